"""`SceneEnv`: the gymnasium base class of the built-in suite.

Observation (LeRobot's layout, what `lerobot.envs.utils.preprocess_observation` maps to `observation.images.<camera>`
and `observation.state`)::

    {"pixels": {"top": uint8 (H, W, 3), ...more cameras...}, "agent_pos": float32 (state_dim,)}

The task string is `env.unwrapped.task` (also `task_description`), e.g. "go to the red square". `instruction="other"`
is the wrong-instruction baseline: the same scene, robot and target (success is still reaching the target), but the
task names another object of the scene (the next one in the scene's order; no random draw, so nothing else
changes). It needs scenes of 2+ objects. Episodes end with
`terminated=True` on success (`info["is_success"]`); the registered `max_episode_steps` truncates them.
Reward: progress towards the goal (previous distance - distance, world units) plus 1.0 on success.

A subclass samples its scene in `_generate(rng)`, draws what does not move in `_draw_static(image)` (once per
episode) and what moves in `_draw_dynamic(image)` (every frame), and implements `_apply_action`, `_distance`,
`_is_success`, `_state` and the privileged `expert_action()` (the scripted expert, used by `vla collect` and by the
`expert` baseline of `vla eval` through `VectorEnv.call("expert_action")`).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs import scene
from envs.embodiments import Embodiment, get_embodiment


class SceneEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}
    embodiment_name: str = ""
    #: scene objects are drawn this big (half-extent, world units)
    object_size: float = 0.075

    def __init__(self, image_size: int = 96, render_mode: str | None = "rgb_array", cameras: tuple[str, ...] | None = None,
                 instruction: str = "target"):
        if int(image_size) < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
        if instruction not in ("target", "other"):
            raise ValueError(f"instruction must be 'target' or 'other' (the wrong-instruction baseline), got {instruction!r}")
        self.instruction = instruction
        self.embodiment: Embodiment = get_embodiment(self.embodiment_name)
        self.image_size = int(image_size)
        self.render_mode = render_mode
        self.cameras = tuple(cameras) if cameras is not None else self.embodiment.camera_names
        unknown = sorted(set(self.cameras) - set(self.embodiment.camera_names))
        if unknown or not self.cameras:
            raise ValueError(f"{type(self).__name__}: cameras {list(self.cameras)} invalid; available: {list(self.embodiment.camera_names)}")
        self.metadata = {**self.metadata, "render_fps": self.embodiment.fps}
        image_space = spaces.Box(0, 255, (self.image_size, self.image_size, 3), dtype=np.uint8)
        self.observation_space = spaces.Dict(
            {
                "pixels": spaces.Dict({camera: image_space for camera in self.cameras}),
                "agent_pos": spaces.Box(*self._state_bounds(), shape=(self.embodiment.state_dim,), dtype=np.float32),
            }
        )
        self.action_space = spaces.Box(-1.0, 1.0, shape=(self.embodiment.action_dim,), dtype=np.float32)
        self.objects: list[scene.SceneObject] = []
        self.target: scene.SceneObject | None = None
        self.task = ""
        self._background: np.ndarray | None = None
        self._frame: np.ndarray | None = None
        self._last_distance = 0.0

    # ----------------------------------------------------------------- gymnasium API
    @property
    def task_description(self) -> str:
        return self.task

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._generate(self.np_random)
        if self.instruction == "other":
            if len(self.objects) < 2:
                raise ValueError(f"{type(self).__name__}: instruction='other' needs scenes of 2+ objects, this one has "
                                 f"{len(self.objects)} (set num_objects)")
            other = self.objects[(self.objects.index(self.target) + 1) % len(self.objects)]
            self.task = self.task.replace(self.target.name, other.name)
        for obj in self.objects:
            obj.mask = scene.shape_mask(obj.shape, obj.size * self.image_size)
        self._background = scene.blank(self.image_size)
        self._draw_static(self._background)
        self._last_distance = self._distance()
        return self._observation(), self._info(success=False)

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float64).reshape(self.action_space.shape), -1.0, 1.0)
        self._apply_action(action)
        distance = self._distance()
        success = self._is_success()
        reward = (self._last_distance - distance) + (1.0 if success else 0.0)
        self._last_distance = distance
        return self._observation(), float(reward), bool(success), False, self._info(success)

    def render(self) -> np.ndarray:
        """The top camera image of the current state (rgb_array)."""
        return self._render_top().copy()

    # ----------------------------------------------------------------- ground truth
    def scene_ground_truth(self, camera: str = "top") -> dict[str, Any]:
        """What `camera` shows, for captions/grounding/QA: objects with colour, shape and the pixel bounding box
        (x1, y1, x2, y2) they occupy in its frame (x2/y2 exclusive), the robot, and the task. Another camera than
        the top one keeps only the objects it sees, their boxes clipped to its frame (`_camera_ground_truth`)."""
        if camera not in self.embodiment.camera_names:
            raise ValueError(f"{type(self).__name__} has no camera {camera!r}; available: {list(self.embodiment.camera_names)}")
        objects = []
        for obj in self.objects:
            cx, cy = obj.x * self.image_size, obj.y * self.image_size
            objects.append(
                {
                    "name": obj.name,
                    "colour": obj.colour,
                    "shape": obj.shape,
                    "center": [round(cx, 2), round(cy, 2)],
                    "bbox": list(scene.mask_bbox(obj.mask, cx, cy, self.image_size, self.image_size)),
                    "is_target": obj is self.target,
                }
            )
        return {
            "image_size": [self.image_size, self.image_size],
            "objects": objects,
            "extras": self._extra_ground_truth(),
            "task": self.task,
            "embodiment": self.embodiment.name,
        } | ({} if camera == "top" else self._camera_ground_truth(camera, objects))

    def _camera_ground_truth(self, camera: str, top_objects: list[dict[str, Any]]) -> dict[str, Any]:
        """The keys of `scene_ground_truth` that differ in `camera`'s frame ("objects", "extras"), from the top
        camera's objects; a subclass with another camera implements it."""
        raise ValueError(f"{type(self).__name__}: no ground truth for camera {camera!r}")

    def _extra_ground_truth(self) -> list[dict[str, Any]]:
        return []

    # ----------------------------------------------------------------- rendering
    def _render_top(self) -> np.ndarray:
        frame = self._background.copy()
        self._draw_dynamic(frame)
        self._frame = frame
        return frame

    def _observation(self) -> dict[str, Any]:
        top = self._render_top()
        pixels = {}
        for camera in self.cameras:
            pixels[camera] = top if camera == "top" else self._render_camera(camera, top)
        return {"pixels": pixels, "agent_pos": self._state().astype(np.float32)}

    def _render_camera(self, camera: str, top: np.ndarray) -> np.ndarray:
        raise ValueError(f"{type(self).__name__} has no camera {camera!r}")

    def _info(self, success: bool) -> dict[str, Any]:
        return {"is_success": bool(success), "distance": float(self._last_distance), "task": self.task}

    # ----------------------------------------------------------------- subclass hooks
    def _state_bounds(self) -> tuple[float, float]:
        return (-np.inf, np.inf)

    def _generate(self, rng: np.random.Generator) -> None:
        raise NotImplementedError

    def _draw_static(self, image: np.ndarray) -> None:
        for obj in self.objects:
            scene.paste(image, obj.mask, obj.x * self.image_size, obj.y * self.image_size, scene.COLOURS[obj.colour])

    def _draw_dynamic(self, image: np.ndarray) -> None:
        raise NotImplementedError

    def _apply_action(self, action: np.ndarray) -> None:
        raise NotImplementedError

    def _distance(self) -> float:
        raise NotImplementedError

    def _is_success(self) -> bool:
        raise NotImplementedError

    def _state(self) -> np.ndarray:
        raise NotImplementedError

    def expert_action(self) -> np.ndarray:
        """The scripted expert's action for the current state, float32 in [-1, 1]."""
        raise NotImplementedError
