"""Benchmarks: `vla bench <name> [--quick] [key=value ...]`.

Each benchmark lives in `benchmarks/<name>.py` as `run(cfg) -> dict`: it prints a table while it measures and returns
the summary, which is printed last as one JSON line (the line scripts and checks read).
"""

from __future__ import annotations

import importlib
import json
import pkgutil

import benchmarks


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if not m.name.startswith("_"))


def main(cfg) -> int:
    if cfg.name not in available():
        raise SystemExit(f"vla bench: unknown benchmark {cfg.name!r}; available: {', '.join(available())}")
    result = importlib.import_module(f"benchmarks.{cfg.name}").run(cfg)
    print(json.dumps(result, sort_keys=False))
    return 0
