"""Stage 0, `vla train stage=vision`: pretrain the SigLIP tower the way SigLIP was made, with a sigmoid image-text
contrastive loss, on scene captions, before `align -> pretrain -> sft`.

    vla train stage=vision out=runs/vision model.vision='{width: 64, layers: 4, heads: 4, mlp_dim: 128}'
    vla train stage=align init_from=runs/vision/checkpoints/step-00002000 ...

DeepSeek-VL2's tower is SigLIP-SO400M, trained contrastively on image-text pairs (an image tower with a multi-head
attention pooling head, a text tower, the pairwise sigmoid loss of Zhai et al. 2023) before DeepSeek-VL2 ever saw
it. This stage does the same at laptop scale: the backbone's tower (transformers' SiglipVisionModel) gets SigLIP's
pooling head, a small SigLIP text tower reads the captions, and each image is scored against every caption of the
batch plus `hard_negatives` captions of its own scene with two objects' colours or shapes swapped, or one object
recoloured / reshaped (envs.scene_language.hard_negative_captions). A random caption is told apart by counting or
by colour alone; a swapped one only by features that bind colour, shape and place per object, which is what
scene questions ("What colour is the triangle?") need from the image tokens.

Loss (sigmoid, SigLIP): logits_ij = exp(t) <img_i, txt_j> + b over the B images and the B (1 + K) captions, label
+1 for an image's own caption and -1 otherwise, loss = -sum_ij log sigmoid(label_ij logits_ij) / B. Metrics: the
share of images whose own caption outscores all of its hard negatives (`binding_acc`), and of the whole batch's
captions (`retrieval_acc`).

Per-pixel labels read off the rendered frames can replace or join it (`dense_weight`: each pixel's colour and shape
from a linear head on its patch's token; `box_weight`: the box of the object drawn at each pixel, L1 in patch units,
so a token carries where its object is in the frame; `share_weight`: the share of the patch's pixels that each kind of
object, a colour-shape pair, covers, soft cross-entropy of a linear head, so a token says which objects it holds in
one direction each, as the oracle image tokens of `vla bench vqa` do). With `contrastive_weight: 0` no text tower is
built.

`adaptor_weight` trains the adaptor (the 2x2 merge and its MLP, which DeepSeek-VL2 trains only from its align stage on)
here too: each output token regresses, squared error, the mean over its cell's pixels of a fixed code of the object
drawn there (a random unit direction per kind of object, a colour-shape pair, and its box in [0, 1] frame units on
four more), so the language model starts from tokens that name the objects of their cell, each in a direction of its
own; a language model reads those at once, where it does not learn to read the same facts off an untrained adaptor
in thousands of steps (docs/experiments.md, "The adaptor, not the tower, loses the objects"). `code_scale` sets the
norm of the code's directions: at 1 the tokens are so small next to what the language model's first layer writes onto
their positions that it wipes where the object is (docs/experiments.md, "Image tokens too small to keep a place").

A checkpoint is an official-format DeepSeek-VL2 folder (the trained tower, the rest as initialised, the tokenizer)
that `align` starts from, plus `contrastive_heads.safetensors` (the heads it built: pooling head, text tower, t and b;
per-pixel heads) for resuming.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import SiglipTextConfig, SiglipTextModel
from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

from backbone.grounding import paired_box_iou
from envs.mixture import SourceSchedule
from envs.scene import COLOURS, SHAPES
from vla.train.stages import (LossOutput, ShardedBatches, StageContext, StageTask, StageTaskError, build_vl2_backbone,
                              data_paths, group_parameters, register_stage_task)

HEADS_FILE = "contrastive_heads.safetensors"
GROUPS = ("vision_tower", "projector", "contrastive_heads")
WEIGHTS = ("contrastive_weight", "dense_weight", "box_weight", "share_weight", "adaptor_weight")


@dataclass
class VisionDataConfig:
    path: str | list[str] | None = None  # generated-format JSONL(s) with scene meta (objects, env); None = generate
    generate: int = 2048  # records generated into <out>/data when path is None
    image_size: int = 64
    num_objects: tuple[int, int] = (2, 4)  # objects per generated scene
    hard_negatives: int = 3  # per image: captions of its scene with what-goes-with-what changed
    max_caption_tokens: int = 64
    text_width: int = 128  # the text tower (SigLIP's, small): width, layers, heads
    text_layers: int = 2
    text_heads: int = 4
    embed_dim: int = 128  # the joint embedding both towers project to
    dense_weight: float = 0.0  # weight of the per-pixel colour / shape loss on the rendered labels (0 = contrastive only)
    contrastive_weight: float = 1.0  # weight of the sigmoid image-caption loss (0 = no text tower at all)
    box_weight: float = 0.0  # weight of the per-pixel L1 loss on the box of the object drawn there (patch units)
    share_weight: float = 0.0  # weight of the per-patch loss on the share of its pixels each colour-shape pair covers
    adaptor_weight: float = 0.0  # weight of the adaptor's loss (its tokens -> the fixed code of their cell's objects)
    box_bins: int = 0  # the code's box: 0 = its 4 coordinates on 4 directions; n = each on n directions (soft one-hot)
    code_scale: float = 1.0  # the norm of each row of the code, so of the adaptor's tokens (the loss is in code units)
    code_pool: str = "share"  # a cell's code: "share" = each object's (kind and box) scaled by its pixels' share of the
    # cell; "object" = the mean over the cell's object pixels (whole wherever a cell holds part of an object)


class ContrastiveTowers(nn.Module):
    """The backbone's SigLIP vision model (shared, not copied) + SigLIP's attention-pooling head + a SigLIP text
    tower + the learned temperature t and bias b (initialised as in SigLIP: t = log 10, b = -10); the per-pixel
    heads (colour / shape, box), the per-patch share head and the backbone's adaptor when their weights are on. A head
    whose weight is 0 is not built."""

    def __init__(self, vision: nn.Module, vocab_size: int, pad_id: int, data: VisionDataConfig,
                 projector: nn.Module | None = None, center_tokens: bool = False):
        super().__init__()
        if max(getattr(data, w) for w in WEIGHTS) <= 0:
            raise StageTaskError(f"stage vision: {', '.join(WEIGHTS)} are all 0: nothing to learn")
        self.vision = vision
        vision_config = vision.config
        self.patch_size = vision_config.patch_size
        if data.contrastive_weight > 0:
            self.pool = SiglipMultiheadAttentionPoolingHead(vision_config)
            self.image_proj = nn.Linear(vision_config.hidden_size, data.embed_dim)
            self.text = SiglipTextModel(SiglipTextConfig(
                vocab_size=vocab_size, hidden_size=data.text_width, intermediate_size=4 * data.text_width,
                num_hidden_layers=data.text_layers, num_attention_heads=data.text_heads,
                max_position_embeddings=data.max_caption_tokens, projection_size=data.embed_dim,
                pad_token_id=pad_id, attention_dropout=0.0))
            self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
            self.logit_bias = nn.Parameter(torch.tensor(-10.0))
        if data.dense_weight > 0:  # per pixel of each patch: colour (or none) and shape (or none)
            self.dense = nn.Linear(vision_config.hidden_size, self.patch_size ** 2 * (len(COLOURS) + len(SHAPES) + 2))
        if data.box_weight > 0:  # per pixel of each patch: x1, y1, x2, y2 of the object drawn there
            self.box = nn.Linear(vision_config.hidden_size, self.patch_size ** 2 * 4)
        if data.share_weight > 0:  # per patch: background and each colour-shape pair
            self.share = nn.Linear(vision_config.hidden_size, 1 + len(COLOURS) * len(SHAPES))
        if data.adaptor_weight > 0:  # the backbone's adaptor (shared, not copied) and the fixed object code it learns
            if projector is None:
                raise StageTaskError("stage vision: adaptor_weight > 0 needs the backbone's projector")
            self.projector, self.center_tokens = projector, center_tokens
            if data.box_bins == 1 or data.box_bins < 0:
                raise StageTaskError(f"stage vision: box_bins is {data.box_bins}; 0 (4 coordinates) or >= 2 bins")
            if data.code_scale <= 0:
                raise StageTaskError(f"stage vision: code_scale is {data.code_scale}; it must be > 0")
            if data.code_pool not in CODE_POOLS:
                raise StageTaskError(f"stage vision: code_pool is {data.code_pool!r}; one of {', '.join(CODE_POOLS)}")
            self.box_bins, self.code_scale, self.code_pool = data.box_bins, float(data.code_scale), data.code_pool
            self.register_buffer("object_code", object_code(projector.config.n_embed, data.box_bins, self.code_scale),
                                 persistent=False)

    def _per_pixel(self, head: nn.Linear, patches_BLC: torch.Tensor) -> torch.Tensor:
        """A linear head's per-patch outputs laid out as pixels: (B, L, P*P*K) -> (B, H, W, K)."""
        B, L, _ = patches_BLC.shape
        G, P = math.isqrt(L), self.patch_size
        return head(patches_BLC).view(B, G, G, P, P, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, G * P, G * P, -1)

    def _embed_patches(self, patches_BLC: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.pool(patches_BLC)), dim=-1)

    def embed_texts(self, ids_NT: torch.Tensor) -> torch.Tensor:
        # SigLIP's text tower pools the last position: captions are padded to a fixed length on the right
        return F.normalize(self.text(input_ids=ids_NT).pooler_output, dim=-1)

    def forward(self, pixels_BCHW: torch.Tensor, captions_NT: torch.Tensor | None, hard_negatives: int,
                dense_BHW2: torch.Tensor | None = None, boxes_BHW4: torch.Tensor | None = None):
        """Sigmoid loss of B images against N = B (1 + K) captions (own captions first, then each image's K hard
        negatives, image by image), plus, with `dense_BHW2` (per pixel: colour id, shape id; 0 = no object), the
        per-pixel cross-entropy of a linear head that predicts each patch's pixels, and with `boxes_BHW4` (per pixel:
        the box of the object drawn there, in patch units) the L1 error of a linear head that predicts it on object
        pixels; returns (terms, metrics)."""
        patches_BLC = self.vision(pixel_values=pixels_BCHW).last_hidden_state
        terms, metrics = {}, {}
        if hasattr(self, "text"):
            img_BE, txt_NE = self._embed_patches(patches_BLC), self.embed_texts(captions_NT)
            logits_BN = img_BE @ txt_NE.T * self.logit_scale.exp() + self.logit_bias
            B = img_BE.shape[0]
            labels_BN = -torch.ones_like(logits_BN)
            labels_BN[:, :B] += 2 * torch.eye(B, device=logits_BN.device)
            terms["loss"] = -F.logsigmoid(labels_BN * logits_BN).sum() / B
            with torch.no_grad():
                own = logits_BN[:, :B].diagonal()
                negatives_BK = logits_BN[:, B:].reshape(B, B, hard_negatives)[torch.arange(B), torch.arange(B)] \
                    if hard_negatives else own[:, None] - 1
                metrics |= {"binding_acc": float((own[:, None] > negatives_BK).all(-1).float().mean()),
                            "retrieval_acc": float((logits_BN[:, :B].argmax(-1) == torch.arange(B, device=own.device)).float().mean()),
                            "logit_scale": float(self.logit_scale.exp())}
        on_object = dense_BHW2[..., 0] > 0 if dense_BHW2 is not None else None
        if on_object is not None and hasattr(self, "dense"):
            logits = self._per_pixel(self.dense, patches_BLC)
            n_colours = len(COLOURS) + 1
            colour_BHWC, shape_BHWS = logits.split([n_colours, logits.shape[-1] - n_colours], dim=-1)
            # object pixels (~6% of a frame) and background pixels weigh half each: a mean over all pixels is
            # background-dominated and learns shape slowly
            ce_BHW = (F.cross_entropy(colour_BHWC.permute(0, 3, 1, 2), dense_BHW2[..., 0], reduction="none")
                      + F.cross_entropy(shape_BHWS.permute(0, 3, 1, 2), dense_BHW2[..., 1], reduction="none"))
            terms["dense"] = 0.5 * (ce_BHW[on_object].mean() if on_object.any() else ce_BHW.sum() * 0) \
                + 0.5 * ce_BHW[~on_object].mean()
            with torch.no_grad():
                colour_right = colour_BHWC.argmax(-1) == dense_BHW2[..., 0]
                shape_right = shape_BHWS.argmax(-1) == dense_BHW2[..., 1]
                for key, right in (("dense_acc", colour_right & shape_right), ("colour_acc", colour_right),
                                   ("shape_acc", shape_right)):
                    metrics[key] = float(right[on_object].float().mean()) if on_object.any() else 0.0
        if boxes_BHW4 is not None and hasattr(self, "box"):
            # the object's box at each of its pixels: the tokens then carry where their object is (its column and
            # row in the frame, which a causal language model otherwise has to count off the token order)
            pred_N4, true_N4 = self._per_pixel(self.box, patches_BLC)[on_object], boxes_BHW4[on_object]
            terms["box"] = (pred_N4 - true_N4).abs().mean() if len(true_N4) else pred_N4.sum() * 0
            with torch.no_grad():
                iou_N = paired_box_iou(pred_N4.float().cpu().numpy(), true_N4.float().cpu().numpy())
                metrics["box_iou50"] = float((iou_N >= 0.5).mean()) if len(true_N4) else 0.0
        if dense_BHW2 is not None and hasattr(self, "share"):
            shares_BLK = patch_shares(dense_BHW2, self.patch_size)
            logits_BLK = self.share(patches_BLC)
            terms["share"] = -(shares_BLK * F.log_softmax(logits_BLK, dim=-1)).sum(-1).mean()
            with torch.no_grad():  # patches holding an object: is the kind covering most of them the head's top one
                holds = shares_BLK[..., 0] < 1
                top_right = logits_BLK[..., 1:].argmax(-1) == shares_BLK[..., 1:].argmax(-1)
                metrics["share_acc"] = float(top_right[holds].float().mean()) if holds.any() else 0.0
        if dense_BHW2 is not None and boxes_BHW4 is not None and hasattr(self, "projector"):
            tokens_BLD = self.projector(patches_BLC)
            cell = self.patch_size * self.projector.config.downsample_ratio
            target_BLD = cell_codes(dense_BHW2, boxes_BHW4, self.object_code, cell, dense_BHW2.shape[1] / self.patch_size,
                                    self.box_bins, self.code_pool)
            if self.center_tokens:  # as the backbone's VisionEncoder hands them to the language model
                tokens_BLD = tokens_BLD - tokens_BLD.mean(dim=1, keepdim=True)
                target_BLD = target_BLD - target_BLD.mean(dim=1, keepdim=True)
            terms["adaptor"] = ((tokens_BLD - target_BLD) / self.code_scale).pow(2).sum(-1).mean()
            with torch.no_grad():  # how much of the code's variance the tokens give
                metrics["adaptor_r2"] = float(1 - (tokens_BLD - target_BLD).pow(2).sum()
                                              / (target_BLD - target_BLD.mean((0, 1))).pow(2).sum().clamp_min(1e-8))
        return terms, metrics


