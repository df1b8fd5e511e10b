"""LoRA fine-tuning of a `VLAPolicy` through the peft library (no hand-written LoRA).

What is adapted (`lora_target_names`): every `nn.Linear` of the language model's attention (MLA `q_proj` or
`q_a_proj`/`q_b_proj`, `kv_a_proj_with_mqa`, `kv_b_proj`, `o_proj`), of the dense MLPs and of the shared experts,
and of the vision projector. Frozen: the vision tower, the router and, by default, the routed experts. With
`experts=True` (`vla train peft.experts=true`) the routed experts are adapted too: `GroupedExperts` keeps each
layer's experts in two fused 3-D parameters (`gate_up_proj` (E, 2F, D), `down_proj` (E, D, F)), which peft adapts
through `target_parameters` (one rank-r pair per expert, added to the weight inside the forward; peft allows no
dropout there).

What trains in full beside the adapters:
- the rows of the vocabulary this policy added (action bins and embodiment tokens), in the input embedding and in
  the LM head, through peft's `trainable_token_indices` (the rest of both matrices stays frozen);
- the action head (`queries`, `offset_head`, `state_proj`, `box_proj`, `router_prior`), through peft's `modules_to_save`.

A LoRA checkpoint of `vla train` is a folder with `adapter_config.json` + `adapter_model.safetensors` (peft's
files: the adapters and the trained extras only), `policy_config.json` (with a `lora` entry naming the base and its
fingerprint) and the tokenizer. `VLAPolicy.load` reads it (base + adapter); `vla merge-lora CKPT out=DIR` writes a
full policy folder whose `backbone/` is an official-format DeepSeek-VL2 checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: module names (relative to the VLAPolicy) adapted by default: attention projections, dense / shared-expert MLPs,
#: the vision projector's linear layers
LORA_TARGET_PATTERN = (r"backbone\.(language\.model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|"
                       r"kv_a_proj_with_mqa|kv_b_proj|o_proj)|mlp\.(shared_experts\.)?(gate_proj|up_proj|down_proj))"
                       r"|vision_encoder\.projector\.layers\.\d+)")
#: the routed experts' fused parameters (backbone.moe.GroupedExperts), adapted with `experts=True`
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
#: VLAPolicy submodules trained in full (peft `modules_to_save`)
HEAD_MODULES = ("queries", "offset_head", "state_proj", "box_proj", "router_prior")


class LoraError(ValueError):
    """A LoRA setting or checkpoint that cannot work (one clear line)."""


def _linear_names(module: nn.Module, prefix: str = "") -> list[str]:
    return [prefix + name for name, m in module.named_modules() if isinstance(m, nn.Linear)]


def _fullmatch(pattern: str, name: str) -> bool:
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def lora_target_names(policy: nn.Module, prefix: str = "", targets: list[str] | str | None = None) -> list[str]:
    """Full names of the `nn.Linear` modules to adapt. `targets`: None = the default set (`LORA_TARGET_PATTERN`);
    else regular expressions / name suffixes, each of which must match at least one linear layer (LoraError)."""
    linear = _linear_names(policy)
    if targets is None:
        names = [n for n in linear if re.fullmatch(LORA_TARGET_PATTERN, n)]
    else:
        names = []
        for target in [targets] if isinstance(targets, str) else list(targets):
            hits = [n for n in linear if n == target or n.endswith("." + target) or _fullmatch(target, n)]
            if not hits:
                leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
                raise LoraError(f"peft target {target!r} matches no linear layer of the policy (layer names end in: "
                                f"{', '.join(leaves)})")
            names += [n for n in hits if n not in names]
    return [prefix + n for n in names]


def new_token_ids(policy) -> list[int]:
    """The vocabulary rows this policy added: embodiment tokens and action bins."""
    return sorted({policy.tokenizer.token_id(t) for t in policy.registry.special_tokens(policy.config.n_bins)})


def expert_target_parameters(policy: nn.Module, prefix: str = "") -> list[str]:
    """Full names of the routed experts' fused parameters (every MoE layer's `gate_up_proj` and `down_proj`)."""
    from backbone.moe import GroupedExperts

    return [f"{prefix}{name}.{param}" for name, module in policy.named_modules() if isinstance(module, GroupedExperts)
            for param in EXPERT_PARAMETERS]


def make_lora_config(policy, r: int = 16, alpha: int | None = None, dropout: float = 0.0,
                     targets: list[str] | str | None = None, prefix: str = "", experts: bool = False):
    """A peft LoraConfig for `policy` (a VLAPolicy; `prefix` = its name inside a wrapper, e.g. "model." in the
    lerobot plugin); `experts`: the routed experts too."""
    from peft import LoraConfig

    if experts and dropout:
        raise LoraError(f"LoRA on the routed experts takes no dropout (peft adds their update to the weight, not to "
                        f"an activation): set peft.dropout=0, or leave peft.experts off (dropout {dropout})")
    return LoraConfig(**default_peft_targets(policy, prefix, targets, experts), r=int(r),
                      lora_alpha=int(alpha if alpha is not None else 2 * r), lora_dropout=float(dropout))


def default_peft_targets(policy, prefix: str = "", targets: list[str] | str | None = None,
                         experts: bool = False) -> dict[str, Any]:
    """peft config fields: `target_modules`, `modules_to_save` (the action head), `trainable_token_indices` (the
    added vocabulary rows of the embedding and the LM head), and with `experts` `target_parameters` (the routed
    experts)."""
    ids = new_token_ids(policy)
    present = [m for m in HEAD_MODULES if getattr(policy, m, None) is not None]
    fields = {
        "target_modules": lora_target_names(policy, prefix, targets),
        "modules_to_save": [prefix + m for m in present],
        "trainable_token_indices": {prefix + "backbone.language.model.embed_tokens": ids,
                                    prefix + "backbone.language.lm_head": ids},
    }
    if experts:
        fields["target_parameters"] = expert_target_parameters(policy, prefix)
        if not fields["target_parameters"]:
            raise LoraError("peft.experts: this model has no routed experts (no MoE layer)")
    return fields


def _adapted_weights(policy) -> list[str]:
    """The state-dict name of the base weight under each adapter: `<layer>.base_layer.weight` for a linear layer,
    `<experts>.base_layer[.base_layer].<parameter>` for the routed experts (peft nests one wrapper per parameter)."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    module_names = {id(module): name for name, module in policy.named_modules()}
    names = []
    for name, layer in policy.named_modules():
        if isinstance(layer, ParamWrapper):
            names.append(f"{module_names[id(layer.get_base_layer())]}.{layer.parameter_name}")
        elif isinstance(layer, LoraLayer):
            names.append(f"{name}.base_layer.weight")
    return names


