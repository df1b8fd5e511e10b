"""Seeded scenes of coloured shapes and their numpy rendering, shared by every built-in env and the scene-language data.

World coordinates are image-like: a unit square with (0, 0) at the top left, x to the right, y downwards, so a world
point (x, y) lands on pixel column x * W and row y * H. Images are square (W = H = `image_size`).

A scene is a list of `SceneObject`s (colour, shape, centre, half-size). Objects are drawn from small binary masks
computed once per object and pasted at their pixel position, so a frame costs a background copy plus a few small
pastes. Bounding boxes are read off the same masks, so the ground truth is exactly what was drawn:
`(x1, y1, x2, y2)` in pixel units, x1/y1 the first covered column/row and x2/y2 one past the last.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (40, 170, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 205, 35),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")

BACKGROUND = (185, 185, 185)
ROBOT_COLOUR = (35, 35, 35)
GOAL_COLOUR = (240, 240, 240)
GOAL_EDGE_COLOUR = (90, 90, 90)


@dataclass
class SceneObject:
    """One coloured shape: `size` is its half-extent in world units, (x, y) its centre."""

    colour: str
    shape: str
    x: float
    y: float
    size: float
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def pos(self) -> np.ndarray:
        return np.array([self.x, self.y], dtype=np.float64)


def sample_objects(
    rng: np.random.Generator,
    count: int,
    size: float,
    low: float,
    high: float,
    min_gap: float,
    avoid: list[tuple[np.ndarray, float]] = (),
    region=None,
    distinct_colours: bool = False,
) -> list[SceneObject]:
    """Place `count` objects with distinct (colour, shape) pairs (with `distinct_colours`, distinct colours too),
    centres in [low, high]^2 (or `region(rng)`), at least `min_gap` apart edge to edge and clear of each
    `(point, radius)` in `avoid`."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    if distinct_colours:
        if count > len(COLOURS):
            raise ValueError(f"{count} objects cannot have distinct colours; there are {len(COLOURS)}")
        colours = rng.choice(len(COLOURS), size=count, replace=False)
        chosen = [int(c) * len(SHAPES) + int(rng.integers(len(SHAPES))) for c in colours]
    else:
        chosen = rng.choice(len(pairs), size=count, replace=False)
    objects: list[SceneObject] = []
    for index in chosen:
        colour, shape = pairs[int(index)]
        for _ in range(1000):
            pos = region(rng) if region is not None else rng.uniform(low, high, size=2)
            clear_of_objects = all(np.linalg.norm(pos - o.pos) > 2 * size + min_gap for o in objects)
            clear_of_avoid = all(np.linalg.norm(pos - p) > r + size for p, r in avoid)
            if clear_of_objects and clear_of_avoid:
                break
        else:  # pragma: no cover - the regions are sized so that this never happens
            raise RuntimeError("could not place scene objects; region too small")
        objects.append(SceneObject(colour, shape, float(pos[0]), float(pos[1]), size))
    return objects


def shape_mask(shape: str, radius_px: float) -> np.ndarray:
    """Boolean mask of `shape` with circumradius `radius_px`, on a (2R+1)^2 grid centred on the middle pixel."""
    half = int(np.ceil(radius_px))
    v, u = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    r = max(radius_px, 0.5)
    if shape == "circle":
        mask = u * u + v * v <= r * r
    elif shape == "square":
        side = 0.82 * r
        mask = (np.abs(u) <= side) & (np.abs(v) <= side)
    elif shape == "triangle":  # pointing up, base at the bottom
        top, bottom = -r, 0.75 * r
        half_base = 0.95 * r
        t = (v - top) / (bottom - top)  # 0 at the apex, 1 at the base
        mask = (v >= top) & (v <= bottom) & (np.abs(u) <= t * half_base)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    if not mask.any():
        mask[half, half] = True
    return mask


def paste(image: np.ndarray, mask: np.ndarray, cx: float, cy: float, colour) -> tuple[int, int, int, int] | None:
    """Paint `colour` where `mask` is set, mask centred on pixel (cx, cy); clipped at the borders.

    Returns the painted bounding box (x1, y1, x2, y2) or None when nothing landed inside the image.
    """
    height, width = image.shape[:2]
    half = mask.shape[0] // 2
    left, top = int(np.floor(cx)) - half, int(np.floor(cy)) - half
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + mask.shape[1], width), min(top + mask.shape[0], height)
    if x0 >= x1 or y0 >= y1:
        return None
    sub = mask[y0 - top : y1 - top, x0 - left : x1 - left]
    image[y0:y1, x0:x1][sub] = colour
    rows, cols = np.nonzero(sub)
    if rows.size == 0:
        return None
    return (x0 + int(cols.min()), y0 + int(rows.min()), x0 + int(cols.max()) + 1, y0 + int(rows.max()) + 1)


def mask_bbox(mask: np.ndarray, cx: float, cy: float, width: int, height: int) -> tuple[int, int, int, int]:
    """The bounding box `paste` would report for this mask at this position (without drawing)."""
    half = mask.shape[0] // 2
    left, top = int(np.floor(cx)) - half, int(np.floor(cy)) - half
    rows, cols = np.nonzero(mask)
    x1 = max(left + int(cols.min()), 0)
    y1 = max(top + int(rows.min()), 0)
    x2 = min(left + int(cols.max()) + 1, width)
    y2 = min(top + int(rows.max()) + 1, height)
    return (x1, y1, x2, y2)


def draw_segment(image: np.ndarray, p0: np.ndarray, p1: np.ndarray, half_width: float, colour) -> None:
    """Thick line from p0 to p1 (pixel coordinates), drawn only inside its bounding box."""
    height, width = image.shape[:2]
    pad = half_width + 1
    x0 = max(int(np.floor(min(p0[0], p1[0]) - pad)), 0)
    x1 = min(int(np.ceil(max(p0[0], p1[0]) + pad)) + 1, width)
    y0 = max(int(np.floor(min(p0[1], p1[1]) - pad)), 0)
    y1 = min(int(np.ceil(max(p0[1], p1[1]) + pad)) + 1, height)
    if x0 >= x1 or y0 >= y1:
        return
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5
    d = p1 - p0
    length2 = float(d @ d) or 1e-9
    t = np.clip(((xs - p0[0]) * d[0] + (ys - p0[1]) * d[1]) / length2, 0.0, 1.0)
    dx = xs - (p0[0] + t * d[0])
    dy = ys - (p0[1] + t * d[1])
    image[y0:y1, x0:x1][dx * dx + dy * dy <= half_width * half_width] = colour


def blank(image_size: int) -> np.ndarray:
    image = np.empty((image_size, image_size, 3), dtype=np.uint8)
    image[...] = BACKGROUND
    return image


def to_px(value: float, image_size: int) -> float:
    """World coordinate -> pixel coordinate (continuous)."""
    return value * image_size
