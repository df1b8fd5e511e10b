"""DeepSeek-VL2 vision side: SigLIP tower, 2x2 downsampling MLP adaptor, and the 2D token layout of tiled images.

Pipeline for one image tiled nw x nh (docs/architecture.md, "Vision tower and the 2x2 adaptor" and "Image token
layout"):

    tiles (1 + nw*nh, 3, 384, 384)                     global view first, then local tiles row-major
      -> SigLIP-SO400M (transformers SiglipVisionModel)  27x27 = 729 patch tokens (the last 6 px are never seen),
                                                         last hidden state after post_layernorm, no pooling head
      -> Projector: pad 27x27 -> 28x28 with zeros, 2x2 unfold -> 196 tokens of 4*1152 (feature c*4 + ki*2 + kj),
                    Linear -> GELU (exact erf) -> Linear into the language model width N
      -> layout: global 14x14 grid + `image_newline` after each row (210), `view_seperator` (1),
                 local tiles as one (nh*14) x (nw*14) grid + `image_newline` after each row
    = image_token_count(...) embeddings, which replace that image's `<image>` positions in the text embeddings.

Parameter names of `VisionEncoder` (its state_dict keys) and the official checkpoint keys they come from; the
conversion itself lives in backbone/convert.py:

    official (timm naming)                         here
    vision.patch_embed.proj.{weight,bias}          vision.vision_model.embeddings.patch_embedding.{weight,bias}
    vision.pos_embed [1, 729, C]                   vision.vision_model.embeddings.position_embedding.weight [729, C]
    vision.blocks.{i}.norm1.{weight,bias}          vision.vision_model.encoder.layers.{i}.layer_norm1.{weight,bias}
    vision.blocks.{i}.attn.qkv.{weight,bias}       vision.vision_model.encoder.layers.{i}.self_attn.{q,k,v}_proj.*
                                                   (rows split in thirds: q | k | v)
    vision.blocks.{i}.attn.proj.{weight,bias}      vision.vision_model.encoder.layers.{i}.self_attn.out_proj.*
    vision.blocks.{i}.norm2.{weight,bias}          vision.vision_model.encoder.layers.{i}.layer_norm2.{weight,bias}
    vision.blocks.{i}.mlp.fc{1,2}.{weight,bias}    vision.vision_model.encoder.layers.{i}.mlp.fc{1,2}.{weight,bias}
    vision.norm.{weight,bias}                      vision.vision_model.post_layernorm.{weight,bias}
    vision.attn_pool.*                             (unused by DeepSeek-VL2: no pooling head is built)
    projector.layers.{0,2}.{weight,bias}           projector.layers.{0,2}.{weight,bias}   (same)
    image_newline [N], view_seperator [N]          image_newline, view_seperator           (same; sic)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel


# --------------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class VisionConfig:
    """The SigLIP tower. Defaults are SigLIP-SO400M-patch14-384 as DeepSeek-VL2 uses it."""

    image_size: int = 384
    patch_size: int = 14
    width: int = 1152
    layers: int = 27
    heads: int = 16
    mlp_dim: int = 4304  # int(1152 * 3.7362)
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    model_name: str = "siglip_so400m_patch14_384"

    @property
    def grid_side(self) -> int:
        """Patch tokens along a side: floor(image / patch) (27 for 384/14: the last 6 pixels are never seen)."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid_side**2

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> VisionConfig:
        """`so400m` (the published tower) or `tiny` (64 px, patch 8, width 32, 2 layers; pairs with the tiny
        processor preset)."""
        presets = {
            "so400m": {},
            "tiny": dict(image_size=64, patch_size=8, width=32, layers=2, heads=2, mlp_dim=64, model_name="tiny"),
        }
        if name not in presets:
            raise KeyError(f"unknown vision preset {name!r}; known: {sorted(presets)}")
        return cls(**(presets[name] | overrides))

    @classmethod
    def from_official(cls, vision_config: dict[str, Any]) -> VisionConfig:
        """From config.json's `vision_config` (timm keys; absent keys take the official VisionEncoderConfig
        defaults, except `patch_size` / `width` / `layers` which every published config sets)."""
        width = int(vision_config.get("width", 1152))
        return cls(
            image_size=int(vision_config.get("image_size", 384)),
            patch_size=int(vision_config.get("patch_size", 14)),
            width=width,
            layers=int(vision_config.get("layers", 27)),
            heads=int(vision_config.get("heads", 16)),
            mlp_dim=int(width * float(vision_config.get("mlp_ratio", 3.7362))),  # timm: int(width * mlp_ratio)
            model_name=str(vision_config.get("model_name", "siglip_so400m_patch14_384")),
        )

    def to_official(self) -> dict[str, Any]:
        """config.json's `vision_config`; `mlp_ratio` is chosen so that int(width * mlp_ratio) == mlp_dim."""
        ratio = round(self.mlp_dim / self.width, 4)
        if int(self.width * ratio) != self.mlp_dim:
            ratio = (self.mlp_dim + 0.5) / self.width
        return {
            "model_type": "vision",
            "model_name": self.model_name,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "width": self.width,
            "layers": self.layers,
            "heads": self.heads,
            "mlp_ratio": ratio,
        }

    def to_siglip(self) -> SiglipVisionConfig:
        """The transformers config: no pooling head (`vision_use_head=False`)."""
        return SiglipVisionConfig(
            hidden_size=self.width,
            intermediate_size=self.mlp_dim,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            layer_norm_eps=self.layer_norm_eps,
            hidden_act=self.hidden_act,
            attention_dropout=0.0,
            vision_use_head=False,
        )


