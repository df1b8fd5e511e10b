"""`vla/PointNav-v0`: a disk robot (`point2d`) must drive onto the named shape, e.g. "go to the red square".

2-4 coloured shapes with distinct (colour, shape) pairs lie on the floor; the robot drives over them (they are not
obstacles). Action: velocity in [-1, 1]^2, times 0.04 world units per step, at 10 fps. State: robot (x, y).
Success: the robot centre within 0.05 of the target centre; the robot starts at least 0.3 away from it.
"""

from __future__ import annotations

import numpy as np

from envs import scene
from envs.base import SceneEnv

MAX_SPEED = 0.04
ROBOT_RADIUS = 0.035
SUCCESS_RADIUS = 0.05
START_DISTANCE = 0.3  # the robot starts at least this far from the target


class PointNavEnv(SceneEnv):
    embodiment_name = "point2d"

    def __init__(self, image_size: int = 96, render_mode: str | None = "rgb_array", cameras=None, num_objects=(2, 4),
                 distinct_colours: bool = False, instruction: str = "target"):
        super().__init__(image_size=image_size, render_mode=render_mode, cameras=cameras, instruction=instruction)
        self.num_objects = tuple(num_objects)
        self.distinct_colours = bool(distinct_colours)
        self.agent = np.zeros(2)
        self._robot_mask = scene.shape_mask("circle", ROBOT_RADIUS * self.image_size)

    def _state_bounds(self):
        return (0.0, 1.0)

    def _generate(self, rng):
        count = int(rng.integers(self.num_objects[0], self.num_objects[1] + 1))
        self.objects = scene.sample_objects(rng, count, self.object_size, 0.12, 0.88, min_gap=0.04,
                                            distinct_colours=self.distinct_colours)
        self.target = self.objects[int(rng.integers(count))]
        avoid = [(o.pos, 0.05) for o in self.objects]
        for _ in range(1000):
            self.agent = rng.uniform(0.08, 0.92, size=2)
            clear = all(np.linalg.norm(self.agent - p) > r + self.object_size for p, r in avoid)
            if clear and np.linalg.norm(self.agent - self.target.pos) > START_DISTANCE:
                break
        self.task = f"go to the {self.target.name}"

    def _draw_dynamic(self, image):
        scene.paste(image, self._robot_mask, self.agent[0] * self.image_size, self.agent[1] * self.image_size, scene.ROBOT_COLOUR)

    def _apply_action(self, action):
        self.agent = np.clip(self.agent + action * MAX_SPEED, 0.0, 1.0)

    def _distance(self):
        return float(np.linalg.norm(self.agent - self.target.pos))

    def _is_success(self):
        return self._distance() < SUCCESS_RADIUS

    def _state(self):
        return self.agent

    def _extra_ground_truth(self):
        c = self.agent * self.image_size
        return [{"name": "robot", "bbox": list(scene.mask_bbox(self._robot_mask, c[0], c[1], self.image_size, self.image_size))}]

    def expert_action(self):
        return np.clip((self.target.pos - self.agent) / MAX_SPEED, -1.0, 1.0).astype(np.float32)
