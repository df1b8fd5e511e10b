"""Roll policies out in gymnasium vector envs and summarize success, return and length per task and embodiment.

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
options such as `dataset` or `checkpoint`) and returns a policy. Trained checkpoints plug in this way (e.g. the `vla` package
registering a `ckpt` prefix); nothing here pretends to load one.

Vector envs
-----------
`make_vector_env` builds `SyncVectorEnv` or `AsyncVectorEnv` (spawn context by default) from `EnvFactory`, a
picklable callable that imports the modules registering the env inside each worker before `gym.make`: `envs` for
`vla/...` ids, the namespace module for `namespace/Name` ids (e.g. `gym_pusht`), plus any `import_modules`. That is
what lerobot-eval's async path lacks (NamespaceNotFound in forkserver workers). As with any spawned multiprocessing,
a script that calls `evaluate(..., asynchronous=True)` needs an `if __name__ == "__main__":` guard. Tasks are read with
`vec_env.call("task")` only from envs that have a `task` attribute (probing a missing attribute kills an async worker).

MuJoCo envs (`gym_aloha/...`; lerobot's MetaWorld and LIBERO wrappers) need MuJoCo rendering: `MUJOCO_GL=egl` with an
EGL device (GPU) or `MUJOCO_GL=osmesa` (slow). Where it is missing they raise `EnvUnavailable` with that message and
`evaluate` skips them (listed under `skipped` in the summary).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import gymnasium as gym
import numpy as np

import envs
from envs.embodiments import EMBODIMENTS, Embodiment

MUJOCO_NAMESPACES = ("gym_aloha", "metaworld", "libero")
MUJOCO_HINT = (
    "needs MuJoCo rendering: set MUJOCO_GL=egl on a machine with an EGL device (a GPU), or MUJOCO_GL=osmesa "
    "(software, slow, apt libosmesa6); install with pip install 'lerobot[aloha]' / 'lerobot[metaworld]' / 'lerobot[libero]'"
)
#: gym.make keyword arguments some external envs need to give pixels + agent_pos observations
DEFAULT_ENV_KWARGS: dict[str, dict[str, Any]] = {
    "gym_pusht/PushT-v0": {"obs_type": "pixels_agent_pos"},
    "gym_aloha/AlohaInsertion-v0": {"obs_type": "pixels_agent_pos"},
    "gym_aloha/AlohaTransferCube-v0": {"obs_type": "pixels_agent_pos"},
}
#: embodiment of external envs (the built-in ones carry theirs)
EXTERNAL_EMBODIMENTS = {"gym_pusht": "pusht", "gym_aloha": "aloha"}


class EnvUnavailable(RuntimeError):
    """The env cannot run here (simulator or renderer missing); the message says what it needs."""


# ---------------------------------------------------------------------------------------------- policies
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

    dataset = LeRobotDataset(f"local/{Path(root).name}", root=root)
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


# ---------------------------------------------------------------------------------------------- vector envs
def env_modules(env_id: str) -> list[str]:
    """Modules to import (in every worker) before `gym.make(env_id)`."""
    modules = ["envs"]
    namespace = env_id.split("/")[0] if "/" in env_id else None
    if ":" in env_id:
        modules.append(env_id.split(":")[0])
    elif namespace and namespace != "vla" and importlib.util.find_spec(namespace) is not None:
        modules.append(namespace)
    return modules


class EnvFactory:
    """Picklable `() -> gym.Env` that imports the registering modules first (so spawned workers know the id)."""

    def __init__(self, env_id: str, env_kwargs: dict[str, Any] | None = None, import_modules: Sequence[str] = ()):
        self.env_id = env_id
        self.env_kwargs = dict(env_kwargs or {})
        self.import_modules = list(dict.fromkeys([*env_modules(env_id), *import_modules]))

    def __call__(self) -> gym.Env:
        for module in self.import_modules:
            importlib.import_module(module)
        return gym.make(self.env_id, **self.env_kwargs)


def default_env_kwargs(env_id: str, image_size: int | None = None) -> dict[str, Any]:
    kwargs = dict(DEFAULT_ENV_KWARGS.get(env_id, {}))
    if image_size is not None and env_id in envs.BUILTIN_ENVS:
        kwargs["image_size"] = int(image_size)
    return kwargs


def probe_env(env_id: str, env_kwargs: dict[str, Any], import_modules: Sequence[str] = ()) -> gym.Env:
    """Build one env in this process, turning missing simulators/renderers into `EnvUnavailable`."""
    namespace = env_id.split("/")[0]
    try:
        return EnvFactory(env_id, env_kwargs, import_modules)()
    except Exception as error:  # noqa: BLE001 - anything here means "cannot run this env"
        if namespace in MUJOCO_NAMESPACES or "mujoco" in repr(error).lower() or "egl" in repr(error).lower():
            raise EnvUnavailable(f"{env_id}: {MUJOCO_HINT} ({type(error).__name__}: {error})") from error
        if isinstance(error, (gym.error.NamespaceNotFound, gym.error.NameNotFound, ModuleNotFoundError)):
            raise EnvUnavailable(f"{env_id}: not registered/installed ({type(error).__name__}: {error})") from error
        raise


def make_vector_env(
    env_id: str,
    num_envs: int,
    asynchronous: bool = False,
    env_kwargs: dict[str, Any] | None = None,
    import_modules: Sequence[str] = (),
    context: str | None = "spawn",
) -> gym.vector.VectorEnv:
    factories = [EnvFactory(env_id, env_kwargs, import_modules) for _ in range(num_envs)]
    if asynchronous:
        return gym.vector.AsyncVectorEnv(factories, context=context)
    return gym.vector.SyncVectorEnv(factories)


# ---------------------------------------------------------------------------------------------- rollouts
@dataclass
class EpisodeResult:
    env_id: str
    embodiment: str
    task: str
    seed: int
    success: bool
    sum_reward: float
    length: int


def _success_from_info(info: dict[str, Any], num_envs: int) -> np.ndarray:
    for key in ("is_success", "success"):
        if key in info:
            values = np.asarray(info[key], dtype=bool).reshape(num_envs)
            mask = np.asarray(info.get(f"_{key}", np.ones(num_envs, bool)), dtype=bool).reshape(num_envs)
            return values & mask
    return np.zeros(num_envs, dtype=bool)


def _video_frame(observation: dict[str, Any], index: int) -> np.ndarray | None:
    pixels = observation.get("pixels")
    if pixels is None:
        return None
    if isinstance(pixels, dict):
        camera = "top" if "top" in pixels else next(iter(pixels))
        return np.asarray(pixels[camera][index])
    return np.asarray(pixels[index])


def _to_numpy(action: Any) -> np.ndarray:
    if hasattr(action, "detach"):
        action = action.detach().cpu().numpy()
    return np.asarray(action)


def rollout(
    vec_env: gym.vector.VectorEnv,
    policy: Policy,
    seeds: Sequence[int],
    env_id: str,
    embodiment: str,
    max_steps: int,
    has_task: bool,
    record: Sequence[int] = (),
    on_episode_end: Callable[[EpisodeResult], None] | None = None,
) -> tuple[list[EpisodeResult], dict[int, list[np.ndarray]]]:
    """One batch: reset every env with its seed, step until all episodes ended (or `max_steps`).

    Envs keep stepping after their episode ended (the vector env autoresets them) but nothing after the end counts.
    Returns the episode results in env order and the frames of the envs listed in `record`.
    """
    num_envs = vec_env.num_envs
    observation, _ = vec_env.reset(seed=[int(s) for s in seeds])
    tasks = list(vec_env.call("task")) if has_task else [env_id] * num_envs
    policy.reset()
    done = np.zeros(num_envs, dtype=bool)
    success = np.zeros(num_envs, dtype=bool)
    returns = np.zeros(num_envs)
    lengths = np.zeros(num_envs, dtype=np.int64)
    frames: dict[int, list[np.ndarray]] = {i: [] for i in record}
    results: list[EpisodeResult | None] = [None] * num_envs

    def finish(i: int) -> None:
        results[i] = EpisodeResult(env_id, embodiment, tasks[i], int(seeds[i]), bool(success[i]), float(returns[i]), int(lengths[i]))
        if on_episode_end is not None:
            on_episode_end(results[i])

    for i in record:
        frame = _video_frame(observation, i)
        if frame is not None:
            frames[i].append(frame)
    for _ in range(max_steps):
        action = _to_numpy(policy.select_action({**observation, "task": list(tasks)}))
        expected = (num_envs, *vec_env.single_action_space.shape)
        if action.shape != expected:
            raise ValueError(f"{env_id}: policy returned actions of shape {action.shape}, expected {expected}")
        observation, reward, terminated, truncated, info = vec_env.step(action.astype(vec_env.single_action_space.dtype))
        active = ~done
        returns[active] += np.asarray(reward)[active]
        lengths[active] += 1
        success[active] |= _success_from_info(info, num_envs)[active]
        for i in record:
            frame = _video_frame(observation, i) if active[i] else None
            if frame is not None:
                frames[i].append(frame)
        ended = active & (np.asarray(terminated) | np.asarray(truncated))
        done |= ended
        for i in np.flatnonzero(ended):
            finish(int(i))
        if done.all():
            break
    for i in np.flatnonzero(~done):  # ran out of max_steps without a time limit
        finish(int(i))
    return [r for r in results if r is not None], frames


def save_gif(frames: Sequence[np.ndarray], path: str | Path, fps: float, min_size: int = 192) -> Path:
    """Write frames as an animated GIF (nearest-neighbour upscaled so small renders stay visible)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames[0].shape[:2]
    scale = max(1, int(np.ceil(min_size / max(min(height, width), 1))))
    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)).resize((width * scale, height * scale), Image.NEAREST) for f in frames]
    duration = max(int(round(1000 / max(fps, 1))), 20)
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration, loop=0)
    return path