@dataclass
class ProjectorConfig:
    """The adaptor ("downsample_mlp_gelu"): 2x2 token merge then an MLP into the language model width `n_embed`."""

    input_dim: int = 1152
    n_embed: int = 2048  # LM hidden size: 1280 tiny / 2048 small / 2560 base
    depth: int = 2
    mlp_ratio: int = 1
    downsample_ratio: int = 2
    projector_type: str = "downsample_mlp_gelu"

    def __post_init__(self) -> None:
        if self.projector_type != "downsample_mlp_gelu":
            raise ValueError(f"only the downsample_mlp_gelu projector is implemented, got {self.projector_type!r}")
        if self.depth < 1:
            raise ValueError(f"projector depth must be >= 1, got {self.depth}")

    @classmethod
    def from_official(cls, projector_config: dict[str, Any]) -> ProjectorConfig:
        """From config.json's `projector_config` (absent keys take the official MlpProjectorConfig defaults)."""
        if projector_config.get("token_pooling", False):
            raise ValueError("token_pooling projectors are not used by DeepSeek-VL2 and are not implemented")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in projector_config.items() if k in known})

    def to_official(self) -> dict[str, Any]:
        return {"model_type": "mlp_projector", **asdict(self), "token_pooling": False}


# --------------------------------------------------------------------------------------------------------------------
# Adaptor
# --------------------------------------------------------------------------------------------------------------------
class Projector(nn.Module):
    """(B, g*g, C) patch tokens -> (B, ceil(g/r)^2, n_embed).

    The g x g grid is zero-padded bottom/right to a multiple of r, each r x r block is flattened channel-outermost
    (feature index c*r*r + ki*r + kj, what `F.unfold` gives), then Linear -> GELU -> ... -> Linear. With depth 2
    the parameters are `layers.0` (r*r*C -> N) and `layers.2` (N -> N), as in the checkpoint.
    """

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        self.config = config
        r = config.downsample_ratio
        hidden = config.n_embed * config.mlp_ratio
        modules: list[nn.Module] = [nn.Linear(config.input_dim * r * r, hidden)]
        for _ in range(1, config.depth - 1):
            modules += [nn.GELU(), nn.Linear(hidden, hidden)]
        modules += [nn.GELU(), nn.Linear(hidden, config.n_embed)]
        self.layers = nn.Sequential(*modules)

    def merge(self, x_BLC: torch.Tensor) -> torch.Tensor:
        """The parameter-free part: (B, g*g, C) -> (B, ceil(g/r)^2, C*r*r)."""
        batch, length, channels = x_BLC.shape
        side = math.isqrt(length)
        if side * side != length:
            raise ValueError(f"projector input must be a square grid of tokens, got {length}")
        r = self.config.downsample_ratio
        pad = (r - side % r) % r
        x_BHWC = x_BLC.reshape(batch, side, side, channels)
        if pad:
            x_BHWC = F.pad(x_BHWC, (0, 0, 0, pad, 0, pad))  # zero rows at the bottom, zero columns at the right
        x_BCHW = x_BHWC.permute(0, 3, 1, 2)
        x_BFL = F.unfold(x_BCHW, kernel_size=r, stride=r)  # (B, C*r*r, L'), feature = c*r*r + ki*r + kj
        return x_BFL.permute(0, 2, 1)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        return self.layers(self.merge(x_BLC))


