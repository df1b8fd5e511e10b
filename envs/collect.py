"""Scripted-expert demonstrations written as a LeRobotDataset v3 with lerobot's own API.

`collect_dataset(env_id, root, episodes)` runs `env.unwrapped.expert_action()` (plus optional Gaussian action noise,
clipped to the action space; the noisy action is what is executed) and writes one frame per step. The recorded action
is the executed one (`label="executed"`), or the expert's own clean action at that state (`label="expert"`: DART,
Laskey et al. 2017; the noise then only widens the states the expert is seen recovering from, and no noise is learned):

| key                          | dtype   | shape      |                                          |
|------------------------------|---------|------------|------------------------------------------|
| observation.images.<camera>  | image   | (H, W, 3)  | PNG inside the parquet files (no video)   |
| observation.state            | float32 | (state,)   | `agent_pos` before the action             |
| action                       | float32 | (action,)  | the executed (or expert) action, [-1, 1]  |
| next.reward                  | float32 | (1,)       |                                          |
| next.success                 | bool    | (1,)       | `info["is_success"]` after the action     |

plus the task string. `robot_type` is the embodiment name, `fps` the embodiment's control rate. lerobot computes the
stats (min/max/mean/std/q01/q10/q50/q90/q99) in `finalize()`; `write_exact_stats` then replaces those of the action
and the state with exact whole-dataset values (lerobot averages per-episode quantiles, see envs/normalize.py). Failed
episodes are dropped (and another seed is tried) unless `keep_failures=True`. Nothing touches the network
(`HF_HUB_OFFLINE=1` is set if unset).

`meta/collection.json` records how the dataset was made, the env seed of every kept episode included
(`episode_seeds`); `check_eval_seeds` uses it to refuse evaluating on scenes a policy was trained on. For scene envs
it also records, per kept episode, the object the instruction names and its box in the first camera's frame at the
episode's start (`episode_targets`: {"ref", "det"} or null; envs.scene_language.named_object_grounding), which the
mixture hands a policy that says where it is going before it acts (`ground_target`).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import gymnasium as gym
import numpy as np

import envs  # noqa: F401  (registers the built-in suite)
from envs.scene_language import named_object_grounding

LABELS = ("executed", "expert")  # what a frame's action records: the executed (noisy) action, or the expert's
COLLECTION_FILE = "meta/collection.json"  # env id, kwargs, noise and the env seed of each kept episode
EPISODE_TARGETS = "episode_targets"  # its key for each episode's named object and box (vla collect, vla annotate)


@dataclass
class CollectResult:
    root: str
    repo_id: str
    env_id: str
    embodiment: str
    episodes: int
    frames: int
    attempts: int
    success_rate: float  # over all attempted episodes, before dropping failures
    seconds: float


@cache
def video_backend() -> str:
    """The video decoder every LeRobotDataset here is opened with: torchcodec where it loads, else pyav. lerobot picks
    the same way when given none, but tries to import torchcodec again for each dataset and, where FFmpeg's libraries
    are missing, logs every loader's traceback (pages) each time."""
    try:
        import torchcodec  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return "pyav"
    return "torchcodec"


def dataset_features(env: gym.Env) -> dict[str, dict]:
    """LeRobot feature spec for a built-in env's observations and actions."""
    base = env.unwrapped
    embodiment = base.embodiment
    size = base.image_size
    features: dict[str, dict] = {}
    for camera in base.cameras:
        features[f"observation.images.{camera}"] = {
            "dtype": "image",
            "shape": (size, size, 3),
            "names": ["height", "width", "channels"],
        }
    features["observation.state"] = {
        "dtype": "float32",
        "shape": (embodiment.state_dim,),
        "names": list(embodiment.state_names) or None,
    }
    features["action"] = {"dtype": "float32", "shape": (embodiment.action_dim,), "names": list(embodiment.action_names) or None}
    features["next.reward"] = {"dtype": "float32", "shape": (1,), "names": None}
    features["next.success"] = {"dtype": "bool", "shape": (1,), "names": None}
    return features


