"""Embodiments as the action-token head sees them, and the token strings they add to the vocabulary.

An `Embodiment` names one robot's action and state sizes, its camera keys, its control rate and the chunk length H the
policy predicts for it. Each robot emits its own number of action
tokens per control step, `chunk_len * action_dim`, in time-major order (step 0 dims 0..A-1, step 1, ...); nothing is
padded to a global maximum, so a 2-D robot costs 2H positions and a 14-D one 14H.

New vocabulary entries (added to the backbone's embeddings and LM head by the policy):

- `<|emb:NAME|>`, one per registered embodiment: "the following actions are for robot NAME"; precedes the actions.
- `<|act_0|>` ... `<|act_{n-1}|>`, n_bins (256) of them: uniform bin i of a normalized action dimension in [-1, 1].
- `<|state_0|>` ... `<|state_{n-1}|>` (optional): the same binning applied to proprio state.

The action bins are shared by all robots: bin i always means the same normalized value, so robots with different
action spaces reuse one output vocabulary and the cross-entropy is over the 256 action bins only.

State tokens are offered, not imposed. Discretized state in the prompt (as pi0.5 does, quantile-normalized into 256
bins) lets state flow through the MoE experts as ordinary tokens, like actions do, at a cost of `state_dim` positions;
a separate `<|state_i|>` range (rather than reusing `<|act_i|>`) keeps the current state apart from the actions to
predict, so in autoregressive decoding the prompt never holds action tokens that are not part of the answer. The same `ActionTokenizer`
(heads/action_tokenizer.py) bins the state once it is normalized with the state's own stats. A policy may instead project the continuous state
into one embedding (no quantization error, one position); both fit this registry.

Token order matters: token ids are assigned in the order `EmbodimentRegistry.special_tokens()` lists them, which follows
registration order. Save the registry (`to_dict`, JSON) beside a checkpoint so the ids are reproduced on load.

This module knows nothing of environments or datasets; `envs.embodiments` registers the known robots with its
`Embodiment`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

DEFAULT_N_BINS = 256

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]+$")


def action_token_strings(n_bins: int = DEFAULT_N_BINS) -> list[str]:
    """The action-bin tokens `<|act_0|>` ... `<|act_{n_bins-1}|>`, in bin order."""
    _check_n_bins(n_bins)
    return [f"<|act_{i}|>" for i in range(n_bins)]


def state_token_strings(n_bins: int = DEFAULT_N_BINS) -> list[str]:
    """The state-bin tokens `<|state_0|>` ... `<|state_{n_bins-1}|>`, in bin order (optional; see the module doc)."""
    _check_n_bins(n_bins)
    return [f"<|state_{i}|>" for i in range(n_bins)]


def embodiment_token(name: str) -> str:
    """The token announcing embodiment `name`: `<|emb:NAME|>`."""
    _check_name(name)
    return f"<|emb:{name}|>"


def camera_key(camera: str) -> str:
    """A camera's observation key in LeRobot's naming: `observation.images.<camera>`; `image` is the single unnamed
    camera `observation.image`; a name already starting with `observation.` is returned unchanged."""
    if camera.startswith("observation."):
        return camera
    return "observation.image" if camera == "image" else f"observation.images.{camera}"


def camera_name(feature_key: str) -> str:
    """`observation.images.top` -> `top`; LeRobot's single-camera key `observation.image` -> `image`."""
    if feature_key.startswith("observation.images."):
        return feature_key[len("observation.images.") :]
    if feature_key == "observation.image":
        return "image"
    raise ValueError(f"{feature_key!r} is not a camera key")


def _check_n_bins(n_bins: int) -> None:
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 2:
        raise ValueError(f"n_bins must be an int >= 2, got {n_bins!r}")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise ValueError(
            f"embodiment name must be non-empty and use only letters, digits, '_', '-', '.' "
            f"(it becomes the token <|emb:NAME|>), got {name!r}"
        )