# --------------------------------------------------------------------------------------------------------------------
# Token layout
# --------------------------------------------------------------------------------------------------------------------
def layout_image_tokens(
    tiles_NLD: torch.Tensor,
    image_newline_D: torch.Tensor,
    view_separator_D: torch.Tensor,
    num_width_tiles: int,
    num_height_tiles: int,
    global_view_pos: str = "head",
) -> torch.Tensor:
    """The embedding sequence of one image from its projected tiles (official "2D" tile tag).

    tiles_NLD: (1 + nw*nh, h*h, D), the global view first, then the local tiles row-major.
    Returns (h*(h+1) + 1 + (nh*h)*(nw*h+1), D): the global h x h grid with `image_newline` after each row, then
    `view_separator`, then the local tiles as one (nh*h) x (nw*h) grid ("(th tw)(h w) d -> (th h)(tw w) d") with
    `image_newline` after each row. `global_view_pos="tail"` puts the local grid first (not used by DeepSeek-VL2).
    """
    num_tiles, length, dim = tiles_NLD.shape
    h = math.isqrt(length)
    if h * h != length:
        raise ValueError(f"tile token count {length} is not a square")
    if num_tiles != 1 + num_width_tiles * num_height_tiles:
        raise ValueError(f"{num_tiles} tiles given for a {num_width_tiles}x{num_height_tiles} image (needs 1 + nw*nh)")
    newline_D = image_newline_D.to(tiles_NLD.dtype)

    global_hwD = tiles_NLD[0].reshape(h, h, dim)
    global_rows = torch.cat([global_hwD, newline_D.expand(h, 1, dim)], dim=1).reshape(-1, dim)

    # (th*tw, h*w, D) -> (th, tw, h, w, D) -> (th, h, tw, w, D) -> (th*h, tw*w, D)
    local = tiles_NLD[1:].reshape(num_height_tiles, num_width_tiles, h, h, dim).permute(0, 2, 1, 3, 4)
    local = local.reshape(num_height_tiles * h, num_width_tiles * h, dim)
    local_rows = torch.cat([local, newline_D.expand(num_height_tiles * h, 1, dim)], dim=1).reshape(-1, dim)

    separator_1D = view_separator_D.to(tiles_NLD.dtype)[None]
    if global_view_pos == "head":
        return torch.cat([global_rows, separator_1D, local_rows])
    if global_view_pos == "tail":
        return torch.cat([local_rows, separator_1D, global_rows])
    raise ValueError(f"global_view_pos must be 'head' or 'tail', got {global_view_pos!r}")


def layout_global_view(tiles_NLD: torch.Tensor, image_newline_D: torch.Tensor) -> torch.Tensor:
    """Global-view-only layout of N single-view frames: each h x h grid with `image_newline` after every row,
    (N, h*(h+1), D). A cheaper frame encoding for control (210 tokens at 384 px instead of 421)."""
    num, length, dim = tiles_NLD.shape
    h = math.isqrt(length)
    grid = tiles_NLD.reshape(num, h, h, dim)
    rows = torch.cat([grid, image_newline_D.to(tiles_NLD.dtype).expand(num, h, 1, dim)], dim=2)
    return rows.reshape(num, h * (h + 1), dim)


