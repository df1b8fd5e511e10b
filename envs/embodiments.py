"""Embodiment descriptions: plain data naming a robot's action/state sizes, cameras and control rate.

An embodiment is what the datasets' `robot_type` names and what the mixture loader, the rollouts and the action
tokenizer key on. The built-in envs use `point2d` and `arm3`; `pusht`, `aloha` and `libero` describe the external
simulators so their datasets can join a mixture. Add your own with `register_embodiment`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Embodiment:
    """A robot as the data sees it. `cameras` name the image streams (`observation.images.<camera>` in a dataset;
    `image` stands for a single unnamed camera, `observation.image`)."""

    name: str
    action_size: int
    state_size: int
    cameras: tuple[str, ...]
    fps: int
    action_names: tuple[str, ...] = ()
    state_names: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        if self.action_names and len(self.action_names) != self.action_size:
            raise ValueError(f"embodiment {self.name!r}: {len(self.action_names)} action names for size {self.action_size}")
        if self.state_names and len(self.state_names) != self.state_size:
            raise ValueError(f"embodiment {self.name!r}: {len(self.state_names)} state names for size {self.state_size}")


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
        action_size=2,
        state_size=2,
        cameras=("top",),
        fps=10,
        action_names=("vx", "vy"),
        state_names=("x", "y"),
        description="a disk robot moving in the plane; action = velocity in [-1, 1]^2 (x 0.04 world units per step)",
    )
)
register_embodiment(
    Embodiment(
        name="arm3",
        action_size=3,
        state_size=5,
        cameras=("top", "wrist"),
        fps=20,
        action_names=("dq0", "dq1", "dq2"),
        state_names=("q0", "q1", "q2", "ee_x", "ee_y"),
        description="a planar 3-link arm; action = joint velocities in [-1, 1]^3 (x 0.08 rad per step); "
        "state = joint angles and end-effector position",
    )
)
register_embodiment(
    Embodiment(
        name="pusht",
        action_size=2,
        state_size=2,
        cameras=("image",),
        fps=10,
        action_names=("x", "y"),
        state_names=("x", "y"),
        description="gym_pusht/PushT-v0: absolute target position of the pusher in [0, 512]^2",
    )
)
register_embodiment(
    Embodiment(
        name="aloha",
        action_size=14,
        state_size=14,
        cameras=("top",),
        fps=50,
        description="gym_aloha bimanual ALOHA (needs MuJoCo rendering: MUJOCO_GL=egl)",
    )
)
register_embodiment(
    Embodiment(
        name="libero",
        action_size=7,
        state_size=8,
        cameras=("image", "image2"),
        fps=20,
        description="LIBERO Franka: relative end-effector delta + gripper (needs MuJoCo rendering: MUJOCO_GL=egl)",
    )
)
