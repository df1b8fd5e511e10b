"""`vla bench policy`: milliseconds per `select_action` call that computes a new chunk, and the control rate it
allows, for parallel and autoregressive decoding, on the demo-size model and on the DeepSeek-VL2 `tiny` preset, and
for the demo's own policy (parallel, grounding first: `ground_target` + `target_token`, configs/demo.yaml), which
generates its grounding answer before the action pass. On random weights that answer never reaches `<|/det|>`, so
the row is the worst case: `max_grounding_tokens` (48) generated tokens; a trained policy stops after ~24.

Control rate = chunk steps served per chunk / seconds per chunk (the policy re-plans once per served chunk). Both
decodings run on the same random weights. The "forward passes" column is counted, not computed: a hook on the language
model counts its calls during one `select_action` (parallel: 1; autoregressive: the prefill, which gives the first
action token, one per further action token, and the teacher-forced offset pass; grounding first: the prefill, one per
further answer token, and the action pass). `--quick` skips the tiny preset (3.4B parameters).
"""

from __future__ import annotations

import time

import torch

from backbone.tokenizer import build_bpe_tokenizer
from benchmarks._util import print_table, setup, time_interleaved
from heads.embodiment import Embodiment, EmbodimentRegistry
from vla.policy import VLAPolicyConfig, build_policy

DEMO_BACKBONE = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=4,
                     num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)


GROUNDED = "parallel, grounding first"
GROUNDED_COMPILED = "parallel, grounding first, compiled decode"


def _registry(chunk_len: int) -> EmbodimentRegistry:
    return EmbodimentRegistry([Embodiment("point2d", action_dim=2, state_dim=2, cameras=("observation.images.top",),
                                          fps=10, chunk_len=chunk_len)])


def _batch(image_size: int) -> dict:
    return {"observation.images.top": torch.rand(1, 3, image_size, image_size), "observation.state": torch.zeros(1, 2),
            "task": ["go to the red square"], "embodiment": ["point2d"]}


def _policy(preset: str, overrides: dict, chunk_len: int, dtype: torch.dtype, **config):
    """One policy; both decodings run on it (the decoding mode is read at call time), so they share the weights.
    `config`: VLAPolicyConfig fields (the grounded row's); the backbone's weights are the same for every config."""
    torch.manual_seed(0)
    tok = build_bpe_tokenizer(vocab_size=400)
    return build_policy(VLAPolicyConfig(**config), _registry(chunk_len), tok, preset, **overrides).to(dtype).eval()


def count_forward_passes(policy, call) -> int:
    """How many times the policy's language model (the decoder stack) runs a forward pass during `call()`."""
    calls = 0

    def hook(module, args) -> None:
        nonlocal calls
        calls += 1

    handle = policy.backbone.language.register_forward_pre_hook(hook)
    try:
        call()
    finally:
        handle.remove()
    return calls


def _measure(name: str, preset: str, overrides: dict, image_size: int, chunk_len: int, repeats: int, dtype,
             grounded: bool = False, compiled: bool = False, extra: dict | None = None) -> list:
    """Rows [model, decoding, forward passes, ms / chunk, control Hz]. `compiled` (with `grounded`): the grounded
    policy once more with `compile_decoding()`; its first call (the compilation) is timed into `extra["compile_s"]`,
    and `extra["same_answer"]` says whether both grounded policies generated the same answer."""
    extra = {} if extra is None else extra
    policy = _policy(preset, overrides, chunk_len, dtype)
    rows = {"parallel": (policy, "parallel"), "autoregressive": (policy, "autoregressive")}
    if grounded:
        grounded_policy = _policy(preset, overrides, chunk_len, dtype, ground_target=True, target_token=True)
        rows[GROUNDED] = (grounded_policy, "parallel")
    batch = _batch(image_size)
    if grounded and compiled:
        compiled_policy = _policy(preset, overrides, chunk_len, dtype, ground_target=True, target_token=True)
        compiled_policy.compile_decoding()
        rows[GROUNDED_COMPILED] = (compiled_policy, "parallel")
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled_policy.select_action(batch)
        extra["compile_s"] = time.perf_counter() - t0

    def new_chunk(row: str):
        policy, decoding = rows[row]

        def call():
            policy.config.decoding = decoding
            policy.reset()
            policy.select_action(batch)
        return call

    with torch.no_grad():
        seconds = time_interleaved({row: new_chunk(row) for row in rows}, repeats)
        # one more call each, counted on the policy that ran it
        passes = {row: count_forward_passes(rows[row][0], new_chunk(row)) for row in rows}
    if GROUNDED_COMPILED in rows:
        extra["same_answer"] = grounded_policy.last_grounding == compiled_policy.last_grounding
    return [[name, row, passes[row], s * 1e3, chunk_len / s] for row, s in seconds.items()]


def run(cfg) -> dict:
    setup(cfg)
    chunk_len = 8
    compiled: dict = {}
    rows = _measure("demo", "test", DEMO_BACKBONE, 64, chunk_len, 3 if cfg.quick else 10, torch.float32, grounded=True,
                    compiled=bool(cfg.compile), extra=compiled)
    if not cfg.quick:
        rows += _measure("tiny (VL2-Tiny, 3.4B)", "tiny", {}, 384, chunk_len, 2, torch.bfloat16)
    threads = torch.get_num_threads()
    print(f"select_action computing a new chunk of {chunk_len} steps x 2 dims, batch 1, {threads} threads")
    print_table(["model", "decoding", "forward passes", "ms / chunk", "control Hz"], rows)
    result: dict = {"bench": "policy", "chunk_len": chunk_len, "action_dim": 2}
    for model, decoding, passes, ms, hz in rows:
        key = ("demo" if model == "demo" else "tiny") + "_" + {GROUNDED: "grounded", GROUNDED_COMPILED:
                                                                "grounded_compiled"}.get(decoding, decoding)
        result[f"{key}_ms"] = round(ms, 2)
        result[f"{key}_hz"] = round(hz, 2)
        result[f"{key}_forward_passes"] = passes
    result["parallel_speedup"] = round(result["demo_autoregressive_ms"] / result["demo_parallel_ms"], 2)
    if compiled:
        result["grounded_compiled_speedup"] = round(result["demo_grounded_ms"] / result["demo_grounded_compiled_ms"], 2)
        result["grounded_compile_s"] = round(compiled["compile_s"], 1)
        result["grounded_compiled_same_answer"] = compiled["same_answer"]
        print(f"compiled decode: {result['grounded_compiled_speedup']}x the grounded chunk, "
              f"{result['grounded_compile_s']} s to compile, same answer: {compiled['same_answer']}")
    if "tiny_parallel_ms" in result:
        result["parallel_speedup_tiny"] = round(result["tiny_autoregressive_ms"] / result["tiny_parallel_ms"], 2)
    return result
