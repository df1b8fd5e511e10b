"""DeepSeek-VL2 processor: dynamic tiling, image transforms, the "deepseek" chat template, tokenization, batching.

Matches the official `processing_deepseek_vl_v2.py` (docs/architecture.md, "Image preprocessing and dynamic
tiling"):

* `select_best_resolution` picks a (width, height) among the candidate resolutions (all (m*tile, n*tile) with
  m*n <= max_tiles, in the published order; first wins on a full tie).
* Every image becomes 1 global view (aspect-preserving resize + centred grey pad to tile x tile) followed by
  nw*nh local tiles (pad to the chosen resolution, cut row-major), normalized to [-1, 1]. With more than two images
  in a conversation nothing is tiled: the chosen resolution is (tile, tile), so 1 global + 1 local.
* Each `<image>` becomes `image_token_count` image-token ids: h*(h+1) global + 1 separator + (nh*h)*(nw*h+1) local,
  h = ceil((tile // patch) / downsample).
* Ids: [BOS] + per user turn encode("<|User|>: {content}\\n\\n<|Assistant|>:") (images spliced in) + per assistant
  turn encode(answer) + [EOS]; a leading system message is encoded raw. Inference drops the final EOS.

One sample (`DeepseekVL2Processor.process`) is a dict:
    input_ids (T,) long, labels (T,) long (-100 = ignored), images_seq_mask (T,) bool,
    images (n_tiles, 3, tile, tile) float32, images_spatial_crop (n_images, 2) long rows [nw, nh],
    num_image_tokens list[int].
A text-only sample has one all-zero tile and one [0, 0] crop row, as in the official processor.
`collate` left-pads a list of samples into a batch (see its docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from backbone.tokenizer import IMAGE_TOKEN, Tokenizer

USER_ROLES = ("<|User|>", "user")
ASSISTANT_ROLES = ("<|Assistant|>", "assistant")
SYSTEM_ROLES = ("system", "deepseekapi-sys")


class ProcessorError(ValueError):
    """A conversation or image the processor cannot turn into model inputs."""


class ImageLoadError(ProcessorError):
    """An image file that cannot be read, is truncated, or an image with no pixels."""


class PromptTooLongError(ProcessorError):
    """The tokenized prompt is longer than the model's context."""


# --------------------------------------------------------------------------------------------------------------------
# Configuration and tiling arithmetic
# --------------------------------------------------------------------------------------------------------------------
def make_candidate_resolutions(tile_size: int = 384, max_tiles: int = 9) -> tuple[tuple[int, int], ...]:
    """All (m*tile, n*tile), m*n <= max_tiles, in the published order.

    The published list is ordered by tile count, then by the shorter side, then narrow-before-wide:
    384x384, 384x768, 768x384, 384x1152, 1152x384, 384x1536, 1536x384, 768x768, ...
    """
    grids = [(m, n) for m in range(1, max_tiles + 1) for n in range(1, max_tiles + 1) if m * n <= max_tiles]
    grids.sort(key=lambda mn: (mn[0] * mn[1], min(mn), mn[0]))
    return tuple((m * tile_size, n * tile_size) for m, n in grids)


