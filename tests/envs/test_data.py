"""Datasets: expert collection -> LeRobotDataset round trip, normalization, the multi-embodiment mixture, bad data."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gymnasium as gym
import numpy as np
import pytest
import torch

from envs import point_nav
from envs.collect import collect_dataset
from envs.embodiments import Embodiment
from envs.mixture import DataError, DatasetSpec, MixtureDataset, MixtureSampler, make_mixture_loader
from envs.normalize import Normalizer, StatsError, normalize, unnormalize
from helpers import JOINTS, so100_like, write_dataset

IMAGE = 32


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    nav = collect_dataset("vla/PointNav-v0", base / "nav", 3, image_size=IMAGE, seed=0, progress=False)
    arm = collect_dataset("vla/ArmReach-v0", base / "arm", 2, image_size=IMAGE, seed=0, noise=0.1, progress=False)
    return {"nav": nav.root, "arm": arm.root, "base": base}


def load(root, **kwargs):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    return LeRobotDataset("local/test", root=root, **kwargs)


# ---------------------------------------------------------------------------------------------- collection
def test_collect_round_trip(roots):
    dataset = load(roots["nav"])
    meta = dataset.meta
    assert meta.robot_type == "point2d" and meta.fps == 10 and meta.total_episodes == 3
    assert meta.info["codebase_version"] == "v3.0"
    assert meta.features["observation.images.top"]["dtype"] == "image"
    assert not any(path.suffix == ".mp4" for path in Path(roots["nav"]).rglob("*"))  # images live in the parquet files
    for key in ("action", "observation.state"):
        assert {"q01", "q99", "mean", "std"} <= set(meta.stats[key])
    # the first frame is exactly what the env showed at reset with seed 0, and the task matches
    env = gym.make("vla/PointNav-v0", image_size=IMAGE)
    obs, _ = env.reset(seed=0)
    first = dataset[0]
    image = (first["observation.images.top"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(image, obs["pixels"]["top"])
    np.testing.assert_allclose(first["observation.state"].numpy(), obs["agent_pos"])
    assert first["task"] == env.unwrapped.task
    actions = torch.stack([dataset[i]["action"] for i in range(len(dataset))])
    assert actions.abs().max() <= 1.0
    # replaying the recorded actions in the env reproduces a successful episode
    length = int(meta.episodes[0]["length"])
    for i in range(length):
        _, _, terminated, _, info = env.step(dataset[i]["action"].numpy())
    assert terminated and info["is_success"]


def test_collect_with_expert_labels_records_the_clean_action(tmp_path):
    # DART: noisy actions are executed, the expert's own action at each recorded state is what the dataset holds
    root = collect_dataset("vla/PointNav-v0", tmp_path / "dart", 1, image_size=IMAGE, seed=0, noise=0.5,
                           label="expert", progress=False).root
    dataset = load(root)
    env = gym.make("vla/PointNav-v0", image_size=IMAGE)
    env.reset(seed=0)
    target = env.unwrapped.target.pos
    states = torch.stack([dataset[i]["observation.state"] for i in range(len(dataset))]).numpy()
    actions = torch.stack([dataset[i]["action"] for i in range(len(dataset))]).numpy()
    expert = np.clip((target - states) / point_nav.MAX_SPEED, -1, 1)
    np.testing.assert_allclose(actions, expert, atol=1e-5)
    # the states were reached with other (noisy) actions: one expert step would not have led from each to the next
    assert np.abs(states[1:] - np.clip(states[:-1] + actions[:-1] * point_nav.MAX_SPEED, 0, 1)).max() > 1e-3
    assert json.loads((Path(root) / "meta" / "collection.json").read_text())["label"] == "expert"
    with pytest.raises(ValueError, match="label must be one of executed, expert"):
        collect_dataset("vla/PointNav-v0", tmp_path / "bad", 1, image_size=IMAGE, label="noisy", progress=False)


def test_collect_refuses_to_overwrite(roots, tmp_path):
    with pytest.raises(FileExistsError, match="overwrite"):
        collect_dataset("vla/PointNav-v0", roots["nav"], 1, image_size=IMAGE, progress=False)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a LeRobot dataset"):
        collect_dataset("vla/PointNav-v0", precious, 1, image_size=IMAGE, overwrite=True, progress=False)
    assert (precious / "notes.txt").exists()
    copy = tmp_path / "copy"
    shutil.copytree(roots["nav"], copy)
    result = collect_dataset("vla/PointNav-v0", copy, 1, image_size=IMAGE, overwrite=True, progress=False)
    assert result.episodes == 1 and load(copy).meta.total_episodes == 1



def test_stats_are_exact_whole_dataset_quantiles(tmp_path):
    """lerobot averages per-episode quantiles; the collector and the mixture use whole-dataset ones."""
    from envs.collect import write_exact_stats

    # two episodes of constant, opposite actions: per-episode q01 = q99 = the action, so lerobot's average is 0
    root = write_dataset(tmp_path / "hand", [[[1.0, -1.0]] * 20, [[-1.0, 1.0]] * 20])
    lerobot_stats = load(root).meta.stats["action"]
    assert abs(lerobot_stats["q99"][0]) < 0.5  # the averaged "q99" lies inside the data range
    meta_only = MixtureDataset([root], stats_source="meta").normalizer_for("point2d")
    assert np.abs(meta_only.normalize("action", np.array([1.0, 1.0]))).max() > 2  # so +-1 actions leave [-1, 1]
    from_data = MixtureDataset([root]).normalizer_for("point2d")
    np.testing.assert_allclose(from_data.stats["action"]["q01"], [-1.0, -1.0])
    np.testing.assert_allclose(from_data.stats["action"]["q99"], [1.0, 1.0])
    exact = write_exact_stats(root)
    assert exact["action"]["q99"] == [1.0, 1.0] and exact["action"]["count"] == [40]
    assert load(root).meta.stats["action"]["q01"].tolist() == [-1.0, -1.0]  # written into meta/stats.json
    with pytest.raises(ValueError, match="stats_source"):
        MixtureDataset([root], stats_source="guess")


def test_same_robot_datasets_share_exactly_merged_stats(tmp_path):
    """Two point2d datasets of different ranges: one normalizer for the robot, with stats over all their frames,
    used to normalize both in training and saved (per robot) with the policy."""
    from envs.normalize import feature_stats

    small = [[[0.1 * i, -0.1 * i] for i in range(10)]]
    large = [[[2.0 + i, 5.0 - i] for i in range(10)], [[-3.0, 4.0]] * 6]
    a, b = write_dataset(tmp_path / "a", small), write_dataset(tmp_path / "b", large)
    mixture = MixtureDataset([a, b])
    shared = mixture.normalizer_for("point2d")
    assert mixture.normalizers[0] is mixture.normalizers[1] is shared
    every = np.array([step for episodes in (small, large) for episode in episodes for step in episode])
    expected = feature_stats(every)
    assert {"q01", "q99"} <= set(shared.stats["action"])
    for stat in shared.stats["action"]:  # the ones quantile normalization keeps
        np.testing.assert_allclose(shared.stats["action"][stat], expected[stat], rtol=1e-6, atol=1e-6)
    # both datasets' samples are normalized with the merged stats (a frame of `a` no longer maps by its own range)
    raw = torch.tensor(every[0], dtype=torch.float32)
    np.testing.assert_allclose(mixture[0]["action"][0].numpy(), shared.normalize("action", raw).numpy(), atol=1e-6)
    assert abs(float(mixture[len(mixture) - 1]["action"][0, 0]) - float(shared.normalize("action", torch.tensor([-3.0, 4.0]))[0])) < 1e-6
    # quantiles of several datasets cannot be merged from meta/stats.json
    with pytest.raises(DataError, match="stats_source='data'"):
        MixtureDataset([a, b], stats_source="meta")


def test_source_schedule_weights_and_per_source_epochs():
    """The one sampler: sources in proportion to their weights over thousands of draws, each source's items once
    per epoch, the same draws for the same seed, a pure function of the position."""
    from envs.mixture import SourceSchedule

    sizes, weights = [7, 30, 5], [0.45, 0.15, 0.4]
    schedule = SourceSchedule(sizes, weights, seed=3, block=64)
    draws = [schedule(i) for i in range(6000)]
    counts = np.bincount([s for s, _ in draws], minlength=3) / len(draws)
    np.testing.assert_allclose(counts, weights, atol=0.02)
    for source, size in enumerate(sizes):
        items = [item for s, item in draws if s == source]
        for epoch in range(len(items) // size):
            assert sorted(items[epoch * size:(epoch + 1) * size]) == list(range(size)), (source, epoch)
    fresh = SourceSchedule(sizes, weights, seed=3, block=64)
    assert [fresh(i) for i in (5999, 17, 4000, 0)] == [draws[i] for i in (5999, 17, 4000, 0)]
    assert [SourceSchedule(sizes, weights, seed=4, block=64)(i) for i in range(50)] != draws[:50]
    with pytest.raises(DataError, match="no items"):
        SourceSchedule([3, 0], [1.0, 1.0])


def test_vla_stage_draws_robots_and_vqa_by_the_configured_weights(roots, tmp_path):
    """The sampler training uses: `vla train stage=vla` with dataset weights 3:1 and vqa_ratio 0.25, counted over
    a few thousand draws of the task's own stream; what `sample` returns follows it."""
    from envs.scene_language import generate_scene_language
    from vla.train.stages import StageContext, make_stage_task

    generate_scene_language(tmp_path / "lang", "sft", 4, seed=0, image_size=IMAGE)
    data = {"datasets": [{"root": str(roots["nav"]), "weight": 3}, {"root": str(roots["arm"]), "weight": 1}],
            "chunk_len": 2, "vqa_path": str(tmp_path / "lang" / "sft.jsonl"), "vqa_ratio": 0.25}
    task = make_stage_task(StageContext(name="vla", out_dir=tmp_path, data=data,
                                        model_language={"hidden_size": 32, "num_hidden_layers": 1}))
    sources = np.array([task.schedule(i)[0] for i in range(4000)])
    np.testing.assert_allclose(np.bincount(sources, minlength=3) / len(sources), [0.5625, 0.1875, 0.25], atol=0.02)
    for i in range(12):
        sample, source = task.sample(i), sources[i]
        assert ("_vqa" in sample) == (source == 2)
        if source < 2:
            assert sample["embodiment"] == ["point2d", "arm3"][source]
    # every frame of the smaller dataset once before any twice
    arm = [task.schedule(i)[1] for i in range(4000) if sources[i] == 1][: len(task.mixture.members[1])]
    assert sorted(arm) == list(range(len(task.mixture.members[1])))


