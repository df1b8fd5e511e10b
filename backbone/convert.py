"""Checkpoint key surgery, in one place: official DeepSeek(-VL2) naming <-> this package's module names.

Ours differ from the official layout in one way only: routed experts are stacked per layer,
    model.layers.N.mlp.experts.gate_up_proj  (E, 2F, D)  = cat(experts.e.gate_proj.weight, experts.e.up_proj.weight)
    model.layers.N.mlp.experts.down_proj     (E, D, F)   = experts.e.down_proj.weight
Official files name every expert (`model.layers.N.mlp.experts.E.gate_proj.weight`), optionally under `language.` as in
DeepSeek-VL2 checkpoints; transformers' `DeepseekV2ForCausalLM.save_pretrained` writes the same per-expert names.
Stacked names (as transformers holds them in memory) are accepted on input too.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")

# Official tensors that exist in some checkpoints but have no counterpart here (buffers, unused heads).
IGNORED_LANGUAGE_KEYS = re.compile(r"(rotary_emb\.inv_freq|\.rotary_emb\.|^rm_head\.)")


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keep keys under `prefix` (e.g. "language.") without it; if no key has it, return the dict unchanged."""
    if not any(k.startswith(prefix) for k in state):
        return state
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def language_from_official(state: dict[str, torch.Tensor], num_experts: int | None) -> dict[str, torch.Tensor]:
    """Official / transformers per-expert naming -> ours (experts stacked). Non-expert keys pass through."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    for key, tensor in state.items():
        if IGNORED_LANGUAGE_KEYS.search(key):
            continue
        m = _EXPERT_RE.match(key)
        if m:
            experts[m.group(1)][int(m.group(2))][m.group(3)] = tensor
        else:
            out[key] = tensor
    for prefix, per_expert in experts.items():
        expected = set(range(num_experts or 0))
        if set(per_expert) != expected:
            missing = sorted(expected - set(per_expert))
            extra = sorted(set(per_expert) - expected)
            raise KeyError(f"{prefix}: expert tensors missing for experts {missing[:8]}{'...' if len(missing) > 8 else ''}"
                           f"{' and unexpected experts ' + str(extra[:8]) if extra else ''}")
        for e, parts in sorted(per_expert.items()):
            for name in ("gate_proj", "up_proj", "down_proj"):
                if name not in parts:
                    raise KeyError(f"missing tensor {prefix}.{e}.{name}.weight")
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat((per_expert[e]["gate_proj"], per_expert[e]["up_proj"]), 0) for e in sorted(per_expert)])
        out[f"{prefix}.down_proj"] = torch.stack([per_expert[e]["down_proj"] for e in sorted(per_expert)])
    return out


def language_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> official per-expert naming (what DeepSeek's and transformers' loaders read)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key[: -len(".gate_up_proj")]
            gate, up = tensor.chunk(2, dim=1)
            for e in range(tensor.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = gate[e].contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = up[e].contiguous()
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key[: -len(".down_proj")]
            for e in range(tensor.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = tensor[e].contiguous()
        else:
            out[key] = tensor.contiguous()
    return out


# ---- DeepSeek-VL2 vision (timm naming) <-> transformers SigLIP names inside our VisionEncoder ----------------------

_SIGLIP = "vision_encoder.vision.vision_model"
_TIMM_BLOCK_RE = re.compile(r"^vision\.blocks\.(\d+)\.(.+)$")
_TIMM_BLOCK_PARTS = {
    "norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}


def vision_from_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`vision.*` (timm) / `projector.*` / `image_newline` / `view_seperator` -> our VisionEncoder keys.

    The fused qkv rows (q | k | v) are split into q/k/v projections; `vision.attn_pool.*` is dropped (DeepSeek-VL2
    builds the pooling head but never uses it).
    """
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if key.startswith("vision.attn_pool."):
            continue
        if key in ("image_newline", "view_seperator") or key.startswith("projector."):
            out[f"vision_encoder.{key}"] = t
        elif key == "vision.pos_embed":
            out[f"{_SIGLIP}.embeddings.position_embedding.weight"] = t.reshape(t.shape[-2], t.shape[-1])
        elif key.startswith("vision.patch_embed.proj."):
            out[f"{_SIGLIP}.embeddings.patch_embedding.{key.rsplit('.', 1)[1]}"] = t
        elif key.startswith("vision.norm."):
            out[f"{_SIGLIP}.post_layernorm.{key.rsplit('.', 1)[1]}"] = t
        elif m := _TIMM_BLOCK_RE.match(key):
            layer, rest = m.groups()
            module, _, leaf = rest.rpartition(".")
            prefix = f"{_SIGLIP}.encoder.layers.{layer}"
            if module == "attn.qkv":
                for name, part in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                    out[f"{prefix}.self_attn.{name}.{leaf}"] = part.contiguous()
            elif module in _TIMM_BLOCK_PARTS:
                out[f"{prefix}.{_TIMM_BLOCK_PARTS[module]}.{leaf}"] = t
            else:
                raise KeyError(f"unexpected vision tensor {key}")
        elif key.startswith("vision."):
            raise KeyError(f"unexpected vision tensor {key}")
        else:
            out[key] = t
    return out


def vision_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `vision_from_official` (no attn_pool tensors are written)."""
    out: dict[str, torch.Tensor] = {}
    block_parts = {v: k for k, v in _TIMM_BLOCK_PARTS.items()}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = defaultdict(dict)
    for key, t in state.items():
        if key.startswith("vision_encoder.") and not key.startswith(_SIGLIP):
            out[key[len("vision_encoder."):]] = t
        elif key.startswith(_SIGLIP):
            rest = key[len(_SIGLIP) + 1:]
            if rest == "embeddings.position_embedding.weight":
                out["vision.pos_embed"] = t[None]
            elif rest.startswith("embeddings.patch_embedding."):
                out[f"vision.patch_embed.proj.{rest.rsplit('.', 1)[1]}"] = t
            elif rest.startswith("post_layernorm."):
                out[f"vision.norm.{rest.rsplit('.', 1)[1]}"] = t
            elif rest.startswith("encoder.layers."):
                layer, sub = rest[len("encoder.layers."):].split(".", 1)
                module, _, leaf = sub.rpartition(".")
                if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                    qkv[(layer, leaf)][module[-6]] = t
                else:
                    out[f"vision.blocks.{layer}.{block_parts[module]}.{leaf}"] = t
            else:
                raise KeyError(f"no official name for {key}")
        else:
            out[key] = t
    for (layer, leaf), parts in qkv.items():
        out[f"vision.blocks.{layer}.attn.qkv.{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def deepseek_vl2_from_official(state: dict[str, torch.Tensor], num_experts: int | None) -> dict[str, torch.Tensor]:
    """A whole official DeepSeek-VL2 state dict -> our DeepseekVL2 keys."""
    language = {k[len("language."):]: v for k, v in state.items() if k.startswith("language.")}
    rest = {k: v for k, v in state.items() if not k.startswith("language.")}
    out = vision_from_official(rest)
    out.update({f"language.{k}": v for k, v in language_from_official(language, num_experts).items()})
    return out


def deepseek_vl2_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    language = {k[len("language."):]: v for k, v in state.items() if k.startswith("language.")}
    rest = {k: v for k, v in state.items() if not k.startswith("language.")}
    out = {k: v.contiguous() for k, v in vision_to_official(rest).items()}
    out.update({f"language.{k}": v for k, v in language_to_official(language).items()})
    return out