def object_kinds(labels_BHW2: torch.Tensor) -> torch.Tensor:
    """(B, H, W) per pixel: 0 for the floor, else 1 + colour * shapes + shape (0-based ids) of the object drawn there."""
    colour, shape = labels_BHW2[..., 0], labels_BHW2[..., 1]
    return torch.where(colour > 0, 1 + (colour - 1) * len(SHAPES) + (shape - 1), 0)


def patch_shares(labels_BHW2: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, L, 1 + colours * shapes) per patch (row-major): the share of its pixels that are background (column 0) and
    that each kind of object covers (column `object_kinds`), from `pixel_labels`."""
    one_hot = F.one_hot(object_kinds(labels_BHW2), 1 + len(COLOURS) * len(SHAPES)).float().permute(0, 3, 1, 2)
    return F.avg_pool2d(one_hot, patch_size).flatten(2).transpose(1, 2)


CODE_POOLS = ("share", "object")


def object_code(width: int, box_bins: int, scale: float = 1.0) -> torch.Tensor:
    """(K, width) the fixed code stage vision fits the adaptor's tokens to: one row per colour-shape pair, then the
    box's rows (4, or 4 * box_bins), random directions (seed 0, the same in every run) of norm `scale`."""
    code = torch.randn(len(COLOURS) * len(SHAPES) + 4 * max(box_bins, 1), width,
                       generator=torch.Generator().manual_seed(0))
    return F.normalize(code, dim=-1) * scale