def test_collected_stats_match_the_data(roots):
    dataset = load(roots["nav"])
    actions = np.stack([dataset[i]["action"].numpy() for i in range(len(dataset))])
    np.testing.assert_allclose(dataset.meta.stats["action"]["q99"], np.quantile(actions, 0.99, axis=0), atol=1e-6)
    np.testing.assert_allclose(dataset.meta.stats["action"]["mean"], actions.mean(0), atol=1e-6)


def test_distinct_colours_and_object_count(tmp_path):
    env = gym.make("vla/PointNav-v0", image_size=IMAGE, num_objects=(3, 3), distinct_colours=True)
    for seed in range(20):
        env.reset(seed=seed)
        colours = [o.colour for o in env.unwrapped.objects]
        assert len(colours) == 3 and len(set(colours)) == 3
    with pytest.raises(ValueError, match="distinct colours"):
        gym.make("vla/ArmReach-v0", image_size=IMAGE, num_objects=(5, 5), distinct_colours=True).reset(seed=0)
    result = collect_dataset("vla/PointNav-v0", tmp_path / "two", 2, image_size=IMAGE, progress=False,
                             env_kwargs={"num_objects": (2, 2), "distinct_colours": True})
    assert result.episodes == 2

# ---------------------------------------------------------------------------------------------- normalization
def test_normalizer_round_trip_numpy_and_torch(roots):
    stats = load(roots["arm"]).meta.stats
    for mode in ("quantile", "mean_std", "min_max", "quantile10"):
        normalizer = Normalizer.from_stats(stats, {"action": mode, "observation.state": mode}, name="arm")
        x = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
        np.testing.assert_allclose(normalizer.unnormalize("action", normalizer.normalize("action", x)), x, atol=1e-5)
        t = torch.from_numpy(x)
        back = normalizer.unnormalize("action", normalizer.normalize("action", t))
        assert isinstance(back, torch.Tensor) and back.dtype == torch.float32
        torch.testing.assert_close(back, t, atol=1e-5, rtol=1e-5)
    quantile = Normalizer.from_stats(stats, {"action": "quantile"}, name="arm")
    q01, q99 = np.asarray(stats["action"]["q01"]), np.asarray(stats["action"]["q99"])
    np.testing.assert_allclose(quantile.normalize("action", q01), -1.0, atol=1e-6)
    np.testing.assert_allclose(quantile.normalize("action", q99), 1.0, atol=1e-6)
    assert Normalizer.from_dict(json.loads(json.dumps(quantile.to_dict()))).stats["action"]["q01"].tolist() == q01.tolist()


