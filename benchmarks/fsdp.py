"""`vla bench fsdp`: FSDP2 from the meta device, 2 gloo processes (torchrun) on CPU.

A random model whose full fp32 weights take >= 1 GB is written once as an official-format folder; each process then
builds the model on `meta`, shards it (`fully_shard` per decoder layer, then the root), allocates only its shards
and reads them from the folder (vla/train/fsdp_load.py), as `torchrun ... -m vla.train distributed=fsdp init_from=...`
does. Printed per rank: peak resident memory (ru_maxrss, the whole process: Python, torch, gloo buffers) beside the
full model's bytes and the bytes of the rank's own shards. Target: each rank <= 0.6 x the full model + 0.5 GB.

Also the worker (`python -m benchmarks.fsdp FOLDER OUT [--gather]`, under torchrun): `--gather` writes the full
state dict gathered from the shards to OUT/full.pt (the test compares it with the single-process load).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._util import print_table, setup

GB = 1024**3
# test-preset architecture, widened: ~3 GB of fp32 weights (MoE layers with 8 routed experts, MLA attention)
LANGUAGE = {"vocab_size": 16384, "hidden_size": 1024, "num_hidden_layers": 24, "intermediate_size": 2816,
            "moe_intermediate_size": 1024}
QUICK_LANGUAGE = {"vocab_size": 4096, "hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 512,
                  "moe_intermediate_size": 128}


def write_model(folder: Path, language: dict) -> int:
    """A random DeepSeek-VL2 (test preset with `language` overrides) saved in the official format; its bytes."""
    from backbone.deepseek_vl2 import build_deepseek_vl2, deepseek_vl2_preset, save_deepseek_vl2

    model = build_deepseek_vl2(deepseek_vl2_preset("test", **language))
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    save_deepseek_vl2(model, folder)
    return nbytes


def run_workers(folder: Path, out: Path, gather: bool = False, nproc: int = 2, timeout: int = 600) -> list[dict]:
    """torchrun `nproc` gloo processes of the worker; their JSON reports (one per rank)."""
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
           "-m", "benchmarks.fsdp", str(folder), str(out)] + (["--gather"] if gather else [])
    env = os.environ | {"PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"fsdp workers failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def worker(folder: str, out: str, gather: bool) -> None:
    import resource

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from backbone.checkpoint import read_config
    from backbone.deepseek_vl2 import DeepseekVL2Config, build_deepseek_vl2
    from vla.train.fsdp_load import MetaInit, load_sharded
    from vla.train.trainer import close_distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    config = DeepseekVL2Config.from_official(read_config(folder))
    model = build_deepseek_vl2(config, device="meta")
    for layer in model.language.model.layers:
        fully_shard(layer)
    fully_shard(model)
    load_sharded(model, MetaInit(folders=[("", Path(folder))], num_experts=config.language.n_routed_experts),
                 torch.device("cpu"))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    report = {"rank": rank, "peak_rss_bytes": peak, "start_rss_bytes": rss_start, "shard_bytes": local,
              "load_s": seconds}
    if gather:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save(state, Path(out) / "full.pt")
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))
    close_distributed()


def run(cfg) -> dict:
    setup(cfg)
    language = QUICK_LANGUAGE if cfg.get("quick") else LANGUAGE
    with tempfile.TemporaryDirectory(prefix="vla_bench_fsdp_") as tmp:
        folder, out = Path(tmp) / "model", Path(tmp) / "out"
        out.mkdir()
        full = write_model(folder, language)
        reports = run_workers(folder, out)
    rows = [[r["rank"], f"{full / GB:.3f}", f"{r['shard_bytes'] / GB:.3f}", f"{r['start_rss_bytes'] / GB:.3f}",
             f"{r['peak_rss_bytes'] / GB:.3f}", f"{r['peak_rss_bytes'] / full:.2f}", f"{r['load_s']:.1f}"]
            for r in reports]
    print("FSDP2 from the meta device, 2 gloo processes on CPU: peak resident memory per rank (GB)")
    print_table(["rank", "full model", "own shards", "RSS at start", "peak RSS", "peak / full", "load s"], rows)
    target = [0.6 * full / GB + 0.5] * len(reports)
    return {"full_model_gb": round(full / GB, 4),
            "rank_peak_rss_gb": [round(r["peak_rss_bytes"] / GB, 4) for r in reports],
            "rank_shard_gb": [round(r["shard_bytes"] / GB, 4) for r in reports],
            "target_gb": round(target[0], 4),
            "within_target": all(r["peak_rss_bytes"] / GB <= t for r, t in zip(reports, target))}


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], "--gather" in sys.argv[3:])
