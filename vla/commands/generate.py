"""`vla generate`: greedy or sampled generation from a language-model checkpoint (or a tiny random model).

Prints the new token ids, decode speed and the KV-cache footprint. With no checkpoint and no preset it builds a
CPU-sized random model, which makes a fast end-to-end smoke run of the language model.
"""

from __future__ import annotations

import time

import torch

from backbone.checkpoint import load_language_model
from backbone.config import language_preset, tiny_test_config
from backbone.generate import generate
from backbone.language_model import build_language_model


def main(cfg) -> int:
    torch.manual_seed(cfg.seed)
    dtype = getattr(torch, cfg.dtype)
    if cfg.checkpoint:
        model = load_language_model(cfg.checkpoint, dtype=dtype)
        source = cfg.checkpoint
    else:
        config = language_preset(cfg.preset) if cfg.preset else tiny_test_config()
        model = build_language_model(config, dtype=dtype).eval()
        source = f"random {cfg.preset or 'test-size'} model"
    ids = torch.tensor([list(cfg.prompt_ids)], dtype=torch.long)
    if int(ids.max()) >= model.config.vocab_size:
        raise SystemExit(f"prompt id {int(ids.max())} is outside the vocabulary ({model.config.vocab_size})")
    t0 = time.perf_counter()
    out = generate(model, ids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                   stop_token_ids=[model.config.eos_token_id] if model.config.eos_token_id is not None else [])
    seconds = time.perf_counter() - t0
    print(f"model: {source}: {model.num_parameters() / 1e6:.2f}M parameters "
          f"({model.num_active_parameters() / 1e6:.2f}M active), KV cache {model.kv_cache_bytes_per_token(dtype)} B/token")
    print(f"prompt ids: {ids[0].tolist()}")
    print(f"generated ids: {out[0].tolist()}")
    print(f"{out.shape[1]} tokens in {seconds:.3f} s ({out.shape[1] / seconds:.1f} tokens/s incl. prefill)")
    return 0
