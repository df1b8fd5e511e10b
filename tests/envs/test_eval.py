"""Rollouts: baselines in sync/async vector envs, summaries and videos, policy resolution, external envs."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gymnasium as gym
import numpy as np
import pytest
import torch
from PIL import Image

import envs
from envs.rollout import (
    POLICY_FACTORIES,
    PolicyContext,
    evaluate,
    make_policy,
    make_vector_env,
    register_policy_factory,
    to_lerobot_observation,
)

BUILTIN = list(envs.BUILTIN_ENVS)


def test_expert_succeeds_and_writes_summary_and_videos(tmp_path):
    summary = evaluate("expert", BUILTIN, episodes=10, batch_size=4, out=tmp_path, videos=2, seed=100, image_size=32, progress=False)
    assert summary["overall"]["episodes"] == 30
    for env_id in BUILTIN:
        row = summary["per_env"][env_id]
        assert row["episodes"] == 10 and row["success_rate"] >= 0.95
        seeds = sorted(e["seed"] for e in summary["episodes"] if e["env_id"] == env_id)
        assert seeds == list(range(100, 110))
    assert set(summary["per_embodiment"]) == {"point2d", "arm3"}
    assert summary["per_embodiment"]["point2d"]["episodes"] == 20
    assert sum(row["episodes"] for row in summary["per_task"].values()) == 30
    assert json.loads((tmp_path / "summary.json").read_text())["overall"] == summary["overall"]
    table = (tmp_path / "summary.md").read_text()
    assert "| vla/ArmReach-v0 | 10 |" in table and "per embodiment" in table
    gifs = sorted((tmp_path / "videos").glob("*.gif"))
    assert len(gifs) == 6 and len(summary["videos"]) == 6
    with Image.open(gifs[0]) as gif:
        assert gif.n_frames > 2


def test_random_policy_is_near_zero():
    summary = evaluate("random", BUILTIN, episodes=8, batch_size=8, seed=100, image_size=32, progress=False)
    assert summary["overall"]["success_rate"] <= 0.1
    assert summary["per_env"]["vla/PushBlock-v0"]["mean_length"] == gym.spec("vla/PushBlock-v0").max_episode_steps


def test_async_vector_env_matches_sync():
    kwargs = dict(episodes=4, batch_size=2, seed=7, image_size=32, progress=False)
    sync = evaluate("expert", ["vla/PushBlock-v0"], asynchronous=False, **kwargs)
    spawned = evaluate("expert", ["vla/PushBlock-v0"], asynchronous=True, **kwargs)
    assert spawned["overall"]["success_rate"] == 1.0
    assert [e["length"] for e in spawned["episodes"]] == [e["length"] for e in sync["episodes"]]
    assert [e["task"] for e in spawned["episodes"]] == [e["task"] for e in sync["episodes"]]


def test_prior_policy_from_a_dataset(tmp_path):
    from envs.collect import collect_dataset

    root = collect_dataset("vla/PointNav-v0", tmp_path / "nav", 4, image_size=32, progress=False).root
    for mode in ("sample", "mean"):
        summary = evaluate(
            "prior", ["vla/PointNav-v0"], episodes=8, batch_size=4, seed=100, image_size=32, progress=False,
            policy_options={"dataset": root, "prior_mode": mode},
        )
        assert summary["overall"]["success_rate"] <= 0.4
    with pytest.raises(ValueError, match="actions have size 2"):
        evaluate("prior:" + root, ["vla/ArmReach-v0"], episodes=1, image_size=32, progress=False)
    with pytest.raises(ValueError, match="needs a dataset"):
        evaluate("prior", ["vla/PointNav-v0"], episodes=1, image_size=32, progress=False)


def test_eval_refuses_seeds_the_training_dataset_was_collected_from(tmp_path, capsys):
    from envs.collect import COLLECTION_FILE, SeedOverlapError, collect_dataset
    from vla.cli import main

    root = collect_dataset("vla/PointNav-v0", tmp_path / "nav", 2, image_size=32, seed=10, progress=False).root
    record = json.loads((tmp_path / "nav" / COLLECTION_FILE).read_text())
    assert record["env_id"] == "vla/PointNav-v0" and record["seed"] == 10
    assert len(record["episode_seeds"]) == 2 and all(10 <= s < 10 + record["attempts"] for s in record["episode_seeds"])
    trained = record["episode_seeds"][-1]
    kwargs = dict(episodes=2, batch_size=2, image_size=32, progress=False)
    with pytest.raises(SeedOverlapError, match="of vla/PointNav-v0 overlap the training dataset .* not held out"):
        evaluate("random", ["vla/PointNav-v0"], seed=trained - 1, train_datasets=[root], **kwargs)
    with pytest.raises(SeedOverlapError):  # the prior's own dataset counts too
        evaluate("prior", ["vla/PointNav-v0"], seed=trained, policy_options={"dataset": root}, **kwargs)
    # seeds past the dataset's, or another env, are held out
    assert evaluate("random", ["vla/PointNav-v0"], seed=trained + 1, train_datasets=[root], **kwargs)["overall"]["episodes"] == 2
    assert evaluate("random", ["vla/ArmReach-v0"], seed=trained, train_datasets=[root], **kwargs)["overall"]["episodes"] == 2
    # the CLI refuses with one error line, as every command does
    capsys.readouterr()
    assert main(["eval", "policy=random", "env=vla/PointNav-v0", "episodes=2", "batch_size=2", "videos=0", "image_size=32",
                 f"seed={trained}", f"train_datasets=[{root}]", f"out={tmp_path / 'eval'}"]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.count("\n") == 1
    assert printed.err.startswith("vla eval: error: eval seeds") and "not held out" in printed.err
    # an env that cannot run is skipped (listed in the summary); when none can, one error line, no table of nothing
    assert main(["eval", "policy=random", "env=vla/NoSuchEnv-v0", "episodes=1", f"out={tmp_path / 'none'}"]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.count("\n") == 1
    assert printed.err.startswith("vla eval: error: no env could run: vla/NoSuchEnv-v0: not registered")
    summary = evaluate("random", ["vla/NoSuchEnv-v0", "vla/PointNav-v0"], **kwargs)
    assert [s["env_id"] for s in summary["skipped"]] == ["vla/NoSuchEnv-v0"] and summary["overall"]["episodes"] == 2
    # a dataset that records no seeds cannot be checked: a warning, not a refusal
    (tmp_path / "nav" / COLLECTION_FILE).unlink()
    with pytest.warns(UserWarning, match="records no collection seeds"):
        evaluate("random", ["vla/PointNav-v0"], seed=trained, train_datasets=[root], **kwargs)


class ConstantPolicy:
    def __init__(self, value: float, size: int):
        self.value, self.size, self.resets = value, size, 0

    def reset(self):
        self.resets += 1

    def select_action(self, observation):
        return np.full((len(observation["task"]), self.size), self.value, dtype=np.float32)


def test_policy_extension_points():
    space = gym.spaces.Box(-1, 1, (2,), np.float32)
    context = PolicyContext("vla/PointNav-v0", envs.get_embodiment("point2d"), space, num_envs=2)
    register_policy_factory("constant", lambda arg, ctx: ConstantPolicy(float(arg or 0), ctx.action_space.shape[0]), overwrite=True)
    try:
        policy = make_policy("constant:0.5", context)
        assert policy.select_action({"task": ["a", "b"]}).tolist() == [[0.5, 0.5], [0.5, 0.5]]
        assert type(make_policy("envs.policies:_random_factory", context)).__name__ == "RandomPolicy"
        instance = ConstantPolicy(0.0, 2)
        assert make_policy(instance, context) is instance
        summary = evaluate(instance, ["vla/PointNav-v0"], episodes=3, batch_size=2, image_size=32, progress=False)
        assert summary["overall"]["episodes"] == 3 and instance.resets == 2
    finally:
        POLICY_FACTORIES.pop("constant")
    with pytest.raises(ValueError, match="unknown policy 'nonsense'.*expert"):
        make_policy("nonsense", context)
    with pytest.raises(ValueError, match="has no attribute"):
        make_policy("envs.rollout:no_such_factory", context)
    with pytest.raises(ValueError, match="shape \\(2, 3\\), expected \\(2, 2\\)"):
        evaluate(ConstantPolicy(0.0, 3), ["vla/PointNav-v0"], episodes=2, batch_size=2, image_size=32, progress=False)


def test_observation_batch_and_lerobot_conversion():
    vec_env = make_vector_env("vla/ArmReach-v0", 2, env_kwargs={"image_size": 32})
    try:
        observation, _ = vec_env.reset(seed=[0, 1])
    finally:
        vec_env.close()
    assert observation["pixels"]["top"].shape == (2, 32, 32, 3) and observation["agent_pos"].shape == (2, 5)
    converted = to_lerobot_observation({**observation, "task": ["a", "b"]})
    assert converted["observation.images.wrist"].shape == (2, 3, 32, 32)
    for camera in ("top", "wrist"):  # channels first, uint8 -> [0, 1]
        want = torch.as_tensor(observation["pixels"][camera]).permute(0, 3, 1, 2).float() / 255.0
        assert torch.allclose(converted[f"observation.images.{camera}"], want)
    assert converted["observation.state"].shape == (2, 5) and converted["task"] == ["a", "b"]


def test_pusht_async_random_and_mujoco_envs_skipped(tmp_path):
    pytest.importorskip("gym_pusht")
    summary = evaluate(
        "random", ["gym_pusht/PushT-v0", "gym_aloha/AlohaInsertion-v0"], episodes=2, batch_size=2,
        asynchronous=True, out=tmp_path, videos=1, progress=False,
    )
    assert summary["per_env"]["gym_pusht/PushT-v0"]["episodes"] == 2
    assert summary["per_embodiment"].keys() == {"pusht"}
    assert len(summary["videos"]) == 1
    if "gym_aloha/AlohaInsertion-v0" not in summary["per_env"]:
        assert "MUJOCO_GL" in summary["skipped"][0]["reason"]
