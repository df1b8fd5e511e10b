"""Per-dataset normalization of actions and states from a dataset's own stats (`meta/stats.json` of a LeRobotDataset).

Plain numpy (torch tensors are accepted and stay tensors; torch is imported only when one is passed), no model
dependencies: the one normalizer of the project. The mixture loader normalizes with it, a policy's post-processing
undoes it, and the action tokenizer (heads.ActionTokenizer) only bins what it gives.

Modes (the same formulas as lerobot's `NormalizerProcessorStep`, so numbers agree with lerobot policies):

| mode         | stats       | normalize                              | maps to                |
|--------------|-------------|----------------------------------------|------------------------|
| `quantile`   | q01, q99    | 2 (x - q01) / (q99 - q01) - 1          | [-1, 1] for 98% of data|
| `quantile10` | q10, q90    | 2 (x - q10) / (q90 - q10) - 1          |                        |
| `mean_std`   | mean, std   | (x - mean) / (std + eps)               | zero mean, unit std    |
| `min_max`    | min, max    | 2 (x - min) / (max - min) - 1          | [-1, 1]                |
| `identity`   | -           | x                                      |                        |

A zero range (constant dimension) uses `eps` as the denominator, as lerobot does. Values outside the quantile range
are not clipped here (the action tokenizer clips to its bins' range and counts what it clipped).

Quantiles must be quantiles of the whole dataset. lerobot 0.6.1 aggregates per-episode stats into `meta/stats.json`
by averaging the per-episode quantiles, which is exact for min/max/mean/std but not for quantiles: on short
goal-directed episodes (one saturated action per episode) the averaged q01/q99 of our PointNav data were -0.20/0.39
while 40% of the actions are +-1, so "[-1, 1]" normalized actions reached +-3.7 and a tokenizer over [-1, 1] clipped
them. `feature_stats` computes exact stats from the values; the mixture loader uses it by default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

REQUIRED_STATS: dict[str, tuple[str, str] | tuple[()]] = {
    "quantile": ("q01", "q99"),
    "quantile10": ("q10", "q90"),
    "mean_std": ("mean", "std"),
    "min_max": ("min", "max"),
    "identity": (),
}
MODES = tuple(REQUIRED_STATS)
EPS = 1e-8


class StatsError(ValueError):
    """Stats missing, non-finite or of the wrong shape for a feature."""


def _check_mode(mode: str) -> None:
    if mode not in REQUIRED_STATS:
        raise ValueError(f"unknown normalization mode {mode!r}; known: {', '.join(MODES)}")


def _like(value: np.ndarray, x: Any):
    """`value` as the same kind of array as `x` (numpy array, or torch tensor with x's dtype/device)."""
    if type(x).__module__.startswith("torch"):
        import torch

        return torch.as_tensor(value, dtype=x.dtype, device=x.device)
    return np.asarray(value, dtype=np.result_type(np.asarray(x).dtype, np.float32))


def _pair(stats: Mapping[str, Any], mode: str) -> tuple[np.ndarray, np.ndarray]:
    low_name, high_name = REQUIRED_STATS[mode]
    missing = [name for name in (low_name, high_name) if name not in stats]
    if missing:
        raise StatsError(f"mode {mode!r} needs stats {missing}; have {sorted(stats)}")
    return np.asarray(stats[low_name], dtype=np.float64), np.asarray(stats[high_name], dtype=np.float64)


def normalize(x, stats: Mapping[str, Any], mode: str = "quantile", eps: float = EPS):
    """Normalize `x` (..., D) with per-dimension `stats` ({"q01": (D,), "q99": (D,), ...})."""
    _check_mode(mode)
    if mode == "identity":
        return x
    first, second = _pair(stats, mode)
    if mode == "mean_std":
        return (x - _like(first, x)) / _like(second + eps, x)
    denom = second - first
    denom = np.where(denom == 0, eps, denom)
    return 2.0 * (x - _like(first, x)) / _like(denom, x) - 1.0


def unnormalize(y, stats: Mapping[str, Any], mode: str = "quantile", eps: float = EPS):
    """Inverse of `normalize`."""
    _check_mode(mode)
    if mode == "identity":
        return y
    first, second = _pair(stats, mode)
    if mode == "mean_std":
        return y * _like(second + eps, y) + _like(first, y)
    denom = second - first
    denom = np.where(denom == 0, eps, denom)
    return (y + 1.0) * _like(denom, y) / 2.0 + _like(first, y)

QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}


