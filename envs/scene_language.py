"""Scene-language data for the backbone's training stages, generated from the built-in envs' scenes and ground truth.

Stages
------
- `align` (stage 1): one caption per image ("Describe the image." -> "There are 3 shapes: a red square at the top
  left, ...").
- `pretrain` (stage 2): single-turn captions, grounding and short-answer questions, mixed.
- `sft` (stage 3): multi-turn conversations mixing questions and grounding about one image.

File format (JSONL + images; the loader reads user-made files of the same format)
-------------------------------------------------------------------------------
One JSON object per line:

    {"id": "sft-000000",
     "images": ["images/sft-000000.png"],                      # paths relative to the JSONL file's directory
     "conversation": [
        {"role": "<|User|>", "content": "<image>\\nLocate <|ref|>the red square<|/ref|> in the given image."},
        {"role": "<|Assistant|>", "content": "<|ref|>the red square<|/ref|><|det|>[[120,345,310,560]]<|/det|>"},
        {"role": "<|User|>", "content": "How many shapes are there?"},
        {"role": "<|Assistant|>", "content": "3"}],
     "meta": {...}}                                           # optional; ground truth for scoring

Rules checked by `load_conversations` (errors give file:line): `id` unique string or int; `images` a list of
existing files; `conversation` a non-empty list of {"role", "content"} strings alternating `<|User|>` /
`<|Assistant|>`, starting with the user and ending with the assistant; as many `<image>` placeholders in the user
turns as there are images; `meta` an object if present.

Boxes follow DeepSeek-VL2: `<|det|>[[x1,y1,x2,y2]]<|/det|>` with every coordinate in 0..999 relative to the image,
`round(x * 999 / W)` for x and `round(y * 999 / H)` for y, from the pixel box (x1, y1 first covered column/row, x2, y2
one past the last) of the env's `scene_ground_truth()`.

Generated `meta`: stage, env, seed, image_size [W, H], objects (name, colour, shape, pixel bbox, is_target), extras
(robot, goal zone), task, and `turns`: one entry per assistant turn with its `kind` and canonical `answer` (grounding
turns: `ref`, pixel `bbox` and `det`). Short answers are canonical: a colour word, a shape word, "colour shape", a
digit, "yes"/"no"; `score_answer` compares a prediction with a turn (normalized exact match; a grounding answer must
give exactly one box, with IoU >= 0.5).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from backbone.grounding import iou as _iou
from backbone.grounding import locate_prompt
from backbone.grounding import parse_grounding as _parse_grounding

import envs
from envs.scene import COLOURS, SHAPES

USER = "<|User|>"
ASSISTANT = "<|Assistant|>"
IMAGE_TOKEN = "<image>"
STAGES = ("align", "pretrain", "sft")
CAPTION_PROMPTS = ("Describe the image.", "What is in this picture?", "Describe the scene in one sentence.")
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six")
# the short-answer question kinds `question_turns` writes (turn meta "kind"; captions and grounding are the others)
QUESTION_KINDS = ("count", "count_colour", "colour_of_shape", "shape_of_colour", "extreme", "left_of", "exists")


class SceneLanguageFormatError(ValueError):
    """A record breaks the JSONL format (message starts with file:line)."""


# ---------------------------------------------------------------------------------------------- boxes
def to_det(bbox: list[float], width: int, height: int) -> list[int]:
    """Pixel box -> DeepSeek-VL2 0..999 box."""
    x1, y1, x2, y2 = bbox
    return [round(x1 * 999 / width), round(y1 * 999 / height), round(x2 * 999 / width), round(y2 * 999 / height)]


def from_det(det: list[float], width: int, height: int) -> list[float]:
    """0..999 box -> pixel box (inverse of `to_det` up to rounding)."""
    x1, y1, x2, y2 = det
    return [x1 * width / 999, y1 * height / 999, x2 * width / 999, y2 * height / 999]


def grounding_answer(ref: str, det: list[int]) -> str:
    return f"<|ref|>{ref}<|/ref|><|det|>[[{det[0]},{det[1]},{det[2]},{det[3]}]]<|/det|>"


def named_object_grounding(env: gym.Env, camera: str | None = None) -> dict[str, Any] | None:
    """The object `env`'s instruction names, in `camera`'s frame (its first camera by default), as {"ref": "the red
    triangle", "det": [x1, y1, x2, y2] in 0..999}; `grounding_answer(**it)` is the answer to "Locate it". None when
    the task names no single object of the scene or the camera does not show it. (A vla policy with `ground_target`
    is trained to say this box before it acts; `collect_dataset` records it per episode.)"""
    base = env.unwrapped
    truth = base.scene_ground_truth(camera or base.cameras[0])
    named = [o for o in truth["objects"] if o["name"] in truth["task"]]
    if len(named) != 1:
        return None
    width, height = truth["image_size"]
    return {"ref": f"the {named[0]['name']}", "det": to_det(named[0]["bbox"], width, height)}


def parse_grounding(text: str) -> list[tuple[str, list[list[float]]]]:
    """All `<|ref|>..<|/ref|><|det|>[[..]]<|/det|>` pairs of a text as (ref, boxes); malformed boxes are skipped
    (the one grounding parser of the project, backbone.grounding, does the work)."""
    return [(label.strip(), [list(box) for box in boxes]) for label, boxes in _parse_grounding(text) if boxes]


def box_iou(a: list[float], b: list[float]) -> float:
    return _iou(a, b)


# ---------------------------------------------------------------------------------------------- language
def _position(center: list[float], width: int, height: int) -> str:
    col = ("left", "centre", "right")[min(int(3 * center[0] / width), 2)]
    row = ("top", "middle", "bottom")[min(int(3 * center[1] / height), 2)]
    if (row, col) == ("middle", "centre"):
        return "in the centre"
    if row == "middle":
        return f"on the {col}"
    if col == "centre":
        return f"at the {row}"
    return f"at the {row} {col}"


def caption(truth: dict[str, Any]) -> str:
    """One-sentence description of the shapes and their coarse positions, plus the robot / goal zone."""
    width, height = truth["image_size"]
    objects = sorted(truth["objects"], key=lambda o: (o["center"][1], o["center"][0]))
    parts = [f"a {o['name']} {_position(o['center'], width, height)}" for o in objects]
    listing = "" if not parts else ": " + (parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1])
    count = len(objects)
    sentence = f"There {'is' if count == 1 else 'are'} {NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else count} shape{'s' if count != 1 else ''}{listing}."
    names = {e["name"] for e in truth.get("extras", [])}
    if truth.get("embodiment") == "arm3":
        sentence += " A robot arm reaches up from the bottom."
    elif "robot" in names:
        sentence += " A small black robot is also there."
    if "goal zone" in names:
        sentence += " A white square marks the goal zone."
    return sentence


def record_truth(meta: dict[str, Any]) -> dict[str, Any]:
    """The scene ground truth `caption` reads, from a generated record's meta."""
    robot = {"vla/ArmReach-v0": "arm3"}.get(meta.get("env", ""), "")
    return {"image_size": meta["image_size"], "objects": meta["objects"], "extras": meta.get("extras", []),
            "embodiment": robot}


def hard_negative_captions(truth: dict[str, Any], rng: np.random.Generator, count: int) -> list[str]:
    """`count` captions of scenes that differ from `truth` only in what goes with what: two objects' colours or
    shapes swapped (the words of the true caption, bound the other way), or one object recoloured / reshaped to one
    the scene lacks. Against them, a caption is matched only by an image feature that binds colour, shape and place
    per object (the contrastive vision stage's hard negatives)."""
    positive = caption(truth)
    objects = truth["objects"]

    def edited(changes: dict[int, dict[str, str]]) -> str:
        new = []
        for i, o in enumerate(objects):
            o = dict(o) | changes.get(i, {})
            new.append(o | {"name": f"{o['colour']} {o['shape']}"})
        return caption(truth | {"objects": new})

    out: list[str] = []
    for _ in range(50 * count):
        if len(out) == count:
            break
        kind = int(rng.integers(4))
        i, j = (int(k) for k in rng.choice(len(objects), size=2, replace=False)) if len(objects) >= 2 else (0, 0)
        if kind == 0 and i != j:  # swap colours
            text = edited({i: {"colour": objects[j]["colour"]}, j: {"colour": objects[i]["colour"]}})
        elif kind == 1 and i != j and objects[i]["shape"] != objects[j]["shape"]:  # swap shapes
            text = edited({i: {"shape": objects[j]["shape"]}, j: {"shape": objects[i]["shape"]}})
        elif kind == 2:  # a colour the scene does not have
            free = [c for c in COLOURS if c not in {o["colour"] for o in objects}]
            text = edited({i: {"colour": free[int(rng.integers(len(free)))]}}) if free else positive
        else:  # another shape
            others = [sh for sh in SHAPES if sh != objects[i]["shape"]]
            text = edited({i: {"shape": others[int(rng.integers(len(others)))]}})
        if text != positive and text not in out:
            out.append(text)
    while len(out) < count:  # a scene too plain for `count` distinct edits: repeat the ones there are
        out.append(out[len(out) % max(len(out), 1)] if out else positive)
    return out


@dataclass
class Turn:
    """One question/answer pair; `meta` is the ground truth stored for scoring."""

    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


def grounding_turn(obj: dict[str, Any], width: int, height: int) -> Turn:
    ref = f"the {obj['name']}"
    det = to_det(obj["bbox"], width, height)
    return Turn(
        locate_prompt(ref),
        grounding_answer(ref, det),
        {"kind": "grounding", "ref": ref, "bbox": list(obj["bbox"]), "det": det, "answer": grounding_answer(ref, det)},
    )


def question_turns(truth: dict[str, Any], rng: np.random.Generator, min_gap_px: float = 3.0) -> list[Turn]:
    """Every unambiguous short-answer question about the scene (the caller samples from them)."""
    objects = truth["objects"]
    turns = [Turn("How many shapes are there?", str(len(objects)), {"kind": "count"})]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    turns.append(Turn(f"How many {colour} shapes are there?", str(sum(o["colour"] == colour for o in objects)), {"kind": "count_colour"}))
    for shape in SHAPES:
        having = [o for o in objects if o["shape"] == shape]
        if len(having) == 1:
            turns.append(Turn(f"What colour is the {shape}?", having[0]["colour"], {"kind": "colour_of_shape"}))
    for colour in COLOURS:
        having = [o for o in objects if o["colour"] == colour]
        if len(having) == 1:
            turns.append(Turn(f"What shape is the {colour} object?", having[0]["shape"], {"kind": "shape_of_colour"}))
    for axis, sign, phrase in ((0, 1, "furthest to the left"), (0, -1, "furthest to the right"), (1, 1, "highest up"), (1, -1, "lowest down")):
        ordered = sorted(objects, key=lambda o: sign * o["center"][axis])
        if len(ordered) >= 2 and abs(ordered[0]["center"][axis] - ordered[1]["center"][axis]) > min_gap_px:
            turns.append(Turn(f"Which shape is {phrase}?", ordered[0]["name"], {"kind": "extreme"}))
    if len(objects) >= 2:
        i, j = rng.choice(len(objects), size=2, replace=False)
        a, b = objects[int(i)], objects[int(j)]
        if abs(a["center"][0] - b["center"][0]) > min_gap_px:
            answer = "yes" if a["center"][0] < b["center"][0] else "no"
            turns.append(Turn(f"Is the {a['name']} left of the {b['name']}?", answer, {"kind": "left_of"}))
    present = {o["name"] for o in objects}
    probe_colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    probe_shape = SHAPES[int(rng.integers(len(SHAPES)))]
    probe = f"{probe_colour} {probe_shape}"
    turns.append(Turn(f"Is there a {probe}?", "yes" if probe in present else "no", {"kind": "exists"}))
    for turn in turns:
        turn.meta["answer"] = turn.answer
    return turns


def normalize_answer(text: str) -> str:
    text = text.strip().lower().rstrip(".!")
    return re.sub(r"^(the|a|an) ", "", text).strip()


def score_answer(prediction: str, turn_meta: dict[str, Any], iou_threshold: float = 0.5) -> bool:
    """Is `prediction` right for this turn? Grounding: the question asks for one object, so the answer must give
    exactly one well-formed box and that box needs IoU >= threshold (0..999 space) against the true box; extra boxes
    count against it (a right box among others, or a wrong first box followed by a right one, is wrong), so emitting
    many boxes is not rewarded. The ref label is not compared. Otherwise: normalized exact match of the canonical
    answer."""
    if turn_meta.get("kind") == "grounding":
        boxes = [box for _, group in parse_grounding(prediction) for box in group]
        return len(boxes) == 1 and box_iou(boxes[0], turn_meta["det"]) >= iou_threshold
    return normalize_answer(prediction) == normalize_answer(str(turn_meta["answer"]))


# ---------------------------------------------------------------------------------------------- generation
def _record(record_id: str, image_path: str, turns: list[Turn], truth: dict[str, Any], extra_meta: dict[str, Any]) -> dict[str, Any]:
    conversation = []
    for index, turn in enumerate(turns):
        content = f"{IMAGE_TOKEN}\n{turn.question}" if index == 0 else turn.question
        conversation += [{"role": USER, "content": content}, {"role": ASSISTANT, "content": turn.answer}]
    meta = {
        **extra_meta,
        "image_size": truth["image_size"],
        "objects": truth["objects"],
        "extras": truth.get("extras", []),
        "task": truth.get("task", ""),
        "turns": [t.meta for t in turns],
    }
    return {"id": record_id, "images": [image_path], "conversation": conversation, "meta": meta}


def make_turns(stage: str, truth: dict[str, Any], rng: np.random.Generator) -> list[Turn]:
    """The turns of one record of `stage` for a scene."""
    width, height = truth["image_size"]
    caption_turn = Turn(CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))], caption(truth), {"kind": "caption"})
    caption_turn.meta["answer"] = caption_turn.answer
    objects = truth["objects"]
    if stage == "align":
        return [caption_turn]
    questions = question_turns(truth, rng)
    groundings = [grounding_turn(o, width, height) for o in objects]
    if stage == "pretrain":
        kind = int(rng.integers(3))
        pool = [caption_turn] if kind == 0 else groundings if kind == 1 else questions
        return [pool[int(rng.integers(len(pool)))]]
    if stage == "sft":
        pool = questions + groundings
        count = min(len(pool), int(rng.integers(3, 6)))
        return [pool[int(i)] for i in rng.choice(len(pool), size=count, replace=False)]
    raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")


