"""`vla/PushBlock-v0`: the disk robot (`point2d`) must push the named block into the goal zone,
e.g. "push the green triangle into the goal zone".

2-3 blocks (one target, the rest distractors) and a white goal zone with a dark border. Contacts are kinematic: the
robot and blocks are disks (blocks are drawn as their shape inside the disk); a block the robot overlaps is moved
out along the contact normal, blocks push each other the same way, walls stop everything. Action and state as for
PointNav (velocity x 0.04 per step at 10 fps; robot (x, y)). Success: the target block centre inside the goal zone
shrunk by 0.03 on each side.
"""

from __future__ import annotations

import numpy as np

from envs import scene
from envs.base import SceneEnv

MAX_SPEED = 0.04
ROBOT_RADIUS = 0.035
BLOCK_SIZE = 0.06
GOAL_HALF = 0.12
GOAL_MARGIN = 0.03


def _separate(mover: np.ndarray, fixed: np.ndarray, distance: float) -> np.ndarray:
    """Move `mover` out of a disk of radius `distance` around `fixed` along the line joining them."""
    delta = mover - fixed
    norm = float(np.linalg.norm(delta))
    if norm >= distance:
        return mover
    direction = delta / norm if norm > 1e-9 else np.array([1.0, 0.0])
    return fixed + direction * distance


class PushBlockEnv(SceneEnv):
    embodiment_name = "point2d"
    object_size = BLOCK_SIZE

    def __init__(self, image_size: int = 96, render_mode: str | None = "rgb_array", cameras=None, num_objects=(2, 3),
                 instruction: str = "target"):
        super().__init__(image_size=image_size, render_mode=render_mode, cameras=cameras, instruction=instruction)
        self.num_objects = tuple(num_objects)
        self.agent = np.zeros(2)
        self.goal = np.array([0.5, 0.5])
        self._robot_mask = scene.shape_mask("circle", ROBOT_RADIUS * self.image_size)

    def _state_bounds(self):
        return (0.0, 1.0)

    def _generate(self, rng):
        self.goal = rng.uniform(0.2, 0.8, size=2)
        count = int(rng.integers(self.num_objects[0], self.num_objects[1] + 1))
        goal_clearance = (self.goal, GOAL_HALF * 1.42 + 0.05)
        self.objects = scene.sample_objects(rng, count, BLOCK_SIZE, 0.17, 0.83, min_gap=0.1, avoid=[goal_clearance])
        self.target = self.objects[int(rng.integers(count))]
        for _ in range(1000):
            self.agent = rng.uniform(0.08, 0.92, size=2)
            if all(np.linalg.norm(self.agent - o.pos) > ROBOT_RADIUS + BLOCK_SIZE + 0.03 for o in self.objects):
                break
        self.task = f"push the {self.target.name} into the goal zone"

    def _draw_static(self, image):
        s = self.image_size
        x0, y0 = np.floor((self.goal - GOAL_HALF) * s).astype(int)
        x1, y1 = np.ceil((self.goal + GOAL_HALF) * s).astype(int)
        border = max(1, round(0.01 * s))
        image[y0:y1, x0:x1] = scene.GOAL_EDGE_COLOUR
        image[y0 + border : y1 - border, x0 + border : x1 - border] = scene.GOAL_COLOUR

    def _draw_dynamic(self, image):
        s = self.image_size
        for obj in self.objects:
            scene.paste(image, obj.mask, obj.x * s, obj.y * s, scene.COLOURS[obj.colour])
        scene.paste(image, self._robot_mask, self.agent[0] * s, self.agent[1] * s, scene.ROBOT_COLOUR)

    def _apply_action(self, action):
        self.agent = np.clip(self.agent + action * MAX_SPEED, ROBOT_RADIUS, 1 - ROBOT_RADIUS)
        positions = [o.pos for o in self.objects]
        contact = ROBOT_RADIUS + BLOCK_SIZE
        positions = [_separate(p, self.agent, contact) for p in positions]
        for _ in range(2):
            for i in range(len(positions)):
                for j in range(len(positions)):
                    if i != j:
                        positions[j] = _separate(positions[j], positions[i], 2 * BLOCK_SIZE)
        positions = [np.clip(p, BLOCK_SIZE, 1 - BLOCK_SIZE) for p in positions]
        for p in positions:  # a block stopped by a wall stops the robot
            self.agent = _separate(self.agent, p, contact)
        self.agent = np.clip(self.agent, ROBOT_RADIUS, 1 - ROBOT_RADIUS)
        for obj, p in zip(self.objects, positions):
            obj.x, obj.y = float(p[0]), float(p[1])

    def _distance(self):
        return float(np.linalg.norm(self.target.pos - self.goal))

    def _is_success(self):
        return bool(np.all(np.abs(self.target.pos - self.goal) < GOAL_HALF - GOAL_MARGIN))

    def _state(self):
        return self.agent

    def _extra_ground_truth(self):
        s = self.image_size
        x0, y0 = np.floor((self.goal - GOAL_HALF) * s).astype(int)
        x1, y1 = np.ceil((self.goal + GOAL_HALF) * s).astype(int)
        c = self.agent * s
        return [
            {"name": "goal zone", "bbox": [int(x0), int(y0), int(x1), int(y1)]},
            {"name": "robot", "bbox": list(scene.mask_bbox(self._robot_mask, c[0], c[1], s, s))},
        ]

    def expert_action(self):
        """Get behind the target (seen from the goal) going around it, then push it straight at the goal centre."""
        block, agent = self.target.pos, self.agent
        to_goal = self.goal - block
        push_dir = to_goal / max(np.linalg.norm(to_goal), 1e-9)
        contact = ROBOT_RADIUS + BLOCK_SIZE
        rel = agent - block
        along = float(rel @ push_dir)
        lateral = rel - along * push_dir
        if along < -0.7 * contact and np.linalg.norm(lateral) < 0.025:
            # pushing: drive towards the goal, steering back onto the line through the block centre
            velocity = push_dir * MAX_SPEED - 0.8 * lateral
        else:
            behind = block - push_dir * (contact + 0.02)
            to_behind = behind - agent
            distance = float(np.linalg.norm(rel))
            clearance = contact + 0.03
            # does the straight path to the push point pass through the block?
            seg = to_behind
            t = np.clip(-(rel @ seg) / max(seg @ seg, 1e-12), 0.0, 1.0)
            closest = float(np.linalg.norm(rel + t * seg))
            if closest < clearance and np.linalg.norm(to_behind) > 0.01:
                radial = rel / max(distance, 1e-9)
                tangent = np.array([-radial[1], radial[0]])
                if tangent @ to_behind < 0:
                    tangent = -tangent
                velocity = tangent * MAX_SPEED + radial * max(clearance - distance, 0.0)
            else:
                velocity = to_behind
        return np.clip(velocity / MAX_SPEED, -1.0, 1.0).astype(np.float32)