def test_normalizer_errors():
    stats = {"action": {"q01": [0.0, 0.0], "q99": [1.0, 2.0], "mean": [0.0, float("nan")], "std": [1.0, 1.0]}}
    with pytest.raises(StatsError, match="nav.*'observation.state'"):
        Normalizer.from_stats(stats, {"observation.state": "quantile"}, name="nav")
    with pytest.raises(StatsError, match="not finite"):
        Normalizer.from_stats(stats, {"action": "mean_std"}, name="nav")
    with pytest.raises(StatsError, match="lack \\['q10', 'q90'\\]"):
        Normalizer.from_stats(stats, {"action": "quantile10"}, name="nav")
    with pytest.raises(ValueError, match="unknown normalization mode"):
        Normalizer.from_stats(stats, {"action": "zscore"})
    normalizer = Normalizer.from_stats(stats, {"action": "quantile"}, name="nav")
    with pytest.raises(StatsError, match="shape"):
        normalizer.normalize("action", np.zeros(3))
    # constant dimensions do not divide by zero, as in lerobot
    constant = {"q01": np.array([1.0]), "q99": np.array([1.0])}
    assert np.isfinite(normalize(np.array([1.0]), constant)).all()
    np.testing.assert_allclose(unnormalize(normalize(np.array([1.0]), constant), constant), [1.0])