# --------------------------------------------------------------------------------------------------------------------
# The encoder the full model calls
# --------------------------------------------------------------------------------------------------------------------
class VisionEncoder(nn.Module):
    """SigLIP tower + projector + the learned `image_newline` / `view_seperator` vectors.

    Submodules / parameters (see the module docstring for checkpoint names): `vision` (transformers
    SiglipVisionModel), `projector` (`layers.{0,2}`), `image_newline` (N,), `view_seperator` (N,) (misspelled as
    in the checkpoint).
    """

    def __init__(self, vision_config: VisionConfig, projector_config: ProjectorConfig, global_view_pos: str = "head",
                 center_tokens: bool = False):
        super().__init__()
        # Extension, off for DeepSeek-VL2 checkpoints: subtract each tile's mean token after the projector. A
        # from-scratch tower's tokens share a large common component (token-to-token differences ~0.1-0.3 of the
        # token norm), which keeps the language model from singling out one object's token; centred, a position-
        # dependent action is learned in ~150 steps instead of not at all in 300 (docs/experiments.md, "Centred
        # image tokens").
        self.center_tokens = center_tokens
        if projector_config.input_dim != vision_config.width:
            raise ValueError(
                f"projector input_dim {projector_config.input_dim} != vision width {vision_config.width}"
            )
        self.vision_config = vision_config
        self.projector_config = projector_config
        self.global_view_pos = global_view_pos
        self.vision = SiglipVisionModel(vision_config.to_siglip())
        self.projector = Projector(projector_config)
        embed_std = 1 / math.sqrt(projector_config.n_embed)  # official init
        self.image_newline = nn.Parameter(torch.randn(projector_config.n_embed) * embed_std)
        self.view_seperator = nn.Parameter(torch.randn(projector_config.n_embed) * embed_std)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the non-persistent `position_ids` buffer (needed after building on the meta device and loading)."""
        embeddings = self.vision.vision_model.embeddings
        n = embeddings.position_embedding.weight.shape[0]
        embeddings.register_buffer("position_ids", torch.arange(n, device=embeddings.position_embedding.weight.device)
                                   .expand((1, -1)), persistent=False)

    @property
    def tokens_per_tile(self) -> int:
        return math.ceil(self.vision_config.grid_side / self.projector_config.downsample_ratio) ** 2

    def encode_tiles(self, tiles_NCHW: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) tiles -> (N, h*h, n_embed) projected tokens."""
        dtype = self.projector.layers[0].weight.dtype
        patches_NLC = self.vision(pixel_values=tiles_NCHW.to(dtype)).last_hidden_state
        tokens_NLD = self.projector(patches_NLC)
        if self.center_tokens:
            tokens_NLD = tokens_NLD - tokens_NLD.mean(dim=1, keepdim=True)
        return tokens_NLD

    def forward(self, images_NCHW: torch.Tensor, spatial_crop_I2: torch.Tensor) -> torch.Tensor:
        """The image embeddings of one sample, images concatenated in `<image>` order.

        images_NCHW: (n_tiles, 3, H, W) as the processor makes them (extra zero tiles at the end are ignored).
        spatial_crop_I2: (n_images, 2) rows [nw, nh]; the first row with a zero ends the list (padding).
        Returns (sum of image_token_count over the images, n_embed); (0, n_embed) when there are no images.
        """
        return torch.cat(self.embed_batch(images_NCHW[None], spatial_crop_I2[None]))

    def embed_batch(self, images_BNCHW: torch.Tensor, spatial_crop_BI2: torch.Tensor) -> list[torch.Tensor]:
        """Per sample of a collated batch, its image embeddings ((0, n_embed) for text-only samples).

        All valid tiles of the batch go through the tower in one call, as in the official model.
        """
        grids = [_valid_grids(crop_I2) for crop_I2 in spatial_crop_BI2.tolist()]
        tiles_per_sample = [sum(1 + nw * nh for nw, nh in sample) for sample in grids]
        valid = [images_BNCHW[b, :n] for b, n in enumerate(tiles_per_sample) if n]
        dim = self.projector_config.n_embed
        if not valid:
            empty = self.image_newline.new_zeros(0, dim)
            return [empty for _ in grids]
        tokens_NLD = self.encode_tiles(torch.cat(valid))

        per_sample, tile = [], 0
        for sample in grids:
            sequences = []
            for nw, nh in sample:
                tiles_NLD = tokens_NLD[tile : tile + 1 + nw * nh]
                tile += 1 + nw * nh
                sequences.append(
                    layout_image_tokens(tiles_NLD, self.image_newline, self.view_seperator, nw, nh, self.global_view_pos)
                )
            per_sample.append(torch.cat(sequences) if sequences else tokens_NLD.new_zeros(0, dim))
        return per_sample

    def merge_into(
        self,
        inputs_embeds_BTD: torch.Tensor,
        images_seq_mask_BT: torch.Tensor,
        images_BNCHW: torch.Tensor | None,
        spatial_crop_BI2: torch.Tensor | None,
    ) -> torch.Tensor:
        """Text embeddings with every `<image>` position replaced by its image embedding (a new tensor).

        Text-only batches (no images, or an all-zero crop table) skip the tower and return the input unchanged.
        """
        if images_BNCHW is None or spatial_crop_BI2 is None or int(spatial_crop_BI2.sum()) == 0:
            return inputs_embeds_BTD
        per_sample = self.embed_batch(images_BNCHW, spatial_crop_BI2)
        out_BTD = inputs_embeds_BTD.clone()
        for b, feats_LD in enumerate(per_sample):
            positions = int(images_seq_mask_BT[b].sum())
            if positions != feats_LD.shape[0]:
                raise ValueError(
                    f"sample {b}: {positions} image positions in the text but {feats_LD.shape[0]} image embeddings"
                )
            if positions:
                out_BTD[b][images_seq_mask_BT[b]] = feats_LD.to(out_BTD.dtype)
        return out_BTD


def _valid_grids(crop_rows: list[list[int]]) -> list[tuple[int, int]]:
    """[nw, nh] rows up to the first padding row (one with a zero), as the official model reads them."""
    grids = []
    for nw, nh in crop_rows:
        if nw == 0 or nh == 0:
            break
        grids.append((int(nw), int(nh)))
    return grids