# ---------------------------------------------------------------------------------------------- summaries
def _aggregate(results: Sequence[EpisodeResult]) -> dict[str, float]:
    return {
        "episodes": len(results),
        "success_rate": float(np.mean([r.success for r in results])) if results else 0.0,
        "mean_sum_reward": float(np.mean([r.sum_reward for r in results])) if results else 0.0,
        "mean_length": float(np.mean([r.length for r in results])) if results else 0.0,
    }


def summarize(results: Sequence[EpisodeResult]) -> dict[str, Any]:
    """Overall, per env, per embodiment and per task (env + task string) aggregates."""
    groups: dict[str, dict[str, list[EpisodeResult]]] = {"per_env": defaultdict(list), "per_embodiment": defaultdict(list), "per_task": defaultdict(list)}
    for r in results:
        groups["per_env"][r.env_id].append(r)
        groups["per_embodiment"][r.embodiment].append(r)
        groups["per_task"][f"{r.env_id}: {r.task}"].append(r)
    summary: dict[str, Any] = {"overall": _aggregate(results)}
    for name, group in groups.items():
        summary[name] = {key: _aggregate(group[key]) for key in sorted(group)}
    return summary


def markdown_table(summary: dict[str, Any], policy: str = "") -> str:
    lines = [f"# Evaluation{f' of {policy}' if policy else ''}", ""]
    for section, title in (("per_env", "env"), ("per_embodiment", "embodiment"), ("per_task", "task")):
        lines += [f"## per {title}", "", f"| {title} | episodes | success | mean return | mean length |", "|---|---:|---:|---:|---:|"]
        for key, row in summary.get(section, {}).items():
            lines.append(f"| {key.replace('|', '/')} | {row['episodes']} | {row['success_rate']:.3f} | {row['mean_sum_reward']:.3f} | {row['mean_length']:.1f} |")
        lines.append("")
    overall = summary["overall"]
    lines.append(
        f"**overall**: {overall['episodes']} episodes, success {overall['success_rate']:.3f}, "
        f"mean return {overall['mean_sum_reward']:.3f}, mean length {overall['mean_length']:.1f}"
    )
    for skipped in summary.get("skipped", []):
        lines.append(f"\nskipped {skipped['env_id']}: {skipped['reason']}")
    return "\n".join(lines) + "\n"


