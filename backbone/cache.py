"""A preallocated KV cache for generation.

For MLA layers it stores only what the absorbed decode needs: the normalized latent c_kv (kv_lora_rank values) and the
post-RoPE shared key k_pe (qk_rope_head_dim values) per token -- 576 values per token per layer for VL2-Small/Base --
never the expanded per-head keys and values. Plain-MHA layers (VL2-Tiny) store post-RoPE keys and values per head.

Slots run 0..max_len-1 for every sequence of the batch; left padding is a per-slot `valid_BS` mask, and each sequence
keeps its own RoPE position counter so padded prompts get the same positions as unpadded ones.
"""

from __future__ import annotations

import torch

from backbone.config import LanguageModelConfig


class KVCache:
    def __init__(self, config: LanguageModelConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.config, self.batch_size, self.max_len = config, batch_size, max_len
        self.length = 0  # slots filled (same for the whole batch)
        self.valid_BS = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_rope_pos_B = torch.zeros(batch_size, dtype=torch.long, device=device)
        L = config.num_hidden_layers
        if config.use_mla:
            self.c_kv = [torch.zeros(batch_size, max_len, config.kv_lora_rank, dtype=dtype, device=device) for _ in range(L)]
            self.k_pe = [torch.zeros(batch_size, max_len, config.qk_rope_head_dim, dtype=dtype, device=device) for _ in range(L)]
        else:
            shape = (batch_size, config.num_attention_heads, max_len, config.head_dim)
            self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(L)]
            self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(L)]

    @staticmethod
    def values_per_token(config: LanguageModelConfig) -> int:
        """Cached values per token, summed over layers."""
        per_layer = (config.kv_lora_rank + config.qk_rope_head_dim) if config.use_mla else 2 * config.hidden_size
        return per_layer * config.num_hidden_layers

    def nbytes(self) -> int:
        tensors = (self.c_kv + self.k_pe) if self.config.use_mla else (self.k + self.v)
        return sum(t.numel() * t.element_size() for t in tensors)

    def begin(self, mask_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Register T new tokens (mask: which are real); return (rope_pos_BT, slot_pos_BT, key_valid_BS)."""
        B, T = mask_BT.shape
        if B != self.batch_size:
            raise ValueError(f"cache was built for batch {self.batch_size}, got {B}")
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache full: {self.length} cached + {T} new tokens > max_len {self.max_len}")
        self.valid_BS[:, self.length:self.length + T] = mask_BT
        rope_pos_BT = (self.next_rope_pos_B[:, None] + mask_BT.long().cumsum(-1) - 1).clamp(min=0)
        slot_pos_BT = torch.arange(self.length, self.length + T, device=mask_BT.device).expand(B, T)
        return rope_pos_BT, slot_pos_BT, self.valid_BS[:, : self.length + T]

    def advance(self, mask_BT: torch.Tensor) -> None:
        """Called once all layers have written the new tokens."""
        self.length += mask_BT.shape[1]
        self.next_rope_pos_B += mask_BT.long().sum(-1)

    def update_latent(self, layer: int, c_kv_BTR: torch.Tensor, k_pe_BTP: torch.Tensor):
        end = self.length + c_kv_BTR.shape[1]
        self.c_kv[layer][:, self.length:end] = c_kv_BTR
        self.k_pe[layer][:, self.length:end] = k_pe_BTP
        return self.c_kv[layer][:, :end], self.k_pe[layer][:, :end]

    def update_kv(self, layer: int, k_BHTE: torch.Tensor, v_BHTE: torch.Tensor):
        end = self.length + k_BHTE.shape[2]
        self.k[layer][:, :, self.length:end] = k_BHTE
        self.v[layer][:, :, self.length:end] = v_BHTE
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def truncate(self, length: int) -> None:
        """Forget everything after `length` slots (e.g. to reuse a prefilled prompt)."""
        if length > self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        dropped = self.valid_BS[:, length:self.length].long().sum(-1)
        self.valid_BS[:, length:] = False
        self.next_rope_pos_B -= dropped
        self.length = length
