"""Where the demo-size vla step's time goes on this machine, eager and compiled: `vla bench train`'s vla stage (the
demo's model and micro-batch, 1 thread unless --threads), 8 batches drawn once and replayed, so that every setting
times the same forward, backward and optimizer work; the batches' own cost (sampling, collation) is timed apart.

    python docs/experiments/step_profile.py [--compile none|dynamic|static] [--mode MODE] [--reps 4] [--threads 1] \\
        [--profile] [--device cpu|cuda] [--bf16] [--graph-per-block]

`--compile dynamic` is `backbone.compile_blocks` as the trainer calls it; `static` compiles one graph per sequence
length (dynamic=False). The first pass over the batches pays the compilation and is left out of the means. `--profile`
prints torch.profiler's table of one more pass (with the generated CPU kernels named; on CUDA also sorted by GPU
time). `--device cuda` times each phase to the GPU's end (synchronized); `--bf16` runs under bf16 autocast as the
trainer does on a GPU. `--graph-per-block` gives each block instance its own graph (see --help). Prints one JSON
line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", choices=["none", "dynamic", "static"], default="none")
    parser.add_argument("--mode", default=None, help="torch.compile's mode (default: its default)")
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the demo runs torch's default)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (the trainer's GPU precision)")
    parser.add_argument("--graph-per-block", action="store_true",
                        help="one graph per block instance, not one shared by the blocks of a kind (dynamo's "
                             "inline_inbuilt_nn_modules off): under --mode reduce-overhead each block is then its own "
                             "CUDA graph, not one graph called again before its backward ran")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = 64  # static: one graph per sequence length of the 8 batches
    torch._dynamo.config.inline_inbuilt_nn_modules = not args.graph_per_block
    torch._inductor.config.cpp.enable_kernel_profile = True

    from backbone.deepseek_vl2 import compile_blocks
    from benchmarks.train import demo_model, stage_task
    from vla.train.trainer import OptimConfig, build_optimizer

    language, vision, micro_batch = demo_model()
    with tempfile.TemporaryDirectory() as tmp:
        task, groups = stage_task("vla", Path(tmp), 0, language, vision)
        device = torch.device(args.device)
        task.module.to(device)
        task.module.train()
        if args.compile != "none":
            compile_blocks(task.module, dynamic=args.compile == "dynamic", mode=args.mode)
        optimizer = build_optimizer(dict(task.module.named_parameters()), groups, OptimConfig(lr=1e-4))
        task.attach(optimizer)
        batches = task.batches(0, 1, micro_batch)
        t0 = time.perf_counter()
        replay = [next(batches) for _ in range(8)]
        data_s = (time.perf_counter() - t0) / len(replay)
        replay = [torch.utils._pytree.tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, b)
                  for b in replay]
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def one_pass() -> dict[str, float]:
            sums = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
            for batch in replay:
                sync()
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                    loss = sum(v.float() for v in task.loss(task.module, batch).terms.values())
                sync()
                t1 = time.perf_counter()
                loss.backward()
                sync()
                t2 = time.perf_counter()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                sync()
                t3 = time.perf_counter()
                for key, dt in zip(sums, (t1 - t0, t2 - t1, t3 - t2)):
                    sums[key] += dt / len(replay)
            return sums

        t0 = time.perf_counter()
        one_pass()
        first_pass_s = time.perf_counter() - t0
        passes = [one_pass() for _ in range(args.reps)]
        means = {k: sum(p[k] for p in passes) / len(passes) for k in passes[0]}
        if args.profile:
            from torch.profiler import profile

            with profile() as prof:
                one_pass()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
            if device.type == "cuda":
                print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20))
    step = sum(means.values())
    counters = torch._dynamo.utils.counters
    breaks = {reason[:120]: n for reason, n in counters["graph_break"].items()}
    if breaks:
        print("graph breaks:", json.dumps(breaks, indent=1))
    print(json.dumps({"compile": args.compile, "mode": args.mode, "data_s": round(data_s, 4),
                      **{f"{k}_s": round(v, 4) for k, v in means.items()}, "step_s": round(step, 4),
                      "step_with_data_s": round(step + data_s, 4), "first_pass_s": round(first_pass_s, 1),
                      "threads": torch.get_num_threads(), "device": args.device, "bf16": args.bf16,
                      "graph_per_block": args.graph_per_block,
                      "graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(breaks.values())}))


if __name__ == "__main__":
    main()
