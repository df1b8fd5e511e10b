"""LeRobot policies beside ours: `vla eval policy=lerobot:DIR` on an ACT checkpoint that the real `lerobot-train` wrote
(episodes, summary and seeds the same as for our policies; a checkpoint whose features do not match the env is one
line), and `vla bench peers --quick` end to end (~2 minutes here)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks.peers import (Contender, lerobot_train_command, ours_seconds_per_step, parse_train_log,
                              steps_for_budget)

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE = 32  # px: the smallest frames the envs and ResNet-18 both take quickly
TINY_ACT = Contender("act_tiny", "ACT, tiny", "act",
                     fields={"pretrained_backbone_weights": None, "dim_model": 32, "dim_feedforward": 64, "n_heads": 2,
                             "n_encoder_layers": 1, "n_vae_encoder_layers": 1, "latent_dim": 8, "chunk_size": 4,
                             "n_action_steps": 4},
                     train={"batch_size": 4, "num_workers": 0})
STEPS = 2


@pytest.fixture(scope="module")
def act_checkpoint(tmp_path_factory):
    """A PointNav dataset (seeds 0..) and an ACT policy lerobot-train trained on it for two steps (the bench's own
    command line); returns (dataset root, checkpoint folder, lerobot-train's log)."""
    from benchmarks.peers import _subprocess_env
    from envs.collect import collect_dataset

    tmp = tmp_path_factory.mktemp("peers")
    root = collect_dataset("vla/PointNav-v0", tmp / "nav", 3, image_size=IMAGE, noise=0.1, seed=0, progress=False,
                           env_kwargs={"num_objects": [1, 1]}).root
    (tmp / "torch_home").mkdir()
    command = lerobot_train_command(TINY_ACT, root, tmp / "act", STEPS, log_freq=1)
    result = subprocess.run(command, capture_output=True, text=True, env=_subprocess_env(tmp / "torch_home", 1),
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not any((tmp / "torch_home").rglob("*.pth"))  # no backbone weights were downloaded
    return root, tmp / "act" / "checkpoints" / "last" / "pretrained_model", result.stdout + result.stderr


def _eval(capsys, *args: str) -> tuple[int, str, str]:
    from vla.cli import main

    code = main(["eval", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_act_checkpoint_same_loop_and_seeds_as_ours(act_checkpoint, tmp_path, capsys):
    root, checkpoint, _ = act_checkpoint
    common = ["env=vla/PointNav-v0", "episodes=3", "batch_size=2", "seed=1000", "env_kwargs={num_objects: [1, 1]}",
              f"train_datasets=[{root}]"]
    # image_size left at null: the envs render at the 32 px the checkpoint records (96 would be refused)
    code, out, _ = _eval(capsys, f"policy=lerobot:{checkpoint}", f"out={tmp_path / 'act'}", "videos=1", *common)
    assert code == 0, out
    summary = json.loads((tmp_path / "act" / "summary.json").read_text())
    assert json.loads(out.strip().splitlines()[-1])["episodes"] == 3
    assert summary["policy"] == f"lerobot:{checkpoint}"
    assert summary["overall"]["episodes"] == 3 and 0.0 <= summary["overall"]["success_rate"] <= 1.0
    assert list(summary["per_env"]) == ["vla/PointNav-v0"] and list(summary["per_embodiment"]) == ["point2d"]
    assert len(summary["videos"]) == 1 and Path(summary["videos"][0]).is_file()
    for episode in summary["episodes"]:
        assert 1 <= episode["length"] <= 60 and isinstance(episode["success"], bool)

    # the same scenes as any other policy of `vla eval` (ours included): seeds 1000.., the same tasks
    code, _, _ = _eval(capsys, "policy=random", f"out={tmp_path / 'random'}", f"image_size={IMAGE}", "videos=0", *common)
    assert code == 0
    other = json.loads((tmp_path / "random" / "summary.json").read_text())
    assert [e["seed"] for e in summary["episodes"]] == [e["seed"] for e in other["episodes"]] == [1000, 1001, 1002]
    assert [e["task"] for e in summary["episodes"]] == [e["task"] for e in other["episodes"]]

    # the held-out guard holds for lerobot checkpoints too: seed 0 is a training episode of the dataset
    code, _, err = _eval(capsys, f"policy=lerobot:{checkpoint}", "env=vla/PointNav-v0", "episodes=1", "seed=0",
                         f"train_datasets=[{root}]", "videos=0", f"out={tmp_path / 'overlap'}")
    assert code == 2 and err.startswith("vla eval: error:") and "overlap the training dataset" in err


def test_checkpoint_whose_features_do_not_match_is_one_line(act_checkpoint, tmp_path, capsys):
    _, checkpoint, _ = act_checkpoint
    # an arm (state 5, action 3, two cameras) for a point-robot checkpoint (state 2, action 2)
    code, out, err = _eval(capsys, f"policy=lerobot:{checkpoint}", "env=vla/ArmReach-v0", "episodes=1", "videos=0",
                           f"out={tmp_path / 'arm'}")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "features do not match the env" in err and "observation.state [2] but the env gives [5]" in err
    assert "action [2] but the env's actions are [3]" in err
    # other frames than the checkpoint's
    code, _, err = _eval(capsys, f"policy=lerobot:{checkpoint}", "env=vla/PointNav-v0", "episodes=1", "image_size=48",
                         "videos=0", f"out={tmp_path / 'size'}")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"observation.images.top [3, {IMAGE}, {IMAGE}] but the env gives [3, 48, 48]" in err
    # not a checkpoint; a config field the policy does not have
    code, _, err = _eval(capsys, f"policy=lerobot:{tmp_path}", "episodes=1", "videos=0")
    assert code == 2 and "is not a LeRobot policy checkpoint" in err and len(err.strip().splitlines()) == 1
    code, _, err = _eval(capsys, f"policy=lerobot:{checkpoint}", "episodes=1", "videos=0",
                         "policy_options={config: {num_inference_steps: 10}}", f"out={tmp_path / 'field'}")
    assert code == 2 and "act config has no field(s) ['num_inference_steps']" in err


def test_config_overrides_reach_the_policy(act_checkpoint):
    from vla.policy.lerobot_checkpoint import load_lerobot_policy, recorded_image_size

    _, checkpoint, _ = act_checkpoint
    assert recorded_image_size(checkpoint) == IMAGE
    assert recorded_image_size(checkpoint.parents[2]) == IMAGE  # the lerobot-train output folder resolves too
    policy, _, _, config = load_lerobot_policy(checkpoint, overrides={"n_action_steps": 1, "temporal_ensemble_coeff": 0.01})
    assert config.n_action_steps == 1 and policy.config.temporal_ensemble_coeff == 0.01
    assert not policy.training


def test_lerobot_train_log_and_step_budget(act_checkpoint):
    from vla.policy.lerobot_checkpoint import load_lerobot_policy

    _, checkpoint, log = act_checkpoint
    parsed = parse_train_log(log)
    assert parsed["s_per_step"] is not None and parsed["s_per_step"] > 0
    policy = load_lerobot_policy(checkpoint)[0]
    assert parsed["params"] == sum(p.numel() for p in policy.parameters())  # lerobot-train's count of this model
    command = " ".join(lerobot_train_command(TINY_ACT, "data/nav", Path("out"), 7, 1))
    assert "--policy.pretrained_backbone_weights=null" in command and "--steps=7 --save_freq=7" in command
    assert "--batch_size=4" in command and "--policy.n_action_steps=4" in command

    assert steps_for_budget(100.0, 10.0, 0.5, 1, None) == 180
    assert steps_for_budget(100.0, 10.0, 0.5, 1, 50) == 50
    assert steps_for_budget(5.0, 10.0, 0.5, 3, None) == 3  # the fixed cost alone is over the budget


def test_ours_seconds_per_step_from_metrics(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,train/loss,train/samples_per_s\n10,1.0,80\n20,0.9,160\n30,0.8,100\n")
    assert ours_seconds_per_step(tmp_path, 16) == pytest.approx(0.16)  # 16 samples at the median 100 per second
    assert ours_seconds_per_step(tmp_path / "missing", 16) is None


def test_bench_peers_quick(tmp_path, capsys):
    from vla.cli import main

    assert main(["bench", "peers", "--quick", "threads=1", f"peers.out={tmp_path / 'peers'}"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    contenders = ["act_default", "diffusion_default", "act_cpu", "diffusion_cpu"]
    assert result["failed"] == {} and result["quick"] is True
    assert result["out"] == str(tmp_path / "peers")
    for robot in ("nav", "arm"):
        assert set(result["success"][robot]) == {"ours", "random", "no_vision", *contenders}
        assert all(0.0 <= v <= 1.0 for v in result["success"][robot].values())
    from vla.config import load_config

    assert result["steps"]["ours"] == load_config("demo").quick_overrides.steps.vla and result["train_s"]["ours"] == result["budget_s"]["ours"] > 0
    for name in contenders:
        assert result["steps"][name] == {"nav": 2, "arm": 2}
        assert all(v > 0 for v in result["train_s"][name].values())
        assert all(v > 0 for v in result["params"][name].values())
    assert result["params"]["diffusion_default"]["arm"] > result["params"]["diffusion_default"]["nav"]  # 2 cameras
    assert result["eval"] == {"episodes_per_robot": 2, "seed": 1000}
    assert "ours (one model, both robots)" in out and "Diffusion Policy, LeRobot defaults" in out
    checkpoint = tmp_path / "peers" / "peers" / "act_cpu" / "arm" / "run" / "checkpoints" / "last"
    assert (checkpoint / "pretrained_model" / "model.safetensors").is_file()
    assert not (checkpoint / "training_state").exists()  # optimizer state removed after training
    assert result["wall_s"] < 600