# ---------------------------------------------------------------------------------------------- mixture
def test_chunks_and_pad_mask_at_episode_end(roots):
    horizon = 5
    mixture = MixtureDataset([roots["nav"]], action_horizon=horizon)
    raw = load(roots["nav"])
    normalizer = mixture.normalizers[0]
    episode = raw.meta.episodes[0]
    start, end = int(episode["dataset_from_index"]), int(episode["dataset_to_index"])
    for offset_from_end in range(1, horizon + 2):
        index = end - offset_from_end
        sample = mixture[index]
        valid = min(offset_from_end, horizon)
        expected_pad = torch.arange(horizon) >= valid
        assert torch.equal(sample["action_is_pad"], expected_pad), (offset_from_end, sample["action_is_pad"])
        expected = torch.stack([raw[index + k]["action"] for k in range(valid)])
        torch.testing.assert_close(sample["action"][:valid, :2], normalizer.normalize("action", expected).float())
        # past the end the point robot holds still: its hold action (zero velocity), normalized
        hold = normalizer.normalize("action", torch.zeros(horizon - valid, 2)).float()
        torch.testing.assert_close(sample["action"][valid:, :2], hold)
    assert sample["frame_index"] == end - horizon - 1 - start
    assert not mixture[start]["action_is_pad"].any()


