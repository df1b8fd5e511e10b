"""envs: gymnasium environments, LeRobot datasets, mixtures and rollouts. Knows nothing of model internals.

Importing `envs` registers the built-in suite with gymnasium (entry points are strings, so AsyncVectorEnv workers
that import `envs` see the same registrations):

| id                   | embodiment | action | state | cameras      | fps | max steps |
|----------------------|------------|--------|-------|--------------|-----|-----------|
| vla/PointNav-v0      | point2d    | 2      | 2     | top          | 10  | 60        |
| vla/ArmReach-v0      | arm3       | 3      | 5     | top, wrist   | 20  | 100       |
| vla/PushBlock-v0     | point2d    | 2      | 2     | top          | 10  | 150       |

Observation: `{"pixels": {camera: uint8 (H, W, 3)}, "agent_pos": float32 (state,)}`; task string in
`env.unwrapped.task` / `task_description`; `info["is_success"]`; `env.unwrapped.expert_action()` is the scripted
expert; `env.unwrapped.scene_ground_truth()` lists objects with pixel bounding boxes. `gym.make(id, image_size=64)`
changes the (square) image size.

Modules: `scene` (scene sampling and numpy rendering), `embodiments` (EMBODIMENTS, get_embodiment),
`normalize` (per-dataset normalizer), `mixture` (multi-dataset loader), `collect` (expert -> LeRobotDataset),
`scene_language` (caption/grounding/QA JSONL), `rollout` (evaluation: the rollout loop), `policies` (the policy
protocol, specs and baselines), `vector_env` (env factories for vector envs), `report` (summaries, markdown, GIFs).
"""

from __future__ import annotations

import gymnasium as gym

from envs.embodiments import EMBODIMENTS, Embodiment, get_embodiment, register_embodiment

#: id -> (entry point, max_episode_steps)
BUILTIN_ENVS: dict[str, tuple[str, int]] = {
    "vla/PointNav-v0": ("envs.point_nav:PointNavEnv", 60),
    "vla/ArmReach-v0": ("envs.arm_reach:ArmReachEnv", 100),
    "vla/PushBlock-v0": ("envs.push_block:PushBlockEnv", 150),
}


def register_builtin_envs() -> None:
    """Register the built-in suite with gymnasium (idempotent)."""
    for env_id, (entry_point, max_steps) in BUILTIN_ENVS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry_point, max_episode_steps=max_steps)


register_builtin_envs()

__all__ = ["BUILTIN_ENVS", "EMBODIMENTS", "Embodiment", "get_embodiment", "register_embodiment", "register_builtin_envs"]