def generate_scene_language(
    out_dir: str | Path,
    stage: str,
    count: int,
    seed: int = 0,
    env_ids: list[str] | None = None,
    image_size: int = 96,
    env_kwargs: dict[str, Any] | None = None,
    camera: str = "top",
) -> Path:
    """Write `count` records of `stage` to `out_dir/<stage>.jsonl` with PNGs in `out_dir/images/`. Record i shows
    the reset scene of env `env_ids[i % len(env_ids)]` (default: the built-in suite) with seed `seed + i`;
    `env_kwargs` go to every `gym.make` (e.g. `{"num_objects": [1, 1]}`). Another `camera` than the top one (the
    arm's `wrist`) writes `<stage>-<camera>.jsonl` of that camera's frames, with what it sees as their ground truth
    (objects out of its view left out; a frame may show none)."""
    from PIL import Image

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    env_ids = list(env_ids or envs.BUILTIN_ENVS)
    made = {env_id: gym.make(env_id, **{"image_size": image_size, **(env_kwargs or {})}) for env_id in env_ids}
    rng = np.random.default_rng(seed)
    name = stage if camera == "top" else f"{stage}-{camera}"
    path = out_dir / f"{name}.jsonl"
    with path.open("w") as handle:
        for i in range(count):
            env_id = env_ids[i % len(env_ids)]
            env = made[env_id]
            observation, _ = env.reset(seed=seed + i)
            truth = env.unwrapped.scene_ground_truth(camera)
            record_id = f"{name}-{i:06d}"
            image_path = f"images/{record_id}.png"
            Image.fromarray(observation["pixels"][camera]).save(out_dir / image_path)
            turns = make_turns(stage, truth, rng)
            record = _record(record_id, image_path, turns, truth, {"stage": stage, "env": env_id, "seed": seed + i}
                             | ({} if camera == "top" else {"camera": camera}))
            handle.write(json.dumps(record) + "\n")
    for env in made.values():
        env.close()
    return path


