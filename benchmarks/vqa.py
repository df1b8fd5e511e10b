"""`vla bench vqa [--quick]`: how fast the demo-size DeepSeek-VL2 learns to answer short questions from a scene image.

The demo's scene-VQA number mixes many things (captions, boxes, multi-turn SFT, the vla stage). This benchmark
isolates one: can the model, trained from random init on short-answer questions only, read the answer off the image?
Per setting it generates scene-language records (64 px, the demo's robots' envs), builds the demo's model
(`configs/demo.yaml`: `model`, `vision`, the "test" preset) and a tokenizer of the same size, trains on questions of
the setting's kinds (micro-batch 16, AdamW, lr 1e-3, clip 1) and scores held-out scenes teacher-forced (every answer
token must be the argmax). The blind column is the best a model that ignores the image can do: the majority training
answer of each question text.

Settings (rows):
  1 object: colour     "What colour is the <shape>?", one object in the scene
  1 object: shape      "What shape is the <colour> object?", one object
  2-4 objects: binding the same two questions with 2-4 objects (the question names the object by shape or colour)
  2-4 objects: count   "How many shapes are there?" / "How many <colour> shapes are there?"
  binding + 1-object   the binding questions, with the one-object scenes' questions mixed into training (a
                       curriculum: where one object is shown, the image's average already holds the answer); scored on
                       the 2-4 object scenes. Its effect shows from ~1,000 steps (`steps=1500`).
  binding, oracle tokens the binding questions with the tower replaced by oracle image tokens: per token cell,
                       learned colour and shape embeddings weighted by each object's share of its pixels in that cell
                       (from the renderer's ground truth). Same language model, same token layout: what the model
                       does with perfect colour / shape features.
  every kind           every short-answer kind the demo scores (counts, binding, "Which shape is furthest to the
                       left?", "Is the <a> left of the <b>?", "Is there a <colour shape>?"), 2-4 objects
  every kind, oracle   the same with oracle image tokens: the ceiling of the language model at this step count
  2-4 objects: grounding "Locate <|ref|>the <colour shape><|/ref|> in the given image.": the answer is the object's
                       box (0..999, digit by digit); right when the box read off the argmax tokens has IoU >= 0.5
                       (teacher-forced as everywhere here: each digit given the true ones before it)
  grounding + 1-object  the grounding questions with one-object scenes' mixed into training (where the image's
                       average already holds the box), scored on the 2-4 object scenes
  grounding, q first   the grounding questions before the image (each image token can see what is asked for)
  grounding, oracle tokens the same with oracle image tokens (colour / shape shares and a learned position per cell:
                       where an object is only to the cell, 16 px)
  binding, tower shares the binding questions with image tokens made from the tower's own predictions: a `tower=`
                       folder made by stage vision with `share_weight` has a head that reads each patch's object
                       kinds (colour-shape pairs) off the frozen tower; its softmax, pooled per token cell, through a
                       learned embedding, as the oracle's. What the tower knows, handed over without the adaptor.
  ..., q first         the question before the image in the prompt: with a causal model the image tokens then
                       see the question, so each can carry "am I what is asked about" to the answer
"""

from __future__ import annotations

import collections
import hashlib
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from envs.scene_language import QUESTION_KINDS


@dataclass(frozen=True)
class Setting:
    label: str
    num_objects: tuple[int, int]  # objects in the scored (and training) scenes
    kinds: tuple[str, ...]  # question kinds (envs.scene_language)
    mixed_in: tuple[int, int] | None = None  # object counts of extra training scenes (curriculum)
    oracle_tokens: bool = False  # replace the tower by OracleImageTokens
    question_first: bool = False  # "<question>\n<image>" instead of DeepSeek-VL2's usual "<image>\n<question>"
    tower_shares: bool = False  # replace the adaptor by TowerShareTokens (needs tower= with a share head)