def cell_codes(labels_BHW2: torch.Tensor, boxes_BHW4: torch.Tensor, code_KD: torch.Tensor, cell: int,
               grid: float, box_bins: int = 0, code_pool: str = "share") -> torch.Tensor:
    """(B, L, D) per adaptor cell (`cell` px, row-major): the mean over its pixels of the code of the object drawn there
    (the row `object_kinds` - 1 of `code_KD`, its kind (a colour-shape pair), plus its box, `boxes_BHW4`
    in patch units over a `grid` of patches, as [0, 1] frame units on the last rows); zero for floor pixels.
    Kinds, not a colour row plus a shape row: a cell holding parts of a red triangle and a blue circle then differs
    from one holding a blue triangle and a red circle. The box: with `box_bins` = 0 its four coordinates on the last
    four rows (a position is one amplitude per direction, easily lost in what the fit leaves); with n bins each is a
    soft one-hot over n rows (linear interpolation between the two nearest of n evenly spaced values), halved so the
    box weighs about as much as the kind: where an object is stays as readable as what it is. `code_pool` "share"
    keeps each object's code scaled by its pixels' share of the cell; "object" divides the cell's object share out
    (the mean code of its object pixels), so a token holding any part of one object reads its kind and box at full
    strength (docs/experiments.md, "Where the place is lost: the code's amplitude, and no lookup")."""
    on_BHW = (labels_BHW2[..., 0] > 0).float()
    frame_BHW4 = boxes_BHW4 / grid
    box_BHWF = frame_BHW4  # the box's rows of the code: 4, or 4 * box_bins
    if box_bins > 0:
        position = frame_BHW4.clamp(0, 1) * (box_bins - 1)
        below = position.floor().long().clamp(max=box_bins - 2)
        above_share = (position - below)[..., None]
        tent_BHW4N = F.one_hot(below, box_bins) * (1 - above_share) + F.one_hot(below + 1, box_bins) * above_share
        box_BHWF = 0.5 * tent_BHW4N.flatten(-2)
    facts_BHWK = torch.cat([F.one_hot(object_kinds(labels_BHW2), 1 + len(COLOURS) * len(SHAPES))[..., 1:].float(),
                            box_BHWF * on_BHW[..., None]], dim=-1)
    pooled_BKL = F.avg_pool2d(facts_BHWK.permute(0, 3, 1, 2), cell).flatten(2)
    if code_pool == "object":
        pooled_BKL = pooled_BKL / F.avg_pool2d(on_BHW[:, None], cell).flatten(2).clamp_min(1e-6)
    return pooled_BKL.transpose(1, 2) @ code_KD