# ---------------------------------------------------------------------------------------------- loading
@dataclass
class ConversationRecord:
    id: str | int
    images: list[Path]
    conversation: list[dict[str, str]]
    meta: dict[str, Any]
    line: int

    @property
    def answers(self) -> list[str]:
        return [turn["content"] for turn in self.conversation if turn["role"] == ASSISTANT]


def _validate(raw: Any, where: str, base: Path, check_images: bool) -> tuple[Any, list[Path], list[dict], dict]:
    if not isinstance(raw, dict):
        raise SceneLanguageFormatError(f"{where}: a record must be a JSON object, got {type(raw).__name__}")
    for key in ("id", "conversation"):
        if key not in raw:
            raise SceneLanguageFormatError(f"{where}: missing key {key!r} (have {sorted(raw)})")
    record_id = raw["id"]
    if not isinstance(record_id, (str, int)) or isinstance(record_id, bool):
        raise SceneLanguageFormatError(f"{where}: 'id' must be a string or an integer")
    images = raw.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise SceneLanguageFormatError(f"{where}: 'images' must be a list of path strings")
    paths = [(base / p) if not Path(p).is_absolute() else Path(p) for p in images]
    if check_images:
        for shown, resolved in zip(images, paths):
            if not resolved.is_file():
                raise SceneLanguageFormatError(f"{where}: image {shown!r} not found (looked for {resolved})")
    conversation = raw["conversation"]
    if not isinstance(conversation, list) or not conversation:
        raise SceneLanguageFormatError(f"{where}: 'conversation' must be a non-empty list of turns")
    for index, turn in enumerate(conversation):
        if not isinstance(turn, dict) or set(turn) - {"role", "content"} or not {"role", "content"} <= set(turn):
            raise SceneLanguageFormatError(f"{where}: turn {index} must be an object with exactly 'role' and 'content'")
        if not isinstance(turn["content"], str):
            raise SceneLanguageFormatError(f"{where}: turn {index} content must be a string")
        expected = USER if index % 2 == 0 else ASSISTANT
        if turn["role"] != expected:
            raise SceneLanguageFormatError(f"{where}: turn {index} has role {turn['role']!r}, expected {expected!r} (turns alternate, user first)")
    if conversation[-1]["role"] != ASSISTANT:
        raise SceneLanguageFormatError(f"{where}: the last turn must be the assistant's")
    placeholders = sum(turn["content"].count(IMAGE_TOKEN) for turn in conversation if turn["role"] == USER)
    if placeholders != len(images):
        raise SceneLanguageFormatError(f"{where}: {placeholders} {IMAGE_TOKEN} placeholder(s) for {len(images)} image(s)")
    meta = raw.get("meta", {})
    if not isinstance(meta, dict):
        raise SceneLanguageFormatError(f"{where}: 'meta' must be an object")
    return record_id, paths, conversation, meta


