"""FSDP2 from the meta device: every process builds the model on `meta` (no memory), shards it with `fully_shard`,
allocates only its own shards (`to_empty`) and fills them from the checkpoint files, one group of tensors at a
time (a decoder layer, a vision block, or one tensor), so that no process - rank 0 included - ever holds the full
model.

Sources: official-format DeepSeek-VL2 folders (single or sharded safetensors; a trainer checkpoint of a VL stage, or
a policy checkpoint's `backbone/`), converted group by group with `backbone.convert.deepseek_vl2_from_official`
(the only key surgery), plus safetensors files already in the module's naming (a policy's
`policy_head.safetensors`) and `extras` (values built in memory, e.g. a fresh action head).

Each safetensors file is opened (memory-mapped) per group and closed after it, so the pages read do not accumulate
in the process's resident memory.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn



@dataclass
class MetaInit:
    """Where the weights of a module built on `meta` come from (applied in order: extras, files, folders, after)."""

    folders: list[tuple[str, Path]] = field(default_factory=list)  # (key prefix in the module, official folder)
    files: list[tuple[str, Path]] = field(default_factory=list)  # (key prefix, safetensors in the module's naming)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # full name -> value (CPU)
    num_experts: int | None = None
    # vocabulary rows added on meta (`DeepseekV2LM.pending_rows`, keyed by full name): a source tensor with fewer
    # rows than its target grows by `grow_rows` (fresh rows, noise) when it is read
    grow: dict[str, tuple[list[int], torch.Tensor | None]] = field(default_factory=dict)
    # tensors whose value is rows of another (peft's trainable token rows start as the base rows): source name ->
    # [(target name, row ids)]
    derive: dict[str, list[tuple[str, list[int]]]] = field(default_factory=dict)
    after: dict[str, torch.Tensor] = field(default_factory=dict)  # full name -> value, last (a resumed adapter)


#: what peft inserts into a wrapped module's names (LoRA's base_layer, trainable tokens' token_adapter, the two
#: copies of a modules_to_save module); the files name the module without them
_PEFT_INSERTION = re.compile(r"\.(base_layer|token_adapter|original_module|modules_to_save\.default)(?=\.)")


def canonical_name(name: str) -> str:
    """A parameter's name as the checkpoint files give it (peft's insertions removed)."""
    return _PEFT_INSERTION.sub("", name)


def snapshot_to_meta(module: nn.Module) -> dict[str, torch.Tensor]:
    """Values of every parameter and buffer not on `meta` (copied to CPU: a fresh head, LoRA adapters); the module
    then moves to `meta` entirely (so that FSDP2 shards one kind of tensor)."""
    extras = {}
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if not tensor.is_meta:
            extras[name] = tensor.detach().cpu().clone()
    module.to("meta")
    return extras


def _official_keys(folder: Path) -> dict[str, Path]:
    """tensor name -> file, for a single-file or sharded official folder."""
    from safetensors import safe_open

    from backbone.checkpoint import INDEX_NAME, SINGLE_NAME, CheckpointError

    index = folder / INDEX_NAME
    if index.is_file():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    files = [folder / SINGLE_NAME] if (folder / SINGLE_NAME).is_file() else sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no safetensors files found")
    keys = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            keys.update({k: file for k in f.keys()})
    return keys


def _read(keys: list[str], where: dict[str, Path]) -> dict[str, torch.Tensor]:
    """The tensors `keys` (full copies), each file opened for this group only."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for key in keys:
        by_file.setdefault(where[key], []).append(key)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in names:
                out[name] = f.get_tensor(name)  # a copy (the file is unmapped when the group is done)
    return out


_EXPERT_KEY = re.compile(r"^((?:language\.)?model\.layers\.\d+\.mlp\.experts)\.(\d+)\.")


def _renumber(key: str, shift: int) -> str:
    m = _EXPERT_KEY.match(key)
    return f"{m.group(1)}.{int(m.group(2)) + shift}.{key[m.end():]}"


def _own_experts(group: list[str], prefix: str, targets: dict, num_experts: int | None):
    """For a MoE layer's group whose stacked expert tensors FSDP2 shards by expert (dim 0): (our stacked names,
    first expert, count, the official keys of those experts); None when the group holds no experts or they are not
    sharded that way (then the whole group converts as usual)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    expert_keys = [k for k in group if _EXPERT_KEY.match(k)]
    if not expert_keys or not num_experts:
        return None
    base = _EXPERT_KEY.match(expert_keys[0]).group(1)  # e.g. language.model.layers.3.mlp.experts
    names = [f"{base}.gate_up_proj", f"{base}.down_proj"]
    spans = set()
    for name in names:
        target = targets.get(prefix + name)
        if not isinstance(target, DTensor) or target.shape[0] != num_experts:
            return None
        shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
        if tuple(shape[1:]) != tuple(target.shape[1:]):
            return None  # not a dim-0 shard
        spans.add((offset[0], shape[0]))
    if len(spans) != 1:
        return None
    first, count = spans.pop()
    own = [k for k in expert_keys if first <= int(_EXPERT_KEY.match(k).group(2)) < first + count]
    return names, first, count, own


def _load_single(key: str, file: Path, prefix: str, targets: dict, single: dict[str, str], convert, put,
                 loaded: set) -> None:
    """One official tensor: a plain rename into a dim-0-sharded parameter reads only this process's rows (the
    converter is run on a meta tensor to learn the name); anything else is read whole and converted. `single`:
    canonical name -> the one module name it fills (names filled twice, grown, or whose rows feed another tensor
    are not in it: they go through `put`)."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    with safe_open(str(file), framework="pt") as f:
        piece = f.get_slice(key)
        shape = tuple(piece.get_shape())
        names = convert({key: torch.empty(shape, device="meta")}, None)
        if not names:
            return  # ignored by the converter (e.g. rotary buffers, vision.attn_pool)
        if len(names) == 1:
            name, meta = next(iter(names.items()))
            actual = single.get(prefix + name)
            target = targets.get(actual)
            if isinstance(target, DTensor) and tuple(meta.shape) == shape == tuple(target.shape):
                local, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh,
                                                                      target.placements)
                if tuple(local[1:]) == shape[1:]:
                    if local[0]:
                        with torch.no_grad():
                            target.to_local().copy_(piece[offset[0]:offset[0] + local[0]])
                    loaded.add(actual)
                    return
        value = f.get_tensor(key)
    for name, converted in convert({key: value}, None).items():
        put(prefix + name, converted, str(file))


