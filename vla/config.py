"""Hydra at the entry points only: compose `configs/<name>.yaml` with `key=value` overrides, then hand plain values to the code."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(os.environ.get("VLA_CONFIG_DIR", Path(__file__).resolve().parents[1] / "configs"))
# maps whose keys are free-form although the yaml gives them a default entry: `lr_mult` is keyed by parameter group
# (`stage.lr_mult.projector=0.1`), and the trainer refuses a group it does not know
FREE_FORM_MAPS = ("lr_mult",)


def load_config(name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose `configs/<name>.yaml` with hydra-style overrides (`a.b=1`, `+new=2`).

    Free-form sections (a `{}` in the yaml, e.g. `model.language` or `stage.data`, and the FREE_FORM_MAPS) take new
    keys without hydra's `+`: `model.language.hidden_size=128` and `stage.data={datasets: [...]}` just work. Keys of
    structured sections still have to exist, so typos there fail loudly."""
    from hydra import compose, initialize_config_dir

    overrides = list(overrides or [])
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        top_level = [o for o in overrides if "." not in o.partition("=")[0] and not o.partition("=")[2].lstrip().startswith("{")]
        base = compose(config_name=name, overrides=top_level)  # groups chosen (stage=vla) before the dicts are placed
        return compose(config_name=name, overrides=[_free_form(o, base) for o in overrides])


def _free_form(override: str, base: DictConfig) -> str:
    """`key=value` -> `++key=value` where the key is new inside a free-form dict, or a dict replaces a dict."""
    key, eq, value = override.partition("=")
    if not eq or key[:1] in "+~":
        return override
    node = OmegaConf.select(base, key, default=None)
    if isinstance(node, DictConfig) and value.lstrip().startswith("{"):
        return "++" + override
    if "." not in key:
        return override
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(base, parent_key, default=None)
    free = isinstance(parent, DictConfig) and (len(parent) == 0 or parent_key.rpartition(".")[2] in FREE_FORM_MAPS)
    if node is None and free and leaf not in parent:
        return "++" + override
    return override


def with_settings(cfg: DictConfig, settings: Mapping[str, Any]) -> DictConfig:
    """`cfg` with the nested `settings` merged in, by the rules of the command line's overrides: keys of structured
    sections must exist (a KeyError naming the known ones), free-form sections (a `{}` in the yaml) take any keys, a
    dict merges into a dict and anything else replaces. For code that calls the training API (the demo, benchmarks)
    with values instead of `key=value` strings."""
    _check_keys(cfg, settings, "")
    merged = OmegaConf.merge(_unlocked(cfg), OmegaConf.create(_plain_values(settings)))
    OmegaConf.set_struct(merged, True)
    return merged


def _check_keys(node: DictConfig, settings: Mapping[str, Any], path: str) -> None:
    for key, value in settings.items():
        where = f"{path}.{key}" if path else str(key)
        if len(node) and key not in node and path.rpartition(".")[2] not in FREE_FORM_MAPS:
            raise KeyError(f"unknown config key {where!r}; known at that level: {', '.join(sorted(node.keys()))}")
        child = node.get(key) if key in node else None
        if isinstance(value, Mapping) and isinstance(child, DictConfig):
            _check_keys(child, value, where)


def _unlocked(cfg: DictConfig) -> DictConfig:
    copy = OmegaConf.create(OmegaConf.to_container(cfg))
    OmegaConf.set_struct(copy, False)
    return copy


def _plain_values(value: Any) -> Any:
    """Paths become strings and tuples lists, so OmegaConf takes them."""
    if isinstance(value, Mapping):
        return {str(k): _plain_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_values(v) for v in value]
    return str(value) if isinstance(value, Path) else value
