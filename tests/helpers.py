"""Helpers shared by test modules (tests/ is on sys.path: pytest puts a conftest's folder there)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from vla.config import load_config
from vla.train import run
from vla.train.checkpoint import list_checkpoints

REPO = Path(__file__).resolve().parents[1]


def drop_after(out: Path, step: int) -> None:
    """A run that "died" after its step-`step` checkpoint: remove the later checkpoints of `out`."""
    for s, p in list_checkpoints(out / "checkpoints"):
        if s > step:
            shutil.rmtree(p)


def torchrun_train(out: Path, *args: str) -> tuple[dict[int, float], str]:
    """`torchrun --nproc-per-node 2 -m vla.train out=OUT ARGS`; (the losses per step of its summary, its stdout)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "vla.train", f"out={out}", *args]
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = {int(k): v for k, v in json.loads((out / "summary.json").read_text())["losses"].items()}
    return losses, result.stdout


def two_processes_match_one(tmp_path: Path, common: list[str], mode: str) -> dict[int, float]:
    """3 steps of `common` under torchrun (2 processes x micro-batch 2, `mode`) equal 1 process x micro-batch 4 to
    1e-5 (and the loss moves); returns the 1-process losses."""
    two, _ = torchrun_train(tmp_path / "two", *common, "micro_batch=2", f"distributed={mode}")
    one = run(load_config("train", [*common, f"out={tmp_path / 'one'}", "micro_batch=4"]))["losses"]
    assert sorted(two) == [1, 2, 3]
    for step in (1, 2, 3):
        assert abs(two[step] - one[step]) < 1e-5, (step, two[step], one[step])
    assert one[3] != one[1]
    return one


def tiny_policy(embodiments, seed: int = 0, normalizer_stats=None, **config):
    """The tests' small random-weight policy: the CPU `test` preset, a 300-token BPE, chunks up to 8 x 4, seeded.
    `embodiments`: a list of heads.Embodiment; `config`: other VLAPolicyConfig fields."""
    from backbone.tokenizer import build_bpe_tokenizer
    from heads.embodiment import EmbodimentRegistry
    from vla.policy import VLAPolicyConfig, build_policy

    torch.manual_seed(seed)
    return build_policy(VLAPolicyConfig(**{"max_chunk_len": 8, "max_action_dim": 4, **config}),
                        EmbodimentRegistry(list(embodiments)), build_bpe_tokenizer(vocab_size=300), "test",
                        normalizer_stats=normalizer_stats)


def write_dataset(root, actions_per_episode, state_size=2, robot_type="point2d", cameras=("top",), fps=10,
                  action_names=None):
    """A tiny hand-made LeRobotDataset (point2d-like by default) with the given per-episode action arrays."""
    import numpy as np
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    action_size = len(actions_per_episode[0][0])
    features = {f"observation.images.{c}": {"dtype": "image", "shape": (16, 16, 3), "names": ["height", "width", "channels"]}
                for c in cameras}
    features |= {
        "observation.state": {"dtype": "float32", "shape": (state_size,), "names": None},
        "action": {"dtype": "float32", "shape": (action_size,), "names": action_names},
    }
    dataset = LeRobotDataset.create("local/hand", fps=fps, features=features, root=root, robot_type=robot_type, use_videos=False)
    for actions in actions_per_episode:
        for action in actions:
            dataset.add_frame(
                {f"observation.images.{c}": np.zeros((16, 16, 3), np.uint8) for c in cameras}
                | {
                    "observation.state": np.zeros(state_size, np.float32),
                    "action": np.asarray(action, np.float32),
                    "task": "go",
                }
            )
        dataset.save_episode()
    dataset.finalize()
    return str(root)


JOINTS = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]


def so100_like(root, action_size=6, robot_type="so100"):
    """A robot the project does not know: 6 joints (named as lerobot names them), two cameras, 30 fps."""
    episodes = [[[0.1 * (i + j) for j in range(action_size)] for i in range(5)]] * 2
    return write_dataset(root, episodes, state_size=action_size, robot_type=robot_type, cameras=("front", "wrist"),
                         fps=30, action_names={"motors": JOINTS} if action_size == len(JOINTS) else None)
