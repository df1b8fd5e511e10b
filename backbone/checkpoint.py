"""Reading and writing checkpoint folders: `config.json` + safetensors (one file, or shards with an index).

Every failure names the file or tensor at fault; nothing is ever silently left at its random initialization.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from backbone.config import LanguageModelConfig
from backbone.convert import language_from_official, language_to_official, strip_prefix

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, corrupt, or does not match the model."""


def is_hub_id(text: str) -> bool:
    """Whether `text` reads as a Hugging Face hub repository, `namespace/name`, rather than a path."""
    return not text.startswith(("/", ".", "~")) and text.count("/") == 1


def checkpoint_folder(name: str | Path) -> Path:
    """The local folder of a checkpoint: `name` itself when it is a directory, else a Hugging Face hub id
    (`deepseek-ai/deepseek-vl2-tiny`) found in the local hub cache, or downloaded into it where the hub is on
    (HF_HUB_OFFLINE unset or 0; `./run.sh` and the tests set it to 1, so nothing is downloaded at run time)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    text = str(name)
    if path.exists() or not is_hub_id(text):
        raise CheckpointError(f"{name}: not a directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(snapshot_download(text))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise CheckpointError(f"{text}: no such local folder, and not in the local Hugging Face cache (with "
                              f"HF_HUB_OFFLINE=1 nothing is downloaded: give the folder, or set HF_HUB_OFFLINE=0)") from e
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"{text}: no such local folder, and the hub gave no checkpoint ({e})") from e


def read_safetensors_file(file: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file; a missing, truncated or corrupt file is a `CheckpointError` naming it."""
    if not Path(file).is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from e


def read_json_file(file: str | Path) -> dict:
    """A JSON file of a checkpoint folder; a missing or malformed one is a `CheckpointError` naming it."""
    if not Path(file).is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        return json.loads(Path(file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e


def read_config(path: str | Path) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: no config.json (expected a checkpoint folder with config.json + safetensors)")
    return read_json_file(file)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, single-file or sharded (`model.safetensors.index.json` + shards).

    A sharded folder must agree with its index: every listed shard present, every tensor in the shard its entry names,
    and no tensor in a shard without an entry (an index that does not describe the files is corrupt)."""
    path = Path(path)
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError(f"weight_map is a {type(weight_map).__name__}, not an object")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable shard index ({e!r})") from e
        files = sorted(set(weight_map.values()))
    elif (path / SINGLE_NAME).is_file():
        files, weight_map = [SINGLE_NAME], None
    else:
        files, weight_map = sorted(p.name for p in path.glob("*.safetensors")), None
        if not files:
            raise CheckpointError(f"{path}: no safetensors files found")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: shard listed in {INDEX_NAME} is missing")
        shard = read_safetensors_file(file)
        if weight_map is not None:
            listed = {k for k, v in weight_map.items() if v == name}
            absent = sorted(listed - set(shard))
            if absent:
                raise CheckpointError(f"{path}: {INDEX_NAME} lists tensors absent from {name}: "
                                      f"{absent[:5]}{' ...' if len(absent) > 5 else ''}")
            unlisted = sorted(k for k in set(shard) - listed if k not in weight_map)
            if unlisted:
                raise CheckpointError(f"{path}: {name} holds tensors with no entry in {INDEX_NAME}: "
                                      f"{unlisted[:5]}{' ...' if len(unlisted) > 5 else ''}")
            elsewhere = sorted(set(shard) - listed)
            if elsewhere:
                raise CheckpointError(f"{path}: {name} holds tensors that {INDEX_NAME} places in another shard: "
                                      + ", ".join(f"{k} (listed in {weight_map[k]})" for k in elsewhere[:5]))
        duplicate = sorted(set(shard) & set(state))
        if duplicate:
            raise CheckpointError(f"{file}: tensors also stored in another shard: {duplicate[:5]}")
        state.update(shard)
    return state


# Tensors that keep the dtype the module declares whatever `dtype` a load asks for: routing state, kept in float32
# (the MoE gate chooses experts in float32; the noaux_tc bias is nudged by 1e-3 steps that bf16 would round away).
KEEP_MODULE_DTYPE = ("e_score_correction_bias",)


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str, dtype: torch.dtype | None = None) -> None:
    """Strictly copy `state` into `module`: every parameter and persistent buffer must be present with its shape.
    Floating tensors are cast to `dtype` (None: as stored, e.g. bf16 for the published checkpoints), except those in
    KEEP_MODULE_DTYPE, which take the dtype the module declares."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors ({len(missing)}): {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
        raise CheckpointError(f"{where}: " + "; ".join(parts))
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{where}: tensor {key} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(expected[key].shape)}")
    def cast(key: str, tensor: torch.Tensor) -> torch.Tensor:
        if key.endswith(KEEP_MODULE_DTYPE):
            return tensor.to(expected[key].dtype)
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor

    state = {k: cast(k, v) for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (counters) are not in files: give any still on the meta device real zeros.
    for name, buf in list(module.named_buffers()):
        if buf.device.type == "meta":
            owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            owner.register_buffer(name.rpartition(".")[2], torch.zeros(buf.shape, dtype=buf.dtype), persistent=False)


def write_checkpoint(path: str | Path, config: dict, state: dict[str, torch.Tensor], max_shard_bytes: int = 4 << 30) -> None:
    """Write config.json + safetensors (sharded with an index above `max_shard_bytes`) atomically per file."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        t = state[key].detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    names = [SINGLE_NAME] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        tmp = path / (name + ".tmp")
        save_file(shard, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path / name)
    if len(shards) > 1:
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
        (path / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(config, indent=2))


# ---- language model ------------------------------------------------------------------------------------------------

def language_config_from_json(cfg: dict) -> LanguageModelConfig:
    """A bare DeepSeek-V2 config.json, or a DeepSeek-VL2 one holding `language_config`."""
    return LanguageModelConfig.from_dict(cfg.get("language_config", cfg))


def load_language_model(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load a DeepSeek-V2-family causal LM from a local folder or hub id (`checkpoint_folder`; official, DeepSeek-VL2
    `language.*`, or transformers naming). Returns a `DeepseekV2LM`; `model(input_ids).logits` is (B, T, V)."""
    from backbone.language_model import build_language_model

    path = checkpoint_folder(path)
    config = language_config_from_json(read_config(path))
    state = strip_prefix(read_safetensors(path), "language.")
    try:
        state = language_from_official(state, config.n_routed_experts)
    except KeyError as e:
        raise CheckpointError(f"{path}: {e.args[0]}") from e
    model = build_language_model(config, device="meta")
    load_into(model, state, str(path), dtype)
    return model.to(device).eval()


def save_language_model(model, path: str | Path) -> None:
    """Write config.json + safetensors in the official naming (per-expert keys)."""
    write_checkpoint(path, model.config.to_dict(), language_to_official(model.state_dict()))
