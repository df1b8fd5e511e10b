"""The DeepSeek-V2-family decoder used as DeepSeek-VL2's language model.

Pre-norm decoder: x += attn(rmsnorm(x)); x += mlp(rmsnorm(x)); the MLP is dense SwiGLU for the first
`first_k_dense_replace` layers and DeepSeekMoE after. Untied LM head, logits in fp32. Module names follow the official
checkpoints (`model.layers.N.self_attn.kv_a_proj_with_mqa`, `model.layers.N.mlp.gate`, ...) so the converter only has
to stack or unstack expert weights.

Accounting lives on the model (as nanochat does): `num_parameters`, `num_active_parameters`, `flops_per_token`,
`kv_cache_bytes_per_token`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from backbone.attention import MultiHeadAttention, MultiHeadLatentAttention, RMSNorm, attention_inputs
from backbone.cache import KVCache
from backbone.config import LanguageModelConfig
from backbone.moe import MLP, MoE, RouterOutput, balance_aux_loss


@dataclass
class LMOutput:
    logits: torch.Tensor | None  # (B, T, V) fp32
    hidden_states: torch.Tensor  # (B, T, D) after the final norm
    aux_loss: torch.Tensor | None = None  # summed balance loss over MoE layers (training, softmax routing)
    router: list[RouterOutput | None] = field(default_factory=list)  # per layer; None for dense layers


def grow_rows(weight_VD: torch.Tensor, vocab_size: int, fresh: list[int], noise_FD: torch.Tensor | None) -> torch.Tensor:
    """`weight_VD` grown to `vocab_size` rows: rows `fresh` (ids beyond V are always fresh) become the mean of the
    kept rows + 0.1 x their mean std x `noise_FD` (one row of noise per fresh id, drawn by the caller)."""
    V, D = weight_VD.shape
    grown = torch.empty(vocab_size, D, dtype=weight_VD.dtype, device=weight_VD.device)
    grown[:V] = weight_VD
    if fresh:
        keep = torch.ones(V, dtype=torch.bool)
        keep[[i for i in fresh if i < V]] = False
        kept = weight_VD[keep.to(weight_VD.device)]
        grown[fresh] = kept.mean(0) + 0.1 * kept.std(0).mean() * noise_FD.to(weight_VD.device)
    return grown


class DecoderLayer(nn.Module):
    def __init__(self, config: LanguageModelConfig, layer_idx: int):
        super().__init__()
        attn_cls = MultiHeadLatentAttention if config.use_mla else MultiHeadAttention
        self.self_attn = attn_cls(config, layer_idx)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = MoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x_BTD, cos_BTF, sin_BTF, mask_BTS, cache=None, router_bias_BTE=None):
        """cos, sin, mask: `backbone.attention.attention_inputs` of this forward pass, shared by every layer."""
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos_BTF, sin_BTF, mask_BTS, cache)
        h_BTD = self.post_attention_layernorm(x_BTD)
        if self.is_moe:
            y_BTD, route = self.mlp(h_BTD, router_bias_BTE)
            return x_BTD + y_BTD, route
        return x_BTD + self.mlp(h_BTD), None


class DeepseekV2Model(nn.Module):
    def __init__(self, config: LanguageModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepseekV2LM(nn.Module):
    """Causal LM: `model(input_ids=...)` or `model(inputs_embeds=...)` -> LMOutput with `.logits` (B, T, V)."""

    def __init__(self, config: LanguageModelConfig):
        super().__init__()
        self.config = config
        self.model = DeepseekV2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.pending_rows: dict[str, tuple[list[int], torch.Tensor | None]] = {}  # resize_vocabulary on meta
        if self.lm_head.weight.device.type != "meta":
            self.reset_parameters()

    # ---- init ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
        for layer in self.model.layers:
            if layer.is_moe and hasattr(layer.mlp.gate, "e_score_correction_bias"):
                layer.mlp.gate.e_score_correction_bias.zero_()

    # ---- forward ---------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_router: bool = False,
        logits_to_keep: int = 0,
        compute_logits: bool = True,
        block_ids: torch.Tensor | None = None,
        router_bias: dict[int, torch.Tensor] | None = None,
    ) -> LMOutput:
        """input_ids (B, T) or inputs_embeds (B, T, D); attention_mask (B, T) marks real tokens (left padding).

        `block_ids` (B, T) long, -1 outside blocks: tokens sharing a block id attend to each other bidirectionally
        (causal to everything before them); only without a cache.

        With `cache`, the T tokens are appended to it (prefill or decode). `logits_to_keep=n` computes logits for the
        last n positions only (0 = all). `return_router` returns each MoE layer's expert ids and weights.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x_BTD = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x_BTD.shape
        mask_BT = (torch.ones(B, T, dtype=torch.bool, device=x_BTD.device) if attention_mask is None
                   else attention_mask.to(device=x_BTD.device, dtype=torch.bool))
        if cache is not None:
            if block_ids is not None:
                raise ValueError("bidirectional blocks are only supported without a KV cache")
            rope_pos_BT, slot_pos_BT, key_valid_BS = cache.begin(mask_BT)
        else:
            if T > self.config.max_position_embeddings:
                raise ValueError(f"sequence of {T} tokens exceeds max_position_embeddings {self.config.max_position_embeddings}")
            rope_pos_BT = (mask_BT.long().cumsum(-1) - 1).clamp(min=0)
            slot_pos_BT = torch.arange(T, device=x_BTD.device).expand(B, T)
            key_valid_BS = mask_BT

        cfg = self.config
        cos_BTF, sin_BTF, mask_BTS = attention_inputs(rope_pos_BT, slot_pos_BT, key_valid_BS, block_ids,
                                                      cfg.qk_rope_head_dim if cfg.use_mla else cfg.head_dim, cfg.rope_theta)
        routes: list[RouterOutput | None] = []
        for i, layer in enumerate(self.model.layers):
            bias = router_bias.get(i) if router_bias else None
            if self.gradient_checkpointing and self.training and cache is None:
                x_BTD, route = torch.utils.checkpoint.checkpoint(
                    layer, x_BTD, cos_BTF, sin_BTF, mask_BTS, None, bias, use_reentrant=False)
            else:
                x_BTD, route = layer(x_BTD, cos_BTF, sin_BTF, mask_BTS, cache, bias)
            routes.append(route)
        if cache is not None:
            cache.advance(mask_BT)
        h_BTD = self.model.norm(x_BTD)

        aux_loss = None
        moe_routes = [r for r in routes if r is not None]
        if self.training and moe_routes and cfg.aux_loss_alpha > 0 and cfg.scoring_func == "softmax":
            aux_loss = sum(balance_aux_loss(r, B, cfg.aux_loss_alpha, cfg.seq_aux, token_mask_T=mask_BT.reshape(-1))
                           for r in moe_routes)
        logits = None
        if compute_logits:
            h_keep = h_BTD[:, -logits_to_keep:] if logits_to_keep else h_BTD
            logits = self.lm_head(h_keep).float()
        return LMOutput(logits, h_BTD, aux_loss, routes if return_router else [])

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    @torch.no_grad()
    def resize_vocabulary(self, vocab_size: int, init_ids: list[int] | None = None) -> None:
        """Grow the vocabulary to `vocab_size` rows (embedding and LM head); rows in `init_ids` (and all new rows) are
        set to the mean of the existing rows plus small noise (`grow_rows`), a common choice that keeps new logits on
        scale. The noise is drawn on the CPU generator whatever the device; on `meta` (FSDP2 from the meta device)
        the rule waits in `pending_rows` (parameter name -> (fresh rows, noise)) until the loader has the real rows."""
        old = self.config.vocab_size
        if vocab_size < old:
            raise ValueError(f"cannot shrink the vocabulary from {old} to {vocab_size}")
        fresh = sorted(set(range(old, vocab_size)) | set(init_ids or []))
        for name, module in (("model.embed_tokens.weight", self.model.embed_tokens), ("lm_head.weight", self.lm_head)):
            weight = module.weight
            noise = torch.randn(len(fresh), weight.shape[1], dtype=weight.dtype) if fresh else None
            if weight.is_meta:
                grown = torch.empty(vocab_size, weight.shape[1], dtype=weight.dtype, device="meta")
                self.pending_rows[name] = (fresh, noise)
            else:
                grown = grow_rows(weight.detach(), vocab_size, fresh, noise)
            module.weight = nn.Parameter(grown, requires_grad=weight.requires_grad)
        self.model.embed_tokens.num_embeddings = vocab_size
        self.lm_head.out_features = vocab_size
        self.config.vocab_size = vocab_size

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len, dtype or p.dtype, p.device)

    # ---- load balancing --------------------------------------------------------------------------------------------
    def update_expert_bias(self, rate: float | None = None) -> None:
        """noaux_tc: apply the bias update to every MoE layer (call after each optimizer step)."""
        rate = self.config.bias_update_rate if rate is None else rate
        for layer in self.model.layers:
            if layer.is_moe and hasattr(layer.mlp.gate, "e_score_correction_bias"):
                layer.mlp.gate.update_bias(rate)

    def attach_bias_update(self, optimizer: torch.optim.Optimizer):
        """Run `update_expert_bias` after every `optimizer.step()` (so gradient accumulation counts all micro-batches)."""
        if self.config.topk_method != "noaux_tc" or self.config.bias_update_rate <= 0:
            return None
        return optimizer.register_step_post_hook(lambda *_: self.update_expert_bias())

    # ---- accounting ------------------------------------------------------------------------------------------------
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.model.embed_tokens.weight.numel() if exclude_embeddings else n

    def num_active_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters touched per token: all but the (E - K) routed experts each MoE layer skips."""
        cfg = self.config
        inactive = 0
        for layer in self.model.layers:
            if layer.is_moe:
                per_expert = layer.mlp.experts.gate_up_proj[0].numel() + layer.mlp.experts.down_proj[0].numel()
                inactive += (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
        return self.num_parameters(exclude_embeddings) - inactive

    def flops_per_token(self, context_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 * active matmul params + attention over the context."""
        cfg = self.config
        matmul_params = self.num_active_parameters(exclude_embeddings=True)
        if cfg.use_mla:
            attn_dim = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
        else:
            attn_dim = 2 * cfg.hidden_size
        return 6 * matmul_params + 6 * cfg.num_hidden_layers * attn_dim * context_len

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        return KVCache.values_per_token(self.config) * torch.empty((), dtype=dtype).element_size()


def build_language_model(config: LanguageModelConfig, device: str | torch.device | None = None,
                         dtype: torch.dtype | None = None) -> DeepseekV2LM:
    """Build on `device` (use "meta" to count parameters of big presets without allocating)."""
    with torch.device(device or "cpu"):
        model = DeepseekV2LM(config)
    return model.to(dtype) if dtype is not None else model
