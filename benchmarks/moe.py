"""`vla bench moe`: forward+backward tokens/s of one MoE layer, ours against transformers' DeepseekV2 MoE.

Layer: hidden 512, 16 routed experts of 256, 2 shared, top-4, 4096 tokens, fp32 (quick: 1024 tokens). transformers'
layer is run with its `eager` and `grouped_mm` experts implementations on identical weights, in the same process.

Before timing, both implementations are checked against ours on the benchmark's input (output and input gradient);
a difference above `tolerance` (default 1e-5; fp32 agrees to ~2e-8) fails the benchmark (SystemExit, exit code 1):
a speed comparison of layers that compute different functions means nothing.
"""

from __future__ import annotations

import torch

from backbone.config import LanguageModelConfig
from backbone.moe import MoE
from benchmarks._util import matmul_peak_flops, print_table, setup, time_interleaved


def _configs(hidden=512, experts=16, expert_dim=256, shared=2, top_k=4):
    ours = LanguageModelConfig(
        vocab_size=32, hidden_size=hidden, intermediate_size=4 * hidden, moe_intermediate_size=expert_dim,
        num_hidden_layers=2, num_attention_heads=8, n_routed_experts=experts, n_shared_experts=shared,
        num_experts_per_tok=top_k, topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
        routed_scaling_factor=1.0, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    )
    from transformers import DeepseekV2Config

    hf = DeepseekV2Config(
        vocab_size=32, hidden_size=hidden, intermediate_size=4 * hidden, moe_intermediate_size=expert_dim,
        num_hidden_layers=2, num_attention_heads=8, n_routed_experts=experts, n_shared_experts=shared,
        num_experts_per_tok=top_k, topk_method="greedy", routed_scaling_factor=1.0, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    )
    return ours, hf


def build_pair(seed: int = 0):
    """Our MoE layer and transformers' DeepseekV2Moe holding the same weights."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    ours_cfg, hf_cfg = _configs()
    torch.manual_seed(seed)
    ours = MoE(ours_cfg)
    for p in ours.parameters():
        torch.nn.init.normal_(p, 0.0, 0.02)
    hf = DeepseekV2Moe(hf_cfg)
    with torch.no_grad():
        hf.gate.weight.copy_(ours.gate.weight)
        hf.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
        hf.experts.down_proj.copy_(ours.experts.down_proj)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(hf.shared_experts, name).weight.copy_(getattr(ours.shared_experts, name).weight)
    return ours, hf, ours_cfg


def _fwd_bwd(layer, x, g, is_ours: bool):
    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y = layer(x)[0] if is_ours else layer(x)
        (y * g).sum().backward()
    return step


def parity(ours, hf, x: torch.Tensor, g: torch.Tensor) -> dict[str, float]:
    """max |ours - transformers| over the output and the input gradient, per transformers experts implementation."""
    def output_and_grad(layer, is_ours: bool) -> tuple[torch.Tensor, torch.Tensor]:
        xi = x.detach().clone().requires_grad_(True)
        y = layer(xi)[0] if is_ours else layer(xi)
        (grad,) = torch.autograd.grad((y * g).sum(), xi)
        return y.detach(), grad

    y_ours, dx_ours = output_and_grad(ours, True)
    diffs = {}
    for impl in ("eager", "grouped_mm"):
        hf.experts.config._experts_implementation = impl
        y_hf, dx_hf = output_and_grad(hf, False)
        diffs[impl] = max((y_ours - y_hf).abs().max().item(), (dx_ours - dx_hf).abs().max().item())
    return diffs


def check_parity(diffs: dict[str, float], tolerance: float) -> float:
    """The largest difference; SystemExit (one line) when it exceeds `tolerance`."""
    worst = max(diffs.values())
    if not worst <= tolerance:  # NaN fails too
        detail = ", ".join(f"{impl} {d:.2e}" for impl, d in diffs.items())
        raise SystemExit(f"vla bench moe: ours and transformers' MoE layer differ by {worst:.2e} (> tolerance "
                         f"{tolerance:.0e}; {detail}): they do not compute the same function, so no timing")
    return worst


def layer_flops(cfg: LanguageModelConfig, tokens: int) -> float:
    """Matmul FLOPs of forward + backward (3x forward)."""
    D, F, K = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    routed = tokens * K * 3 * 2 * D * F
    shared = tokens * 3 * 2 * D * F * cfg.n_shared_experts
    router = tokens * 2 * D * cfg.n_routed_experts
    return 3.0 * (routed + shared + router)


def run(cfg) -> dict:
    setup(cfg)
    tokens = 1024 if cfg.quick else 4096
    repeats = 3 if cfg.quick else 7
    ours, hf, ours_cfg = build_pair(int(cfg.seed))
    x = torch.randn(1, tokens, ours_cfg.hidden_size, requires_grad=True)
    g = torch.randn(1, tokens, ours_cfg.hidden_size)

    # same weights, same function (output and gradient), or the timing below compares different layers
    tolerance = cfg.get("tolerance")
    diff = check_parity(parity(ours, hf, x, g), 1e-5 if tolerance is None else float(tolerance))

    def hf_with(impl: str):
        step = _fwd_bwd(hf, x, g, False)

        def run_impl():
            hf.experts.config._experts_implementation = impl
            step()
        return run_impl

    names = {"ours (sorted grouped_mm)": _fwd_bwd(ours, x, g, True), "transformers eager": hf_with("eager"),
             "transformers grouped_mm": hf_with("grouped_mm")}
    seconds = time_interleaved(names, repeats)
    tok_s = {name: tokens / s for name, s in seconds.items()}
    rows = [[name, s * 1e3, tokens / s, layer_flops(ours_cfg, tokens) / s / 1e9] for name, s in seconds.items()]
    peak = matmul_peak_flops()
    ours_flops = layer_flops(ours_cfg, tokens) / (tokens / tok_s["ours (sorted grouped_mm)"])
    print(f"MoE layer fwd+bwd, hidden 512, 16 experts x 256, 2 shared, top-4, {tokens} tokens, fp32, "
          f"{torch.get_num_threads()} threads; max |ours - transformers| = {diff:.2e}")
    print_table(["implementation", "ms", "tokens/s", "GFLOP/s"], rows)
    print(f"measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s; ours reaches {ours_flops / peak:.0%}")
    hf_best = max(tok_s["transformers eager"], tok_s["transformers grouped_mm"])
    return {
        "bench": "moe",
        "tokens": tokens,
        "ours_tok_s": round(tok_s["ours (sorted grouped_mm)"], 1),
        "hf_eager_tok_s": round(tok_s["transformers eager"], 1),
        "hf_grouped_tok_s": round(tok_s["transformers grouped_mm"], 1),
        "speedup_vs_hf_best": round(tok_s["ours (sorted grouped_mm)"] / hf_best, 2),
        "fraction_of_matmul_peak": round(ours_flops / peak, 3),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "max_abs_diff_vs_hf": diff,
    }
