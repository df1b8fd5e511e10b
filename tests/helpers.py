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