def _targets(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name (DTensors where FSDP2 sharded them)."""
    return dict(module.state_dict(keep_vars=True))


def _aliases(targets: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """canonical name -> the module's names holding it (two for a modules_to_save module, one otherwise)."""
    out: dict[str, list[str]] = {}
    for name in targets:
        out.setdefault(canonical_name(name), []).append(name)
    return out


def copy_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Write this process's part of `full` into `target` (a DTensor shard of FSDP2 or a plain tensor)."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        if isinstance(target, DTensor):
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
            index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
            target.to_local().copy_(full[index])
        else:
            target.copy_(full)


def load_sharded(module: nn.Module, init: MetaInit, device: torch.device) -> None:
    """Allocate this process's shards of `module` (built on meta, already sharded) on `device` and fill them from
    `init`; every parameter and persistent buffer must be covered (CheckpointError otherwise)."""
    from backbone.checkpoint import KEEP_MODULE_DTYPE, CheckpointError
    from backbone.convert import deepseek_vl2_from_official

    module.to_empty(device=device)
    targets = _targets(module)
    aliases = _aliases(targets)
    single = {c: names[0] for c, names in aliases.items() if len(names) == 1 and c not in init.derive
              and c not in init.grow}
    loaded: set[str] = set()

    def put(name: str, value: torch.Tensor, where: str, strict: bool = True, exact: bool = False) -> None:
        """`name`: canonical (files: every module name holding it) or, `exact`, a module name (extras and a resumed
        adapter's values: that tensor alone; a canonical name may be shared, e.g. by the LoRA pairs of the routed
        experts' two parameters, one peft wrapper nested in the other)."""
        names = [name] if exact else aliases.get(name) or ([name] if name in targets else [])
        if not names:
            if strict:
                raise CheckpointError(f"{where}: unexpected tensor {name}")
            return
        target = targets[names[0]]
        if name in init.grow and value.shape[0] < target.shape[0] and value.shape[1:] == target.shape[1:]:
            from backbone.language_model import grow_rows

            value = grow_rows(value, target.shape[0], *init.grow[name])
        if tuple(value.shape) != tuple(target.shape):
            if strict:
                raise CheckpointError(f"{where}: tensor {name} has shape {tuple(value.shape)}, the model expects "
                                      f"{tuple(target.shape)}")
            return
        if name.endswith(KEEP_MODULE_DTYPE):
            value = value.to(target.dtype)
        for actual in names:
            copy_into(targets[actual], value)
            loaded.add(actual)
        for derived, rows in init.derive.get(name, []):
            copy_into(targets[derived], value[rows])
            loaded.add(derived)

    for name, value in init.extras.items():
        if name in targets:
            put(name, value, "extras", exact=True)
    for prefix, file in init.files:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                put(prefix + key, f.get_tensor(key), str(file), strict=False)  # a head may have grown (new robots)
    for prefix, folder in init.folders:
        folder = Path(folder)
        where = _official_keys(folder)
        experts: dict[str, list[str]] = {}  # a MoE layer's routed experts convert together (they are stacked)
        singles = []  # everything else converts one tensor at a time
        for key in sorted(where):
            m = _EXPERT_KEY.match(key)
            (experts.setdefault(m.group(1), []) if m else singles).append(key)

        def convert(state: dict[str, torch.Tensor], num_experts: int | None) -> dict[str, torch.Tensor]:
            try:
                return deepseek_vl2_from_official(state, num_experts)
            except KeyError as e:
                raise CheckpointError(f"{folder}: {e.args[0]}") from e

        for group in experts.values():
            own = _own_experts(group, prefix, targets, init.num_experts)
            if own is None:  # not sharded by expert: the whole layer's experts, then this process's part
                for key, value in convert(_read(group, where), init.num_experts).items():
                    put(prefix + key, value, str(folder))
                continue
            stacked, first, count, own_keys = own
            if count:  # read and stack only the experts of this process's shard
                state = {_renumber(k, -first): v for k, v in _read(own_keys, where).items()}
                for key, value in convert(state, count).items():
                    with torch.no_grad():
                        targets[prefix + key].to_local().copy_(value)
                    loaded.add(prefix + key)
                del state
            else:
                loaded.update(prefix + name for name in stacked)
        for key in singles:
            _load_single(key, where[key], prefix, targets, single, convert, put, loaded)
    for name, value in init.after.items():
        put(name, value, "after", exact=True)  # module names, as the extras
    persistent = set(targets)
    missing = sorted(persistent - loaded)
    if missing:
        raise CheckpointError(f"meta-device load: no value for {len(missing)} tensors: {missing[:6]}")
    # non-persistent buffers: from extras where given, else zeros; then modules recompute theirs (position ids)
    persistent_buffers = set(targets)
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name in persistent_buffers:
                continue
            if name in init.extras:
                buf.copy_(init.extras[name])
            else:
                buf.zero_()
    for sub in module.modules():
        if hasattr(sub, "reset_buffers") and callable(sub.reset_buffers):
            sub.reset_buffers()
