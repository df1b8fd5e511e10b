"""`vla bench data [--quick]`: cost of one training sample from the multi-embodiment mixture.

Collects a point-robot and an arm dataset (64x64 frames, images stored in parquet as the demo's are) into a temporary
folder, then builds a `MixtureDataset` (action chunk of 8, both robots) with lerobot's row access
(`cache_frames=False`) and with the whole-dataset read (`cache_frames=True`) and times `mixture[i]` in random order.
Reported per mode: construction seconds and milliseconds per sample (median of repeats).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _time_samples(mixture, indices: np.ndarray, repeats: int) -> float:
    """Median over repeats of the mean milliseconds per sample."""
    results = []
    for _ in range(repeats):
        start = time.perf_counter()
        for index in indices:
            mixture[int(index)]
        results.append((time.perf_counter() - start) / len(indices) * 1e3)
    return statistics.median(results)


def run(cfg) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import envs  # noqa: F401
    from envs.collect import collect_dataset
    from envs.mixture import MixtureDataset

    quick = bool(cfg.get("quick", False))
    episodes, samples, repeats = (20, 100, 2) if quick else (100, 500, 3)
    with tempfile.TemporaryDirectory() as tmp:
        roots = [collect_dataset(env_id, Path(tmp) / name, episodes, image_size=64, seed=0, progress=False,
                                 env_kwargs={"num_objects": [1, 1]}).root
                 for env_id, name in (("vla/PointNav-v0", "nav"), ("vla/ArmReach-v0", "arm"))]
        rows = {}
        for label, cached in (("lerobot rows", False), ("cache_frames", True)):
            start = time.perf_counter()
            mixture = MixtureDataset(roots, action_horizon=8, image_size=64, cache_frames=cached)
            build_s = time.perf_counter() - start
            indices = np.random.default_rng(0).integers(0, len(mixture), samples)
            rows[label] = {"build_s": round(build_s, 3), "ms_per_sample": round(_time_samples(mixture, indices, repeats), 4),
                           "frames": len(mixture)}
    print(f"{'access':<14} {'frames':>7} {'build s':>8} {'ms/sample':>10}")
    for label, row in rows.items():
        print(f"{label:<14} {row['frames']:>7} {row['build_s']:>8.2f} {row['ms_per_sample']:>10.3f}")
    speedup = rows["lerobot rows"]["ms_per_sample"] / rows["cache_frames"]["ms_per_sample"]
    print(f"cache_frames is {speedup:.1f}x faster per sample")
    return {"benchmark": "data", "quick": quick, "episodes_per_robot": episodes, "samples": samples, "results": rows,
            "speedup": round(speedup, 2)}
