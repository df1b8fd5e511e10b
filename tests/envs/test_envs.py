"""The built-in env suite: gymnasium API, determinism, observations, ground truth, scripted experts, embodiments."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs import scene
from envs.scene_language import named_object_grounding

ENV_IDS = list(envs.BUILTIN_ENVS)


def rollout_expert(env, seed: int) -> tuple[bool, int]:
    env.reset(seed=seed)
    for step in range(10_000):
        _, _, terminated, truncated, info = env.step(env.unwrapped.expert_action())
        if terminated or truncated:
            return bool(info["is_success"]), step + 1
    raise AssertionError("episode never ended")


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_env_checker(env_id):
    env = gym.make(env_id, image_size=32)
    check_env(env.unwrapped, skip_render_check=False)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_observation_layout_and_task(env_id):
    env = gym.make(env_id, image_size=48)
    embodiment = env.unwrapped.embodiment
    obs, info = env.reset(seed=1)
    assert set(obs) == {"pixels", "agent_pos"}
    assert set(obs["pixels"]) == set(embodiment.camera_names)
    for image in obs["pixels"].values():
        assert image.dtype == np.uint8 and image.shape == (48, 48, 3)
    assert obs["agent_pos"].dtype == np.float32 and obs["agent_pos"].shape == (embodiment.state_dim,)
    assert env.action_space.shape == (embodiment.action_dim,)
    assert env.metadata["render_fps"] == embodiment.fps
    assert env.spec.max_episode_steps > 0
    task = env.unwrapped.task
    assert env.unwrapped.task_description == task
    assert env.unwrapped.target.name in task
    assert info["is_success"] is False


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_same_seed_same_episode_and_seeds_differ(env_id):
    def run(seed):
        env = gym.make(env_id, image_size=32)
        obs, _ = env.reset(seed=seed)
        frames, rewards = [obs["pixels"]["top"]], []
        rng = np.random.default_rng(0)
        for _ in range(15):
            obs, reward, *_ = env.step(rng.uniform(-1, 1, env.action_space.shape).astype(np.float32))
            frames.append(obs["pixels"]["top"])
            rewards.append(reward)
        return env.unwrapped.task, np.stack(frames), np.array(rewards)

    task_a, frames_a, rewards_a = run(7)
    task_b, frames_b, rewards_b = run(7)
    assert task_a == task_b
    np.testing.assert_array_equal(frames_a, frames_b)
    np.testing.assert_array_equal(rewards_a, rewards_b)
    scenes = {run(seed)[1][0].tobytes() for seed in range(4)}
    assert len(scenes) == 4


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_wrong_instruction_changes_only_the_instruction(env_id):
    """instruction='other' (the wrong-instruction baseline): same frames, target, rewards and success; the task names
    another object of the same scene."""
    def run(instruction, seed):
        env = gym.make(env_id, image_size=32, num_objects=(2, 3), instruction=instruction)
        obs, _ = env.reset(seed=seed)
        frames, rewards, successes = [obs["pixels"]["top"]], [], []
        for _ in range(30):
            obs, reward, terminated, _, info = env.step(env.unwrapped.expert_action())
            frames.append(obs["pixels"]["top"]), rewards.append(reward), successes.append(info["is_success"])
            if terminated:
                break
        u = env.unwrapped
        return u.task, u.target.name, [o.name for o in u.objects], np.stack(frames), rewards, successes, named_object_grounding(env)

    for seed in range(3):
        told, target, names, frames, rewards, successes, named = run("target", seed)
        other, target_o, names_o, frames_o, rewards_o, successes_o, named_o = run("other", seed)
        assert (target_o, names_o) == (target, names) and rewards_o == rewards and successes_o == successes
        np.testing.assert_array_equal(frames_o, frames)
        assert target in told and target not in other
        assert other == told.replace(target, next(n for n in names if n in other))
        # the object the instruction names (what a ground_target policy is trained to find): the told one
        assert named["ref"] == f"the {target}" and named_o["ref"] != named["ref"] and named_o["ref"][4:] in other
    with pytest.raises(ValueError, match="2\\+ objects"):
        gym.make(env_id, image_size=32, num_objects=(1, 1), instruction="other").reset(seed=0)
    with pytest.raises(ValueError, match="wrong-instruction"):
        gym.make(env_id, image_size=32, instruction="nope")


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_expert_succeeds_on_20_seeds(env_id):
    env = gym.make(env_id, image_size=32)
    successes = [rollout_expert(env, seed)[0] for seed in range(20)]
    assert np.mean(successes) >= 0.95, successes


def test_arm_near_start_demonstrations_start_close_on_any_side():
    from envs.arm_reach import START_DISTANCE, SUCCESS_RADIUS

    default, near = gym.make("vla/ArmReach-v0", image_size=32), gym.make("vla/ArmReach-v0", image_size=32, near_start=1.0)
    starts = []
    for seed in range(20):
        default.reset(seed=seed)
        assert default.unwrapped._distance() > START_DISTANCE
        near.reset(seed=seed)
        assert 1.2 * SUCCESS_RADIUS < near.unwrapped._distance() < START_DISTANCE
        starts.append(near.unwrapped.target.pos - near.unwrapped._tip())
    assert (np.array(starts)[:, 1] < 0).any() and (np.array(starts)[:, 1] > 0).any()  # targets above and below the tip
    with pytest.raises(ValueError, match="near_start must be in"):
        gym.make("vla/ArmReach-v0", near_start=2.0)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_ground_truth_boxes_cover_drawn_pixels(env_id):
    env = gym.make(env_id, image_size=64)
    for seed in range(3):
        obs, _ = env.reset(seed=seed)
        image = obs["pixels"]["top"]
        truth = env.unwrapped.scene_ground_truth()
        assert truth["image_size"] == [64, 64] and truth["task"] == env.unwrapped.task
        assert sum(o["is_target"] for o in truth["objects"]) == 1
        for obj in truth["objects"]:
            x1, y1, x2, y2 = obj["bbox"]
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
            colour = np.array(scene.COLOURS[obj["colour"]])
            inside = np.all(image[y1:y2, x1:x2] == colour, axis=-1)
            # most of the box shows the object's colour (the robot may cover a little of it)
            assert inside.mean() > 0.3, (obj, inside.mean())
            # and the colour does not spill outside the box: the row above/below/left/right is free of it
            grown = np.zeros((64, 64), dtype=bool)
            grown[max(y1 - 1, 0) : y2 + 1, max(x1 - 1, 0) : x2 + 1] = True
            ring = grown.copy()
            ring[y1:y2, x1:x2] = False
            other_same_colour = [o for o in truth["objects"] if o["colour"] == obj["colour"] and o is not obj]
            if not other_same_colour:
                assert not np.any(np.all(image[ring] == colour, axis=-1))


def test_wrist_ground_truth_boxes_what_the_wrist_camera_shows():
    env = gym.make("vla/ArmReach-v0", image_size=64, near_start=0.5)
    listed = visible = grippers = 0
    for seed in range(40):
        obs, _ = env.reset(seed=seed)
        wrist, top = env.unwrapped.scene_ground_truth("wrist"), env.unwrapped.scene_ground_truth()
        assert wrist["task"] == top["task"] and wrist["image_size"] == [64, 64]
        for extra in wrist["extras"]:  # the end effector, at the frame's centre (unless it is off the top frame)
            assert extra["name"] == "gripper" and all(abs(v - 32) <= 4 for v in extra["bbox"])
        grippers += len(wrist["extras"])
        boxes = {o["name"]: o["bbox"] for o in wrist["objects"]}
        assert set(boxes) <= {o["name"] for o in top["objects"]}
        listed += len(boxes)
        for obj in top["objects"]:
            if [o["colour"] for o in top["objects"]].count(obj["colour"]) > 1:
                continue
            painted = np.all(obs["pixels"]["wrist"] == np.array(scene.COLOURS[obj["colour"]]), axis=-1)
            visible += bool(painted.any())
            if painted.any():  # every pixel the wrist shows of an object lies in its wrist box
                x1, y1, x2, y2 = boxes[obj["name"]]
                outside = painted.copy()
                outside[y1:y2, x1:x2] = False
                assert not outside.any(), (seed, obj["name"])
    assert grippers >= 30 and visible >= 20 and listed >= visible  # half the starts are near the target: objects are in view
    with pytest.raises(ValueError, match="no camera 'wrist'"):
        gym.make("vla/PointNav-v0").unwrapped.scene_ground_truth("wrist")


def test_image_size_changes_rendering_and_rejects_tiny():
    env = gym.make("vla/PointNav-v0", image_size=224)
    obs, _ = env.reset(seed=0)
    assert obs["pixels"]["top"].shape == (224, 224, 3)
    assert env.render().shape == (224, 224, 3)
    with pytest.raises(ValueError, match="image_size"):
        gym.make("vla/PointNav-v0", image_size=4)
    with pytest.raises(ValueError, match="available"):
        gym.make("vla/PointNav-v0", cameras=("wrist",))


def test_arm_cameras_can_be_selected():
    env = gym.make("vla/ArmReach-v0", image_size=32, cameras=("wrist",))
    obs, _ = env.reset(seed=0)
    assert list(obs["pixels"]) == ["wrist"]


def test_embodiments_are_plain_data_with_clear_errors():
    point, arm = envs.get_embodiment("point2d"), envs.get_embodiment("arm3")
    assert (point.action_dim, point.fps) == (2, 10) and (arm.action_dim, arm.fps) == (3, 20)
    assert set(envs.EMBODIMENTS) >= {"point2d", "arm3", "pusht"}
    with pytest.raises(KeyError, match="known embodiments: .*arm3.*point2d"):
        envs.get_embodiment("hexapod")
    with pytest.raises(ValueError, match="already registered"):
        envs.register_embodiment(envs.Embodiment("arm3", 4, 4, ("top",), 10))


def test_random_actions_rarely_succeed():
    env = gym.make("vla/PushBlock-v0", image_size=32)
    rng = np.random.default_rng(0)
    successes = 0
    for seed in range(5):
        env.reset(seed=seed)
        while True:
            _, _, terminated, truncated, info = env.step(rng.uniform(-1, 1, 2).astype(np.float32))
            if terminated or truncated:
                successes += info["is_success"]
                break
    assert successes <= 1
