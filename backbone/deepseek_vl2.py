"""DeepSeek-VL2: the vision encoder (SigLIP + adaptor + layout) feeding the DeepSeekMoE language model.

`DeepseekVL2(config)` has two submodules: `vision_encoder` (backbone.vision.VisionEncoder) and `language`
(backbone.language_model.DeepseekV2LM). Image embeddings replace the `<image>` positions of the token embeddings;
positions stay plain 1-D; text-only batches never touch the vision tower.

`load_deepseek_vl2(path)` reads an official-format checkpoint folder (config.json with vision_config /
projector_config / language_config; safetensors with `vision.*` in timm naming, `projector.layers.{0,2}.*`,
`image_newline`, `view_seperator`, `language.model.*`, `language.lm_head.*`); `save_deepseek_vl2` writes the same.
All key surgery lives in backbone/convert.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backbone.cache import KVCache
from backbone.checkpoint import (CheckpointError, checkpoint_folder, load_into, read_config, read_safetensors,
                                 write_checkpoint)
from backbone.config import LanguageModelConfig, language_preset, tiny_test_config
from backbone.convert import deepseek_vl2_from_official, deepseek_vl2_to_official
from backbone.generate import generate, prefill
from backbone.language_model import DeepseekV2LM, LMOutput
from backbone.processor import ProcessorConfig, make_candidate_resolutions
from backbone.vision import ProjectorConfig, VisionConfig, VisionEncoder


@dataclass
class DeepseekVL2Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    language: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    max_tiles: int = 9
    tile_tag: str = "2D"
    global_view_pos: str = "head"
    center_image_tokens: bool = False  # extension for from-scratch towers (see VisionEncoder); off in official models

    def __post_init__(self) -> None:
        if self.projector.n_embed != self.language.hidden_size:
            raise ValueError(f"projector n_embed {self.projector.n_embed} != language hidden_size {self.language.hidden_size}")
        if self.projector.input_dim != self.vision.width:
            raise ValueError(f"projector input_dim {self.projector.input_dim} != vision width {self.vision.width}")
        if self.tile_tag != "2D":
            raise ValueError(f"only the '2D' tile tag of DeepSeek-VL2 is implemented, got {self.tile_tag!r}")

    def processor_config(self, **overrides: Any) -> ProcessorConfig:
        """The processor settings this model expects (tile = the tower's image size)."""
        values = dict(tile_size=self.vision.image_size, patch_size=self.vision.patch_size,
                      downsample_ratio=self.projector.downsample_ratio, max_tiles=self.max_tiles,
                      max_length=self.language.max_position_embeddings)
        values.update(overrides)
        return ProcessorConfig(**values)

    def to_official(self) -> dict[str, Any]:
        return {
            "model_type": "deepseek_vl_v2",
            "architectures": ["DeepseekVLV2ForCausalLM"],
            "tile_tag": self.tile_tag,
            "global_view_pos": self.global_view_pos,
            "candidate_resolutions": [list(r) for r in make_candidate_resolutions(self.vision.image_size, self.max_tiles)],
            "vision_config": self.vision.to_official(),
            "projector_config": self.projector.to_official(),
            "language_config": self.language.to_dict(),
        } | ({"center_image_tokens": True} if self.center_image_tokens else {})

    @classmethod
    def from_official(cls, cfg: dict[str, Any]) -> "DeepseekVL2Config":
        for key in ("vision_config", "projector_config", "language_config"):
            if key not in cfg:
                raise CheckpointError(f"config.json has no {key!r}: not a DeepSeek-VL2 checkpoint")
        vision = VisionConfig.from_official(cfg["vision_config"])
        candidates = cfg.get("candidate_resolutions")
        max_tiles = max((w // vision.image_size) * (h // vision.image_size) for w, h in candidates) if candidates else 9
        return cls(vision=vision, projector=ProjectorConfig.from_official(cfg["projector_config"]),
                   language=LanguageModelConfig.from_dict(cfg["language_config"]), max_tiles=max_tiles,
                   tile_tag=cfg.get("tile_tag", "2D"), global_view_pos=cfg.get("global_view_pos", "head"),
                   center_image_tokens=bool(cfg.get("center_image_tokens", False)))


def deepseek_vl2_preset(name: str, vision: dict[str, Any] | None = None, **language_overrides: Any) -> DeepseekVL2Config:
    """Whole-model presets: `tiny` / `small` / `base` (published numbers), `test` (CPU-sized, for tests and the demo;
    trained from scratch, so it centres image tokens, see VisionEncoder). `vision`: VisionConfig overrides of the
    preset's tower (e.g. {width: 64, layers: 4}); the projector follows the tower's width."""
    if name == "test":
        language = tiny_test_config(**language_overrides)
        vision = VisionConfig.preset("tiny", **(vision or {}))
        return DeepseekVL2Config(vision=vision, projector=ProjectorConfig(input_dim=vision.width, n_embed=language.hidden_size),
                                 language=language, max_tiles=4, center_image_tokens=True)
    language = language_preset(name, **language_overrides)
    vision = VisionConfig.preset("so400m", **(vision or {}))
    return DeepseekVL2Config(vision=vision, projector=ProjectorConfig(input_dim=vision.width, n_embed=language.hidden_size),
                             language=language)


class DeepseekVL2(nn.Module):
    def __init__(self, config: DeepseekVL2Config):
        super().__init__()
        self.config = config
        self.vision_encoder = VisionEncoder(config.vision, config.projector, config.global_view_pos,
                                            config.center_image_tokens)
        self.language = DeepseekV2LM(config.language)

    def prepare_inputs_embeds(self, input_ids, images=None, images_seq_mask=None, images_spatial_crop=None) -> torch.Tensor:
        """Token embeddings with the `<image>` positions filled by the vision encoder."""
        embeds_BTD = self.language.embed(input_ids)
        if images is None or images_seq_mask is None:
            return embeds_BTD
        return self.vision_encoder.merge_into(embeds_BTD, images_seq_mask, images, images_spatial_crop)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        images_seq_mask: torch.Tensor | None = None,
        images_spatial_crop: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_router: bool = False,
        logits_to_keep: int = 0,
        compute_logits: bool = True,
        block_ids: torch.Tensor | None = None,
        router_bias: dict[int, torch.Tensor] | None = None,
        **_: Any,
    ) -> LMOutput:
        """Inputs as the processor's `collate` makes them; extra batch keys (labels, seq_lens, ...) are ignored."""
        if inputs_embeds is None:
            inputs_embeds = self.prepare_inputs_embeds(input_ids, images, images_seq_mask, images_spatial_crop)
        return self.language(inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
                             return_router=return_router, logits_to_keep=logits_to_keep, compute_logits=compute_logits,
                             block_ids=block_ids, router_bias=router_bias)

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], max_new_tokens: int = 64, prefill_chunk_size: int = 0, **kwargs) -> torch.Tensor:
        """Generate from a processed batch (left padded); kwargs go to backbone.generate.generate."""
        embeds = self.prepare_inputs_embeds(batch["input_ids"], batch.get("images"), batch.get("images_seq_mask"),
                                            batch.get("images_spatial_crop"))
        return generate(self.language, inputs_embeds=embeds, attention_mask=batch.get("attention_mask"),
                        max_new_tokens=max_new_tokens, prefill_chunk_size=prefill_chunk_size, **kwargs)

    @torch.no_grad()
    def prefill(self, batch: dict[str, Any], chunk_size: int = 512, extra_len: int = 0) -> tuple[KVCache, torch.Tensor]:
        """Incremental prefilling of a long (multi-image) prompt in chunks; returns (cache, last logits)."""
        embeds = self.prepare_inputs_embeds(batch["input_ids"], batch.get("images"), batch.get("images_seq_mask"),
                                            batch.get("images_spatial_crop"))
        cache = self.language.new_cache(embeds.shape[0], embeds.shape[1] + extra_len)
        logits = prefill(self.language, cache, inputs_embeds=embeds, attention_mask=batch.get("attention_mask"),
                         chunk_size=chunk_size)
        return cache, logits

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_deepseek_vl2(config: DeepseekVL2Config | str, device: str | torch.device | None = None,
                       dtype: torch.dtype | None = None) -> DeepseekVL2:
    """Build from a config or preset name; device="meta" builds without allocating (parameter counting)."""
    if isinstance(config, str):
        config = deepseek_vl2_preset(config)
    with torch.device(device or "cpu"):
        model = DeepseekVL2(config)
    return model.to(dtype) if dtype is not None else model