def base_fingerprint(policy, state_dict: dict[str, torch.Tensor] | None = None) -> str:
    """A digest of the base weights under the adapters (name, shape and sum of every adapted weight): an
    adapter loaded onto another base fails with a clear error instead of acting wrongly. From `state_dict` (full
    tensors, e.g. gathered from FSDP2 shards) where given, else the policy's own weights ("meta" on meta)."""
    state = state_dict if state_dict is not None else policy.state_dict(keep_vars=True)
    h = hashlib.sha256()
    for name in _adapted_weights(policy):
        weight = state[name]
        if weight.is_meta:  # sizing on the meta device, or FSDP2 before the shards are read: no values to digest
            return "meta"
        h.update(f"{name}:{tuple(weight.shape)}:{float(weight.detach().double().sum()):.6e};".encode())
    return h.hexdigest()[:16]


def init_adapters(policy, seed: int = 0, materialize: bool = True) -> None:
    """peft's default LoRA init (A as `nn.Linear` inits its weight, kaiming-uniform with a = sqrt(5); B zero), each
    layer's A drawn from a generator seeded by `seed` and the layer's name: the same values whether the base was
    built on the CPU or on `meta` (where peft's own draws are lost when it moves the adapters to the base's device;
    the adapters are then allocated on the CPU here and the trainer shards them with the rest; `materialize=False`
    leaves them on meta, for sizing)."""
    from peft.tuners.lora import LoraLayer

    for name, layer in policy.named_modules():
        if not isinstance(layer, LoraLayer) or "default" not in layer.lora_A:
            continue
        A, B = layer.lora_A["default"], layer.lora_B["default"]
        if A.weight.is_meta and not materialize:
            continue
        for adapter in (A, B):
            if adapter.weight.is_meta:
                adapter.to_empty(device="cpu")
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        with torch.no_grad():
            nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5), generator=generator)
            B.weight.zero_()
            if B.bias is not None:
                B.bias.zero_()