BINDING = ("colour_of_shape", "shape_of_colour")
SETTINGS = (
    Setting("1 object: colour", (1, 1), ("colour_of_shape",)),
    Setting("1 object: shape", (1, 1), ("shape_of_colour",)),
    Setting("2-4 objects: binding", (2, 4), BINDING),
    Setting("2-4 objects: count", (2, 4), ("count", "count_colour")),
    Setting("binding + 1-object", (2, 4), BINDING, mixed_in=(1, 1)),
    Setting("binding, oracle tokens", (2, 4), BINDING, oracle_tokens=True),
    Setting("2-4 objects: grounding", (2, 4), ("grounding",)),
    Setting("grounding + 1-object", (2, 4), ("grounding",), mixed_in=(1, 1)),
    Setting("grounding, q first", (2, 4), ("grounding",), question_first=True),
    Setting("grounding, oracle tokens", (2, 4), ("grounding",), oracle_tokens=True),
    Setting("binding, tower shares", (2, 4), BINDING, tower_shares=True),
    Setting("every kind", (2, 4), QUESTION_KINDS),
    Setting("every kind, oracle", (2, 4), QUESTION_KINDS, oracle_tokens=True),
    Setting("every kind, oracle, q first", (2, 4), QUESTION_KINDS, oracle_tokens=True, question_first=True),
    Setting("every kind, q first", (2, 4), QUESTION_KINDS, question_first=True),
)
ENV_IDS = ("vla/PointNav-v0", "vla/ArmReach-v0")


def _tile_key(tile_CHW: torch.Tensor) -> str:
    return hashlib.sha1(tile_CHW.contiguous().numpy().tobytes()).hexdigest()


