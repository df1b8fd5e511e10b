"""Shared helpers for benchmarks: timing, a matmul-peak probe and table printing."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def setup(cfg) -> None:
    if int(cfg.get("threads", 0) or 0) > 0:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(int(cfg.get("seed", 0) or 0))


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Best-of-`repeats` wall seconds per function, the functions run round-robin so that a noisy neighbour
    (other processes on a 2-core machine) hits every contender alike; the minimum filters out interference."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def matmul_peak_flops(dtype: torch.dtype = torch.float32, sizes=(1024, 2048), repeats: int = 3) -> float:
    """Best measured FLOP/s of a square matmul on this machine (the practical peak used for utilization)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        t = time_call(lambda: a @ b, repeats)
        best = max(best, 2 * n**3 / t)
    return best


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
