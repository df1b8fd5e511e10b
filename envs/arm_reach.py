"""`vla/ArmReach-v0`: a planar 3-link arm (`arm3`) must touch the named shape, e.g. "touch the blue circle".

The arm's base sits at the bottom centre; 2-4 shapes lie within its reach. Action: joint velocities in [-1, 1]^3,
times 0.08 rad per step, at 20 fps; joint limits q0 in [0, pi], q1, q2 in [-2.6, 2.6]. State: the three joint angles
and the end-effector (x, y). Cameras: `top` (the whole scene) and `wrist` (a 2x zoom centred on the end effector).
Success: the end effector within 0.05 of the target centre; it starts at least 0.25 away from it (`near_start`, for
collecting demonstrations only: that fraction of episodes starts 0.06-0.25 from it instead, on any side).
"""

from __future__ import annotations

import numpy as np

from envs import scene
from envs.base import SceneEnv

BASE = np.array([0.5, 0.93])
LINKS = np.array([0.30, 0.24, 0.18])
JOINT_LOW = np.array([0.0, -2.6, -2.6])
JOINT_HIGH = np.array([np.pi, 2.6, 2.6])
MAX_JOINT_SPEED = 0.08
SUCCESS_RADIUS = 0.05
START_DISTANCE = 0.25  # the end effector starts at least this far from the target
WRIST_HALF_WIDTH = 0.25
LINK_COLOUR = (70, 70, 70)


def forward_kinematics(q: np.ndarray) -> np.ndarray:
    """Joint positions (base, elbow 1, elbow 2, end effector) as a (4, 2) array; angle 0 points right, pi/2 up."""
    angles = np.cumsum(q)
    steps = LINKS[:, None] * np.stack([np.cos(angles), -np.sin(angles)], axis=1)
    return np.vstack([BASE, BASE + np.cumsum(steps, axis=0)])


def jacobian(q: np.ndarray) -> np.ndarray:
    """d(end effector)/dq, shape (2, 3)."""
    angles = np.cumsum(q)
    columns = LINKS[:, None] * np.stack([-np.sin(angles), -np.cos(angles)], axis=1)  # per-link contribution
    return np.cumsum(columns[::-1], axis=0)[::-1].T