def pixel_shares(image_path: str, objects: list[dict], cells: int) -> np.ndarray:
    """(cells*cells, n_colours + n_shapes): per token cell (row-major), the share of each object's pixels that falls
    in it, added to the object's colour and shape columns. Object pixels: its colour inside its box (flat rendering)."""
    from PIL import Image

    from envs.scene import COLOURS, SHAPES

    pixels_HW3 = np.asarray(Image.open(image_path).convert("RGB")).astype(np.int64)
    height, width, _ = pixels_HW3.shape
    shares = np.zeros((cells * cells, len(COLOURS) + len(SHAPES)), dtype=np.float32)
    for obj in objects:
        x1, y1, x2, y2 = (int(v) for v in obj["bbox"])
        mask_HW = np.zeros((height, width), dtype=bool)
        mask_HW[y1:y2, x1:x2] = np.abs(pixels_HW3[y1:y2, x1:x2] - np.array(COLOURS[obj["colour"]])).sum(-1) < 10
        per_cell = mask_HW.reshape(cells, height // cells, cells, width // cells).sum((1, 3)).reshape(-1)
        per_cell = per_cell / max(int(mask_HW.sum()), 1)
        shares[:, list(COLOURS).index(obj["colour"])] += per_cell
        shares[:, len(COLOURS) + SHAPES.index(obj["shape"])] += per_cell
    return shares


class OracleImageTokens(nn.Module):
    """Stands in for `VisionEncoder.encode_tiles`: tiles -> (N, cells*cells, D) tokens built from the ground-truth
    colour / shape shares of each token cell (`pixel_shares`) through learned embeddings, plus a learned position."""

    def __init__(self, shares_by_tile: dict[str, np.ndarray], cells: int, dim: int):
        super().__init__()
        self.shares_by_tile = shares_by_tile
        features = next(iter(shares_by_tile.values())).shape[1]
        self.feature_embed = nn.Linear(features, dim, bias=False)
        self.position_embed = nn.Parameter(torch.randn(cells * cells, dim) * 0.02)

    def forward(self, tiles_NCHW: torch.Tensor) -> torch.Tensor:
        shares_NLF = torch.from_numpy(np.stack([self.shares_by_tile[_tile_key(t)] for t in tiles_NCHW]))
        return self.feature_embed(shares_NLF) + self.position_embed


class TowerShareTokens(nn.Module):
    """Stands in for `VisionEncoder.encode_tiles`: tiles -> (N, cells*cells, D) tokens from a frozen tower's per-patch
    object-kind predictions (the softmax of stage vision's share head), averaged over each token cell, object kinds
    only (not the floor), through a learned embedding, plus a learned position (as `OracleImageTokens`)."""

    def __init__(self, vision: nn.Module, share_weight_KC: torch.Tensor, share_bias_K: torch.Tensor, ratio: int,
                 cells: int, dim: int):
        super().__init__()
        self.vision, self.ratio = [vision], ratio  # a list: the frozen tower is not this module's parameter
        self.register_buffer("share_weight_KC", share_weight_KC)
        self.register_buffer("share_bias_K", share_bias_K)
        self.feature_embed = nn.Linear(share_weight_KC.shape[0] - 1, dim, bias=False)
        self.position_embed = nn.Parameter(torch.randn(cells * cells, dim) * 0.02)

    def forward(self, tiles_NCHW: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            patches_NLC = self.vision[0](pixel_values=tiles_NCHW).last_hidden_state
            shares_NLK = torch.softmax(patches_NLC @ self.share_weight_KC.T + self.share_bias_K, dim=-1)
            N, L, K = shares_NLK.shape
            side = math.isqrt(L)
            cells_NKL = F.avg_pool2d(shares_NLK.transpose(1, 2).reshape(N, K, side, side), self.ratio).flatten(2)
        return self.feature_embed(cells_NKL.transpose(1, 2)[..., 1:]) + self.position_embed


def _questions(records: list, kinds: tuple[str, ...], seed: int) -> list[tuple[str, str, str, str]]:
    """(image path, question, answer, kind) for every question of `kinds` about each scene of `records` (kind
    "grounding": one per object)."""
    from envs.scene_language import grounding_turn, question_turns

    rng = np.random.default_rng(seed)
    items = []
    for record in records:
        truth = {"objects": record.meta["objects"], "image_size": record.meta["image_size"]}
        turns = question_turns(truth, rng)
        if "grounding" in kinds:
            turns += [grounding_turn(o, *record.meta["image_size"]) for o in record.meta["objects"]]
        items += [(str(record.images[0]), t.question, t.answer, t.meta["kind"]) for t in turns if t.meta["kind"] in kinds]
    return items


def _right(prediction: str, answer: str, kind: str) -> bool:
    """A grounding answer by its box (IoU >= 0.5 against the true one, `score_answer`); others by exact text."""
    from envs.scene_language import parse_grounding, score_answer

    if kind != "grounding":
        return prediction == answer
    return score_answer(prediction, {"kind": kind, "det": parse_grounding(answer)[0][1][0]})


def _blind_accuracy(train, test) -> float:
    """Accuracy of answering each test question with the majority training answer of the same question text."""
    by_question = collections.defaultdict(collections.Counter)
    for _, question, answer, _ in train:
        by_question[question][answer] += 1
    fallback = collections.Counter(answer for *_, answer, _ in train).most_common(1)[0][0]
    guess = {q: c.most_common(1)[0][0] for q, c in by_question.items()}
    return float(np.mean([_right(guess.get(q, fallback), a, kind) for _, q, a, kind in test]))


def _train_and_score(train, test, texts: list[str], demo: dict, steps: int, seed: int,
                     oracle_objects: dict[str, list[dict]] | None = None,
                     question_first: bool = False, tower: str | None = None,
                     freeze_tower: bool = False, adaptor: bool = False, freeze_adaptor: bool = False,
                     tower_shares: bool = False) -> tuple[float, float, float]:
    """(held-out accuracy, final training loss, seconds) of a fresh demo-size model trained on `train`; with
    `oracle_objects` (image path -> ground-truth objects) the tower is replaced by `OracleImageTokens`; with `tower`
    (a DeepSeek-VL2 folder, e.g. a `vla train stage=vision` checkpoint) the model starts from that folder's SigLIP
    tower (its size replaces the demo's), frozen with `freeze_tower`, and with `adaptor` its adaptor (projector) too
    (e.g. one stage vision trained with `adaptor_weight`; frozen with `freeze_adaptor`); with `tower_shares` the
    adaptor is replaced by `TowerShareTokens` on that tower's share head."""
    import dataclasses

    from backbone.deepseek_vl2 import build_deepseek_vl2, deepseek_vl2_preset, load_deepseek_vl2, replace_language
    from backbone.processor import DeepseekVL2Processor
    from backbone.tokenizer import build_bpe_tokenizer
    from vla.train.stages import next_token_loss, shifted_targets

    torch.manual_seed(seed)
    tokenizer = build_bpe_tokenizer(texts, vocab_size=int(demo["tokenizer_vocab"]))
    pretrained = load_deepseek_vl2(tower) if tower else None
    vision = dataclasses.asdict(pretrained.config.vision) if pretrained else demo.get("vision") or {}
    config = deepseek_vl2_preset("test", vision=vision, **demo["model"])
    model = build_deepseek_vl2(replace_language(config, vocab_size=len(tokenizer)))
    if pretrained is not None:
        model.vision_encoder.vision.load_state_dict(pretrained.vision_encoder.vision.state_dict())
        model.vision_encoder.vision.requires_grad_(not freeze_tower)
        if adaptor:
            width = pretrained.config.projector.n_embed
            if width != config.language.hidden_size:
                raise SystemExit(f"vla bench vqa: the adaptor of {tower} maps to width {width}, the benchmark's language "
                                 f"model is {config.language.hidden_size} wide")
            model.vision_encoder.projector.load_state_dict(pretrained.vision_encoder.projector.state_dict())
            model.vision_encoder.projector.requires_grad_(not freeze_adaptor)
            model.vision_encoder.center_tokens = pretrained.vision_encoder.center_tokens  # as that adaptor was trained
    processor = DeepseekVL2Processor(tokenizer, config.processor_config(mask_prompt=True))
    if tower_shares:
        from safetensors.torch import load_file

        from vla.train.vision_stage import HEADS_FILE

        heads = load_file(str(Path(tower) / HEADS_FILE)) if (Path(tower) / HEADS_FILE).is_file() else {}
        if "share.weight" not in heads:
            raise SystemExit(f"vla bench vqa: {tower} has no share head (make it with stage vision "
                             f"stage.data.share_weight > 0) for the 'tower shares' rows")
        encoder = model.vision_encoder
        encoder.vision.requires_grad_(False)
        encoder.shares = TowerShareTokens(encoder.vision, heads["share.weight"], heads["share.bias"],
                                          config.projector.downsample_ratio, math.isqrt(encoder.tokens_per_tile),
                                          config.language.hidden_size)
        encoder.encode_tiles = lambda tiles_NCHW: encoder.shares(tiles_NCHW)  # as for the oracle below
    if oracle_objects is not None:
        encoder = model.vision_encoder
        cells = math.isqrt(encoder.tokens_per_tile)
        shares_by_tile = {}
        for path, objects in oracle_objects.items():
            shares = pixel_shares(path, objects, cells)
            for tile in processor.preprocess_image(path)[0]:
                shares_by_tile[_tile_key(tile)] = shares
        encoder.oracle = OracleImageTokens(shares_by_tile, cells, config.language.hidden_size)
        # an instance attribute shadows the method (a plain function: assigning the module itself would only
        # register it as a submodule); the tower is bypassed and its parameters get no gradient
        encoder.encode_tiles = lambda tiles_NCHW: encoder.oracle(tiles_NCHW)
    processed: dict[tuple[int, int], dict] = {}

    def sample(split: list, index: int) -> dict:
        key = (id(split), index)
        if key not in processed:
            image, question, answer, _ = split[index]
            prompt = f"{question}\n<image>" if question_first else f"<image>\n{question}"
            processed[key] = processor.process([{"role": "<|User|>", "content": prompt},
                                                {"role": "<|Assistant|>", "content": answer}], [image])
        return processed[key]

    def loss_logits_labels(batch):
        out = model(**batch)
        loss = next_token_loss(out.logits, batch)  # the stages' language loss
        return (loss + out.aux_loss if out.aux_loss is not None else loss), out.logits[:, :-1], shifted_targets(batch)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, steps // 10)))
    order = np.random.default_rng(seed).permutation(len(train))
    start, micro_batch = time.perf_counter(), 16
    model.train()
    for step in range(steps):
        picks = [int(order[(step * micro_batch + j) % len(order)]) for j in range(micro_batch)]
        loss, _, _ = loss_logits_labels(processor.collate([sample(train, i) for i in picks]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        schedule.step()
    seconds = time.perf_counter() - start
    model.eval()
    right = 0
    with torch.no_grad():
        for first in range(0, len(test), 32):
            indices = range(first, min(first + 32, len(test)))
            _, logits, labels = loss_logits_labels(processor.collate([sample(test, i) for i in indices]))
            hits = ((logits.argmax(-1) == labels) | (labels == -100)).all(dim=1)
            for row, i in enumerate(indices):
                if test[i][3] == "grounding":  # the box the argmax tokens spell, scored by IoU
                    hits[row] = _right(processor.tokenizer.decode(logits[row].argmax(-1)[labels[row] != -100].tolist()),
                                       test[i][2], "grounding")
            right += int(hits.sum())
    return right / len(test), float(loss.detach()), seconds


def run(cfg) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import envs  # noqa: F401  (registers the built-in envs)
    from omegaconf import OmegaConf

    from envs.scene_language import generate_scene_language, load_conversations

    quick = bool(cfg.get("quick", False))
    steps = int(cfg.get("steps", 0) or (20 if quick else 400))
    train_scenes, test_scenes = (60, 20) if quick else (2000, 100)
    seed = int(cfg.get("seed", 0) or 0)
    demo = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"))
    wanted = list(cfg.get("rows") or [])
    unknown = sorted(set(wanted) - {s.label for s in SETTINGS})
    if unknown:
        raise SystemExit(f"vla bench vqa: unknown rows {unknown}; known: {[s.label for s in SETTINGS]}")
    settings = [s for s in SETTINGS if not wanted or s.label in wanted]
    tower, freeze_tower = cfg.get("tower"), bool(cfg.get("freeze_tower", False))
    adaptor, freeze_adaptor = bool(cfg.get("adaptor", False)), bool(cfg.get("freeze_adaptor", False))
    if adaptor and not tower:
        raise SystemExit("vla bench vqa: adaptor=true takes the adaptor of the tower= folder; give tower=")
    language = OmegaConf.to_container(cfg.get("language") or OmegaConf.create({}))
    if language:
        demo["model"] = {**demo["model"], **language}
        print(f"language model: {demo['model']}")
    if tower:  # the oracle rows have no tower to replace
        settings = [s for s in settings if not s.oracle_tokens]
        print(f"tower: {tower}{' (frozen)' if freeze_tower else ''}{', and its adaptor' if adaptor else ''}"
              f"{' (frozen)' if adaptor and freeze_adaptor else ''}")
    else:  # the tower-shares rows need one
        settings = [s for s in settings if not s.tower_shares]
    rows = []
    print(f"{'setting':<28} {'steps':>6} {'questions':>10} {'blind':>7} {'trained':>8} {'loss':>7} {'train s':>8}")
    with tempfile.TemporaryDirectory() as tmp:

        def scenes(num_objects: tuple[int, int]) -> Path:
            """The train / test records of scenes with `num_objects` objects (generated once per run)."""
            folder = Path(tmp) / f"{num_objects[0]}-{num_objects[1]}"
            if not (folder / "train" / "sft.jsonl").is_file():
                for split, count, first_seed in (("train", train_scenes, 10_000), ("test", test_scenes, 900_000)):
                    generate_scene_language(folder / split, "sft", count, seed=first_seed, env_ids=list(ENV_IDS),
                                            image_size=int(demo["image_size"]),
                                            env_kwargs={"num_objects": list(num_objects)})
            return folder

        for setting in settings:
            label, kinds = setting.label, setting.kinds
            folders = [scenes(setting.num_objects)] + ([scenes(setting.mixed_in)] if setting.mixed_in else [])
            train_records = [r for folder in folders for r in load_conversations(folder / "train" / "sft.jsonl")]
            test_records = load_conversations(folders[0] / "test" / "sft.jsonl")
            train = _questions(train_records, kinds, seed)
            test = _questions(test_records, kinds, seed + 1)
            texts = [m["content"].replace("<image>", "") for r in train_records for m in r.conversation]
            oracle = ({str(r.images[0]): r.meta["objects"] for r in train_records + test_records}
                      if setting.oracle_tokens else None)
            accuracy, loss, seconds = _train_and_score(train, test, texts, demo, steps, seed, oracle,
                                                       question_first=setting.question_first, tower=tower,
                                                       freeze_tower=freeze_tower, adaptor=adaptor,
                                                       freeze_adaptor=freeze_adaptor,
                                                       tower_shares=setting.tower_shares)
            blind = _blind_accuracy(train, test)
            rows.append({"setting": label, "kinds": list(kinds), "oracle_tokens": setting.oracle_tokens,
                         "tower_shares": setting.tower_shares,
                         "question_first": setting.question_first, "steps": steps,
                         "test_questions": len(test), "blind_accuracy": round(blind, 3), "accuracy": round(accuracy, 3),
                         "final_loss": round(loss, 3), "train_s": round(seconds, 1)})
            print(f"{label:<28} {steps:>6} {len(test):>10} {blind:>7.2f} {accuracy:>8.2f} {loss:>7.3f} {seconds:>8.1f}",
                  flush=True)
    return {"benchmark": "vqa", "quick": quick, "steps": steps, "tower": tower, "freeze_tower": freeze_tower,
            "adaptor": adaptor, "freeze_adaptor": freeze_adaptor, "language": demo["model"], "results": rows}
