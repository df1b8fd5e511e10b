"""What a LoRA checkpoint's adapters cost at inference, and what folding them into the base on loading saves: one
action chunk (batch 4, parallel decoding) of the tests' random-weight policy (the CPU `test` preset) plain, with LoRA
r=16 adapters (the default targets, then the routed experts too), and with those adapters merged (1 thread unless
--threads). `vla eval policy=checkpoint:DIR` and `vla serve` load a LoRA checkpoint merged
(`VLAPolicy.load(..., merge_adapters=True)`).

    python docs/experiments/lora_inference.py [--threads 1] [--reps 100]

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

IMAGE, STATE = "observation.image", "observation.state"


def chunk_ms(policy, reps: int) -> float:
    g = torch.Generator().manual_seed(0)
    batch = {IMAGE: torch.rand(4, 3, 64, 64, generator=g), STATE: torch.rand(4, 2, generator=g),
             "task": ["push the T"] * 4, "embodiment": "pusht"}
    with torch.no_grad():
        for _ in range(3):
            policy.predict_action_chunk(batch)
        start = time.perf_counter()
        for _ in range(reps):
            policy.predict_action_chunk(batch)
    return 1e3 * (time.perf_counter() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from helpers import tiny_policy

    from heads.embodiment import Embodiment
    from vla.policy.lora import apply_lora, make_lora_config, merge_lora

    robot = Embodiment("pusht", action_dim=2, state_dim=2, cameras=(IMAGE,), fps=10, chunk_len=4)
    result = {}
    for experts in (False, True):
        policy = tiny_policy([robot]).eval()
        plain = chunk_ms(policy, args.reps)
        apply_lora(policy, make_lora_config(policy, r=16, experts=experts))
        adapted = chunk_ms(policy.eval(), args.reps)
        merged = chunk_ms(merge_lora(policy).eval(), args.reps)
        result["lora_experts" if experts else "lora"] = {"plain_ms": round(plain, 2), "adapter_ms": round(adapted, 2),
                                                         "merged_ms": round(merged, 2)}
    print(f"one action chunk, batch 4, {args.threads} thread(s), ms")
    print(f"{'adapters':<24}{'plain':>8}{'adapter':>9}{'merged':>8}")
    for name, r in result.items():
        label = "LoRA r=16 + experts" if name == "lora_experts" else "LoRA r=16"
        print(f"{label:<24}{r['plain_ms']:>8.1f}{r['adapter_ms']:>9.1f}{r['merged_ms']:>8.1f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
