"""The known robots: `EMBODIMENTS`, by the name the datasets' `robot_type` gives.

Each is a `heads.embodiment.Embodiment` (the project's one robot description: action / state sizes, camera keys,
control rate), what the mixture loader, the rollouts and the policy key on. The built-in envs use `point2d` and
`arm3`; `pusht`, `aloha` and `libero` describe the external simulators so their datasets can join a mixture. Add your own with `register_embodiment`.
"""

from __future__ import annotations

from heads.embodiment import Embodiment  # the one robot description; re-exported here

EMBODIMENTS: dict[str, Embodiment] = {}


def register_embodiment(embodiment: Embodiment, overwrite: bool = False) -> Embodiment:
    """Add an embodiment to `EMBODIMENTS`; re-registering a different description under a used name is an error."""
    existing = EMBODIMENTS.get(embodiment.name)
    if existing is not None and existing != embodiment and not overwrite:
        raise ValueError(f"embodiment {embodiment.name!r} is already registered as {existing}")
    EMBODIMENTS[embodiment.name] = embodiment
    return embodiment


def get_embodiment(name: str) -> Embodiment:
    """The registered embodiment called `name`; an unknown name raises KeyError listing the known ones."""
    try:
        return EMBODIMENTS[name]
    except KeyError:
        raise KeyError(f"unknown embodiment {name!r}; known embodiments: {', '.join(sorted(EMBODIMENTS))}") from None


register_embodiment(
    Embodiment(
        name="point2d",
        action_dim=2,
        state_dim=2,
        cameras=("observation.images.top",),
        fps=10,
        action_names=("vx", "vy"),
        state_names=("x", "y"),
        description="a disk robot moving in the plane; action = velocity in [-1, 1]^2 (x 0.04 world units per step)",
        hold_action=(0.0, 0.0),
    )
)
register_embodiment(
    Embodiment(
        name="arm3",
        action_dim=3,
        state_dim=5,
        cameras=("observation.images.top", "observation.images.wrist"),
        fps=20,
        action_names=("dq0", "dq1", "dq2"),
        state_names=("q0", "q1", "q2", "ee_x", "ee_y"),
        description="a planar 3-link arm; action = joint velocities in [-1, 1]^3 (x 0.08 rad per step); "
        "state = joint angles and end-effector position",
        hold_action=(0.0, 0.0, 0.0),
    )
)
register_embodiment(
    Embodiment(
        name="pusht",
        action_dim=2,
        state_dim=2,
        cameras=("observation.image",),
        fps=10,
        action_names=("x", "y"),
        state_names=("x", "y"),
        description="gym_pusht/PushT-v0: absolute target position of the pusher in [0, 512]^2",
    )
)
register_embodiment(
    Embodiment(
        name="aloha",
        action_dim=14,
        state_dim=14,
        cameras=("observation.images.top",),
        fps=50,
        description="gym_aloha bimanual ALOHA (needs MuJoCo rendering: MUJOCO_GL=egl)",
    )
)
register_embodiment(
    Embodiment(
        name="libero",
        action_dim=7,
        state_dim=8,
        cameras=("observation.images.image", "observation.images.image2"),
        fps=20,
        description="LIBERO Franka: relative end-effector delta + gripper (needs MuJoCo rendering: MUJOCO_GL=egl)",
    )
)