def write_exact_stats(root: str | Path, keys: tuple[str, ...] = ("action", "observation.state")) -> dict[str, dict]:
    """Recompute the stats of the low-dimensional `keys` over every frame of the dataset at `root` and write them into
    its meta/stats.json (other features keep lerobot's). Returns the new stats of `keys`."""
    import json

    import pyarrow.parquet as pq

    from envs.normalize import feature_stats

    root = Path(root)
    files = sorted((root / "data").rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{root}: no data/*.parquet files")
    columns = {key: [] for key in keys}
    for file in files:
        table = pq.read_table(file, columns=list(keys))
        for key in keys:
            columns[key].extend(table.column(key).to_pylist())
    path = root / "meta" / "stats.json"
    stats = json.loads(path.read_text()) if path.exists() else {}
    exact = {key: feature_stats(np.asarray(values, dtype=np.float64)) for key, values in columns.items()}
    path.write_text(json.dumps(stats | exact, indent=4))
    return exact


def prepare_root(root: Path, overwrite: bool) -> None:
    """Refuse an existing root unless `overwrite`; even then only delete what looks like a LeRobot dataset (or nothing)."""
    if not root.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{root} already exists; pass overwrite=true to replace it")
    if root.is_dir() and ((root / "meta" / "info.json").exists() or not any(root.iterdir())):
        shutil.rmtree(root)
        return
    raise FileExistsError(f"{root} exists and is not a LeRobot dataset (no meta/info.json); refusing to delete it")


def collect_dataset(
    env_id: str,
    root: str | Path,
    episodes: int,
    *,
    repo_id: str | None = None,
    noise: float = 0.0,
    seed: int = 0,
    image_size: int = 96,
    overwrite: bool = False,
    keep_failures: bool = False,
    max_attempts: int | None = None,
    progress: bool = True,
    env_kwargs: dict | None = None,
    label: str = "executed",
) -> CollectResult:
    """Run the scripted expert of `env_id` (built with `env_kwargs`, e.g. `num_objects`) for `episodes` episodes
    (episode k of the attempts uses env seed `seed + k`) and write them to `root` as a LeRobotDataset v3."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from tqdm import tqdm

    datasets.disable_progress_bars()  # one bar per saved episode otherwise

    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if label not in LABELS:
        raise ValueError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
    root = Path(root)
    env = gym.make(env_id, **{"image_size": image_size, **(env_kwargs or {})})
    base = env.unwrapped
    if not hasattr(base, "expert_action"):
        raise ValueError(f"{env_id} has no scripted expert (env.unwrapped.expert_action)")
    embodiment = base.embodiment
    repo_id = repo_id or f"local/{env_id.split('/')[-1].lower()}"
    prepare_root(root, overwrite)
    root.parent.mkdir(parents=True, exist_ok=True)
    dataset = LeRobotDataset.create(
        repo_id=repo_id,
        fps=embodiment.fps,
        features=dataset_features(env),
        root=root,
        robot_type=embodiment.name,
        use_videos=False,
        video_backend=video_backend(),
    )
    rng = np.random.default_rng(seed)
    max_attempts = max_attempts or 3 * episodes + 10
    start = time.perf_counter()
    kept = attempts = successes = frames = 0
    episode_seeds: list[int] = []  # env seed of each kept episode, in episode order
    episode_targets: list[dict | None] = []  # the named object's box at each kept episode's start
    scene = hasattr(base, "scene_ground_truth")
    bar = tqdm(total=episodes, desc=f"collect {env_id}", unit="ep", disable=not progress)
    try:
        while kept < episodes:
            if attempts >= max_attempts:
                raise RuntimeError(
                    f"{env_id}: only {kept}/{episodes} successful episodes after {attempts} attempts (noise={noise}); "
                    "lower the noise or pass keep_failures=true"
                )
            obs, info = env.reset(seed=seed + attempts)
            attempts += 1
            target = named_object_grounding(env) if scene else None
            length = 0
            while True:
                expert = base.expert_action().astype(np.float32)
                action = expert
                if noise > 0:
                    action = action + rng.normal(0.0, noise, size=action.shape).astype(np.float32)
                action = np.clip(action, env.action_space.low, env.action_space.high).astype(np.float32)
                next_obs, reward, terminated, truncated, info = env.step(action)
                frame = {f"observation.images.{camera}": image for camera, image in obs["pixels"].items()}
                frame["observation.state"] = obs["agent_pos"].astype(np.float32)
                frame["action"] = action if label == "executed" else expert
                frame["next.reward"] = np.array([reward], dtype=np.float32)
                frame["next.success"] = np.array([info["is_success"]], dtype=bool)
                frame["task"] = base.task
                dataset.add_frame(frame)
                length += 1
                obs = next_obs
                if terminated or truncated:
                    break
            success = bool(info["is_success"])
            successes += success
            if success or keep_failures:
                dataset.save_episode()
                episode_seeds.append(seed + attempts - 1)
                episode_targets.append(target)
                kept += 1
                frames += length
                bar.update(1)
                bar.set_postfix(success=f"{successes / attempts:.2f}", frames=frames)
            else:
                dataset.clear_episode_buffer()
    finally:
        bar.close()
        if dataset.has_pending_frames():  # interrupted mid-episode: keep only whole episodes
            dataset.clear_episode_buffer()
        dataset.finalize()
        env.close()
    if kept:
        write_exact_stats(root)
        write_collection_record(root, {"env_id": env_id, "env_kwargs": dict(env_kwargs or {}), "image_size": image_size,
                                       "noise": noise, "label": label, "seed": seed, "attempts": attempts, "episode_seeds": episode_seeds,
                                       EPISODE_TARGETS: episode_targets})
    return CollectResult(
        root=str(root),
        repo_id=repo_id,
        env_id=env_id,
        embodiment=embodiment.name,
        episodes=kept,
        frames=frames,
        attempts=attempts,
        success_rate=successes / max(attempts, 1),
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------------------- held-out seeds
class SeedOverlapError(ValueError):
    """Evaluation would run on env seeds (scenes) that a training dataset holds episodes of."""


def write_collection_record(root: str | Path, record: dict) -> Path:
    import json

    path = Path(root) / COLLECTION_FILE
    path.write_text(json.dumps(record, indent=1))
    return path


def read_collection_record(root: str | Path) -> dict | None:
    """The dataset's `meta/collection.json`, or None for datasets collected elsewhere (or before it existed)."""
    import json

    path = Path(root) / COLLECTION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_eval_seeds(env_id: str, seeds: Sequence[int], datasets: Sequence[str | Path]) -> list[str]:
    """Raise `SeedOverlapError` (one line) when any of the eval `seeds` of `env_id` is the seed of an episode of one of
    `datasets` collected from the same env: that scene was trained on, so it is not held out. Returns the roots that
    record no collection seeds (and so could not be checked); the caller may warn about them."""
    wanted = {int(s) for s in seeds}
    unchecked = []
    for root in dict.fromkeys(str(d) for d in datasets if d):
        record = read_collection_record(root)
        if record is None:
            unchecked.append(root)
            continue
        if record.get("env_id") != env_id:
            continue
        overlap = sorted(wanted.intersection(int(s) for s in record.get("episode_seeds", [])))
        if overlap:
            trained = record["episode_seeds"]
            raise SeedOverlapError(
                f"eval seeds {min(wanted)}..{max(wanted)} of {env_id} overlap the training dataset {root} "
                f"({len(overlap)} shared, e.g. seed {overlap[0]}; it holds episodes of seeds {min(trained)}..{max(trained)}): "
                f"these scenes are not held out; evaluate with seed > {max(trained)}")
    return unchecked