def load_conversations(path: str | Path, check_images: bool = True) -> list[ConversationRecord]:
    """Read and validate a JSONL file of conversations (generated or user-made); blank lines are skipped."""
    path = Path(path)
    records: list[ConversationRecord] = []
    seen: dict[Any, int] = {}
    with path.open() as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as error:
                raise SceneLanguageFormatError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
            record_id, images, conversation, meta = _validate(raw, where, path.parent, check_images)
            if record_id in seen:
                raise SceneLanguageFormatError(f"{where}: duplicate id {record_id!r} (first on line {seen[record_id]})")
            seen[record_id] = line_number
            records.append(ConversationRecord(record_id, images, conversation, meta, line_number))
    return records


# ---------------------------------------------------------------------------------------------- scoring
def scored_turns(records: list[ConversationRecord]) -> list[tuple[ConversationRecord, str, dict[str, Any]]]:
    """(record, question, turn meta) for every scored turn of `records`: each user turn with the `meta.turns` entry
    of its answer, the `<image>` tag stripped; captions are not scored (no canonical answer)."""
    items = []
    for record in records:
        questions = [m["content"] for m in record.conversation if m["role"] == USER]
        for turn_meta, question in zip(record.meta.get("turns", []), questions):
            if turn_meta.get("kind") != "caption":
                items.append((record, question.replace(IMAGE_TOKEN, "").strip(), turn_meta))
    return items