def _positive_int(value: Any, what: str, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"embodiment {name!r}: {what} must be an int >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class Embodiment:
    """One robot: action and state sizes, cameras, control rate, and the chunk length H a policy predicts for it.

    The one description of a robot in the project: `envs.embodiments` registers the known robots with it (datasets,
    simulators), the policy's `EmbodimentRegistry` holds the ones it serves. `cameras` are observation keys in
    LeRobot's naming (`observation.images.top`; `observation.image` for a single unnamed camera); a short name
    (`top`, `image`) is turned into its key with `camera_key`, and `camera_names` gives the short names back (the keys
    of a gym env's `pixels` dict). `chunk_len` is the policy's choice, not the robot's: a description from `envs`
    leaves it at 1 and the policy sets it with `with_chunk_len(H)`. How actions are normalized is the dataset's
    normalizer's business (envs/normalize.py), not the robot's. `hold_action` is the raw action that keeps the robot
    where it is (velocity control: zeros); None where repeating the last command holds it (position control). A
    chunk's steps past its episode's end are filled with it (lerobot repeats the last action there).
    """

    name: str
    action_dim: int
    state_dim: int
    cameras: tuple[str, ...]
    fps: float
    chunk_len: int = 1
    action_names: tuple[str, ...] = ()
    state_names: tuple[str, ...] = ()
    description: str = ""
    hold_action: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        _check_name(self.name)
        name = self.name
        _positive_int(self.action_dim, "action_dim", name)
        _positive_int(self.state_dim, "state_dim", name, minimum=0)
        _positive_int(self.chunk_len, "chunk_len (H)", name)
        if isinstance(self.cameras, str):
            raise ValueError(f"embodiment {name!r}: cameras must be a tuple of keys, got the string {self.cameras!r}")
        if not all(isinstance(c, str) and c for c in self.cameras):
            raise ValueError(f"embodiment {name!r}: every camera key must be a non-empty string, got {self.cameras!r}")
        cameras = tuple(camera_key(c) for c in self.cameras)
        if len(set(cameras)) != len(cameras):
            raise ValueError(f"embodiment {name!r}: duplicate camera keys in {cameras!r}")
        object.__setattr__(self, "cameras", cameras)
        if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float)) or not self.fps > 0:
            raise ValueError(f"embodiment {name!r}: fps must be a positive number, got {self.fps!r}")
        if self.hold_action is not None:
            hold = tuple(float(v) for v in self.hold_action)
            if len(hold) != self.action_dim:
                raise ValueError(f"embodiment {name!r}: hold_action has {len(hold)} values for action_dim {self.action_dim}")
            object.__setattr__(self, "hold_action", hold)
        for what, names, size in (("action", self.action_names, self.action_dim), ("state", self.state_names, self.state_dim)):
            object.__setattr__(self, f"{what}_names", tuple(names))
            if names and len(names) != size:
                raise ValueError(f"embodiment {name!r}: {len(names)} {what} names for {what}_dim {size}")

    @property
    def camera_names(self) -> tuple[str, ...]:
        """The cameras' short names (`top`, `image`): the keys of a gym env's `pixels` observation."""
        return tuple(camera_name(k) for k in self.cameras)

    @property
    def num_action_tokens(self) -> int:
        """Action positions per control step: chunk_len * action_dim (time-major; no padding)."""
        return self.chunk_len * self.action_dim

    @property
    def token(self) -> str:
        """This robot's embodiment token, `<|emb:NAME|>`."""
        return embodiment_token(self.name)

    @property
    def chunk_seconds(self) -> float:
        """Wall-clock span of one predicted chunk: chunk_len / fps."""
        return self.chunk_len / self.fps

    def with_chunk_len(self, chunk_len: int) -> Embodiment:
        """The same robot with the policy's chunk length H."""
        return replace(self, chunk_len=chunk_len)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples as lists)."""
        data = asdict(self)
        for key in ("cameras", "action_names", "state_names", "hold_action"):
            if data[key] is not None:
                data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Embodiment:
        """Inverse of `to_dict`; unknown keys are an error so a typo in a saved file does not pass silently
        (`norm_mode`, which registries saved before 2026-12-02 hold and nothing read, is dropped)."""
        data = {k: v for k, v in data.items() if k != "norm_mode"}
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown embodiment fields {unknown}; known: {sorted(known)}")
        return cls(**{**data, "cameras": tuple(data.get("cameras", ()))})


class EmbodimentRegistry:
    """The robots one policy serves, in registration order (which fixes their token ids).

    `register` adds one (re-registering an identical description is a no-op; a different one under a used name
    needs `overwrite=True`), `get` looks one up, iteration yields the embodiments in order.
    """

    def __init__(self, embodiments: Iterable[Embodiment] = ()) -> None:
        self._embodiments = {}
        for embodiment in embodiments:
            self.register(embodiment)

    def register(self, embodiment: Embodiment, overwrite: bool = False) -> Embodiment:
        if not isinstance(embodiment, Embodiment):
            raise TypeError(f"register expects an Embodiment, got {type(embodiment).__name__}")
        existing = self._embodiments.get(embodiment.name)
        if existing is not None and existing != embodiment and not overwrite:
            raise ValueError(
                f"embodiment {embodiment.name!r} is already registered as {existing}; pass overwrite=True to replace it"
            )
        self._embodiments[embodiment.name] = embodiment
        return embodiment

    def get(self, name: str) -> Embodiment:
        """The embodiment called `name`; an unknown name raises KeyError listing the known ones."""
        try:
            return self._embodiments[name]
        except KeyError:
            known = ", ".join(self._embodiments) or "(none registered)"
            raise KeyError(f"unknown embodiment {name!r}; known embodiments: {known}") from None

    def __getitem__(self, name: str) -> Embodiment:
        return self.get(name)

    def names(self) -> list[str]:
        return list(self._embodiments)

    def index(self, name: str) -> int:
        """Position of `name` in registration order (e.g. for a per-embodiment router bias table)."""
        self.get(name)
        return self.names().index(name)

    def __iter__(self) -> Iterator[Embodiment]:
        return iter(list(self._embodiments.values()))

    def __len__(self) -> int:
        return len(self._embodiments)

    def __contains__(self, name: object) -> bool:
        return name in self._embodiments

    @property
    def max_action_tokens(self) -> int:
        """The largest per-step action-token count among the robots (for sizing buffers, not for padding the stream)."""
        return max((e.num_action_tokens for e in self), default=0)

    def embodiment_tokens(self) -> list[str]:
        return [e.token for e in self]

    def special_tokens(self, n_bins: int = DEFAULT_N_BINS, state_tokens: bool = False) -> list[str]:
        """Every new vocabulary entry, in the order to add them: embodiment tokens (registration order), then the
        action bins, then (if `state_tokens`) the state bins."""
        tokens = self.embodiment_tokens() + action_token_strings(n_bins)
        return tokens + state_token_strings(n_bins) if state_tokens else tokens

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: {"embodiments": [Embodiment.to_dict(), ...]} in registration order."""
        return {"embodiments": [e.to_dict() for e in self]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EmbodimentRegistry:
        if "embodiments" not in data:
            raise ValueError(f"registry data needs an 'embodiments' list; got keys {sorted(data)}")
        return cls([Embodiment.from_dict(e) for e in data["embodiments"]])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EmbodimentRegistry) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"EmbodimentRegistry({self.names()})"