@dataclass
class ProcessorConfig:
    """Tile geometry, candidate grid, normalization and chat settings (published values by default).

    `candidate_resolutions` left as None is generated from `tile_size` and `max_tiles`.
    """

    tile_size: int = 384
    patch_size: int = 14
    downsample_ratio: int = 2
    max_tiles: int = 9
    candidate_resolutions: tuple[tuple[int, int], ...] | None = None  # (width, height) pairs
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    mask_prompt: bool = False  # published processor_config: false
    ignore_id: int = -100
    max_length: int = 4096  # context length; longer prompts are refused

    def __post_init__(self) -> None:
        if self.candidate_resolutions is None:
            self.candidate_resolutions = make_candidate_resolutions(self.tile_size, self.max_tiles)
        self.candidate_resolutions = tuple((int(w), int(h)) for w, h in self.candidate_resolutions)
        self.image_mean = tuple(float(x) for x in self.image_mean)
        self.image_std = tuple(float(x) for x in self.image_std)
        for w, h in self.candidate_resolutions:
            if w % self.tile_size or h % self.tile_size:
                raise ValueError(f"candidate resolution {w}x{h} is not a multiple of the tile size {self.tile_size}")
        if self.tile_size < self.patch_size:
            raise ValueError(f"tile size {self.tile_size} is smaller than the patch size {self.patch_size}")

    @property
    def patches_per_side(self) -> int:
        """Patches along a tile side seen by the vision tower: floor(tile / patch) (27 for 384/14)."""
        return self.tile_size // self.patch_size

    @property
    def tokens_per_side(self) -> int:
        """Adaptor tokens along a tile side: ceil(patches / downsample) (14 for 384/14/2)."""
        return math.ceil(self.patches_per_side / self.downsample_ratio)

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """The grey used for padding: int(mean * 255) per channel (127 for mean 0.5)."""
        return tuple(int(m * 255) for m in self.image_mean)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ProcessorConfig:
        """`deepseek_vl2` (384 / 14 / 2, up to 9 tiles) or `tiny` (64 / 8 / 2: 4x4 tokens per tile, for CPU tests)."""
        presets = {"deepseek_vl2": {}, "tiny": {"tile_size": 64, "patch_size": 8}}
        if name not in presets:
            raise KeyError(f"unknown processor preset {name!r}; known: {sorted(presets)}")
        return cls(**(presets[name] | overrides))


# The data-class above also describes the vision token layout; a second name for readers who look for that.
VisionLayout = ProcessorConfig
DEFAULT_CONFIG = ProcessorConfig()  # the published geometry, used when a function is given no config


def select_best_resolution(width: int, height: int, config: ProcessorConfig | None = None) -> tuple[int, int]:
    """The candidate (w, h) keeping the most of the image's pixels, then wasting the least (official scoring).

    For each candidate: scale = min(w/W, h/H); effective = min(int(W*scale) * int(H*scale), W*H);
    wasted = w*h - effective. Highest effective wins, ties go to strictly less waste, full ties to the earlier one.
    """
    config = config or DEFAULT_CONFIG
    best_fit = config.candidate_resolutions[0]
    max_effective, min_wasted = 0, float("inf")
    for cand_w, cand_h in config.candidate_resolutions:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_w * cand_h - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (cand_w, cand_h)
    return best_fit


def tokens_for_grid(num_width_tiles: int, num_height_tiles: int, config: ProcessorConfig | None = None) -> int:
    """Image positions for one image tiled nw x nh: h*(h+1) + 1 + (nh*h)*(nw*h+1)."""
    h = (config or DEFAULT_CONFIG).tokens_per_side
    return h * (h + 1) + 1 + (num_height_tiles * h) * (num_width_tiles * h + 1)


