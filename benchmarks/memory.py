"""`vla bench memory`: bytes per GPU to plan fine-tuning, for the published presets (tiny 3.4B, small 16.1B, base
27.5B), built on the meta device (no memory, no weights) as the policy (one embodiment, action tokens added).

Per preset (weights and optimizer only; activations come on top and scale with micro-batch x sequence length, and
activation checkpointing cuts them):
- inference: bf16 weights (2 B/param).
- full fine-tuning, AdamW with bf16 weights and gradients, fp32 master weights and fp32 moments: 2 + 2 + 4 + 8 =
  16 B/param, on 1 GPU; on 8 GPUs under FSDP2 (trainer `distributed=fsdp`) each GPU holds 1/8 of that plus the
  gathered bf16 weights of the largest sharded unit (a decoder layer; x2 for the prefetch of the next one).
- LoRA r=16 on 1 GPU (`vla train ... peft.method=lora`): frozen bf16 weights (2 B/param) + 16 B per trainable
  parameter + the bf16 copies of the embedding and the LM head that peft's trainable token rows build in each
  forward pass (`trainable_token_indices`).
- the trainable share under LoRA r=16 (adapters + added vocabulary rows + action head, counted on meta) - which is
  also the size of the adapter checkpoint relative to the full one in the same dtype.
- LoRA r=16 with the routed experts adapted too (`peft.experts=true`): the same sum with their adapters, plus one bf16
  copy of the routed experts' weights, W + BA, which peft forms in each forward pass and the expert matmuls keep for
  the backward pass (with activation checkpointing only one layer's at a time).
"""

from __future__ import annotations

import time

import torch

from benchmarks._util import print_table, setup

GB = 1024**3
PRESETS = ("tiny", "small", "base")
FULL_FT_BYTES = 2 + 2 + 4 + 8  # bf16 weight + bf16 grad + fp32 master + fp32 Adam m, v
GPUS = 8


def meta_policy(preset: str):
    """The VLAPolicy of `preset` on the meta device (one 2-D PushT-like embodiment, action and embodiment tokens)."""
    from backbone.deepseek_vl2 import build_deepseek_vl2, deepseek_vl2_preset
    from backbone.tokenizer import build_bpe_tokenizer
    from heads.embodiment import Embodiment, EmbodimentRegistry
    from vla.policy import VLAPolicy, VLAPolicyConfig

    emb = Embodiment("robot", action_dim=7, state_dim=8, cameras=("observation.images.main",), fps=10, chunk_len=8)
    with torch.device("meta"):
        backbone = build_deepseek_vl2(deepseek_vl2_preset(preset), device="meta")
        return VLAPolicy(VLAPolicyConfig(), backbone, build_bpe_tokenizer(vocab_size=300), EmbodimentRegistry([emb]))


def size_preset(preset: str, r: int = 16) -> dict:
    from backbone.moe import GroupedExperts
    from vla.policy.lora import apply_lora, make_lora_config, trainable_count

    policy = meta_policy(preset)
    params = sum(p.numel() for p in policy.parameters())
    unit = max(sum(p.numel() for p in layer.parameters()) for layer in policy.backbone.language.model.layers)
    language = policy.backbone.language
    token_copies = 2 * (language.model.embed_tokens.weight.numel() + language.lm_head.weight.numel())
    routed = sum(p.numel() for m in policy.modules() if isinstance(m, GroupedExperts) for p in m.parameters())
    apply_lora(policy, make_lora_config(policy, r=r), materialize=False)
    trainable, total = trainable_count(policy)
    assert total == params, (total, params)
    with_experts = meta_policy(preset)
    apply_lora(with_experts, make_lora_config(with_experts, r=r, experts=True), materialize=False)
    trainable_e, total_e = trainable_count(with_experts)
    assert total_e == params, (total_e, params)
    return {
        "params": params,
        "lora_trainable": trainable,
        "lora_experts_trainable": trainable_e,
        "inference_gb": 2 * params / GB,
        "full_ft_gb_1gpu": FULL_FT_BYTES * params / GB,
        "full_ft_gb_8gpu": (FULL_FT_BYTES * params / GPUS + 2 * 2 * unit) / GB,
        "lora_gb_1gpu": (2 * params + FULL_FT_BYTES * trainable + token_copies) / GB,
        "lora_trainable_fraction": trainable / params,
        "lora_experts_gb_1gpu": (2 * params + FULL_FT_BYTES * trainable_e + token_copies + 2 * routed) / GB,
        "lora_experts_trainable_fraction": trainable_e / params,
    }


def run(cfg) -> dict:
    setup(cfg)
    presets = list(cfg.get("presets") or []) or (["tiny"] if cfg.get("quick") else list(PRESETS))
    rows, out = [], {}
    for preset in presets:
        t0 = time.perf_counter()
        s = size_preset(preset)
        rows.append([preset, f"{s['params'] / 1e9:.2f}B", f"{s['inference_gb']:.1f}", f"{s['full_ft_gb_1gpu']:.1f}",
                     f"{s['full_ft_gb_8gpu']:.1f}", f"{s['lora_gb_1gpu']:.1f}",
                     f"{s['lora_trainable'] / 1e6:.1f}M ({100 * s['lora_trainable_fraction']:.2f}%)",
                     f"{s['lora_experts_gb_1gpu']:.1f}",
                     f"{s['lora_experts_trainable'] / 1e6:.1f}M ({100 * s['lora_experts_trainable_fraction']:.2f}%)",
                     f"{time.perf_counter() - t0:.1f}"])
        out[preset] = {k: round(s[k], 6 if k.endswith("_fraction") else 2)
                       for k in ("inference_gb", "full_ft_gb_1gpu", "full_ft_gb_8gpu", "lora_gb_1gpu",
                                 "lora_trainable_fraction", "lora_experts_gb_1gpu", "lora_experts_trainable_fraction")}
    print("GB per GPU (weights + optimizer; activations on top), built on the meta device")
    print_table(["preset", "params", "bf16 inference", "full FT 1 GPU", "full FT 8 GPU (FSDP)", "LoRA r=16 1 GPU",
                 "LoRA trainable", "LoRA + experts 1 GPU", "LoRA + experts trainable", "build s"], rows)
    return out