def test_mixture_of_two_embodiments(roots):
    mixture = MixtureDataset(
        [DatasetSpec("local/nav", root=roots["nav"], weight=3.0), DatasetSpec("local/arm", root=roots["arm"], weight=1.0)],
        action_horizon=4,
    )
    assert mixture.embodiments == ["point2d", "arm3"] and mixture.cameras == ["top", "wrist"]
    assert (mixture.max_action_dim, mixture.max_state_dim) == (3, 5)
    nav_sample, arm_sample = mixture[0], mixture[len(mixture) - 1]
    assert nav_sample["embodiment"] == "point2d" and arm_sample["embodiment"] == "arm3"
    assert nav_sample["action"].shape == arm_sample["action"].shape == (4, 3)
    assert nav_sample["action_mask"].tolist() == [True, True, False]
    assert (nav_sample["action"][:, 2] == 0).all()
    assert nav_sample["state_mask"].tolist() == [True, True, False, False, False]
    assert nav_sample["camera_mask"].tolist() == [True, False] and arm_sample["camera_mask"].tolist() == [True, True]
    assert (nav_sample["observation.images.wrist"] == 0).all()
    # each dataset is normalized with its own stats
    assert mixture.normalizer_for("arm3") is mixture.normalizers[1]
    assert mixture.normalizers[0].stats["action"]["q01"].shape == (2,)

    sampler = MixtureSampler(mixture, num_samples=400, seed=1)
    indices = list(sampler)
    assert indices == list(MixtureSampler(mixture, num_samples=400, seed=1))
    sampler.set_epoch(1)
    assert list(sampler) != indices
    from_nav = np.mean([mixture.locate(i)[0] == 0 for i in indices])
    assert 0.68 < from_nav < 0.82  # weight 3:1

    unpadded = MixtureDataset([roots["nav"], roots["arm"]], action_horizon=2, pad=False)
    assert unpadded[len(unpadded) - 1]["action"].shape == (2, 3) and unpadded[0]["action"].shape == (2, 2)
    assert "observation.images.wrist" not in unpadded[0]


def test_each_sample_says_where_its_instructions_object_is(roots, tmp_path):
    """`vla collect` records the named object's box per episode; the mixture hands it over as `grounding`, the box
    the env shows for that episode's seed (a dataset made elsewhere gives "")."""
    import gymnasium as gym

    from envs.collect import read_collection_record
    from envs.scene_language import grounding_answer, named_object_grounding

    record = read_collection_record(roots["arm"])
    mixture = MixtureDataset([DatasetSpec("local/arm", root=roots["arm"])], action_horizon=2)
    env = gym.make("vla/ArmReach-v0", image_size=IMAGE)
    for i in (0, len(mixture) - 1):
        sample = mixture[i]
        episode = int(sample["episode_index"])
        env.reset(seed=record["episode_seeds"][episode])
        target = named_object_grounding(env)
        assert sample["grounding"] == grounding_answer(target["ref"], target["det"]) == grounding_answer(**record["episode_targets"][episode])
        assert target["ref"][len("the "):] in sample["task"]
    hand = write_dataset(tmp_path / "hand", [[[0.1, 0.2]] * 3])
    assert MixtureDataset([DatasetSpec("local/hand", root=hand)], action_horizon=2)[0]["grounding"] == ""


def test_cached_frames_equal_decoded_ones(roots):
    plain = MixtureDataset([roots["nav"], roots["arm"]], action_horizon=4)
    cached = MixtureDataset([roots["nav"], roots["arm"]], action_horizon=4, cache_frames=True)
    for index in (0, len(plain) - 1, 3):
        for _ in range(2):  # the first read fills the cache, the second is served from it
            a, b = plain[index], cached[index]
            assert a.keys() == b.keys()
            for key, value in a.items():
                if isinstance(value, torch.Tensor):
                    assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key
                else:
                    assert value == b[key], key
    assert all(member.memory is not None for member in cached.members)  # image datasets: read whole, no per-item cache
    # every row, episode ends included (padded chunks), assembled from memory as lerobot assembles it
    long = MixtureDataset([roots["nav"], roots["arm"]], action_horizon=12, cache_frames=True)
    reference = MixtureDataset([roots["nav"], roots["arm"]], action_horizon=12)
    assert any(bool(reference[i]["action_is_pad"].any()) for i in range(len(reference)))
    for index in range(len(reference)):
        a, b = reference[index], long[index]
        for key, value in a.items():
            assert (torch.equal(value, b[key]) and value.dtype == b[key].dtype) if isinstance(value, torch.Tensor) else value == b[key], (index, key)