class ArmReachEnv(SceneEnv):
    embodiment_name = "arm3"

    def __init__(self, image_size: int = 96, render_mode: str | None = "rgb_array", cameras=None, num_objects=(2, 4),
                 distinct_colours: bool = False, instruction: str = "target", near_start: float = 0.0):
        super().__init__(image_size=image_size, render_mode=render_mode, cameras=cameras, instruction=instruction)
        if not 0 <= near_start <= 1:
            raise ValueError(f"near_start must be in [0, 1], got {near_start!r}")
        self.near_start = float(near_start)
        self.num_objects = tuple(num_objects)
        self.distinct_colours = bool(distinct_colours)
        self.q = np.array([np.pi / 2, 0.0, 0.0])
        self._joint_mask = scene.shape_mask("circle", 0.022 * self.image_size)
        self._tip_mask = scene.shape_mask("circle", 0.03 * self.image_size)
        # wrist camera: sample offsets (world units) of each output pixel relative to the end effector
        self._wrist_offsets = ((np.arange(self.image_size) + 0.5) / self.image_size * 2 - 1) * WRIST_HALF_WIDTH

    def _state_bounds(self):
        return (-4.0, 4.0)

    def _generate(self, rng):
        def reachable(rng):  # inside the arm's reach and fully inside the image
            while True:
                radius = rng.uniform(0.30, 0.62)
                angle = rng.uniform(np.radians(25), np.radians(155))
                pos = BASE + radius * np.array([np.cos(angle), -np.sin(angle)])
                if np.all(pos >= self.object_size + 0.02) and np.all(pos <= 1 - self.object_size - 0.02):
                    return pos

        count = int(rng.integers(self.num_objects[0], self.num_objects[1] + 1))
        self.objects = scene.sample_objects(rng, count, self.object_size, 0, 1, min_gap=0.04, region=reachable,
                                            distinct_colours=self.distinct_colours)
        self.target = self.objects[int(rng.integers(count))]
        near = self.near_start > 0 and rng.random() < self.near_start
        for _ in range(1000 if not near else 20000):
            self.q = np.array([rng.uniform(np.pi / 2 - 0.5, np.pi / 2 + 0.5), rng.uniform(-0.9, 0.9), rng.uniform(-0.9, 0.9)])
            tip = forward_kinematics(self.q)[-1]
            distance = np.linalg.norm(tip - self.target.pos)
            if near:  # close to the target, on any side of it (not clear of it)
                if 1.2 * SUCCESS_RADIUS < distance < START_DISTANCE:
                    break
            elif distance > START_DISTANCE and all(np.linalg.norm(tip - o.pos) > o.size + 0.04 for o in self.objects):
                break
        self.task = f"touch the {self.target.name}"

    def _draw_dynamic(self, image):
        points = forward_kinematics(self.q) * self.image_size
        half_width = max(0.015 * self.image_size, 0.8)
        for p0, p1 in zip(points[:-1], points[1:]):
            scene.draw_segment(image, p0, p1, half_width, LINK_COLOUR)
        for p in points[:-1]:
            scene.paste(image, self._joint_mask, p[0], p[1], scene.ROBOT_COLOUR)
        scene.paste(image, self._tip_mask, points[-1][0], points[-1][1], scene.ROBOT_COLOUR)

    def _wrist_rows_cols(self) -> tuple[np.ndarray, np.ndarray]:
        """The top frame's row and column each wrist pixel row / column shows (outside the frame: < 0 or >= size)."""
        tip = forward_kinematics(self.q)[-1]
        cols = np.floor((tip[0] + self._wrist_offsets) * self.image_size).astype(np.int64)
        rows = np.floor((tip[1] + self._wrist_offsets) * self.image_size).astype(np.int64)
        return rows, cols

    def _render_camera(self, camera, top):
        if camera != "wrist":
            return super()._render_camera(camera, top)
        rows, cols = self._wrist_rows_cols()
        inside_cols = (cols >= 0) & (cols < self.image_size)
        inside_rows = (rows >= 0) & (rows < self.image_size)
        view = top.take(np.clip(rows, 0, self.image_size - 1), axis=0).take(np.clip(cols, 0, self.image_size - 1), axis=1)
        if not inside_rows.all():
            view[~inside_rows] = scene.BACKGROUND
        if not inside_cols.all():
            view[:, ~inside_cols] = scene.BACKGROUND
        return view

    def _camera_ground_truth(self, camera, top_objects):
        """The wrist camera's objects and gripper: each top-frame box mapped through the wrist's pixel sampling (the
        wrist pixels whose top row / column fall inside it), what it does not see dropped."""
        if camera != "wrist":
            return super()._camera_ground_truth(camera, top_objects)
        rows, cols = self._wrist_rows_cols()
        zoom = 1 / (2 * WRIST_HALF_WIDTH)  # wrist pixels per top pixel
        tip = self._tip() * self.image_size

        def seen(items):
            out = []
            for item in items:
                x1, y1, x2, y2 = item["bbox"]
                xs, ys = np.flatnonzero((cols >= x1) & (cols < x2)), np.flatnonzero((rows >= y1) & (rows < y2))
                if len(xs) and len(ys):
                    box = [int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1]
                    out.append(item | {"bbox": box} | ({"center": [round(float((c - t) * zoom + self.image_size / 2), 2)
                                                                   for c, t in zip(item["center"], tip)]}
                                                       if "center" in item else {}))
            return out

        return {"objects": seen(top_objects), "extras": seen(self._extra_ground_truth())}

    def _apply_action(self, action):
        self.q = np.clip(self.q + action * MAX_JOINT_SPEED, JOINT_LOW, JOINT_HIGH)

    def _tip(self):
        return forward_kinematics(self.q)[-1]

    def _distance(self):
        return float(np.linalg.norm(self._tip() - self.target.pos))

    def _is_success(self):
        return self._distance() < SUCCESS_RADIUS

    def _state(self):
        return np.concatenate([self.q, self._tip()])

    def _extra_ground_truth(self):
        tip = self._tip() * self.image_size
        return [{"name": "gripper", "bbox": list(scene.mask_bbox(self._tip_mask, tip[0], tip[1], self.image_size, self.image_size))}]

    def expert_action(self):
        """Damped least-squares inverse kinematics towards the target. Joints at a limit that the solution would
        push further are frozen and the solve is repeated with the others, so the arm slides along its limits."""
        error = self.target.pos - self._tip()
        J = jacobian(self.q)
        free = np.ones(3, dtype=bool)
        for _ in range(3):
            Jf = J * free
            dq = Jf.T @ np.linalg.solve(Jf @ Jf.T + 1e-3 * np.eye(2), error)
            blocked = ((self.q <= JOINT_LOW + 1e-6) & (dq < 0)) | ((self.q >= JOINT_HIGH - 1e-6) & (dq > 0))
            if not (blocked & free).any():
                break
            free &= ~blocked
        action = dq / MAX_JOINT_SPEED
        largest = np.abs(action).max()
        if largest > 1.0:
            action = action / largest
        return action.astype(np.float32)
