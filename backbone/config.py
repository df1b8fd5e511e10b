"""Plain-dataclass configuration of the DeepSeek-V2-family language model used by DeepSeek-VL2.

Field names follow the published `language_config` (DeepseekV2Config) so that `config.json` files map one to one;
`LanguageModelConfig.from_dict` accepts both the official files and those written by transformers 5.x (which stores
`rope_parameters` instead of `rope_theta`). Presets `tiny`, `small`, `base` are the published DeepSeek-VL2 numbers
(docs/architecture.md, "Presets and config.json").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")


@dataclass
class LanguageModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 2560
    intermediate_size: int = 12288  # dense MLP (layers < first_k_dense_replace)
    moe_intermediate_size: int = 1536  # one routed expert; shared experts use n_shared_experts times this
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    # attention: MLA (DeepSeek-V2) or plain multi-head attention (VL2-Tiny, `use_mla: false`)
    use_mla: bool = True
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # mixture of experts
    n_routed_experts: int | None = 72
    n_shared_experts: int | None = 2
    num_experts_per_tok: int = 6
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.0
    # load balancing (training only)
    aux_loss_alpha: float = 0.001  # sequence-level auxiliary loss for softmax routing (0 disables)
    seq_aux: bool = True
    bias_update_rate: float = 0.001  # noaux_tc: DeepSeek-V3 bias nudge per optimizer step (0 disables)
    # the rest
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"topk_method must be one of {TOPK_METHODS}, got {self.topk_method!r}")
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(f"scoring_func must be one of {SCORING_FUNCS}, got {self.scoring_func!r}")
        if self.topk_method == "noaux_tc" and self.scoring_func != "sigmoid":
            raise ValueError("topk_method 'noaux_tc' needs scoring_func 'sigmoid'")
        if self.n_routed_experts:
            if self.num_experts_per_tok > self.n_routed_experts:
                raise ValueError("num_experts_per_tok cannot exceed n_routed_experts")
            if self.n_routed_experts % max(self.n_group, 1):
                raise ValueError("n_routed_experts must be divisible by n_group")
        if not self.use_mla and self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads for multi-head attention")

    # ---- derived sizes ------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """Plain multi-head attention head size (use_mla=False)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return bool(self.n_routed_experts) and layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    # ---- config.json round trip -----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LanguageModelConfig":
        """From an official `language_config` or a transformers `config.json`; unknown keys are ignored, absent keys
        take the official code defaults (not this class's base preset), as DeepseekV2Config does."""
        d = dict(d)
        if "rope_theta" not in d and isinstance(d.get("rope_parameters"), dict):
            d["rope_theta"] = d["rope_parameters"].get("rope_theta", 10000.0)
        if isinstance(d.get("rope_scaling"), dict) and d["rope_scaling"].get("type", d["rope_scaling"].get("rope_type")) not in (None, "default"):
            raise NotImplementedError(f"rope_scaling {d['rope_scaling']} is not supported (DeepSeek-VL2 uses plain RoPE)")
        official_defaults = dict(
            vocab_size=102400, hidden_size=4096, intermediate_size=11008, moe_intermediate_size=1407,
            num_hidden_layers=30, num_attention_heads=32, use_mla=True, q_lora_rank=1536, kv_lora_rank=512,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=None, n_shared_experts=None,
            num_experts_per_tok=None, first_k_dense_replace=0, moe_layer_freq=1, topk_method="greedy",
            scoring_func="softmax", n_group=None, topk_group=None, norm_topk_prob=False, routed_scaling_factor=1.0,
            aux_loss_alpha=0.001, seq_aux=True, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=2048,
            initializer_range=0.02, bos_token_id=100000, eos_token_id=100001, pad_token_id=None, tie_word_embeddings=False,
        )
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: d.get(k, v) for k, v in official_defaults.items()}
        values.update({k: v for k, v in d.items() if k in names and k not in official_defaults})
        values["n_group"] = values["n_group"] or 1
        values["topk_group"] = values["topk_group"] or 1
        values["num_experts_per_tok"] = values["num_experts_per_tok"] or 1
        if not values["use_mla"]:
            values.update(kv_lora_rank=0, qk_nope_head_dim=0, qk_rope_head_dim=0, v_head_dim=0, q_lora_rank=None)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The official `language_config` form (plus `model_type`), readable by `from_dict` and by transformers."""
        d = dataclasses.asdict(self)
        d.update(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], hidden_act="silu",
                 num_key_value_heads=self.num_attention_heads, attention_bias=False, ep_size=1)
        return d


def _preset(**kw: Any) -> LanguageModelConfig:
    return LanguageModelConfig(**kw)


# Published DeepSeek-VL2 language configs (docs/architecture.md, "Presets and config.json").
PRESETS: dict[str, LanguageModelConfig] = {
    "tiny": _preset(
        vocab_size=129280, hidden_size=1280, intermediate_size=6848, moe_intermediate_size=896, num_hidden_layers=12,
        num_attention_heads=10, use_mla=False, kv_lora_rank=0, qk_nope_head_dim=0, qk_rope_head_dim=0, v_head_dim=0,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, topk_method="greedy", scoring_func="softmax",
        norm_topk_prob=False, routed_scaling_factor=1.0, bos_token_id=0, eos_token_id=1,
    ),
    "small": _preset(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
        num_attention_heads=16, use_mla=True, kv_lora_rank=512, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
        routed_scaling_factor=1.0, bos_token_id=100000, eos_token_id=100001,
    ),
    "base": _preset(
        vocab_size=129280, hidden_size=2560, intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=32, use_mla=True, kv_lora_rank=512, n_routed_experts=72, n_shared_experts=2,
        num_experts_per_tok=6, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
        routed_scaling_factor=2.0, bos_token_id=0, eos_token_id=1,
    ),
}


def language_preset(name: str, **overrides: Any) -> LanguageModelConfig:
    """A copy of a published preset, optionally with fields replaced (e.g. `vocab_size` for a custom tokenizer)."""
    if name not in PRESETS:
        raise KeyError(f"unknown language-model preset {name!r}; known: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def tiny_test_config(**overrides: Any) -> LanguageModelConfig:
    """A CPU-sized config for tests and smoke runs (hidden 64, 8 experts)."""
    base = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, use_mla=True, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, topk_method="greedy", scoring_func="softmax",
        norm_topk_prob=False, routed_scaling_factor=1.0, max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
    )
    base.update(overrides)
    return LanguageModelConfig(**base)