def image_token_count(width: int, height: int, num_images: int = 1, config: ProcessorConfig | None = None) -> int:
    """Image positions one `<image>` of this size occupies in a conversation holding `num_images` images.

    421 for a single 384 tile, 2101 at most (384x3456). With more than two images nothing is tiled (421 each).
    """
    config = config or DEFAULT_CONFIG
    best_w, best_h = tile_resolution(width, height, num_images, config)
    return tokens_for_grid(best_w // config.tile_size, best_h // config.tile_size, config)


def tile_resolution(width: int, height: int, num_images: int, config: ProcessorConfig) -> tuple[int, int]:
    """The local-view resolution: the best candidate when tiling (<= 2 images), else one tile."""
    if num_images <= 2:
        return select_best_resolution(width, height, config)
    return config.tile_size, config.tile_size


# --------------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------------
ImageLike = str | Path | Image.Image | np.ndarray


def load_image(source: ImageLike) -> Image.Image:
    """An RGB PIL image from a path, a PIL image or an (H, W, 3) uint8 array; `ImageLoadError` when unusable."""
    if isinstance(source, (str, Path)):
        try:
            with Image.open(source) as opened:
                opened.load()  # decode now: truncated files fail here, not later
                image = opened.convert("RGB")
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
            raise ImageLoadError(f"cannot read image {str(source)!r}: {err}") from err
    elif isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
            raise ImageLoadError(f"array images must be (H, W, 3) uint8, got {source.shape} {source.dtype}")
        image = Image.fromarray(source, "RGB")
    elif isinstance(source, Image.Image):
        image = source if source.mode == "RGB" else source.convert("RGB")
    else:
        raise ImageLoadError(f"not an image: {type(source).__name__}")
    if image.width <= 0 or image.height <= 0:
        raise ImageLoadError(f"image has no pixels: {image.width}x{image.height}")
    return image


class ImageTransform:
    """uint8 RGB pixels -> float32 (x/255 - mean)/std, bit-identical to torchvision ToTensor + Normalize.

    The same float32 operations in the same order (convert, /255, -mean, /std), done in place with numpy on one
    output array holding all tiles of an image (single-threaded numpy is steadier than torch's thread pool on a
    busy CPU, and far faster than torch's strided uint8 copies).
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean_C11 = np.asarray(mean, dtype=np.float32)[:, None, None]
        self.std_C11 = np.asarray(std, dtype=np.float32)[:, None, None]

    def __call__(self, pixels_HWC: np.ndarray, out_CHW: np.ndarray) -> None:
        """Normalize uint8 pixels (..., H, W, 3) into the float32 array `out_CHW` (..., 3, H, W)."""
        np.copyto(out_CHW, np.moveaxis(pixels_HWC, -1, -3))
        np.divide(out_CHW, np.float32(255), out=out_CHW)
        np.subtract(out_CHW, self.mean_C11, out=out_CHW)
        np.divide(out_CHW, self.std_C11, out=out_CHW)


def tile_image(
    image: Image.Image, best: tuple[int, int], config: ProcessorConfig, transform: ImageTransform
) -> torch.Tensor:
    """Global view + row-major local tiles of one RGB image -> (1 + nw*nh, 3, tile, tile) float32."""
    tile = config.tile_size
    best_w, best_h = best
    num_w, num_h = best_w // tile, best_h // tile
    global_view = _pad_view(image, (tile, tile), config)
    local_view = global_view if best == (tile, tile) else _pad_view(image, best, config)

    global_HWC = np.asarray(global_view)
    local_HWC = global_HWC if local_view is global_view else np.asarray(local_view)
    # (nh*tile, nw*tile, 3) -> (nh, tile, nw, tile, 3) -> (nh, nw, tile, tile, 3): row-major tiles, a view (no copy)
    tiles_hwHWC = local_HWC.reshape(num_h, tile, num_w, tile, 3).transpose(0, 2, 1, 3, 4)

    out_NCHW = np.empty((1 + num_w * num_h, 3, tile, tile), dtype=np.float32)
    transform(global_HWC, out_NCHW[0])
    transform(tiles_hwHWC, out_NCHW[1:].reshape(num_h, num_w, 3, tile, tile))
    return torch.from_numpy(out_NCHW)


def _pad_view(image: Image.Image, size: tuple[int, int], config: ProcessorConfig) -> Image.Image:
    """`ImageOps.pad` (bicubic, centred, grey), with a clear error for images too thin to survive the resize."""
    try:
        return ImageOps.pad(image, size, color=config.pad_color)
    except ValueError as err:
        raise ImageLoadError(f"image {image.width}x{image.height} cannot be fitted into {size}: {err}") from err


# --------------------------------------------------------------------------------------------------------------------
# The processor
# --------------------------------------------------------------------------------------------------------------------
Message = dict[str, Any]


class DeepseekVL2Processor:
    """Conversation + images -> model inputs (one sample), and samples -> a padded batch."""

    def __init__(self, tokenizer: Tokenizer, config: ProcessorConfig | None = None):
        self.tokenizer = tokenizer
        self.config = config or DEFAULT_CONFIG
        self.transform = ImageTransform(self.config.image_mean, self.config.image_std)

    # ----------------------------------------------------------------------------------------------------------------
    def preprocess_image(self, image: ImageLike, num_images: int = 1) -> tuple[torch.Tensor, tuple[int, int]]:
        """One image -> (tiles (1 + nw*nh, 3, tile, tile), (nw, nh)); `num_images` > 2 disables tiling."""
        image = load_image(image)
        best_w, best_h = tile_resolution(image.width, image.height, num_images, self.config)
        tiles = tile_image(image, (best_w, best_h), self.config, self.transform)
        return tiles, (best_w // self.config.tile_size, best_h // self.config.tile_size)

    def process(
        self,
        conversation: list[Message] | str,
        images: list[ImageLike] | None = None,
        *,
        system: str | None = None,
        inference: bool = False,
    ) -> dict[str, Any]:
        """One conversation -> model inputs (see the module docstring for the keys).

        conversation: messages `{"role": "user" | "<|User|>" | "assistant" | "<|Assistant|>" | "system",
            "content": str, "images": [...] (optional)}`, or a plain string (one user turn).
        images: all images of the conversation in `<image>` order; when None they are gathered from the
            messages' "images" lists. Paths, PIL images or (H, W, 3) uint8 arrays.
        system: text encoded raw right after BOS (same as a leading "system" message).
        inference: end with "<|Assistant|>:" (an empty assistant turn is appended when the last turn is not an
            assistant's) and drop the final EOS.
        """
        messages = _normalize_conversation(conversation, system, inference)
        if images is None:
            images = [img for message in messages for img in message.get("images", [])]
        images = list(images)
        num_tags = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
        if num_tags != len(images):
            raise ProcessorError(
                f"the conversation has {num_tags} {IMAGE_TOKEN} tag(s) but {len(images)} image(s) were given"
            )

        tok, cfg = self.tokenizer, self.config
        ids, labels, mask = [tok.bos_id], [tok.bos_id], [False]  # the official processor keeps BOS in labels
        tiles, crops, num_image_tokens = [], [], []
        image_iter = iter(images)
        for message in messages:
            role, content = message["role"], message["content"]
            if role in USER_ROLES:
                prompt = f"<|User|>: {content.strip()}\n\n<|Assistant|>:"
                pieces = prompt.split(IMAGE_TOKEN)
                for i, piece in enumerate(pieces):
                    if i > 0:  # an image sits between piece i-1 and piece i
                        image_tiles, (num_w, num_h) = self.preprocess_image(next(image_iter), len(images))
                        n = tokens_for_grid(num_w, num_h, cfg)
                        tiles.append(image_tiles)
                        crops.append((num_w, num_h))
                        num_image_tokens.append(n)
                        ids += [tok.image_id] * n
                        labels += [cfg.ignore_id] * n
                        mask += [True] * n
                    piece_ids = tok.encode(piece)
                    ids += piece_ids
                    labels += [cfg.ignore_id] * len(piece_ids) if cfg.mask_prompt else piece_ids
                    mask += [False] * len(piece_ids)
            elif role in ASSISTANT_ROLES:
                answer_ids = tok.encode(content.strip()) + [tok.eos_id]
                ids += answer_ids
                labels += answer_ids
                mask += [False] * len(answer_ids)
            else:  # system: validated to be first
                system_ids = tok.encode(content.strip())
                ids += system_ids
                labels += [cfg.ignore_id] * len(system_ids) if cfg.mask_prompt else system_ids
                mask += [False] * len(system_ids)

        input_ids = torch.tensor(ids, dtype=torch.long)
        label_ids = torch.tensor(labels, dtype=torch.long)
        images_seq_mask = torch.tensor(mask, dtype=torch.bool)
        label_ids[input_ids == tok.image_id] = cfg.ignore_id
        if inference:
            input_ids, label_ids, images_seq_mask = input_ids[:-1], label_ids[:-1], images_seq_mask[:-1]
        if len(input_ids) > cfg.max_length:
            raise PromptTooLongError(
                f"the prompt is {len(input_ids)} tokens, longer than the context of {cfg.max_length} "
                f"({sum(num_image_tokens)} of them image positions)"
            )
        if tiles:
            images_NCHW = torch.cat(tiles) if len(tiles) > 1 else tiles[0]
            spatial_crop = torch.tensor(crops, dtype=torch.long)
        else:
            images_NCHW = torch.zeros(1, 3, cfg.tile_size, cfg.tile_size)
            spatial_crop = torch.zeros(1, 2, dtype=torch.long)
        return {
            "input_ids": input_ids,
            "labels": label_ids,
            "images_seq_mask": images_seq_mask,
            "images": images_NCHW,
            "images_spatial_crop": spatial_crop,
            "num_image_tokens": num_image_tokens,
        }

    def collate(self, samples: list[dict[str, Any]], padding: str = "left") -> dict[str, Any]:
        """Pad samples into one batch.

        Returns input_ids (B, T) long padded with the pad id, attention_mask (B, T) bool, labels (B, T) (padding
        -100), images_seq_mask (B, T) (padding False), images (B, max_tiles, 3, tile, tile) zero-padded,
        images_spatial_crop (B, max_images, 2) padded with [0, 0] rows, seq_lens list[int],
        num_image_tokens list[list[int]].
        """
        if padding not in ("left", "right"):
            raise ValueError(f"padding must be 'left' or 'right', got {padding!r}")
        if not samples:
            raise ValueError("collate needs at least one sample")
        seq_lens = [len(s["input_ids"]) for s in samples]
        batch, max_len = len(samples), max(seq_lens)
        input_ids = torch.full((batch, max_len), self.tokenizer.pad_id, dtype=torch.long)
        labels = torch.full((batch, max_len), self.config.ignore_id, dtype=torch.long)
        images_seq_mask = torch.zeros((batch, max_len), dtype=torch.bool)
        attention_mask = torch.zeros((batch, max_len), dtype=torch.bool)
        for b, (sample, n) in enumerate(zip(samples, seq_lens)):
            span = slice(max_len - n, max_len) if padding == "left" else slice(0, n)
            input_ids[b, span] = sample["input_ids"]
            labels[b, span] = sample["labels"]
            images_seq_mask[b, span] = sample["images_seq_mask"]
            attention_mask[b, span] = True

        max_tiles = max(s["images"].shape[0] for s in samples)
        images = torch.zeros((batch, max_tiles, *samples[0]["images"].shape[1:]), dtype=samples[0]["images"].dtype)
        max_images = max(s["images_spatial_crop"].shape[0] for s in samples)
        spatial_crop = torch.zeros((batch, max_images, 2), dtype=torch.long)
        for b, sample in enumerate(samples):
            images[b, : sample["images"].shape[0]] = sample["images"]
            spatial_crop[b, : sample["images_spatial_crop"].shape[0]] = sample["images_spatial_crop"]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "images_seq_mask": images_seq_mask,
            "images": images,
            "images_spatial_crop": spatial_crop,
            "seq_lens": seq_lens,
            "num_image_tokens": [s["num_image_tokens"] for s in samples],
        }

    def __call__(
        self,
        conversation: list[Message] | str,
        images: list[ImageLike] | None = None,
        *,
        system: str | None = None,
        inference: bool = True,
    ) -> dict[str, Any]:
        """One conversation -> a batch of one (inference by default), ready for the model."""
        return self.collate([self.process(conversation, images, system=system, inference=inference)])


def _normalize_conversation(conversation: list[Message] | str, system: str | None, inference: bool) -> list[Message]:
    """Validate roles and placement; add the system message and the empty final assistant turn when asked."""
    if isinstance(conversation, str):
        conversation = [{"role": "user", "content": conversation}]
    messages = [dict(m) for m in conversation]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in USER_ROLES + ASSISTANT_ROLES + SYSTEM_ROLES:
            raise ProcessorError(f"message {i} has unknown role {role!r}")
        if not isinstance(message.get("content"), str):
            raise ProcessorError(f"message {i} has no text content")
        if role in SYSTEM_ROLES and i != 0:
            raise ProcessorError("a system message may only come first")
        if role not in USER_ROLES and IMAGE_TOKEN in message["content"]:
            raise ProcessorError(f"message {i} ({role}) contains {IMAGE_TOKEN}; only user turns may hold images")
    if inference and (not messages or messages[-1]["role"] not in ASSISTANT_ROLES):
        messages.append({"role": "assistant", "content": ""})
    return messages