def embodiment_of(env: gym.Env, env_id: str) -> Embodiment | None:
    embodiment = getattr(env.unwrapped, "embodiment", None)
    if isinstance(embodiment, Embodiment):
        return embodiment
    name = EXTERNAL_EMBODIMENTS.get(env_id.split("/")[0])
    return EMBODIMENTS.get(name) if name else None


def evaluate(
    policy: str | PolicyFactory | Policy,
    env_ids: Sequence[str],
    episodes: int,
    batch_size: int = 8,
    asynchronous: bool = False,
    out: str | Path | None = None,
    videos: int = 2,
    seed: int = 0,
    image_size: int | None = None,
    env_kwargs: dict[str, dict[str, Any]] | None = None,
    import_modules: Sequence[str] = (),
    policy_options: dict[str, Any] | None = None,
    max_steps: int = 1000,
    progress: bool = True,
    train_datasets: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Evaluate `policy` on each env for `episodes` episodes (episode k uses env seed `seed + k`) in batches of
    `batch_size` parallel envs; write `summary.json`, `summary.md` and GIFs of the first `videos` episodes per env
    under `out` (if given). Returns the summary (see `summarize`, plus `episodes` and `skipped`).

    Held-out guard: before any rollout, the eval seeds of each env are checked against the episode seeds recorded
    by `train_datasets` (the policy's training data) and by the prior's dataset (`policy_options["dataset"]` or
    `prior:ROOT`); an overlap raises `envs.collect.SeedOverlapError`, a dataset without the record only warns."""
    import warnings

    from tqdm import tqdm

    from envs.collect import check_eval_seeds

    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    guarded = [*train_datasets, (policy_options or {}).get("dataset")]
    if isinstance(policy, str) and policy.startswith("prior:"):
        guarded.append(policy.split(":", 1)[1])
    unchecked = {root for env_id in env_ids for root in check_eval_seeds(env_id, range(seed, seed + episodes), guarded)}
    for root in sorted(unchecked):
        warnings.warn(f"{root} records no collection seeds (meta/collection.json): cannot check that the eval seeds "
                      f"are held out from it", stacklevel=2)
    out_dir = Path(out) if out else None
    all_results: list[EpisodeResult] = []
    skipped: list[dict[str, str]] = []
    videos_written: list[str] = []
    for env_id in env_ids:
        kwargs = {**default_env_kwargs(env_id, image_size), **(env_kwargs or {}).get(env_id, {})}
        try:
            probe = probe_env(env_id, kwargs, import_modules)
        except EnvUnavailable as error:
            print(f"skipping {error}")
            skipped.append({"env_id": env_id, "reason": str(error)})
            continue
        embodiment = embodiment_of(probe, env_id)
        has_task = hasattr(probe.unwrapped, "task")
        limit = probe.spec.max_episode_steps if probe.spec and probe.spec.max_episode_steps else max_steps
        fps = probe.metadata.get("render_fps") or (embodiment.fps if embodiment else 10)
        probe.close()
        num_envs = max(1, min(batch_size, episodes))
        vec_env = make_vector_env(env_id, num_envs, asynchronous, kwargs, import_modules)
        try:
            context = PolicyContext(env_id, embodiment, vec_env.single_action_space, num_envs, seed, dict(policy_options or {}),
                                    vec_env.single_observation_space)
            agent = make_policy(policy, context)
            if hasattr(agent, "attach"):
                agent.attach(vec_env, context)
            env_results: list[EpisodeResult] = []
            bar = tqdm(total=episodes, desc=f"eval {env_id}", unit="ep", disable=not progress)
            tally = {"done": 0, "success": 0}

            def on_end(result: EpisodeResult) -> None:
                if result.seed - seed < episodes:  # not one of the spare envs of the last batch
                    tally["done"] += 1
                    tally["success"] += result.success
                    bar.update(1)
                    bar.set_postfix(success=f"{tally['success'] / tally['done']:.2f}")

            for start in range(0, episodes, num_envs):
                count = min(num_envs, episodes - start)
                seeds = [seed + start + i for i in range(num_envs)]
                record = [i for i in range(count) if start + i < videos] if out_dir else []
                batch, frames = rollout(
                    vec_env, agent, seeds, env_id, embodiment.name if embodiment else "unknown", limit, has_task, record, on_end
                )
                env_results += batch[:count]  # extra envs of the last batch do not count
                for i, clip in frames.items():
                    if clip:
                        name = f"{env_id.replace('/', '_')}_episode{start + i:03d}_{'success' if batch[i].success else 'failure'}.gif"
                        videos_written.append(str(save_gif(clip, out_dir / "videos" / name, fps)))
            bar.close()
        finally:
            vec_env.close()
        all_results += env_results
    summary = summarize(all_results)
    summary["policy"] = policy if isinstance(policy, str) else repr(policy)
    summary["skipped"] = skipped
    summary["videos"] = videos_written
    summary["episodes"] = [asdict(r) for r in all_results]
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        (out_dir / "summary.md").write_text(markdown_table(summary, summary["policy"]))
    return summary
