"""Grounding output of DeepSeek-VL2: parse `<|ref|>label<|/ref|><|det|>[[x1,y1,x2,y2],...]<|/det|>`, rescale, draw.

Coordinates are integers in 0..999 relative to the original image; pixels are x * W / 999, y * H / 999
(docs/architecture.md, "Chat template, special tokens and grounding"). Models (the tiny one especially) emit
malformed boxes: odd coordinate counts, values like 9999, unclosed tags. `parse_grounding` never raises on model text:
everything it cannot use is returned as a `GroundingProblem`, and only well-formed boxes reach
`GroundingResult.objects`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REF_OPEN, REF_CLOSE, DET_OPEN, DET_CLOSE = "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>"
COORD_MAX = 999
Box = tuple[int, int, int, int]


def locate_prompt(ref: str) -> str:
    """The DeepSeek-VL2 paper's visual-grounding question for `ref` ("the red block"); the answer is
    `<|ref|>ref<|/ref|><|det|>[[x1,y1,x2,y2]]<|/det|>`."""
    return f"Locate {REF_OPEN}{ref}{REF_CLOSE} in the given image."


_TAG = re.compile(r"<\|(/?)(ref|det)\|>")
_NUMBER = re.compile(r"^[+-]?\d+(\.\d*)?$")
_PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]  # fmt: skip


@dataclass(frozen=True)
class GroundingProblem:
    """Something in the model text that could not become a box.

    kind: "unclosed_tag" | "unmatched_close" | "det_without_ref" | "ref_without_det" | "unparsable" |
          "coordinate_count" | "out_of_range" | "inverted" | "empty_det".
    Boxes with "inverted" corners are kept (corners sorted); every other kind drops the box.
    """

    kind: str
    message: str
    fragment: str = ""


@dataclass
class GroundingResult:
    """Parsed grounding: `objects` [(label, [boxes])] in text order, and the `problems` met on the way.

    Iterating (or len()) goes over `objects`, so `for label, boxes in parse_grounding(text)` works.
    """

    objects: list[tuple[str, list[Box]]] = field(default_factory=list)
    problems: list[GroundingProblem] = field(default_factory=list)

    def __iter__(self) -> Iterator[tuple[str, list[Box]]]:
        return iter(self.objects)

    def __len__(self) -> int:
        return len(self.objects)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def boxes(self) -> list[Box]:
        """All boxes, flattened in text order."""
        return [box for _, boxes in self.objects for box in boxes]


def parse_grounding(text: str) -> GroundingResult:
    """Pair each `<|ref|>label<|/ref|>` with the `<|det|>...<|/det|>` that follows it and parse its boxes.

    A det block may hold several boxes (`[[..],[..]]`) that all take the label. A det with no ref before it keeps
    its boxes under the label "" (reported as "det_without_ref"); a ref never followed by a det is reported.
    """
    result = GroundingResult()
    label: str | None = None  # the ref waiting for its det
    pos = 0
    while True:
        match = _TAG.search(text, pos)
        if match is None:
            break
        closing, kind = match.group(1) == "/", match.group(2)
        if closing:
            result.problems.append(GroundingProblem("unmatched_close", f"<|/{kind}|> without an opening tag", match.group(0)))  # fmt: skip
            pos = match.end()
            continue
        close_tag = REF_CLOSE if kind == "ref" else DET_CLOSE
        end = text.find(close_tag, match.end())
        next_open = _TAG.search(text, match.end())
        if end < 0 or (next_open is not None and next_open.start() < end):
            fragment = text[match.start() : match.start() + 80]
            result.problems.append(GroundingProblem("unclosed_tag", f"<|{kind}|> is never closed", fragment))
            pos = match.end()
            continue
        body = text[match.end() : end]
        pos = end + len(close_tag)
        if kind == "ref":
            if label is not None:
                result.problems.append(GroundingProblem("ref_without_det", f"ref {label!r} has no boxes", label))
            label = body
            continue
        if label is None:
            result.problems.append(GroundingProblem("det_without_ref", "boxes without a label", body))
        boxes = _parse_det_body(body, result.problems)
        if boxes:
            result.objects.append((label or "", boxes))
        label = None
    if label is not None:
        result.problems.append(GroundingProblem("ref_without_det", f"ref {label!r} has no boxes", label))
    return result


def _parse_det_body(body: str, problems: list[GroundingProblem]) -> list[Box]:
    """`[[x1,y1,x2,y2], ...]` (or a single `[x1,y1,x2,y2]`) -> well-formed boxes; the rest goes to `problems`."""
    groups = re.findall(r"\[([^\[\]]*)\]", body)  # innermost [..] groups
    leftover = re.sub(r"\[[^\[\]]*\]", "", body).strip(" ,[]\n\t")
    if leftover:
        problems.append(GroundingProblem("unparsable", "text in a det block that is not a [..] box", leftover))
    if not groups:
        if not leftover:
            problems.append(GroundingProblem("empty_det", "det block holds no boxes", body))
        return []
    boxes = []
    for group in groups:
        parts = [p.strip() for p in group.split(",") if p.strip()]
        if not all(_NUMBER.match(p) for p in parts):
            problems.append(GroundingProblem("unparsable", "box coordinates are not numbers", f"[{group}]"))
            continue
        if len(parts) != 4:
            problems.append(GroundingProblem("coordinate_count", f"a box needs 4 coordinates, got {len(parts)}", f"[{group}]"))  # fmt: skip
            continue
        values = [float(p) for p in parts]
        if any(v < 0 or v > COORD_MAX for v in values):
            problems.append(GroundingProblem("out_of_range", f"coordinates must lie in 0..{COORD_MAX}", f"[{group}]"))
            continue
        x1, y1, x2, y2 = (int(round(v)) for v in values)
        if x1 > x2 or y1 > y2:
            problems.append(GroundingProblem("inverted", "corners swapped; sorted", f"[{group}]"))
            x1, x2, y1, y2 = min(x1, x2), max(x1, x2), min(y1, y2), max(y1, y2)
        boxes.append((x1, y1, x2, y2))
    return boxes


def scale_boxes(boxes: Sequence[Sequence[float]], width: int, height: int, as_int: bool = False) -> list[tuple]:
    """0..999 boxes -> pixel boxes of a width x height image: x * W / 999, y * H / 999.

    `as_int=True` truncates like the official demo's drawing code (`int(x / 999 * W)`).
    """
    out = []
    for x1, y1, x2, y2 in boxes:
        scaled = (x1 / COORD_MAX * width, y1 / COORD_MAX * height, x2 / COORD_MAX * width, y2 / COORD_MAX * height)
        out.append(tuple(int(v) for v in scaled) if as_int else scaled)
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of broadcastable (..., 4) float arrays of (x1, y1, x2, y2) boxes. Zero-area pairs give 0."""
    area = lambda box: np.clip(box[..., 2] - box[..., 0], 0, None) * np.clip(box[..., 3] - box[..., 1], 0, None)  # noqa: E731
    inter = (np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
             * np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None))
    union = area(a) + area(b) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def box_iou(boxes_a: Sequence[Sequence[float]], boxes_b: Sequence[Sequence[float]]) -> np.ndarray:
    """Pairwise IoU of (x1, y1, x2, y2) boxes: (len(a), len(b)). Zero-area pairs give 0."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    return _iou(a[:, None], b[None])


def paired_box_iou(boxes_a: Sequence[Sequence[float]], boxes_b: Sequence[Sequence[float]]) -> np.ndarray:
    """IoU of boxes_a[i] with boxes_b[i] for each i: (N,) (no N x N matrix, for many pairs). Zero-area pairs give 0."""
    return _iou(np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4), np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4))


def iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU of two boxes."""
    return float(box_iou([box_a], [box_b])[0, 0])


def draw_grounding(
    image: Image.Image | str | Path, parsed: GroundingResult | str, out_path: str | Path | None = None
) -> Image.Image:
    """Draw each labelled box (rescaled from 0..999 to the image) on a copy of `image`; save when `out_path` given.

    `parsed` may be the model text itself. Returns the drawn image.
    """
    if isinstance(parsed, str):
        parsed = parse_grounding(parsed)
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    canvas = image.convert("RGB")  # a copy: the caller's image is untouched
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    line = max(2, round(min(canvas.size) / 200))
    for index, (label, boxes) in enumerate(parsed.objects):
        color = _PALETTE[index % len(_PALETTE)]
        for x1, y1, x2, y2 in scale_boxes(boxes, canvas.width, canvas.height, as_int=True):
            draw.rectangle((x1, y1, x2, y2), outline=color, width=line)
            if label:
                left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
                text_y = max(0, y1 - (bottom - top) - 4)
                draw.rectangle((x1, text_y, x1 + right - left + 4, text_y + bottom - top + 4), fill=color)
                draw.text((x1 + 2, text_y + 2 - top), label, fill=(255, 255, 255), font=font)
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        canvas.save(out_path)
    return canvas
