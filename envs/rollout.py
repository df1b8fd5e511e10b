"""Roll policies out in gymnasium vector envs and summarize success, return and length per task and embodiment.

`evaluate(policy, env_ids, episodes, ...)` is the entry point: it builds the vector envs (envs/vector_env.py), the
policy from its spec (envs/policies.py: the policy protocol, `make_policy`, `register_policy_factory`, the random /
expert / no-vision prior baselines), runs the batches (`rollout`, below) and writes the summary, markdown and GIFs
(envs/report.py). The names of those modules are re-exported here, where they lived before.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from envs.embodiments import EMBODIMENTS, Embodiment
from envs.policies import (POLICY_FACTORIES, ExpertPolicy, Policy, PolicyContext, PolicyFactory, PriorPolicy,
                           RandomPolicy, load_episode_actions, make_policy, register_policy_factory,
                           to_lerobot_observation)
from envs.report import EpisodeResult, markdown_table, save_gif, summarize
from envs.vector_env import (DEFAULT_ENV_KWARGS, MUJOCO_HINT, MUJOCO_NAMESPACES, EnvFactory, EnvUnavailable,
                             default_env_kwargs, env_modules, make_vector_env, probe_env)

__all__ = [
    "DEFAULT_ENV_KWARGS", "EMBODIMENTS", "EXTERNAL_EMBODIMENTS", "MUJOCO_HINT", "MUJOCO_NAMESPACES", "POLICY_FACTORIES",
    "EnvFactory", "EnvUnavailable", "EpisodeResult", "ExpertPolicy", "Policy", "PolicyContext", "PolicyFactory",
    "PriorPolicy", "RandomPolicy", "default_env_kwargs", "embodiment_of", "env_modules", "evaluate",
    "load_episode_actions", "make_policy", "make_vector_env", "markdown_table", "probe_env", "register_policy_factory",
    "rollout", "save_gif", "summarize", "to_lerobot_observation",
]

#: embodiment of external envs (the built-in ones carry theirs)
EXTERNAL_EMBODIMENTS = {"gym_pusht": "pusht", "gym_aloha": "aloha"}


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
    under `out` (if given). Returns the summary (see `summarize`, plus `episodes` and `skipped`: the envs that cannot
    run here, e.g. a simulator not installed; `EnvUnavailable` when none can).

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
        except EnvUnavailable as error:  # listed in the summary (and its table); an error when no env can run
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
    if len(skipped) == len(env_ids):
        raise EnvUnavailable("no env could run: " + "; ".join(s["reason"] for s in skipped))
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
