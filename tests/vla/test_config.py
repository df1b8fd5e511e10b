"""Configs: `stage_config(stage, settings)` (the training API's way in) composes what the command line's `key=value`
overrides compose, with the same rules: structured sections reject unknown keys, free-form ones take any."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from vla.config import load_config
from vla.train import stage_config


def test_settings_compose_what_overrides_compose(tmp_path):
    settings = {"out": tmp_path / "run", "seed": 3, "micro_batch": 2, "init_from": "ckpt",
                "model": {"language": {"hidden_size": 64, "num_hidden_layers": 2}},
                "stage": {"steps": 7, "optim": {"lr": 0.002}, "lr_mult": {"vision_tower": 1.0},
                          "data": {"datasets": [{"root": Path("/data/nav"), "weight": 2.0}], "vqa_ratio": 0.25},
                          "options": {"policy": {"n_bins": 64}}}}
    overrides = [f"out={tmp_path / 'run'}", "seed=3", "micro_batch=2", "init_from=ckpt",
                 "model.language={hidden_size: 64, num_hidden_layers: 2}", "stage.steps=7", "stage.optim.lr=0.002",
                 "stage.lr_mult={vision_tower: 1.0}", "stage.data={datasets: [{root: /data/nav, weight: 2.0}], vqa_ratio: 0.25}",
                 "stage.options={policy: {n_bins: 64}}"]
    via_api = OmegaConf.to_container(stage_config("vla", settings), resolve=True)
    via_cli = OmegaConf.to_container(load_config("train", ["stage=vla", *overrides]), resolve=True)
    assert via_api == via_cli
    assert via_api["stage"]["optim"]["betas"] == [0.9, 0.95]  # a dict merges into a dict: the other keys stay
    assert via_api["stage"]["name"] == "vla" and via_api["log"]["every"] == 1


def test_unknown_keys_of_structured_sections_are_one_error():
    with pytest.raises(KeyError, match=r"unknown config key 'stage.optim.learning_rate'; known at that level: .*lr"):
        stage_config("sft", {"stage": {"optim": {"learning_rate": 1.0}}})
    with pytest.raises(KeyError, match="unknown config key 'micro_batches'"):
        stage_config("sft", {"micro_batches": 2})
    cfg = stage_config("sft", {"model": {"vision": {"width": 64}}})  # free-form: new keys welcome
    assert cfg.model.vision.width == 64
    with pytest.raises(Exception):  # the result is locked again, as hydra's is
        cfg.not_a_key = 1


def test_lr_multipliers_take_any_parameter_group(tmp_path):
    """`lr_mult` has a default entry (the tower's 0.1) but is keyed by parameter group: another group is a new key,
    on the command line and through the API alike; the trainer, not the config, refuses a group it does not know."""
    via_cli = load_config("train", ["stage=vla", "stage.lr_mult.projector=0.1"])
    via_api = stage_config("vla", {"stage": {"lr_mult": {"projector": 0.1}}})
    for cfg in (via_cli, via_api):
        assert dict(cfg.stage.lr_mult) == {"vision_tower": 0.1, "projector": 0.1}
    with pytest.raises(KeyError, match="unknown config key 'stage.optim.lr_multiplier'"):
        stage_config("vla", {"stage": {"optim": {"lr_multiplier": 1.0}}})
