"""Normalized actions <-> action-bin tokens: the action tokenizer only bins.

Normalization is not its job: the one normalizer is `envs.normalize.Normalizer` (lerobot's formulas, a dataset's own
stats), applied by the data loader and undone by the policy's post-processing. What reaches the tokenizer is already
in bin space, where [-1, 1] is the range the bins cover (with `quantile` normalization, the central 98% of the data).
An `ActionTokenizer` of `action_dim` dimensions then:

1. **Clips** to [-1, 1]. Values outside land in the edge bins, so they decode to the edge of the range. Each clipped
   value is counted: `last_n_clipped` (the last call), `clip_count` and `clip_count_per_dim` (cumulative, since
   construction or `reset_clip_counts()`), against `value_count` values seen. A high `clip_fraction` on new data
   means the normalizer's stats do not describe it.

2. **Bins**: `n_bins` uniform bins over [-1, 1], width `bin_width = 2 / n_bins`; bin i covers
   [-1 + i w, -1 + (i + 1) w) (the last bin includes +1) and decodes to its centre -1 + (i + 0.5) w, so the
   round-trip error is at most w / 2. `decode(bins, offsets)` adds `offsets * w` with offsets in [-0.5, 0.5] (a
   fraction of a bin width, from a continuous refinement head) to reach any value inside the bin;
   `encode_with_offsets` gives the exact offsets as training targets.

Inputs may be numpy arrays or torch tensors, of any leading shape (..., A); outputs are the same kind (torch on the
input's device). Computation is in float32 for torch (float64 inputs stay float64) and float64 for numpy. Bins are
int64.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


class ActionTokenizer:
    """Clip and bin `action_dim`-dimensional values in bin space ([-1, 1]); decode bins (+ offsets) back.

    `name` (an embodiment's) appears in errors."""

    def __init__(self, action_dim: int, n_bins: int = 256, name: str = "action") -> None:
        if isinstance(action_dim, bool) or not isinstance(action_dim, int) or action_dim < 1:
            raise ValueError(f"{name}: action_dim must be an int >= 1, got {action_dim!r}")
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 2:
            raise ValueError(f"{name}: n_bins must be an int >= 2, got {n_bins!r}")
        self.name = name
        self.action_dim = action_dim
        self.n_bins = n_bins
        self.reset_clip_counts()

    # ----------------------------------------------------------------------------------------------- bins
    @property
    def bin_width(self) -> float:
        """Width of one bin: 2 / n_bins."""
        return 2.0 / self.n_bins

    @property
    def bin_centers(self) -> np.ndarray:
        """(n_bins,) value each bin decodes to without an offset."""
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

    # ----------------------------------------------------------------------------------------------- encode / decode
    def encode(self, values):
        """(..., A) values -> (..., A) int64 bins in [0, n_bins). Values outside [-1, 1] are clipped and counted."""
        return self.encode_with_offsets(values)[0]

    def encode_with_offsets(self, values):
        """(..., A) values -> (bins (..., A) int64, offsets (..., A) in [-0.5, 0.5]).

        `decode(bins, offsets)` reproduces the (clipped) values up to float rounding: the offsets are the targets of
        a continuous refinement head."""
        x = self._as_float(values)
        if not bool(torch.isfinite(x).all() if isinstance(x, torch.Tensor) else np.isfinite(x).all()):
            raise ValueError(f"{self.name}: actions contain NaN or inf")
        self._count_clipped((x < -1) | (x > 1))
        clipped = x.clip(-1.0, 1.0)
        width = self.bin_width
        position = (clipped + 1.0) / width
        bins = (position.floor() if isinstance(position, torch.Tensor) else np.floor(position)).clip(0, self.n_bins - 1)
        centers = -1.0 + (bins + 0.5) * width
        offsets = ((clipped - centers) / width).clip(-0.5, 0.5)
        bins = bins.long() if isinstance(bins, torch.Tensor) else bins.astype(np.int64)
        return bins, offsets

    def decode(self, bins, offsets=None, dtype: torch.dtype | None = None):
        """(..., A) int bins (+ optional (..., A) offsets in [-0.5, 0.5], clamped) -> (..., A) values in [-1, 1].

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
        decoded = -1.0 + (values + 0.5) * self.bin_width
        if offsets is not None:
            if tuple(offsets.shape) != tuple(bins.shape):
                raise ValueError(f"{self.name}: offsets shape {tuple(offsets.shape)} != bins shape {tuple(bins.shape)}")
            if isinstance(decoded, torch.Tensor):
                offsets = torch.as_tensor(offsets, device=decoded.device).to(decoded.dtype)
            else:
                offsets = np.asarray(offsets, dtype=np.float64)
            decoded = decoded + offsets.clip(-0.5, 0.5) * self.bin_width
        return decoded

    # ----------------------------------------------------------------------------------------------- saving
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: {"name", "action_dim", "n_bins"}."""
        return {"name": self.name, "action_dim": self.action_dim, "n_bins": self.n_bins}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ActionTokenizer:
        missing = [key for key in ("action_dim", "n_bins") if key not in data]
        if missing:
            raise ValueError(f"tokenizer data lack {missing}; have {sorted(data)}")
        return cls(int(data["action_dim"]), n_bins=int(data["n_bins"]), name=data.get("name", "action"))

    def __repr__(self) -> str:
        return f"ActionTokenizer(name={self.name!r}, action_dim={self.action_dim}, n_bins={self.n_bins})"

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

    def _count_clipped(self, outside) -> None:
        if isinstance(outside, torch.Tensor):
            per_dim = outside.reshape(-1, self.action_dim).sum(0).cpu().numpy().astype(np.int64)
        else:
            per_dim = outside.reshape(-1, self.action_dim).sum(0).astype(np.int64)
        self.last_n_clipped = int(per_dim.sum())
        self.clip_count += self.last_n_clipped
        self.clip_count_per_dim += per_dim
        self.value_count += int(np.prod(outside.shape))
