"""backbone: DeepSeek-VL2 (SigLIP tiling vision + adaptor + DeepSeekMoE/MLA language model). Knows nothing of robots.

Public entry points are importable from the package root (resolved lazily, so `import backbone` stays cheap):
    backbone.load_language_model(path, dtype=None)      DeepSeek-V2-family causal LM from a local folder
    backbone.save_language_model(model, path)           official naming
    backbone.build_language_model(config, device=None)  from a LanguageModelConfig ("meta" counts without memory)
    backbone.language_preset(name)                      tiny / small / base language configs
    backbone.generate(model, input_ids, ...)            latent-cache generation
    backbone.compile_decoder(model)                     the model compiled for generate's decode passes
    backbone.select_best_resolution(width, height)      DeepSeek-VL2 tiling
    backbone.image_token_count(width, height, num_images=1)
    backbone.compile_blocks(model)                       torch.compile each transformer block in place
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LanguageModelConfig": "backbone.config",
    "language_preset": "backbone.config",
    "tiny_test_config": "backbone.config",
    "build_language_model": "backbone.language_model",
    "DeepseekV2LM": "backbone.language_model",
    "load_language_model": "backbone.checkpoint",
    "save_language_model": "backbone.checkpoint",
    "CheckpointError": "backbone.checkpoint",
    "KVCache": "backbone.cache",
    "generate": "backbone.generate",
    "compile_decoder": "backbone.generate",
    "select_best_resolution": "backbone.processor",
    "image_token_count": "backbone.processor",
    "load_deepseek_vl2": "backbone.deepseek_vl2",
    "save_deepseek_vl2": "backbone.deepseek_vl2",
    "build_deepseek_vl2": "backbone.deepseek_vl2",
    "compile_blocks": "backbone.deepseek_vl2",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'backbone' has no attribute {name!r}")
