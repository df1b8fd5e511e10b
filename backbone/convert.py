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
