"""Hydra at the entry points only: compose `configs/<name>.yaml` with `key=value` overrides, then hand plain values to the code."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(os.environ.get("VLA_CONFIG_DIR", Path(__file__).resolve().parents[1] / "configs"))


def load_config(name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose `configs/<name>.yaml` with hydra-style overrides (`a.b=1`, `+new=2`)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides or []))


def to_dataclass(cls: type, cfg: Any, **extra: Any):
    """Build dataclass `cls` from a config node, refusing unknown keys (typos should not pass silently)."""
    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})
    values.update(extra)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {unknown}; known: {sorted(names)}")
    return cls(**values)
