"""`vla demo`: the end-to-end demo. Until the full pipeline lands, a smoke run: build a tiny DeepSeek-V2-family
language model, save it in the official format, load it back and generate with the latent KV cache."""

from __future__ import annotations

import tempfile

from omegaconf import OmegaConf

from backbone.checkpoint import save_language_model
from backbone.config import tiny_test_config
from backbone.language_model import build_language_model
from vla import generate as generate_cmd


def main(cfg) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        save_language_model(build_language_model(tiny_test_config()), tmp)
        gen_cfg = OmegaConf.create(dict(checkpoint=tmp, preset=None, prompt_ids=[0, 17, 42, 7], max_new_tokens=16,
                                        temperature=0.0, top_p=1.0, seed=0, dtype="float32"))
        return generate_cmd.main(gen_cfg)