def load_deepseek_vl2(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> DeepseekVL2:
    """Load an official-format DeepSeek-VL2 checkpoint from a local folder or a hub id in the local cache
    (`backbone.checkpoint.checkpoint_folder`; `vision.attn_pool.*` is ignored)."""
    path = checkpoint_folder(path)
    config = DeepseekVL2Config.from_official(read_config(path))
    try:
        state = deepseek_vl2_from_official(read_safetensors(path), config.language.n_routed_experts)
    except KeyError as e:
        raise CheckpointError(f"{path}: {e.args[0]}") from e
    model = build_deepseek_vl2(config, device="meta")
    load_into(model, state, str(path), dtype)
    model.vision_encoder.reset_buffers()
    return model.to(device).eval()


def save_deepseek_vl2(model: DeepseekVL2, path: str | Path, extra_config: dict[str, Any] | None = None) -> None:
    """Write config.json + safetensors in the official DeepSeek-VL2 naming."""
    config = model.config.to_official() | (extra_config or {})
    write_checkpoint(path, config, deepseek_vl2_to_official(model.state_dict()))


def compile_blocks(module: nn.Module, dynamic: bool = True, mode: str | None = None) -> int:
    """torch.compile, in place, every transformer block inside `module` (the language model's decoder layers and the
    SigLIP tower's encoder layers; `module` may be a DeepseekVL2 or anything holding one), as large-model trainers
    compile per block rather than the whole model: the loop over layers, the caches and the Python around them stay
    eager, each block is one graph shared by all layers of its kind. `dynamic`: sequence lengths vary from batch to
    batch; `mode` is torch.compile's (None: its default). On CPU the routed experts' grouped matmul runs eager inside
    the compiled block (backbone.moe.grouped_mm). A block may need graphs of its own where its modules differ in
    class from layer to layer (peft's adapters on a parameter, e.g. the routed experts', give each wrapped module a
    class of its own), so dynamo's recompile limits (per function, 8, and in all) are raised to cover every block
    instead of running the blocks past the eighth eager. Returns the number of blocks compiled."""
    import torch._dynamo
    from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

    from backbone.language_model import DecoderLayer

    blocks = [m for m in module.modules() if isinstance(m, (DecoderLayer, SiglipEncoderLayer))]
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 8 * len(blocks))
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 16 * len(blocks))
    for block in blocks:
        block.compile(dynamic=dynamic, mode=mode)
    return len(blocks)


def replace_language(config: DeepseekVL2Config, **changes: Any) -> DeepseekVL2Config:
    """A copy of `config` with language-model fields changed (e.g. a grown vocabulary)."""
    return dataclasses.replace(config, language=dataclasses.replace(config.language, **changes))
