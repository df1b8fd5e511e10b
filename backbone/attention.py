"""Attention for the DeepSeek-V2-family language model: Multi-head Latent Attention (MLA) and plain multi-head attention.

Shape legend: B batch, T new tokens, S cached + new tokens (keys), H heads, D model width, R kv_lora_rank (latent),
P qk_rope_head_dim, N qk_nope_head_dim, V v_head_dim, E head_dim (plain MHA), Q = H*T folded query rows.

MLA (DeepSeek-V2): keys and values are compressed into one normalized latent c_kv (R values per token) plus a single
RoPE key k_pe (P values per token) shared by all heads. Two ways to compute the same attention:
  * expanded ("MHA mode", training and first prefill): kv_b_proj expands c_kv into per-head K_nope and V, then SDPA.
  * absorbed ("MQA mode", decode and chunked prefill): W_UK is folded into the query and W_UV into the output, so
    attention runs directly against the cached latents; the cache holds only c_kv and k_pe, R + P values per token.
Plain MHA (VL2-Tiny, `use_mla: false`) is DeepSeek-MoE v1 / Llama attention with half-split RoPE over the full head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backbone.cache import KVCache
from backbone.config import LanguageModelConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back, then scaled (the official order)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_angles(positions_BT: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, T, dim/2), computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions_BT.device, dtype=torch.float32) / dim))
    angles_BTF = positions_BT.float()[..., None] * inv_freq
    return angles_BTF.cos(), angles_BTF.sin()


def apply_rope_interleaved(x: torch.Tensor, cos_BTF: torch.Tensor, sin_BTF: torch.Tensor) -> torch.Tensor:
    """RoPE on adjacent pairs (x[2i], x[2i+1]): the MLA layout of the checkpoints. x: (B, heads, T, P)."""
    x32 = x.float().unflatten(-1, (-1, 2))
    x0, x1 = x32[..., 0], x32[..., 1]
    cos, sin = cos_BTF[:, None], sin_BTF[:, None]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def apply_rope_half(x: torch.Tensor, cos_BTF: torch.Tensor, sin_BTF: torch.Tensor) -> torch.Tensor:
    """RoPE on halves (x[i], x[i+E/2]) with rotate_half: the Llama layout of plain MHA. x: (B, heads, T, E)."""
    x32 = x.float()
    x0, x1 = x32.chunk(2, dim=-1)
    cos, sin = cos_BTF[:, None], sin_BTF[:, None]
    return torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).to(x.dtype)


def attention_mask_BTS(query_pos_BT: torch.Tensor, key_pos_BS: torch.Tensor, key_valid_BS: torch.Tensor,
                       block_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask (B, T, S): a query sees valid keys at positions <= its own, and always itself-or-earlier slot.

    Positions here are slot indices in the (cache + new) sequence, not RoPE positions, so left padding works.
    `block_ids_BT` (no cache: T == S) marks bidirectional blocks: tokens sharing a block id >= 0 also see each other
    (used for parallel decoding of action positions). A fully padded query row would be all False (NaN in softmax);
    it is allowed to see its own slot instead.
    """
    causal = key_pos_BS[:, None, :] <= query_pos_BT[:, :, None]
    if block_ids_BT is not None:
        same_block = (block_ids_BT[:, :, None] == block_ids_BT[:, None, :]) & (block_ids_BT[:, :, None] >= 0)
        causal = causal | same_block
    mask = causal & key_valid_BS[:, None, :]
    own_slot = key_pos_BS[:, None, :] == query_pos_BT[:, :, None]
    return mask | (own_slot & ~mask.any(-1, keepdim=True))