def score_turns(records: list[ConversationRecord], predict, progress: bool = False, examples: int = 12) -> dict[str, Any]:
    """Score `predict(record, question, turn_meta) -> text` on every scored turn of `records` (`score_answer`).

    Returns {"vqa_accuracy", "grounding_acc", "n_vqa", "n_grounding", "by_kind": {kind: {"right", "total",
    "accuracy"}}, "examples": the first `examples` as {"image", "question", "answer", "expected", "correct", "kind"}}
    (short answers are "vqa", boxes "grounding")."""
    from tqdm import tqdm

    turns = scored_turns(records)
    if not turns:
        raise ValueError(f"none of the {len(records)} records has a scored turn: scoring needs `meta.turns` with each "
                         f"answer's kind and canonical answer (generate_scene_language writes them)")
    right: dict[str, int] = {}
    total: dict[str, int] = {}
    shown = []
    for record, question, turn_meta in tqdm(turns, desc="scene VQA", unit="q", disable=not progress):
        text = predict(record, question, turn_meta)
        ok = score_answer(text, turn_meta)
        kind = turn_meta.get("kind", "?")
        right[kind] = right.get(kind, 0) + int(ok)
        total[kind] = total.get(kind, 0) + 1
        if len(shown) < examples:
            shown.append({"image": str(record.images[0]) if record.images else "", "question": " ".join(question.split()),
                          "answer": text, "expected": turn_meta.get("answer"), "correct": ok,
                          "kind": "grounding" if kind == "grounding" else "vqa"})
    n_vqa = sum(t for k, t in total.items() if k != "grounding")
    n_grounding = total.get("grounding", 0)
    return {"vqa_accuracy": sum(r for k, r in right.items() if k != "grounding") / max(n_vqa, 1),
            "grounding_acc": right.get("grounding", 0) / max(n_grounding, 1),
            "n_vqa": n_vqa, "n_grounding": n_grounding,
            "by_kind": {k: {"right": right[k], "total": total[k], "accuracy": right[k] / total[k]} for k in sorted(total)},
            "examples": shown}


