"""The known robots: `EMBODIMENTS`, by the name the datasets' `robot_type` gives.

Each is a `heads.embodiment.Embodiment` (the project's one robot description: action / state sizes, camera keys,
control rate), what the mixture loader, the rollouts and the policy key on. The built-in envs use `point2d` and
`arm3`; `pusht`, `aloha` and `libero` describe the external simulators so their datasets can join a mixture. Add your own with `register_embodiment`,
or let a dataset describe its robot (`embodiment_from_features`: sizes, cameras and rate from its `meta/info.json`),
which is what the mixture does for a `robot_type` it does not know.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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


# what a description may add to what the dataset says (the sizes, cameras and rate are the dataset's)
DESCRIBED_FIELDS = ("name", "hold_action", "action_names", "state_names", "description")


def embodiment_from_features(features: Mapping[str, Any], fps: float, described: Mapping[str, Any]) -> Embodiment:
    """The robot a LeRobotDataset records, from its features (`meta/info.json`): action and state sizes, the camera
    keys (image and video features), the rate, and the feature's names where they fit. `described` names it and may
    add `hold_action` (the raw action that keeps the robot still; left None, a chunk past an episode's end repeats
    the last action, lerobot's rule, right for position control), `action_names`, `state_names`, `description`."""
    unknown = sorted(set(described) - set(DESCRIBED_FIELDS))
    if unknown:
        raise ValueError(f"an embodiment described by its dataset takes {', '.join(DESCRIBED_FIELDS)} "
                         f"(the sizes, cameras and fps are the dataset's), not {', '.join(unknown)}")
    if "action" not in features:
        raise ValueError(f"no 'action' feature; features: {sorted(features)}")
    state = features.get("observation.state")
    fields = {
        "action_dim": int(features["action"]["shape"][0]),
        "state_dim": int(state["shape"][0]) if state else 0,
        "cameras": tuple(key for key, f in features.items() if f.get("dtype") in ("image", "video")),
        "fps": float(fps),
        "action_names": _feature_names(features["action"]),
        "state_names": _feature_names(state) if state else (),
    }
    return Embodiment(**(fields | dict(described)))


def _feature_names(feature: Mapping[str, Any]) -> tuple[str, ...]:
    """A feature's per-dimension names: lerobot writes a list, or a dict holding one list (`{"motors": [...]}`)."""
    names = feature.get("names")
    if isinstance(names, Mapping) and len(names) == 1:
        names = next(iter(names.values()))
    if isinstance(names, (list, tuple)) and len(names) == feature["shape"][0] and all(isinstance(n, str) for n in names):
        return tuple(names)
    return ()


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
