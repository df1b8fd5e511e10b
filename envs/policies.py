"""Policies that act in the rollouts: the protocol, the spec registry and the built-in baselines.

Policy protocol
---------------
A policy is any object with

    reset() -> None                                    # before each batch of episodes
    select_action(observation: dict) -> (B, A) array   # numpy or torch; B = number of envs in the vector env

and optionally `attach(vec_env, context)`, called once before the first batch (privileged policies such as the
scripted expert use it to reach the envs through `vec_env.call`). `observation` is the vector env's batched
observation plus the task strings:

    {"pixels": {camera: uint8 (B, H, W, 3)} | uint8 (B, H, W, 3),   # built-in envs: a dict of cameras
     "agent_pos": (B, state),
     "task": [str] * B}

`to_lerobot_observation(observation)` turns this into lerobot's policy input (`observation.images.<camera>` float
(B, 3, H, W) in [0, 1], `observation.state`, `task`), via lerobot's own `preprocess_observation`.

Policy specs (`make_policy`)
----------------------------
`random`, `expert`, `prior` (the "no vision" action prior of a dataset; needs the `dataset` option or `prior:ROOT`)
are built in. Extension point: `register_policy_factory(prefix, factory)` makes `prefix` and `prefix:ARG` resolve to
`factory(ARG, context)`; a spec `package.module:function` imports `function` and calls it as `function("", context)`.
A factory receives a `PolicyContext` (env id, embodiment, action space, observation space, number of envs, seed,
options such as `dataset` or `checkpoint`) and returns a policy. Trained checkpoints plug in this way
(`vla.commands.register_env_policies` registers `checkpoint:`, `lerobot:` and `remote:`); nothing here pretends to
load one.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import gymnasium as gym
import numpy as np

from envs.embodiments import Embodiment


@runtime_checkable
class Policy(Protocol):
    def reset(self) -> None: ...

    def select_action(self, observation: dict[str, Any]) -> Any: ...


@dataclass
class PolicyContext:
    """What a policy factory may need to know about the env it will act in."""

    env_id: str
    embodiment: Embodiment | None
    action_space: gym.spaces.Box
    num_envs: int
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    observation_space: gym.spaces.Space | None = None  # one env's (not batched); None where unknown


PolicyFactory = Callable[[str, PolicyContext], Policy]
POLICY_FACTORIES: dict[str, PolicyFactory] = {}


def register_policy_factory(prefix: str, factory: PolicyFactory, overwrite: bool = False) -> None:
    """Make the spec `prefix` / `prefix:ARG` build a policy with `factory(ARG, context)`."""
    if not prefix or ":" in prefix:
        raise ValueError(f"policy prefix must be a non-empty word without ':', got {prefix!r}")
    if prefix in POLICY_FACTORIES and POLICY_FACTORIES[prefix] is not factory and not overwrite:
        raise ValueError(f"policy prefix {prefix!r} is already registered")
    POLICY_FACTORIES[prefix] = factory


def make_policy(spec: str | PolicyFactory | Policy, context: PolicyContext) -> Policy:
    """Resolve a policy spec (see the module docstring) for one env."""
    if isinstance(spec, Policy) and not isinstance(spec, type):
        return spec
    if callable(spec):
        return _checked(spec("", context), repr(spec))
    prefix, _, argument = str(spec).partition(":")
    if prefix in POLICY_FACTORIES:
        return _checked(POLICY_FACTORIES[prefix](argument, context), spec)
    if argument and ("." in prefix or importlib.util.find_spec(prefix) is not None):
        module = importlib.import_module(prefix)
        try:
            factory = getattr(module, argument)
        except AttributeError:
            raise ValueError(f"policy spec {spec!r}: module {prefix!r} has no attribute {argument!r}") from None
        return _checked(factory("", context), spec)
    known = ", ".join(sorted(POLICY_FACTORIES))
    raise ValueError(f"unknown policy {spec!r}; known: {known}, or 'package.module:factory', or register_policy_factory()")


def _checked(policy: Any, spec: Any) -> Policy:
    if not isinstance(policy, Policy):
        raise TypeError(f"policy spec {spec!r} built {type(policy).__name__}, which lacks reset() / select_action()")
    return policy


class RandomPolicy:
    """Uniform samples from the action space (seeded)."""

    def __init__(self, action_space: gym.spaces.Box, seed: int = 0):
        self.action_space = action_space
        self.action_space.seed(seed)

    def reset(self) -> None:
        pass

    def select_action(self, observation: dict[str, Any]) -> np.ndarray:
        batch = len(observation["task"])
        return np.stack([self.action_space.sample() for _ in range(batch)])


class ExpertPolicy:
    """The env's scripted expert, read through `vec_env.call("expert_action")` (works in sync and async envs)."""

    def __init__(self) -> None:
        self.vec_env = None

    def attach(self, vec_env, context: PolicyContext) -> None:
        self.vec_env = vec_env
        self.env_id = context.env_id

    def reset(self) -> None:
        pass

    def select_action(self, observation: dict[str, Any]) -> np.ndarray:
        if self.vec_env is None:
            raise RuntimeError("ExpertPolicy must be attached to a vector env (rollout does this)")
        return np.stack(self.vec_env.call("expert_action")).astype(np.float32)