def pixel_labels(image_HW3: np.ndarray, objects: list[dict[str, Any]]) -> torch.Tensor:
    """(H, W, 2) int64 per pixel: the colour id and shape id (1-based; 0 = none) of the object drawn there, read off the
    rendered image itself (objects are painted in flat scene colours, without antialiasing) inside each object's box."""
    labels = np.zeros(image_HW3.shape[:2] + (2,), dtype=np.int64)
    colours, shapes = list(COLOURS), list(SHAPES)
    for o in objects:
        x1, y1, x2, y2 = (int(v) for v in o["bbox"])
        box = image_HW3[y1:y2, x1:x2]
        painted = (box == np.asarray(COLOURS[o["colour"]], dtype=image_HW3.dtype)).all(-1)
        labels[y1:y2, x1:x2][painted] = (colours.index(o["colour"]) + 1, shapes.index(o["shape"]) + 1)
    return torch.from_numpy(labels)


def pixel_boxes(labels_HW2: torch.Tensor, objects: list[dict[str, Any]], image_hw: tuple[int, int],
                grid: float) -> torch.Tensor:
    """(H, W, 4) float per pixel: the box (x1, y1, x2, y2) of the object drawn there, in patch units (0..grid across the
    frame; `image_hw` is the size the objects' boxes are given in), zeros where no object is. The object at a pixel is
    the one of `pixel_labels`' colour and shape (scenes never repeat one)."""
    boxes = torch.zeros(labels_HW2.shape[:2] + (4,))
    colours, shapes = list(COLOURS), list(SHAPES)
    h, w = image_hw
    scale = torch.tensor([grid / w, grid / h, grid / w, grid / h])
    for o in objects:
        drawn = (labels_HW2[..., 0] == colours.index(o["colour"]) + 1) & (labels_HW2[..., 1] == shapes.index(o["shape"]) + 1)
        boxes[drawn] = torch.tensor(o["bbox"], dtype=torch.float32) * scale
    return boxes


