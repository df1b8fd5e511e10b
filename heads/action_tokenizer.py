"""Continuous actions <-> action-bin tokens, with one robot's dataset stats.

An `ActionTokenizer` holds the per-dimension stats of one embodiment's actions (or state) and maps a value to a bin
in three steps:

1. **Normalize** to the bin space, where [-1, 1] is the range the bins cover:

   | mode        | stats      | normalized value                       | [-1, 1] covers              |
   |-------------|------------|----------------------------------------|-----------------------------|
   | `quantile`  | q01, q99   | 2 (x - q01) / (q99 - q01) - 1          | the central 98% of the data |
   | `mean_std`  | mean, std  | (x - mean) / (clip_sigma * std)        | mean +- clip_sigma std      |

   For `mean_std` the z-score is divided by `clip_sigma` (default 3) before binning. Binning the raw z-score over
   [-1, 1] would clip a third of Gaussian data at +-1 std; scaling by 3 std keeps 99.7% in range and gives bins of
   6 std / 256 = 0.023 std. The z-score is `normalized * clip_sigma`.

2. **Clip** to [-1, 1]. Values outside (beyond the 1st/99th percentile, or beyond clip_sigma std) land in the edge
   bins, so they decode to the edge of the range. Each clipped value is counted: `last_n_clipped` (the last call),
   `clip_count` and `clip_count_per_dim` (cumulative, since construction or `reset_clip_counts()`), against
   `value_count` values seen. A high `clip_fraction` on new data means the stats do not describe it.

3. **Bin**: `n_bins` uniform bins over [-1, 1], width `bin_width = 2 / n_bins`; bin i covers
   [-1 + i w, -1 + (i + 1) w) (the last bin includes +1) and decodes to its centre -1 + (i + 0.5) w, so the
   round-trip error is at most w / 2 in normalized units. `decode(bins, offsets)` adds `offsets * w` with offsets in
   [-0.5, 0.5] (a fraction of a bin width, from a continuous refinement head) to reach any value inside the bin;
   `encode_with_offsets` gives the exact offsets as training targets.

Degenerate dimensions (q99 == q01, or std == 0: a joint that never moved in the data) normalize to 0 and decode to
the constant (q01, or the mean) exactly, with no division by zero; a value that differs from the constant counts as
clipped. This differs on purpose from lerobot's normalizer (which divides by eps and sends the constant to -1): a
constant dimension should sit in the middle bin and decode to itself.

Inputs may be numpy arrays or torch tensors, of any leading shape (..., A); outputs are the same kind (torch on the
input's device). Computation is in float32 for torch (float64 inputs stay float64) and float64 for numpy. Bins are
int64. The stats arrive as a plain dict of per-dimension arrays, e.g. a LeRobot dataset's `meta.stats["action"]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

MODES = ("quantile", "mean_std")
REQUIRED_STATS = {"quantile": ("q01", "q99"), "mean_std": ("mean", "std")}
STAT_KEYS = ("q01", "q99", "mean", "std", "min", "max")
DEFAULT_CLIP_SIGMA = 3.0


class ActionStatsError(ValueError):
    """Action stats missing a key, non-finite, inconsistent in shape, or reversed (q99 < q01, std < 0)."""


def _validated_stats(stats: Mapping[str, Any], mode: str, name: str) -> tuple[dict[str, np.ndarray], int]:
    """Check that the stats `mode` needs are present, finite, 1-D, of one length and ordered; return them (float64)
    with the action size. Other known keys ("min", "max", ...) are kept when present."""
    if mode not in MODES:
        raise ValueError(f"{name}: unknown normalization mode {mode!r}; known: {', '.join(MODES)}")
    if not isinstance(stats, Mapping):
        raise ActionStatsError(f"{name}: stats must be a dict of per-dimension arrays, got {type(stats).__name__}")
    for key in REQUIRED_STATS[mode]:
        if key not in stats:
            hint = ""
            if any(isinstance(v, Mapping) for v in stats.values()):
                hint = " (this looks like stats of several features; pass one feature's dict, e.g. stats['action'])"
            raise ActionStatsError(
                f"{name}: stats lack {key!r}, needed for {mode!r} normalization; have {sorted(stats)}{hint}"
            )
    arrays: dict[str, np.ndarray] = {}
    for key in STAT_KEYS:
        if key not in stats:
            continue
        value = stats[key]
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        array = np.asarray(value, dtype=np.float64)
        if array.ndim != 1 or array.size == 0:
            raise ActionStatsError(f"{name}: stats {key!r} must be a non-empty 1-D array, got shape {array.shape}")
        if not np.all(np.isfinite(array)):
            raise ActionStatsError(f"{name}: stats {key!r} are not finite: {array.tolist()}")
        arrays[key] = array
    sizes = {key: a.shape[0] for key, a in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ActionStatsError(f"{name}: stats disagree in length: {sizes}")
    if mode == "quantile" and np.any(arrays["q99"] < arrays["q01"]):
        bad = np.nonzero(arrays["q99"] < arrays["q01"])[0].tolist()
        raise ActionStatsError(f"{name}: q99 < q01 in dims {bad}")
    if mode == "mean_std" and np.any(arrays["std"] < 0):
        raise ActionStatsError(f"{name}: negative std in dims {np.nonzero(arrays['std'] < 0)[0].tolist()}")
    return arrays, next(iter(sizes.values()))


class ActionTokenizer:
    """Normalize, clip and bin one embodiment's actions (or state) per dimension; decode bins (+ offsets) back.

    `stats`: {"q01": (A,), "q99": (A,)} for `quantile`, {"mean": (A,), "std": (A,)} for `mean_std` (extra keys
    such as "min"/"max" are kept and saved). `clip_sigma` applies to `mean_std` only. `name` appears in errors.
    """

    def __init__(
        self,
        stats: Mapping[str, Any],
        mode: str = "quantile",
        n_bins: int = 256,
        clip_sigma: float = DEFAULT_CLIP_SIGMA,
        name: str = "action",
    ) -> None:
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 2:
            raise ValueError(f"{name}: n_bins must be an int >= 2, got {n_bins!r}")
        if not clip_sigma > 0:
            raise ValueError(f"{name}: clip_sigma must be positive, got {clip_sigma!r}")
        self.name = name
        self.mode = mode
        self.n_bins = n_bins
        self.clip_sigma = float(clip_sigma)
        self.stats, self.action_dim = _validated_stats(stats, mode, name)
        if mode == "quantile":
            low, high = self.stats["q01"], self.stats["q99"]
            self.center, self.half_range = (low + high) / 2.0, (high - low) / 2.0
        else:
            self.center, self.half_range = self.stats["mean"].copy(), self.clip_sigma * self.stats["std"]
        self.degenerate = self.half_range == 0
        self._constants: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}
        self.reset_clip_counts()

    # ----------------------------------------------------------------------------------------------- bins
    @property
    def bin_width(self) -> float:
        """Width of one bin in normalized units: 2 / n_bins."""
        return 2.0 / self.n_bins

    @property
    def bin_centers(self) -> np.ndarray:
        """(n_bins,) normalized value each bin decodes to without an offset."""
        return -1.0 + (np.arange(self.n_bins) + 0.5) * self.bin_width

    # ----------------------------------------------------------------------------------------------- clip counts
    def reset_clip_counts(self) -> None:
        self.last_n_clipped = 0
        self.clip_count = 0
        self.clip_count_per_dim = np.zeros(self.action_dim, dtype=np.int64)
        self.value_count = 0

    @property
    def clip_fraction(self) -> float:
        """Share of the values encoded so far that were clipped (0 when nothing was encoded)."""
        return self.clip_count / self.value_count if self.value_count else 0.0

    # ----------------------------------------------------------------------------------------------- normalize
    def normalize(self, actions):
        """(..., A) actions -> (..., A) bin-space values (not clipped; in [-1, 1] when inside the stats)."""
        x = self._as_float(actions)
        center, half, degenerate = self._const("center", x), self._const("half_range", x), self._const("degenerate", x)
        safe_half = _where(degenerate, 1.0, half)
        normalized = (x - center) / safe_half
        return _where(degenerate, 0.0, normalized)

    def unnormalize(self, normalized):
        """(..., A) bin-space values -> actions. Degenerate dims return their constant whatever the input."""
        y = self._as_float(normalized)
        return y * self._const("half_range", y) + self._const("center", y)

    # ----------------------------------------------------------------------------------------------- encode / decode
    def encode(self, actions):
        """(..., A) actions -> (..., A) int64 bins in [0, n_bins). Out-of-range values are clipped and counted."""
        return self.encode_with_offsets(actions)[0]

    def encode_with_offsets(self, actions):
        """(..., A) actions -> (bins (..., A) int64, offsets (..., A) in [-0.5, 0.5]).

        `decode(bins, offsets)` reproduces the (clipped) actions up to float rounding: the offsets are the targets of
        a continuous refinement head."""
        x = self._as_float(actions)
        if not bool(_all_finite(x)):
            raise ValueError(f"{self.name}: actions contain NaN or inf")
        normalized = self.normalize(x)
        outside = (normalized < -1) | (normalized > 1)
        outside = outside | (self._const("degenerate", x) & (x != self._const("center", x)))
        self._count_clipped(outside)
        clipped = normalized.clip(-1.0, 1.0)
        width = self.bin_width
        position = (clipped + 1.0) / width
        bins = (position.floor() if isinstance(position, torch.Tensor) else np.floor(position)).clip(0, self.n_bins - 1)
        centers = -1.0 + (bins + 0.5) * width
        offsets = ((clipped - centers) / width).clip(-0.5, 0.5)
        bins = bins.long() if isinstance(bins, torch.Tensor) else bins.astype(np.int64)
        return bins, offsets

    def decode(self, bins, offsets=None, dtype: torch.dtype | None = None):
        """(..., A) int bins (+ optional (..., A) offsets in [-0.5, 0.5], clamped) -> (..., A) actions.

        Torch output is float32 unless `dtype` (or float64 offsets) says otherwise; numpy output is float64."""
        self._check_last_dim(bins, "bins")
        if isinstance(bins, torch.Tensor):
            if bins.is_floating_point():
                raise TypeError(f"{self.name}: bins must be an integer tensor, got {bins.dtype}")
            offsets_are_double = isinstance(offsets, torch.Tensor) and offsets.dtype == torch.float64
            values = bins.to(dtype or (torch.float64 if offsets_are_double else torch.float32))
        else:
            bins = np.asarray(bins)
            if not np.issubdtype(bins.dtype, np.integer):
                raise TypeError(f"{self.name}: bins must be integers, got {bins.dtype}")
            values = bins.astype(np.float64)
        if bins.numel() if isinstance(bins, torch.Tensor) else bins.size:
            low, high = int(bins.min()), int(bins.max())
            if low < 0 or high >= self.n_bins:
                raise ValueError(f"{self.name}: bins must lie in [0, {self.n_bins}), got values in [{low}, {high}]")
        normalized = -1.0 + (values + 0.5) * self.bin_width
        if offsets is not None:
            if tuple(offsets.shape) != tuple(bins.shape):
                raise ValueError(f"{self.name}: offsets shape {tuple(offsets.shape)} != bins shape {tuple(bins.shape)}")
            if isinstance(normalized, torch.Tensor):
                offsets = torch.as_tensor(offsets, device=normalized.device).to(normalized.dtype)
            else:
                offsets = np.asarray(offsets, dtype=np.float64)
            normalized = normalized + offsets.clip(-0.5, 0.5) * self.bin_width
        return self.unnormalize(normalized)

    # ----------------------------------------------------------------------------------------------- saving
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: {"name", "mode", "n_bins", "clip_sigma", "stats": {key: [floats]}}."""
        return {
            "name": self.name,
            "mode": self.mode,
            "n_bins": self.n_bins,
            "clip_sigma": self.clip_sigma,
            "stats": {key: array.tolist() for key, array in self.stats.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ActionTokenizer:
        missing = [key for key in ("mode", "n_bins", "stats") if key not in data]
        if missing:
            raise ValueError(f"tokenizer data lack {missing}; have {sorted(data)}")
        return cls(
            data["stats"],
            mode=data["mode"],
            n_bins=data["n_bins"],
            clip_sigma=data.get("clip_sigma", DEFAULT_CLIP_SIGMA),
            name=data.get("name", "action"),
        )

    def __repr__(self) -> str:
        return f"ActionTokenizer(name={self.name!r}, mode={self.mode!r}, action_dim={self.action_dim}, n_bins={self.n_bins})"

    # ----------------------------------------------------------------------------------------------- helpers
    def _check_last_dim(self, x, what: str) -> None:
        shape = tuple(x.shape) if hasattr(x, "shape") else np.shape(x)
        if len(shape) == 0 or shape[-1] != self.action_dim:
            raise ValueError(
                f"{self.name}: {what} must have last dimension {self.action_dim} (action_dim), got shape {shape}"
            )

    def _as_float(self, x):
        """Check the last dim; torch tensors become float32 (float64 stays), anything else a float64 numpy array."""
        self._check_last_dim(x, "input")
        if isinstance(x, torch.Tensor):
            return x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)
        return np.asarray(x, dtype=np.float64)

    def _const(self, which: str, like):
        """A per-dimension constant (`center`, `half_range` or `degenerate`) as numpy or as a tensor matching `like`."""
        value = getattr(self, which)
        if not isinstance(like, torch.Tensor):
            return value
        dtype = torch.bool if which == "degenerate" else like.dtype
        key = (which, like.device, dtype)
        if key not in self._constants:
            self._constants[key] = torch.as_tensor(value, dtype=dtype, device=like.device)
        return self._constants[key]

    def _count_clipped(self, outside) -> None:
        if isinstance(outside, torch.Tensor):
            per_dim = outside.reshape(-1, self.action_dim).sum(0).cpu().numpy().astype(np.int64)
        else:
            per_dim = outside.reshape(-1, self.action_dim).sum(0).astype(np.int64)
        self.last_n_clipped = int(per_dim.sum())
        self.clip_count += self.last_n_clipped
        self.clip_count_per_dim += per_dim
        self.value_count += int(np.prod(outside.shape))


def _where(condition, if_true: float, otherwise):
    if isinstance(otherwise, torch.Tensor):
        return torch.where(condition, torch.as_tensor(if_true, dtype=otherwise.dtype, device=otherwise.device), otherwise)
    return np.where(condition, if_true, otherwise)


def _all_finite(x):
    return torch.isfinite(x).all() if isinstance(x, torch.Tensor) else np.isfinite(x).all()
