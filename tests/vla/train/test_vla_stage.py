"""Stage 4 end to end on tiny data: two robots' datasets + scene VQA co-training -> a policy checkpoint that rollouts,
`vla vqa` and resume all read."""

import json

import pytest

from vla.config import load_config


def _train(data, out, steps, extra=()):
    from vla.train import run

    overrides = [
        "stage=vla", f"out={out}", f"stage.steps={steps}", "micro_batch=4", "log.progress=false", "log.tensorboard=false",
        "checkpoint.every=2", "model.language={hidden_size: 64, num_hidden_layers: 2}",
        f"stage.data={{datasets: [{{root: '{data / 'nav'}'}}, {{root: '{data / 'arm'}'}}], chunk_len: 4, "
        f"vqa_path: '{data / 'lang' / 'sft.jsonl'}', vqa_ratio: 0.25}}",
        "stage.options={policy: {n_action_steps: 2}}", *extra,
    ]
    return run(load_config("train", overrides))


def test_vla_stage_trains_saves_a_policy_and_resumes(robot_data, tmp_path, capsys):
    data = robot_data
    from vla.policy.env_policy import EnvPolicy
    from vla.policy import VLAPolicy

    summary = _train(data, tmp_path / "run", 4)
    ckpt = summary["checkpoint"]
    policy = VLAPolicy.load(ckpt)
    assert set(policy.registry.names()) == {"point2d", "arm3"}
    assert set(policy.normalizer_stats) == {"point2d", "arm3"}
    assert (tmp_path / "run" / "metrics.csv").read_text().count("\n") >= 4
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert {"loss/point2d", "loss/arm3"} <= set(header.split(","))  # each robot's loss is logged

    from envs.rollout import evaluate
    summary_eval = evaluate(lambda a, ctx: EnvPolicy(policy, "arm3"), ["vla/ArmReach-v0"], episodes=1, batch_size=1,
                            image_size=32, progress=False)
    assert summary_eval["overall"]["episodes"] == 1

    # the backbone inside the policy checkpoint answers questions (vla vqa on a policy checkpoint)
    from vla.policy.checkpoint import load_vl2_for_chat
    from vla.commands.vqa import answer
    model, processor = load_vl2_for_chat(ckpt)
    import glob
    image = sorted(glob.glob(str(data / "lang" / "images" / "*.png")))[0]
    text = answer(model, processor, "How many shapes are there?", [image], max_new_tokens=4)
    from vla.cli import main
    capsys.readouterr()
    assert main(["vqa", f"checkpoint={ckpt}", f"image={image}", "question=How many shapes are there?", "max_new_tokens=4"]) == 0
    assert capsys.readouterr().out.strip() == text  # `vla vqa` on the policy checkpoint: the same greedy answer

    # resume continues the same loss trajectory as the uninterrupted run (this one with cached frames: same numbers)
    cached = ["stage.data.cache_frames=true"]
    _train(data, tmp_path / "part", 2, cached)
    resumed = _train(data, tmp_path / "part", 4, ["resume=true", *cached])
    full = json.loads((tmp_path / "run" / "summary.json").read_text())["losses"]
    assert sorted(resumed["losses"]) == [3, 4]
    for step in (3, 4):
        assert resumed["losses"][step] == pytest.approx(full[str(step)], abs=1e-5)


def _vla_overrides(data, vqa_ratio):
    return ["stage=vla", "seed=2", "stage.steps=3", "checkpoint.every=0", "log.progress=false", "log.tensorboard=false",
            "log.plot=false", "stage.optim.lr=3e-3", "stage.schedule.warmup_steps=0",
            "model.language={hidden_size: 64, num_hidden_layers: 2}",
            f"stage.data={{datasets: [{{root: '{data / 'nav'}'}}, {{root: '{data / 'arm'}', weight: 2}}], chunk_len: 4, "
            f"vqa_path: '{data / 'lang' / 'sft.jsonl'}', vqa_ratio: {vqa_ratio}}}"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_vla_stage_two_processes_match_one(robot_data, tmp_path, mode):
    data = robot_data
    """stage=vla with co-training under torchrun (gloo): each term is a mean over the global step's units (action
    tokens, answer tokens, sequences), and a micro-batch of conversations only goes through the wrapper too."""
    from helpers import two_processes_match_one
    from vla.train.stages import StageContext, make_stage_task

    common = _vla_overrides(data, 0.4)
    # the stream really holds a conversations-only micro-batch of one process and mixed ones (global batch 4 = 2 x 2)
    ctx = StageContext(name="vla", out_dir=tmp_path / "probe", seed=2, model_language={"hidden_size": 64, "num_hidden_layers": 2},
                       data={"datasets": [{"root": str(data / "nav")}, {"root": str(data / "arm"), "weight": 2}],
                             "chunk_len": 4, "vqa_path": str(data / "lang" / "sft.jsonl"), "vqa_ratio": 0.4})
    task = make_stage_task(ctx)
    is_vqa = [task.schedule(i)[0] == 2 for i in range(12)]
    halves = [is_vqa[i:i + 2] for i in range(0, 12, 2)]
    assert [True, True] in halves and [False, False] in halves and any(sum(h) == 1 for h in halves), is_vqa

    two_processes_match_one(tmp_path, common, mode)


def test_a_robot_the_project_does_not_know_trains_from_its_dataset_alone(tmp_path, capsys):
    """`vla train stage=vla` on LeRobot datasets of robots nobody registered: the robot's sizes, cameras and rate come
    from each dataset (one by its robot_type, one named and given a hold_action on the command line); the checkpoint
    serves both in their own units."""
    import numpy as np

    from helpers import so100_like
    from vla.cli import main
    from vla.policy import VLAPolicy
    from vla.policy.env_policy import EnvPolicy

    so100, other = so100_like(tmp_path / "so100"), so100_like(tmp_path / "other", action_size=4, robot_type="koch")
    datasets = (f"stage.data={{datasets: [{{root: '{so100}'}}, {{root: '{other}', embodiment: {{name: my_arm, "
                f"hold_action: [0, 0, 0, 0]}}}}], chunk_len: 2}}")
    assert main(["train", "stage=vla", datasets, f"out={tmp_path / 'run'}", "stage.steps=2", "micro_batch=2",
                 "log.progress=false", "log.tensorboard=false", "log.plot=false", "checkpoint.every=0",
                 "model.language={hidden_size: 64, num_hidden_layers: 2}"]) == 0
    assert "so100 (action 6, H=2, 2 camera(s), 30 Hz), my_arm (action 4, H=2, 2 camera(s), 30 Hz)" in capsys.readouterr().out
    policy = VLAPolicy.load(tmp_path / "run" / "checkpoints" / "step-00000002")
    assert policy.registry.get("my_arm").hold_action == (0.0,) * 4 and policy.registry.get("so100").hold_action is None
    observation = {"pixels": {c: np.zeros((2, 16, 16, 3), np.uint8) for c in ("front", "wrist")}, "task": ["go", "go"]}
    for robot, size in (("so100", 6), ("my_arm", 4)):
        actions = EnvPolicy(policy, robot).select_action(observation | {"agent_pos": np.zeros((2, size), np.float32)})
        assert actions.shape == (2, size) and np.isfinite(actions).all()