def test_in_memory_rows_follow_an_episode_subset(roots):
    subset = [{"root": str(roots["nav"]), "episodes": [0, 2]}]
    plain, cached = MixtureDataset(subset, action_horizon=6), MixtureDataset(subset, action_horizon=6, cache_frames=True)
    assert len(plain) == len(cached) and set(int(plain[i]["episode_index"]) for i in range(len(plain))) == {0, 2}
    for index in range(len(plain)):
        a, b = plain[index], cached[index]
        assert all(torch.equal(a[k], b[k]) for k in ("action", "action_is_pad", "observation.state", "observation.images.top", "index"))

def test_loader_workers_do_not_duplicate(roots):
    mixture = MixtureDataset([roots["nav"], roots["arm"]], action_horizon=2)
    loader = make_mixture_loader(mixture, batch_size=8, seed=3, num_samples=len(mixture), num_workers=2)
    seen = torch.cat([batch["index"] + 10_000 * batch["dataset_index"] for batch in loader]).tolist()
    expected = []
    for flat in MixtureSampler(mixture, num_samples=len(mixture), seed=3):
        which, local = mixture.locate(flat)
        expected.append(int(mixture.members[which].dataset[local]["index"]) + 10_000 * which)
    assert seen == expected
    # equal weights and len(mixture) samples: every frame of the smaller dataset is seen at most once per pass
    assert len(set(seen)) > 0.6 * len(seen)


# ---------------------------------------------------------------------------------------------- bad data
def test_nan_action_error_names_dataset_episode_and_key(tmp_path):
    good = [[0.1, 0.2]] * 4
    bad = [[0.1, 0.2], [0.3, float("nan")], [0.0, 0.0]]
    root = write_dataset(tmp_path / "nan", [good, bad])
    with pytest.raises(DataError, match=r"dataset 'local/nan'.*non-finite 'action'.*episode 1, frame 1"):
        MixtureDataset([DatasetSpec("local/nan", root=root)])


def test_a_robot_the_project_does_not_know_is_described_by_its_dataset(tmp_path):
    root = so100_like(tmp_path / "so100")
    member = MixtureDataset([root], action_horizon=4).members[0]
    robot = member.embodiment
    assert robot == Embodiment(name="so100", action_dim=6, state_dim=6, fps=30.0, action_names=tuple(JOINTS),
                               cameras=("observation.images.front", "observation.images.wrist"),
                               description="described by dataset 'local/so100' (" + root + ")'s meta/info.json")
    assert robot.hold_action is None  # position control: a chunk past the episode's end repeats the last action
    sample = MixtureDataset([root], action_horizon=4)[3]
    assert sample["embodiment"] == "so100" and sample["action"].shape == (4, 6) and sample["action_is_pad"].tolist() == [False, False, True, True]
    # a mapping names a new robot and adds what the features cannot say
    spec = {"root": root, "embodiment": {"name": "my_arm", "hold_action": [0.0] * 6}}
    assert MixtureDataset([spec]).members[0].embodiment.hold_action == (0.0,) * 6
    bad = [
        ({"root": root, "embodiment": {"name": "my_arm", "action_dim": 7}}, "not action_dim"),
        ({"root": root, "embodiment": {"name": "arm3"}}, "'arm3' is a registered robot; pass embodiment=arm3"),
        ({"root": root, "embodiment": {"name": "my arm"}}, "embodiment name must"),
        ({"root": root, "embodiment": {"name": "my_arm", "hold_action": [0.0]}}, "hold_action has 1 values"),
    ]
    for spec, message in bad:
        with pytest.raises(DataError, match=message):
            MixtureDataset([spec])
    # two datasets under one robot name must describe the same robot
    other = so100_like(tmp_path / "so100_7", action_size=7)
    with pytest.raises(DataError, match=r"are all embodiment 'so100' but differ .*\(6, 6, None\), \(7, 7, None\)"):
        MixtureDataset([root, other])
    untyped = so100_like(tmp_path / "untyped", robot_type=None)
    with pytest.raises(DataError, match=r"no robot_type .*embodiment=\{name: NAME\}"):
        MixtureDataset([untyped])
    assert MixtureDataset([{"root": untyped, "embodiment": {"name": "so100"}}]).members[0].embodiment.name == "so100"


