"""What one decode pass of the demo-size language model costs on this machine: the pass `generate` runs for each
generated token (one new token per sequence against the KV cache), eager, and with `--compile` through
`backbone.generate.compile_decoder` as well (same weights, same cache contents; the largest logit difference is
printed). The model is `vla bench policy`'s demo-size one (random weights); a 100-token prompt is prefilled, then
`--tokens` passes are timed, `--reps` times, the best kept. `--batch` sequences per pass (the demo's rollouts: 10).
The op count is torch.profiler's (every aten call of one pass, views included). Prints one JSON line.

    python docs/experiments/decode_pass.py [--compile] [--batch 1] [--threads 1] [--tokens 48] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from benchmarks.policy import DEMO_BACKBONE, _policy

    model = _policy("test", DEMO_BACKBONE, 8, torch.float32).backbone.language
    cache = model.new_cache(args.batch, 100 + args.tokens)
    token = torch.randint(0, 300, (args.batch, 1), generator=torch.Generator().manual_seed(0))

    def passes(step) -> list[torch.Tensor]:
        """`args.tokens` decode passes from the prefilled prompt; the cache is rewound afterwards."""
        length, rope = cache.length, cache.next_rope_pos_B.clone()
        logits = [step(token, cache=cache, logits_to_keep=1).logits for _ in range(args.tokens)]
        cache.length, cache.next_rope_pos_B = length, rope
        return logits

    def best_ms(step) -> float:
        best = float("inf")
        for _ in range(args.reps):
            t0 = time.perf_counter()
            passes(step)
            best = min(best, time.perf_counter() - t0)
        return best / args.tokens * 1e3

    result: dict = {"batch": args.batch, "threads": args.threads, "tokens": args.tokens}
    with torch.no_grad():
        model(torch.randint(0, 300, (args.batch, 100), generator=torch.Generator().manual_seed(1)), cache=cache,
              logits_to_keep=1)
        eager = passes(model)
        result["eager_ms"] = round(best_ms(model), 3)
        from torch.profiler import profile

        with profile() as prof:
            passes(model)
        result["ops_per_pass"] = round(sum(e.count for e in prof.key_averages()) / args.tokens)
        if args.compile:
            from backbone.generate import compile_decoder

            decoder = compile_decoder(model)
            t0 = time.perf_counter()
            compiled = passes(decoder)
            result["compile_s"] = round(time.perf_counter() - t0, 1)
            result["compiled_ms"] = round(best_ms(decoder), 3)
            result["speedup"] = round(result["eager_ms"] / result["compiled_ms"], 2)
            result["max_logit_diff"] = max(float((a - b).abs().max()) for a, b in zip(eager, compiled))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