def attention_inputs(rope_pos_BT: torch.Tensor, slot_pos_BT: torch.Tensor, key_valid_BS: torch.Tensor,
                     block_ids_BT: torch.Tensor | None, rope_dim: int, rope_theta: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What every layer's attention needs of one forward pass, computed once for all layers: the RoPE angles
    (cos, sin: (B, T, rope_dim/2)) and the mask (B, T, S) over the S = cache + new key slots (`attention_mask_BTS`),
    or None where plain causal attention over the T new tokens is the same (no cache before them, nothing padded, no
    bidirectional block): SDPA's causal kernel then runs without a mask. `key_valid_BS` covers all S slots."""
    cos, sin = rope_angles(rope_pos_BT, rope_dim, rope_theta)
    S = key_valid_BS.shape[1]
    no_past = S == slot_pos_BT.shape[1]
    # a data-dependent branch, taken outside the layers (which torch.compile compiles)
    if no_past and block_ids_BT is None and bool(key_valid_BS.all()):
        return cos, sin, None
    key_pos_BS = torch.arange(S, device=slot_pos_BT.device).expand(slot_pos_BT.shape[0], S)
    return cos, sin, attention_mask_BTS(slot_pos_BT, key_pos_BS, key_valid_BS, block_ids_BT)


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: LanguageModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.softmax_scale = self.qk_head_dim**-0.5
        D, H = config.hidden_size, config.num_attention_heads
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, D, bias=False)

    def _query(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        B, T, _ = x_BTD.shape
        return q.view(B, T, self.num_heads, self.qk_head_dim).transpose(1, 2)  # (B, H, T, N+P)

    def forward(self, x_BTD: torch.Tensor, cos_BTF: torch.Tensor, sin_BTF: torch.Tensor, mask_BTS: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        """cos, sin, mask: `attention_inputs` of this pass (rope_dim = qk_rope_head_dim)."""
        B, T, _ = x_BTD.shape
        H, N, P, V, R = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim, self.kv_lora_rank

        q_BHTC = self._query(x_BTD)
        q_nope_BHTN, q_pe_BHTP = q_BHTC.split([N, P], dim=-1)
        q_pe_BHTP = apply_rope_interleaved(q_pe_BHTP, cos_BTF, sin_BTF)

        kv_a = self.kv_a_proj_with_mqa(x_BTD)
        c_kv_BTR, k_pe_BTP = kv_a.split([R, P], dim=-1)
        c_kv_BTR = self.kv_a_layernorm(c_kv_BTR)
        k_pe_BTP = apply_rope_interleaved(k_pe_BTP[:, None], cos_BTF, sin_BTF)[:, 0]

        past_len = 0
        if cache is not None:
            past_len = cache.length
            c_kv_BSR, k_pe_BSP = cache.update_latent(self.layer_idx, c_kv_BTR, k_pe_BTP)
        if cache is None or (past_len == 0 and T > 1):
            out_BHTV = self._expanded(q_nope_BHTN, q_pe_BHTP, c_kv_BTR, k_pe_BTP, mask_BTS)
        else:
            out_BHTV = self._absorbed(q_nope_BHTN, q_pe_BHTP, c_kv_BSR, k_pe_BSP, mask_BTS)
        return self.o_proj(out_BHTV.transpose(1, 2).reshape(B, T, H * V))

    def _expanded(self, q_nope_BHTN, q_pe_BHTP, c_kv_BTR, k_pe_BTP, mask_BTT) -> torch.Tensor:
        """MHA mode: expand the latent into per-head K_nope and V and run SDPA over the T new tokens (no cache before
        them: the mask's S is T)."""
        B, H, T, N = q_nope_BHTN.shape
        kv_BHTC = self.kv_b_proj(c_kv_BTR).view(B, T, H, N + self.v_head_dim).transpose(1, 2)
        k_nope_BHTN, v_BHTV = kv_BHTC.split([N, self.v_head_dim], dim=-1)
        q = torch.cat((q_nope_BHTN, q_pe_BHTP), dim=-1)
        k = torch.cat((k_nope_BHTN, k_pe_BTP[:, None].expand(B, H, T, -1)), dim=-1)
        if mask_BTT is None:
            return F.scaled_dot_product_attention(q, k, v_BHTV, is_causal=True, scale=self.softmax_scale)
        return F.scaled_dot_product_attention(q, k, v_BHTV, attn_mask=mask_BTT[:, None], scale=self.softmax_scale)

    def _absorbed(self, q_nope_BHTN, q_pe_BHTP, c_kv_BSR, k_pe_BSP, mask_BTS) -> torch.Tensor:
        """MQA mode: attention against the cached latents; heads fold into query rows of one shared-KV attention."""
        B, H, T, N = q_nope_BHTN.shape
        S = c_kv_BSR.shape[1]
        w_kvb_HCR = self.kv_b_proj.weight.view(H, N + self.v_head_dim, self.kv_lora_rank)
        w_uk_HNR, w_uv_HVR = w_kvb_HCR.split([N, self.v_head_dim], dim=1)
        q_lat_BHTR = torch.einsum("bhtn,hnr->bhtr", q_nope_BHTN, w_uk_HNR)
        q_BQC = torch.cat((q_lat_BHTR, q_pe_BHTP), dim=-1).reshape(B, 1, H * T, -1)
        k_BSC = torch.cat((c_kv_BSR, k_pe_BSP), dim=-1)[:, None]
        if mask_BTS is None:  # a first chunk of one token: it sees itself
            mask_BTS = torch.ones(B, T, S, dtype=torch.bool, device=q_BQC.device)
        mask_BQS = mask_BTS[:, None].expand(B, H, T, S).reshape(B, 1, H * T, S)
        o_lat_BQR = F.scaled_dot_product_attention(q_BQC, k_BSC, c_kv_BSR[:, None], attn_mask=mask_BQS, scale=self.softmax_scale)
        o_lat_BHTR = o_lat_BQR.view(B, H, T, self.kv_lora_rank)
        return torch.einsum("bhtr,hvr->bhtv", o_lat_BHTR, w_uv_HVR)


class MultiHeadAttention(nn.Module):
    """Plain multi-head attention (VL2-Tiny): q/k/v/o projections without bias, half-split RoPE on the full head."""

    def __init__(self, config: LanguageModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        D = config.hidden_size
        self.q_proj = nn.Linear(D, D, bias=False)
        self.k_proj = nn.Linear(D, D, bias=False)
        self.v_proj = nn.Linear(D, D, bias=False)
        self.o_proj = nn.Linear(D, D, bias=False)

    def forward(self, x_BTD: torch.Tensor, cos_BTF: torch.Tensor, sin_BTF: torch.Tensor, mask_BTS: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        """cos, sin, mask: `attention_inputs` of this pass (rope_dim = head_dim)."""
        B, T, D = x_BTD.shape
        H, E = self.num_heads, self.head_dim
        q_BHTE = apply_rope_half(self.q_proj(x_BTD).view(B, T, H, E).transpose(1, 2), cos_BTF, sin_BTF)
        k_BHTE = apply_rope_half(self.k_proj(x_BTD).view(B, T, H, E).transpose(1, 2), cos_BTF, sin_BTF)
        v_BHTE = self.v_proj(x_BTD).view(B, T, H, E).transpose(1, 2)
        if cache is not None:
            k_BHTE, v_BHTE = cache.update_kv(self.layer_idx, k_BHTE, v_BHTE)
        if mask_BTS is None:
            out = F.scaled_dot_product_attention(q_BHTE, k_BHTE, v_BHTE, is_causal=T > 1)
        else:
            out = F.scaled_dot_product_attention(q_BHTE, k_BHTE, v_BHTE, attn_mask=mask_BTS[:, None])
        return self.o_proj(out.transpose(1, 2).reshape(B, T, D))
