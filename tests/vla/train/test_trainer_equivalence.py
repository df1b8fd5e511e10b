"""The trainer's per-group learning-rate multipliers reach the optimizer (and the update sizes), and gradient
accumulation gives the same losses as one larger micro-batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vla.train.trainer
from vla.config import load_config
from vla.train.stages import vl2_module_group
from vla.train import run

LR = 1e-3


pytestmark = pytest.mark.usefixtures("one_thread")


def pretrain_cfg(out: Path, *extra: str):
    """A tiny, quiet pretrain run (the test-preset model on 16 generated records), no checkpoints but the last."""
    return load_config("train", ["stage=pretrain", f"out={out}", "stage.data.generate=16", "checkpoint.every=0",
                                 "checkpoint.keep_last=1", "log.progress=false", "log.tensorboard=false", "log.plot=false",
                                 f"stage.optim.lr={LR}", "stage.schedule.warmup_steps=0", *extra])


def test_lr_mult_reaches_the_right_param_groups_and_update_sizes(tmp_path, monkeypatch):
    seen = {}
    build = vla.train.trainer.build_optimizer

    def recording_build(named_params, groups, optim):
        optimizer = build(named_params, groups, optim)
        seen["optimizer"] = optimizer
        seen["names"] = {id(p): n for n, p in named_params.items()}
        seen["before"] = {id(p): p.detach().clone() for n, p in named_params.items()}
        return optimizer

    monkeypatch.setattr(vla.train.trainer, "build_optimizer", recording_build)
    # `vision: 0.1` is an alias (tower and projector); no weight decay, so Adam's first step moves each parameter
    # element with a gradient by lr x its group's multiplier (|g| >> eps)
    run(pretrain_cfg(tmp_path, "stage.steps=1", "micro_batch=2", "stage.lr_mult={vision: 0.1, lm_head: 4.0}",
                     "stage.optim.weight_decay=0.0"))
    mult = {"vision_tower": 0.1, "projector": 0.1, "lm_head": 4.0}
    groups = seen["optimizer"].param_groups
    assert {g["name"].split("/")[0] for g in groups} >= {"vision_tower", "projector", "lm_head", "attention", "experts"}
    for group in groups:
        module_group = group["name"].split("/")[0]
        want = mult.get(module_group, 1.0)
        assert group["lr_mult"] == want and group["initial_lr"] == pytest.approx(LR * want), group["name"]
        assert {vl2_module_group(seen["names"][id(p)]) for p in group["params"]} == {module_group}, group["name"]
        moved = torch.cat([(p.detach() - seen["before"][id(p)]).abs().flatten() for p in group["params"]])
        moved = moved[moved > 0]
        assert len(moved) > 0, group["name"]
        assert moved.median().item() == pytest.approx(LR * want, rel=0.05), group["name"]


def test_grad_accum_matches_one_larger_micro_batch(tmp_path):
    steps = ["stage.steps=3"]
    one = run(pretrain_cfg(tmp_path / "one", *steps, "micro_batch=4", "grad_accum=1"))["losses"]
    accum = run(pretrain_cfg(tmp_path / "accum", *steps, "micro_batch=2", "grad_accum=2"))["losses"]
    assert sorted(one) == sorted(accum) == [1, 2, 3]
    for step in (1, 2, 3):
        assert abs(one[step] - accum[step]) < 1e-5, (step, one[step], accum[step])
    assert one[3] != one[1]  # the steps trained (a constant loss would match trivially)