class PriorPolicy:
    """The "no vision" baseline: the action prior of a dataset, blind to observations.

    `mode="sample"` replays a random demonstration episode open loop in each env (holding its last action);
    `mode="mean"` plays the per-step mean action over all episodes.
    """

    def __init__(self, dataset_root: str, action_space: gym.spaces.Box, seed: int = 0, mode: str = "sample"):
        if mode not in ("sample", "mean"):
            raise ValueError(f"prior mode must be 'sample' or 'mean', got {mode!r}")
        self.episodes = load_episode_actions(dataset_root)
        size = self.episodes[0].shape[1]
        if (size,) != action_space.shape:
            raise ValueError(f"dataset {dataset_root}: actions have size {size}, the env expects {action_space.shape}")
        self.mode = mode
        self.rng = np.random.default_rng(seed)
        longest = max(len(e) for e in self.episodes)
        padded = np.stack([np.concatenate([e, np.repeat(e[-1:], longest - len(e), axis=0)]) for e in self.episodes])
        self.mean = padded.mean(axis=0)
        self.plans: list[np.ndarray] = []
        self.step = 0

    def reset(self) -> None:
        self.plans, self.step = [], 0

    def select_action(self, observation: dict[str, Any]) -> np.ndarray:
        batch = len(observation["task"])
        if not self.plans:
            if self.mode == "mean":
                self.plans = [self.mean] * batch
            else:
                self.plans = [self.episodes[int(i)] for i in self.rng.integers(len(self.episodes), size=batch)]
        actions = np.stack([plan[min(self.step, len(plan) - 1)] for plan in self.plans])
        self.step += 1
        return actions.astype(np.float32)


def load_episode_actions(root: str) -> list[np.ndarray]:
    """Actions of every episode of a local LeRobotDataset (no images are decoded)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from envs.collect import video_backend

    dataset = LeRobotDataset(f"local/{Path(root).name}", root=root, video_backend=video_backend())
    table = dataset.hf_dataset.select_columns(["action", "episode_index"]).with_format("numpy")[:]
    actions = np.asarray(np.stack(table["action"]), dtype=np.float32)
    episodes = np.asarray(table["episode_index"])
    return [actions[episodes == e] for e in np.unique(episodes)]


def _random_factory(argument: str, context: PolicyContext) -> Policy:
    return RandomPolicy(context.action_space, seed=context.seed)


def _expert_factory(argument: str, context: PolicyContext) -> Policy:
    return ExpertPolicy()


def _prior_factory(argument: str, context: PolicyContext) -> Policy:
    root = argument or context.options.get("dataset")
    if not root:
        raise ValueError("policy 'prior' needs a dataset: prior:ROOT or dataset=ROOT")
    return PriorPolicy(root, context.action_space, seed=context.seed, mode=context.options.get("prior_mode", "sample"))


register_policy_factory("random", _random_factory)
register_policy_factory("expert", _expert_factory)
register_policy_factory("prior", _prior_factory)


def to_lerobot_observation(observation: dict[str, Any]) -> dict[str, Any]:
    """Rollout observation -> lerobot policy input (`observation.images.*` float CHW in [0, 1], `observation.state`,
    `task`), using lerobot's `preprocess_observation`."""
    from lerobot.envs.utils import preprocess_observation

    converted = preprocess_observation({k: v for k, v in observation.items() if k != "task"})
    converted["task"] = list(observation["task"])
    return converted