def test_bad_data_errors(roots, tmp_path):
    with pytest.raises(DataError, match="missing camera.*'wrist'"):
        MixtureDataset([roots["nav"], roots["arm"]], cameras=["top", "wrist"])
    with pytest.raises(DataError, match="'action' has shape \\(2,\\) but embodiment 'arm3' expects \\(3,\\)"):
        MixtureDataset([DatasetSpec("local/nav", root=roots["nav"], embodiment="arm3")])
    with pytest.raises(DataError, match="unknown embodiment 'hexapod'.*arm3"):
        MixtureDataset([DatasetSpec("local/nav", root=roots["nav"], embodiment="hexapod")])
    broken = tmp_path / "no_quantiles"
    shutil.copytree(roots["nav"], broken)
    stats_path = broken / "meta" / "stats.json"
    stats = json.loads(stats_path.read_text())
    del stats["action"]["q01"]
    stats_path.write_text(json.dumps(stats))
    with pytest.raises(StatsError, match="no_quantiles.*'action' lack \\['q01'\\]"):
        MixtureDataset([str(broken)], stats_source="meta")
    MixtureDataset([str(broken)], action_norm="mean_std", stats_source="meta")  # mean/std are still there
    MixtureDataset([str(broken)])  # stats computed from the data need no stats.json
    with pytest.raises(ValueError, match="weight"):
        MixtureSampler(MixtureDataset([roots["nav"]]), weights=[-1.0])


def test_cli_collect_and_eval_pass_env_kwargs(tmp_path, capsys):
    from vla.cli import main

    root = tmp_path / "one"
    assert main(["collect", "env=vla/PointNav-v0", "episodes=1", f"root={root}", f"image_size={IMAGE}",
                 "env_kwargs={num_objects: [1, 1]}"]) == 0
    env = gym.make("vla/PointNav-v0", image_size=IMAGE, num_objects=(1, 1))
    obs, _ = env.reset(seed=0)  # the first attempt's scene, built with the same kwargs
    assert len(env.unwrapped.objects) == 1
    first = load(root)[0]["observation.images.top"]
    np.testing.assert_array_equal((first.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), obs["pixels"]["top"])
    capsys.readouterr()
    assert main(["eval", "policy=expert", "env=vla/PointNav-v0", "episodes=2", "batch_size=2", "videos=0",
                 f"out={tmp_path / 'eval'}", f"image_size={IMAGE}", "env_kwargs={num_objects: [1, 1]}"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["success_rate"] == 1.0
    rc = main(["eval", "policy=expert", "env=vla/PointNav-v0", "episodes=1", "batch_size=1", "videos=0",
               f"out={tmp_path / 'eval2'}", "env_kwargs={num_objects: [5, 5], distinct_colours: true}"])
    assert rc == 2 and "distinct colours" in capsys.readouterr().err  # the kwargs reach the env


def test_datasets_open_with_a_chosen_video_backend(roots, monkeypatch, caplog):
    """Where torchcodec cannot load, datasets open on pyav without lerobot's per-dataset fallback warning (whose text
    carries every FFmpeg loader's traceback)."""
    import sys

    from envs import collect

    collect.video_backend.cache_clear()
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "torchcodec", None)  # `import torchcodec` raises ImportError
        assert collect.video_backend() == "pyav"  # cached from here on
    try:
        with caplog.at_level("WARNING"):
            mixture = MixtureDataset([roots["nav"]])
        assert mixture.members[0].dataset._video_backend == "pyav"
        assert not [r for r in caplog.records if "torchcodec" in r.getMessage()]
    finally:
        collect.video_backend.cache_clear()
