"""`vla bench decode`: KV-cache bytes per token and greedy decode tokens/s, ours (latent cache, absorbed MLA) against
transformers' DeepseekV2ForCausalLM (expanded K/V cache) on the same weights.

Model: hidden 512, 16 heads, kv_lora_rank 128, rope 32 (nope 64, v 64), 4 layers (1 dense + 3 MoE of 16 experts,
top-4, 2 shared), fp32. Contexts 512 and 2048 (quick: 128 and 512); decode steps timed after the prefill.
"""

from __future__ import annotations

import time

import torch

from backbone.checkpoint import load_language_model
from benchmarks._util import print_table, setup


def _hf_model(seed: int):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    cfg = DeepseekV2Config(
        vocab_size=1024, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=128, q_lora_rank=None, qk_rope_head_dim=32,
        qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=4,
        first_k_dense_replace=1, topk_method="greedy", max_position_embeddings=4096, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.05)
    return model


def _hf_cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def _decode_ours(model, prompt, steps):
    cache = model.new_cache(1, prompt.shape[1] + steps + 1)
    logits = model(prompt, cache=cache, logits_to_keep=1).logits[:, -1]
    tokens = []
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = logits.argmax(-1, keepdim=True)
        tokens.append(nxt)
        logits = model(nxt, cache=cache, logits_to_keep=1).logits[:, -1]
    seconds = time.perf_counter() - t0
    return torch.cat(tokens, 1), seconds, cache.nbytes() / cache.max_len


@torch.no_grad()
def _decode_hf(model, prompt, steps):
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache, logits = out.past_key_values, out.logits[:, -1]
    bytes_per_token = _hf_cache_bytes(cache) / prompt.shape[1]
    tokens = []
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = logits.argmax(-1, keepdim=True)
        tokens.append(nxt)
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache, logits = out.past_key_values, out.logits[:, -1]
    seconds = time.perf_counter() - t0
    return torch.cat(tokens, 1), seconds, bytes_per_token


def run(cfg) -> dict:
    setup(cfg)
    import tempfile

    hf = _hf_model(int(cfg.seed))
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = load_language_model(tmp)
    contexts = (128, 512) if cfg.quick else (512, 2048)
    steps = 16 if cfg.quick else 32
    rows, result = [], {"bench": "decode"}
    for ctx in contexts:
        prompt = torch.randint(0, 1024, (1, ctx), generator=torch.Generator().manual_seed(ctx))
        _decode_ours(ours, prompt[:, :32], 2)  # warm-up
        _decode_hf(hf, prompt[:, :32], 2)
        # best of two runs each, interleaved, so a noisy neighbour hurts both sides alike
        runs_ours = [_decode_ours(ours, prompt, steps) for _ in range(2)]
        runs_hf = [_decode_hf(hf, prompt, steps) for _ in range(2)]
        tok_ours, s_ours, bytes_ours = min(runs_ours, key=lambda r: r[1])
        tok_hf, s_hf, bytes_hf = min(runs_hf, key=lambda r: r[1])
        # identical greedy tokens up to the first near-tie (random weights give close logits)
        agree = (tok_ours == tok_hf).float().mean().item()
        rows.append([ctx, "ours (latent cache)", bytes_ours, steps / s_ours, agree])
        rows.append([ctx, "transformers", bytes_hf, steps / s_hf, ""])
        result[f"ours_tok_s_{ctx}"] = round(steps / s_ours, 1)
        result[f"hf_tok_s_{ctx}"] = round(steps / s_hf, 1)
        result[f"decode_speedup_vs_hf_{ctx}"] = round(s_hf / s_ours, 2)
        result["cache_bytes_per_token_ours"] = bytes_ours
        result["cache_bytes_per_token_hf"] = bytes_hf
        result[f"greedy_agreement_{ctx}"] = agree
    print(f"greedy decode, {steps} steps after the prompt, fp32, {torch.get_num_threads()} threads")
    print_table(["context", "model", "cache B/token", "tokens/s", "same tokens"], rows)
    result["cache_bytes_ratio_vs_hf"] = round(result["cache_bytes_per_token_hf"] / result["cache_bytes_per_token_ours"], 2)
    result.setdefault("decode_speedup_vs_hf_2048", None)  # --quick stops at 512
    return result