def apply_lora(policy, config, seed: int = 0, materialize: bool = True) -> Any:
    """Inject the adapters of peft `config` into `policy` in place (base frozen; adapters, added token rows and the
    head trainable; adapters initialized by `init_adapters(seed)`). Returns peft's LoraModel around it (kept on the
    policy for merging). On a backbone built on `meta` the trainable token rows wait for the base rows
    (`token_row_sources`, read by `vla.train.fsdp_load`)."""
    from peft.tuners.lora import LoraModel

    tuner = LoraModel(policy, config, "default")
    init_adapters(policy, seed, materialize)
    policy.__dict__["_peft_tuner"] = tuner  # not a submodule (the tuner holds the policy)
    policy.__dict__["_lora_fingerprint"] = base_fingerprint(policy)
    return tuner


def token_row_sources(policy) -> dict[str, list[tuple[str, list[int]]]]:
    """peft's trainable token rows start as rows of the base matrix: base weight name (as the files name it) ->
    [(the rows' parameter name, row ids)] (FSDP2 from the meta device fills them when it reads the base)."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    from vla.train.fsdp_load import canonical_name

    out: dict[str, list[tuple[str, list[int]]]] = {}
    for name, layer in policy.named_modules():
        if isinstance(layer, TrainableTokensLayer) and "default" in layer.token_indices:
            out.setdefault(canonical_name(f"{name}.base_layer.weight"), []).append(
                (f"{name}.trainable_tokens_delta.default", list(layer.token_indices["default"])))
    return out


def is_lora(policy) -> bool:
    return "_peft_tuner" in policy.__dict__


def trainable_count(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of a policy with or without adapters; the total counts the model once (peft's
    adapters, token deltas and head copies are not part of it)."""
    trainable = total = 0
    for name, p in module.named_parameters():
        if ".lora_" not in name and "trainable_tokens_delta" not in name and ".modules_to_save." not in name:
            total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def adapter_state(policy, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapters and the trained extras (peft's adapter state dict) from `state_dict` (default the policy's)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(policy, state_dict=state_dict, adapter_name="default")
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_adapter(policy, directory: str | Path, base: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors + policy_config.json (lora: base, fingerprint) + tokenizer."""
    import dataclasses

    from safetensors.torch import save_file

    from vla.policy.checkpoint import POLICY_CONFIG

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = policy.peft_config["default"]
    config_dict = config.to_dict()
    for key, value in config_dict.items():  # sets -> sorted lists (json)
        if isinstance(value, set):
            config_dict[key] = sorted(value)
    config_dict["base_model_name_or_path"] = str(base)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config_dict, indent=2, default=str))
    save_file(adapter_state(policy, state_dict), str(directory / ADAPTER_WEIGHTS))
    policy.tokenizer.save(directory)
    if policy.__dict__["_lora_fingerprint"] == "meta" and state_dict is not None:  # FSDP2 from meta: the gathered base
        policy.__dict__["_lora_fingerprint"] = base_fingerprint(policy, state_dict)
    meta = {"config": dataclasses.asdict(policy.config), "registry": policy.registry.to_dict(),
            "normalizer_stats": policy.normalizer_stats,
            "lora": {"base": str(base), "fingerprint": policy.__dict__["_lora_fingerprint"]}}
    (directory / POLICY_CONFIG).write_text(json.dumps(meta, indent=2))


def is_adapter_checkpoint(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file() and (Path(path) / ADAPTER_WEIGHTS).is_file()


def load_base_backbone(base: str | Path):
    """The DeepSeek-VL2 model of a base: an official-format folder or a policy checkpoint (its backbone/)."""
    from backbone.deepseek_vl2 import load_deepseek_vl2
    from vla.policy.checkpoint import BACKBONE_DIR, POLICY_CONFIG

    base = Path(base)
    if (base / POLICY_CONFIG).is_file() and (base / BACKBONE_DIR).is_dir():
        return load_deepseek_vl2(base / BACKBONE_DIR)
    return load_deepseek_vl2(base)


def load_base_head(policy, base: str | Path) -> None:
    """When the base is a policy checkpoint, its action head (where names and shapes agree) into `policy`."""
    from backbone.checkpoint import read_safetensors_file
    from vla.policy.checkpoint import POLICY_WEIGHTS

    path = Path(base) / POLICY_WEIGHTS
    if not path.is_file():
        return
    own = policy.state_dict()
    state = {k: v for k, v in read_safetensors_file(path).items() if k in own and own[k].shape == v.shape}
    policy.load_state_dict(state, strict=False)


def load_adapter_policy(path: str | Path, device: str | torch.device = "cpu", base: str | Path | None = None):
    """A VLAPolicy with the adapter of checkpoint `path` on its base (`base` overrides the recorded one)."""
    from peft import LoraConfig, set_peft_model_state_dict

    from backbone.checkpoint import read_json_file, read_safetensors_file
    from backbone.tokenizer import load_tokenizer
    from heads.embodiment import EmbodimentRegistry
    from vla.policy.checkpoint import POLICY_CONFIG
    from vla.policy.model import VLAPolicy, VLAPolicyConfig

    path = Path(path)
    meta = read_json_file(path / POLICY_CONFIG)
    lora_meta = meta.get("lora") or {}
    base = Path(base or lora_meta.get("base") or "")
    if not base.is_dir():
        raise LoraError(f"{path}: the adapter's base {str(base)!r} is not a folder (pass the base checkpoint)")
    policy = VLAPolicy(VLAPolicyConfig(**meta["config"]), load_base_backbone(base), load_tokenizer(path),
                       EmbodimentRegistry.from_dict(meta["registry"]), meta.get("normalizer_stats"))
    load_base_head(policy, base)
    raw = json.loads((path / ADAPTER_CONFIG).read_text())
    fields = {k: v for k, v in raw.items() if k in LoraConfig.__dataclass_fields__}
    config = LoraConfig(**fields)
    try:
        apply_lora(policy, config)
    except ValueError as error:  # peft: a target module not found in the base
        raise LoraError(f"{path}: the base {base} does not match the adapter: {str(error).splitlines()[0]}") from None
    fingerprint = policy.__dict__["_lora_fingerprint"]
    if lora_meta.get("fingerprint") and fingerprint != lora_meta["fingerprint"]:
        raise LoraError(f"{path}: the base {base} does not match the adapter (base weights fingerprint {fingerprint}, "
                        f"the adapter was trained on {lora_meta['fingerprint']})")
    result = set_peft_model_state_dict(policy, read_safetensors_file(path / ADAPTER_WEIGHTS), adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise LoraError(f"{path}: the base {base} does not match the adapter: unexpected weights {unexpected[:3]}")
    return policy.to(device).eval()


def load_adapter_weights(policy, path: str | Path) -> None:
    """The adapter weights of checkpoint `path` into `policy`, which already carries the same adapters (resume)."""
    from peft import set_peft_model_state_dict

    from backbone.checkpoint import read_safetensors_file

    result = set_peft_model_state_dict(policy, read_safetensors_file(Path(path) / ADAPTER_WEIGHTS), adapter_name="default")
    if getattr(result, "unexpected_keys", []):
        raise LoraError(f"{path}: adapter weights do not fit this policy: {result.unexpected_keys[:3]}")


def merge_lora(policy):
    """Fold the adapters, the trained token rows and the head copies into plain modules (in place); returns the
    plain VLAPolicy."""
    tuner = policy.__dict__.pop("_peft_tuner", None)
    if tuner is None:
        raise LoraError("the policy carries no LoRA adapter")
    policy.__dict__.pop("_lora_fingerprint", None)
    merged = tuner.merge_and_unload()
    for attr in ("peft_config",):
        merged.__dict__.pop(attr, None)
    return merged


def head_rows(lm_head: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the LM head's weight, with peft's trained token rows where the head carries them (without
    materializing the whole merged matrix)."""
    adapter = getattr(lm_head, "token_adapter", None)
    weight = lm_head.weight if adapter is None else adapter.get_base_layer().weight
    rows = weight[ids]
    if adapter is None or adapter.disable_adapters or adapter.merged:
        return rows
    for name in adapter.active_adapters:
        if name not in adapter.token_indices:
            continue
        index = {t: i for i, t in enumerate(adapter.token_indices[name])}
        pos, src = [], []
        for j, t in enumerate(ids.tolist()):
            if t in index:
                pos.append(j)
                src.append(index[t])
        if pos:
            delta = adapter.trainable_tokens_delta[name][torch.tensor(src, device=rows.device)].to(rows)
            rows = rows.index_copy(0, torch.tensor(pos, device=rows.device), delta)
    return rows
