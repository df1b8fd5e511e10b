"""ATen calls of one demo-size vla training step, by phase (forward, backward, optimizer) and, in the forward, by the
module that made them (transformer blocks apart), plus the host reads of device values (`_local_scalar_dense`: a
sync on a GPU) and the source lines outside the blocks that made the most calls. On a GPU nearly every call is a
kernel launch, so the count is what a host-bound GPU step pays for, measurable on a CPU.

    python docs/experiments/op_census.py [--top 15]

The step is `vla bench train`'s vla stage (the demo's model and micro-batch, its first batch), run twice; the
second is counted. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=15, help="source lines listed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

    from backbone.language_model import DecoderLayer
    from benchmarks.train import demo_model, stage_task
    from vla.train.trainer import OptimConfig, build_optimizer

    language, vision, micro_batch = demo_model()
    with tempfile.TemporaryDirectory() as tmp:
        task, groups = stage_task("vla", Path(tmp), 0, language, vision)
        task.module.train()
        optimizer = build_optimizer(dict(task.module.named_parameters()), groups, OptimConfig(lr=1e-4))
        task.attach(optimizer)
        trainable = [p for g in optimizer.param_groups for p in g["params"]]
        batch = next(task.batches(0, 1, micro_batch))

        region = ["outside"]  # the innermost transformer block running, else "outside"
        for module in task.module.modules():
            if isinstance(module, (DecoderLayer, SiglipEncoderLayer)):
                name = "block:" + type(module).__name__
                module.register_forward_pre_hook(lambda m, a, name=name: region.append(name))
                module.register_forward_hook(lambda m, a, o: region.pop() and None)  # output unchanged
        phase = ["forward"]
        calls: collections.Counter = collections.Counter()
        lines: collections.Counter = collections.Counter()

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                op = func.overloadpacket.__name__
                where = region[-1] if phase[0] == "forward" else ""
                calls[(phase[0], where, op)] += 1
                if phase[0] == "forward" and where == "outside":
                    frames = [f for f in traceback.extract_stack()
                              if f.filename.startswith(str(ROOT)) and "/.venv/" not in f.filename
                              and not f.filename.endswith("op_census.py")]
                    if frames:
                        lines[f"{Path(frames[-1].filename).relative_to(ROOT)}:{frames[-1].lineno}"] += 1
                return func(*args, **(kwargs or {}))

        for _ in range(2):
            calls.clear(), lines.clear()
            with Count():
                phase[0] = "forward"
                loss = sum(v.float() for v in task.loss(task.module, batch).terms.values())
                phase[0] = "backward"
                loss.backward()
                phase[0] = "optimizer"
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    by: collections.Counter = collections.Counter()
    for (ph, where, _), n in calls.items():
        by[f"{ph} {where}".strip()] += n
    syncs = sum(n for (ph, _, op), n in calls.items() if ph == "forward" and op == "_local_scalar_dense")
    print(f"{'calls':>7}  where")
    for key, n in by.most_common():
        print(f"{n:>7}  {key}")
    print(f"{syncs:>7}  forward host reads (_local_scalar_dense)")
    print(f"\nforward calls outside the blocks, by source line (top {args.top}):")
    for key, n in lines.most_common(args.top):
        print(f"{n:>7}  {key}")
    print(json.dumps({"calls": sum(calls.values()), **{k.replace(" ", "_").replace(":", "_"): n for k, n in by.items()},
                      "forward_host_reads": syncs}))


if __name__ == "__main__":
    main()