class VisionStageTask(StageTask):
    """Contrastive pretraining of the backbone's vision tower on scene captions (see the module docstring)."""

    def __init__(self, ctx: StageContext):
        from envs.scene_language import load_conversations

        self.name, self.ctx = ctx.name, ctx
        data = dict(ctx.data)
        if "num_objects" in data:
            data["num_objects"] = tuple(data["num_objects"])
        self.data = VisionDataConfig(**data)
        self.backbone, self.tokenizer = build_vl2_backbone(ctx)
        self.tile = self.backbone.config.vision.image_size
        self.patch_size = self.backbone.config.vision.patch_size
        paths = self._data_paths()
        self.records = [r for path in paths for r in load_conversations(path) if r.meta.get("objects")]
        if not self.records:
            raise StageTaskError(f"stage vision: no records with scene meta (objects) in {', '.join(map(str, paths))}")
        encoder = self.backbone.vision_encoder
        self.module = ContrastiveTowers(encoder.vision, len(self.tokenizer), self.tokenizer.pad_id, self.data,
                                        encoder.projector, encoder.center_tokens)
        self._schedule = SourceSchedule([len(self.records)], [1.0], ctx.seed, salts=[5], names=["scene captions"])
        self.ddp_find_unused_parameters = False

    # ---- data --------------------------------------------------------------------------------------------------
    def _data_paths(self) -> list[Path]:
        if self.data.path:
            return data_paths(self.data.path)
        from envs.scene_language import generate_scene_language

        out = self.ctx.out_dir / "data"
        path, marker = out / "vision.jsonl", out / "vision.done.json"
        spec = {"count": self.data.generate, "seed": self.ctx.seed, "image_size": self.data.image_size,
                "num_objects": list(self.data.num_objects)}
        if self.ctx.rank == 0 and not (marker.is_file() and json.loads(marker.read_text()) == spec):
            generated = generate_scene_language(out, "align", self.data.generate, seed=self.ctx.seed,
                                                image_size=self.data.image_size,
                                                env_kwargs={"num_objects": list(self.data.num_objects)})
            generated.rename(path)
            marker.write_text(json.dumps(spec))
        self.ctx.barrier()
        return [path]

    def _encode_caption(self, text: str) -> torch.Tensor:
        ids = self.tokenizer.encode(text)[: self.data.max_caption_tokens - 1] + [self.tokenizer.eos_id]
        return torch.tensor(ids + [self.tokenizer.pad_id] * (self.data.max_caption_tokens - len(ids)))

    def sample(self, index: int) -> dict[str, Any]:
        """The image (one tile, [-1, 1]); with the caption loss on, its caption and its hard negatives (token ids,
        right padded); with per-pixel losses on, the pixel labels and boxes."""
        from PIL import Image

        from envs.scene_language import caption, hard_negative_captions, record_truth

        record = self.records[self._schedule(index)[1]]
        rgb = np.array(Image.open(record.images[0]).convert("RGB"))
        image = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
        if image.shape[-2:] != (self.tile, self.tile):
            image = F.interpolate(image[None], size=(self.tile, self.tile), mode="bilinear", antialias=True)[0]
        truth = record_truth(record.meta)
        sample = {"pixels": image * 2 - 1}
        if self.data.contrastive_weight > 0:
            rng = np.random.default_rng([self.ctx.seed, 31337, index])
            texts = [caption(truth)] + hard_negative_captions(truth, rng, self.data.hard_negatives)
            sample["captions"] = torch.stack([self._encode_caption(t) for t in texts])
        if max(self.data.dense_weight, self.data.box_weight, self.data.share_weight, self.data.adaptor_weight) > 0:
            labels = pixel_labels(rgb, truth["objects"])
            if labels.shape[:2] != (self.tile, self.tile):
                labels = F.interpolate(labels.permute(2, 0, 1)[None].float(), size=(self.tile, self.tile),
                                       mode="nearest")[0].permute(1, 2, 0).long()
            sample["dense"] = labels
        if self.data.box_weight > 0 or self.data.adaptor_weight > 0:
            sample["boxes"] = pixel_boxes(sample["dense"], truth["objects"], rgb.shape[:2], self.tile / self.patch_size)
        return sample

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = {"pixels": torch.stack([s["pixels"] for s in samples])}
        if "captions" in samples[0]:
            captions = torch.stack([s["captions"] for s in samples])  # (B, 1 + K, T)
            batch["captions"] = torch.cat([captions[:, 0], captions[:, 1:].reshape(-1, captions.shape[-1])])
        for key in ("dense", "boxes"):
            if key in samples[0]:
                batch[key] = torch.stack([s[key] for s in samples])
        return batch

    def batches(self, rank: int, world: int, micro_batch: int) -> ShardedBatches:
        return ShardedBatches(self.sample, self.collate, rank, world, micro_batch)

    # ---- model -------------------------------------------------------------------------------------------------
    def parameter_groups(self):
        def classify(name: str) -> str:
            return ("vision_tower" if name.startswith("vision.") else "projector" if name.startswith("projector.")
                    else "contrastive_heads")

        trainable = list(GROUPS) if "all" in self.ctx.trainable else list(self.ctx.trainable)
        return group_parameters(self.module, classify, GROUPS, trainable, self.ctx.frozen, self.ctx.lr_mult)

    def _weights(self) -> dict[str, float]:
        """The loss terms this stage computes and their weights (a term whose weight is 0 is not computed)."""
        named = {"loss": self.data.contrastive_weight, "dense": self.data.dense_weight, "box": self.data.box_weight,
                 "share": self.data.share_weight, "adaptor": self.data.adaptor_weight}
        return {name: weight for name, weight in named.items() if weight > 0}

    def loss_weights(self, batch: dict[str, Any]) -> dict[str, float]:
        return {name: float(len(batch["pixels"])) for name in self._weights()}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        terms, metrics = model(batch["pixels"], batch.get("captions"), self.data.hard_negatives, batch.get("dense"),
                               batch.get("boxes"))
        return LossOutput({name: terms[name] * weight for name, weight in self._weights().items()}, metrics)

    def describe(self) -> str:
        parts = {"loss": f"each against its caption, the batch's and {self.data.hard_negatives} hard negatives",
                 "dense": f"per-pixel colour / shape labels at weight {self.data.dense_weight}",
                 "box": f"per-pixel object boxes at weight {self.data.box_weight}",
                 "share": f"per-patch object shares at weight {self.data.share_weight}",
                 "adaptor": f"the adaptor's tokens -> their cell's object code at weight {self.data.adaptor_weight}"}
        return (f"stage vision: {len(self.records)} scenes ({self.data.num_objects[0]}-{self.data.num_objects[1]} "
                f"objects); " + "; ".join(parts[name] for name in self._weights()))

    # ---- weights -----------------------------------------------------------------------------------------------
    def save_weights(self, directory: Path, state_dict: dict[str, torch.Tensor]) -> None:
        """The backbone with this tower (and adaptor, when trained here), as an official-format folder + tokenizer; the
        heads beside it."""
        from backbone.checkpoint import write_checkpoint
        from backbone.convert import deepseek_vl2_to_official

        backbone = dict(self.backbone.state_dict())
        for part in ("vision", "projector"):
            backbone |= {f"vision_encoder.{k}": v for k, v in state_dict.items() if k.startswith(f"{part}.")}
        write_checkpoint(directory, self.backbone.config.to_official(), deepseek_vl2_to_official(backbone))
        self.tokenizer.save(directory)
        heads = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()
                 if not k.startswith(("vision.", "projector."))}
        save_file(heads, str(Path(directory) / HEADS_FILE))

    def load_weights(self, directory: Path) -> None:
        from backbone.checkpoint import load_into, read_safetensors
        from backbone.convert import deepseek_vl2_from_official

        state = deepseek_vl2_from_official(read_safetensors(directory), self.backbone.config.language.n_routed_experts)
        load_into(self.backbone, state, str(directory))
        self.backbone.vision_encoder.reset_buffers()
        missing, unexpected = self.module.load_state_dict(load_file(str(Path(directory) / HEADS_FILE)), strict=False)
        if unexpected or [k for k in missing if not k.startswith(("vision.", "projector."))]:
            raise StageTaskError(f"{directory / HEADS_FILE}: missing {missing}, unexpected {unexpected}")


register_stage_task("vision", VisionStageTask)