def feature_stats(values) -> dict[str, list[float]]:
    """Exact stats of one feature over a whole dataset: `values` (N, D) -> min/max/mean/std/count and the quantiles
    q01/q10/q50/q90/q99 (lerobot's stats.json keys)."""
    x = np.asarray(values, dtype=np.float64)
    x = x.reshape(len(x), -1)
    if len(x) == 0:
        raise StatsError("cannot compute stats of an empty feature")
    stats = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0)}
    stats |= {name: np.quantile(x, q, axis=0) for name, q in QUANTILES.items()}
    return {k: v.tolist() for k, v in stats.items()} | {"count": [len(x)]}


@dataclass
class Normalizer:
    """Normalization of several features of one dataset: `stats[key][stat]` arrays and `modes[key]`.

    `name` (the dataset) appears in every error message. Build it from a LeRobotDataset's `meta.stats` with
    `Normalizer.from_stats(ds.meta.stats, {"action": "quantile", "observation.state": "quantile"}, name=repo_id)`.
    """

    stats: dict[str, dict[str, np.ndarray]]
    modes: dict[str, str]
    name: str = "dataset"
    eps: float = EPS
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def from_stats(cls, stats: Mapping[str, Mapping[str, Any]], modes: Mapping[str, str], name: str = "dataset", eps: float = EPS):
        """Validate and keep the stats each feature's mode needs: present, finite, all the same shape."""
        kept: dict[str, dict[str, np.ndarray]] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for key, mode in modes.items():
            _check_mode(mode)
            needed = REQUIRED_STATS[mode]
            if not needed:
                kept[key] = {}
                continue
            if key not in stats:
                raise StatsError(f"{name}: no stats for {key!r} (needed for {mode!r} normalization); stats cover {sorted(stats)}")
            feature_stats = stats[key]
            missing = [s for s in needed if s not in feature_stats]
            if missing:
                raise StatsError(
                    f"{name}: stats of {key!r} lack {missing} (needed for {mode!r} normalization); have {sorted(feature_stats)}"
                )
            arrays = {s: np.asarray(feature_stats[s], dtype=np.float64) for s in needed}
            for stat, array in arrays.items():
                if not np.all(np.isfinite(array)):
                    raise StatsError(f"{name}: stats {key!r}/{stat} are not finite: {array.tolist()}")
            if len({a.shape for a in arrays.values()}) != 1:
                raise StatsError(f"{name}: stats of {key!r} disagree in shape: { {s: a.shape for s, a in arrays.items()} }")
            kept[key] = arrays
            shapes[key] = next(iter(arrays.values())).shape
        return cls(stats=kept, modes=dict(modes), name=name, eps=eps, shapes=shapes)

    def _feature(self, key: str, x) -> tuple[dict[str, np.ndarray], str]:
        if key not in self.modes:
            raise KeyError(f"{self.name}: no normalization configured for {key!r}; configured: {sorted(self.modes)}")
        expected = self.shapes.get(key)
        if expected is not None and tuple(x.shape[-len(expected) :]) != expected:
            raise StatsError(f"{self.name}: {key!r} has shape {tuple(x.shape)} but its stats have shape {expected}")
        return self.stats[key], self.modes[key]

    def normalize(self, key: str, x):
        stats, mode = self._feature(key, x)
        return normalize(x, stats, mode, self.eps)

    def unnormalize(self, key: str, y):
        stats, mode = self._feature(key, y)
        return unnormalize(y, stats, mode, self.eps)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for saving next to a checkpoint or tokenizer)."""
        return {
            "name": self.name,
            "eps": self.eps,
            "modes": dict(self.modes),
            "stats": {k: {s: v.tolist() for s, v in d.items()} for k, d in self.stats.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Normalizer:
        return cls.from_stats(data["stats"], data["modes"], name=data.get("name", "dataset"), eps=data.get("eps", EPS))
