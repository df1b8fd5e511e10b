"""How fast this CPU runs the demo-size vla step's matmuls and attention, alone (1 thread unless --threads): the rate
of the step's largest matmul shapes against a 2048^3 product (the core's own matmul rate), and the language model's
masked attention (MLA: query/key head 48, value head 32) through SDPA as the model runs it (the math path: the
flash kernel wants one head size) against the flash kernel with the value zero-padded to 48, forward and backward.

    python docs/experiments/matmul_rate.py [--threads 1]

Prints a table and one JSON line. Read with `step_profile.py --profile`, which times the same shapes inside a step.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

# (tokens, in, out) of the step's largest linear layers (15 control steps x 87 tokens; 12 x 87) and one weight grad
MATMULS = [(2048, 2048, 2048), (1305, 128, 128), (1305, 128, 192), (1305, 256, 128), (1044, 128, 128),
           (192, 1305, 128)]
ATTENTION = [(15, 4, 87), (4, 4, 252)]  # (batch, heads, tokens): control steps; a long conversation batch


def seconds(fn, reps: int) -> float:
    for _ in range(2):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def attention_ms(B: int, H: int, T: int, padded: bool) -> float:
    gen = torch.Generator().manual_seed(0)
    q_BHTE, k_BHTE = (torch.randn(B, H, T, 48, generator=gen, requires_grad=True) for _ in range(2))
    v_BHTV = torch.randn(B, H, T, 32, generator=gen, requires_grad=True)
    mask_BTT = (torch.rand(B, 1, T, T, generator=gen) > 0.3) | torch.eye(T, dtype=torch.bool)

    def step() -> None:
        v = F.pad(v_BHTV, (0, 16)) if padded else v_BHTV
        out = F.scaled_dot_product_attention(q_BHTE, k_BHTE, v, attn_mask=mask_BTT, scale=48**-0.5)[..., :32]
        out.square().sum().backward()

    return 1e3 * seconds(step, 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print("| matmul (M, K, N) | time | GFLOP/s |\n|---|---|---|")
    for M, K, N in MATMULS:
        a, b = torch.randn(M, K), torch.randn(K, N)
        flops = 2 * M * K * N
        dt = seconds(lambda: a @ b, max(3, int(2e9 / flops)))
        rows.append({"shape": [M, K, N], "us": round(dt * 1e6), "gflops": round(flops / dt / 1e9, 1)})
        print(f"| {M} x {K} x {N} | {dt * 1e6:.0f} us | {flops / dt / 1e9:.0f} |")
    print("\n| attention (B, H, T), forward + backward | SDPA as the model calls it | flash, value padded to 48 |")
    print("|---|---|---|")
    attention = []
    for B, H, T in ATTENTION:
        math_ms, flash_ms = attention_ms(B, H, T, False), attention_ms(B, H, T, True)
        attention.append({"shape": [B, H, T], "sdpa_ms": round(math_ms, 2), "flash_padded_ms": round(flash_ms, 2)})
        print(f"| {B} x {H} x {T} | {math_ms:.2f} ms | {flash_ms:.2f} ms |")
    print(json.dumps({"threads": torch.get_num_threads(), "matmuls": rows, "attention": attention}))


if __name__ == "__main__":
    main()
