"""Benchmarks run by `vla bench <name>`; each module defines `run(cfg) -> dict` (printed as the final JSON line)."""