class SceneOverlapError(ValueError):
    """Held-out records show a scene (env, reset seed) that training saw."""


def scene_keys(records: list[ConversationRecord]) -> set[tuple[str, int]]:
    """(env id, reset seed) of each generated record's scene (records without them, e.g. hand-made ones, are left out)."""
    return {(str(r.meta["env"]), int(r.meta["seed"])) for r in records if "env" in r.meta and "seed" in r.meta}


def check_held_out(eval_records: list[ConversationRecord], trained: set[tuple[str, int]]) -> int:
    """Raise `SceneOverlapError` (one line) when an eval record shows a scene in `trained` ((env id, seed) pairs: the
    training records' `scene_keys`, robot datasets' episode seeds); returns how many eval scenes were checked."""
    keys = scene_keys(eval_records)
    shared = sorted(keys & set(trained))
    if shared:
        env_id, seed = shared[0]
        raise SceneOverlapError(f"{len(shared)} of {len(keys)} held-out scenes were trained on (e.g. {env_id} seed {seed}): "
                                f"generate the eval records from other seeds")
    return len(keys)


def blind_baseline(train_records: list[ConversationRecord], eval_records: list[ConversationRecord]) -> dict[str, Any]:
    """What answering without the image scores on `eval_records` (the language side's "no vision" baseline): a
    short question gets the most common training answer to the same question text (else to its kind), a grounding
    question the mean training box of the same reference (else of every reference). Same result dict as
    `score_turns`."""
    from collections import Counter, defaultdict

    answers: dict[str, Counter] = defaultdict(Counter)
    by_kind: dict[str, Counter] = defaultdict(Counter)
    boxes: dict[str, list[list[int]]] = defaultdict(list)
    for _, question, meta in scored_turns(train_records):
        if meta.get("kind") == "grounding":
            boxes[meta["ref"]].append(meta["det"])
            boxes[""].append(meta["det"])
        else:
            answers[question][str(meta["answer"])] += 1
            by_kind[meta.get("kind", "?")][str(meta["answer"])] += 1

    def predict(record: ConversationRecord, question: str, meta: dict[str, Any]) -> str:
        if meta.get("kind") == "grounding":
            seen = boxes.get(meta["ref"]) or boxes.get("")
            if not seen:
                return ""
            mean = [round(float(v)) for v in np.mean(np.asarray(seen, dtype=np.float64), axis=0)]
            return grounding_answer(meta["ref"], mean)
        pool = answers.get(question) or by_kind.get(meta.get("kind", "?"))
        return pool.most_common(1)[0][0] if pool else ""

    return score_turns(eval_records, predict)
