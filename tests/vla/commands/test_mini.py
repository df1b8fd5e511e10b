"""The mini DeepSeek-VL2 checkpoint: the shipped one loads, matches the hashes it records and answers at the accuracy
it records; the builder writes what it records; a damaged copy is refused in one line."""

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from vla.commands import mini

SHIPPED = mini.resolve("checkpoints/dsvl2-mini")


def _within_noise(measured: float, recorded: float, n: int) -> bool:
    """|measured - recorded| within 3 binomial standard errors of an n-item sample (+ one item of rounding)."""
    return abs(measured - recorded) <= 3 * math.sqrt(max(recorded * (1 - recorded), 0.02) / n) + 1 / n


def test_shipped_checkpoint_matches_its_hashes_and_loads():
    from vla.policy.checkpoint import load_vl2_for_chat

    made_by = mini.verify(SHIPPED)
    assert set(made_by["files"]) == set(mini.WEIGHT_FILES)
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) <= 25 * 2**20  # the size limit
    assert made_by["commit"] and made_by["wall_s"] > 0 and made_by["settings"]["mini"]["steps"]["vision"] > 0
    assert set(made_by["data"]) == {part for part in mini.SEEDS if made_by["settings"]["mini"]["scenes"].get(part, 0) > 0}
    model, processor = load_vl2_for_chat(SHIPPED)
    assert model.config.language.vocab_size >= len(processor.tokenizer)


def test_shipped_checkpoint_answers_at_its_recorded_accuracy():
    recorded, measured = mini.check_scores(SHIPPED, limit=30)
    assert measured["records"] == 30 and measured["n_vqa"] > 60
    assert _within_noise(measured["vqa_accuracy"], recorded["vqa_accuracy"], measured["n_vqa"]), (measured, recorded)
    assert _within_noise(measured["grounding_acc"], recorded["grounding_acc"], measured["n_grounding"]), (measured, recorded)


def test_held_out_scenes_are_not_training_scenes():
    made_by = mini.verify(SHIPPED)
    trained = mini.trained_scene_keys(made_by)
    held_out = mini.plan_scene_keys(made_by["data"]["eval"])
    assert len(held_out) == made_by["data"]["eval"]["count"] and trained and not trained & held_out


def test_a_damaged_or_unmade_copy_is_refused_in_one_line(tmp_path):
    copy = tmp_path / "mini"
    shutil.copytree(SHIPPED, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(mini.MiniCheckpointError, match="sha256") as error:
        mini.verify(copy)
    assert "\n" not in str(error.value)
    weights.write_bytes(bytes(data[:-10]))
    with pytest.raises(mini.MiniCheckpointError, match="truncated"):
        mini.verify(copy)
    (copy / mini.MADE_BY).unlink()
    with pytest.raises(mini.MiniCheckpointError, match="demo.from_scratch=true"):
        mini.verify(copy)


def test_build_records_settings_seeds_scores_and_hashes(tmp_path):
    from vla.commands.demo import _settings
    from vla.config import load_config

    c = _settings(load_config("demo", ["demo.quick=true", "demo.from_scratch=true"]))
    folder = mini.build(c, tmp_path / "mini", say=lambda message: None)
    made_by = mini.verify(folder)
    assert folder == tmp_path / "dsvl2-mini"
    assert made_by["settings"]["mini"] == c["mini"] and made_by["settings"]["vision"] == c["vision"]
    assert {part: plan["seed"] for part, plan in made_by["data"].items()} == mini.SEEDS
    assert made_by["data"]["vision"]["count"] == c["mini"]["scenes"]["vision"]
    # stage vision also reads the arm's wrist frames (the point robot has no wrist camera), from their own JSONL
    wrist = made_by["data"]["vision_wrist"]
    assert (wrist["camera"], wrist["envs"], wrist["env_kwargs"]) == ("wrist", ["vla/ArmReach-v0"], c["mini"]["camera_env_kwargs"])
    vision_paths = list(OmegaConf.load(tmp_path / "mini" / "train" / "vision" / "config.yaml").stage.data.path)
    assert [Path(p).name for p in vision_paths] == ["align.jsonl", "align-wrist.jsonl"]
    assert set(made_by["final_loss"]) == {"vision", "align", "pretrain", "sft"}
    assert made_by["held_out"]["records"] == c["mini"]["scenes"]["eval"]
    # the recorded score is what scoring the recorded held-out scenes gives
    recorded, measured = mini.check_scores(folder, limit=c["mini"]["scenes"]["eval"])
    assert measured == recorded
    assert json.loads((folder / "config.json").read_text())["vision_config"]["width"] == c["vision"]["width"]
    # the tower trains from random init at the stage's whole lr; the stages after at `tower_lr_mult` (0: kept)
    lr_mult = lambda stage: OmegaConf.load(tmp_path / "mini" / "train" / stage / "config.yaml").stage.lr_mult  # noqa: E731
    assert dict(lr_mult("vision")) == {} and dict(lr_mult("sft")) == {"vision_tower": c["mini"]["tower_lr_mult"]}


def test_build_keeps_an_adaptor_made_by_stage_vision_frozen_with_adaptor_lr_mult_0(tmp_path):
    from backbone.deepseek_vl2 import load_deepseek_vl2
    from vla.commands.demo import _settings
    from vla.config import load_config

    c = _settings(load_config("demo", ["demo.quick=true", "demo.from_scratch=true", "mini.adaptor_lr_mult=0",
                                       "mini.vision_data.adaptor_weight=1"]))
    folder = mini.build(c, tmp_path / "mini", say=lambda message: None)
    assert list(OmegaConf.load(tmp_path / "mini" / "train" / "sft" / "config.yaml").stage.frozen) == ["projector"]
    made = load_deepseek_vl2(next((tmp_path / "mini" / "train" / "vision" / "checkpoints").glob("step-*")))
    shipped = load_deepseek_vl2(folder)
    for name, value in made.vision_encoder.projector.state_dict().items():  # what stage vision made, unchanged
        assert torch.equal(value, shipped.vision_encoder.projector.state_dict()[name]), name


def test_vla_vqa_answers_and_draws_boxes_from_the_shipped_checkpoint(tmp_path, capsys):
    from vla.cli import main

    made_by = mini.verify(SHIPPED)
    plan = dict(made_by["data"]["eval"], count=1)
    record = json.loads(mini.scenes(plan, tmp_path / "scene").read_text().splitlines()[0])
    image, target = tmp_path / "scene" / record["images"][0], record["meta"]["objects"][0]["name"]
    assert main(["vqa", f"checkpoint={SHIPPED}", f"image={image}", "draw=" + str(tmp_path / "boxes.png"),
                 f"question='Locate <|ref|>the {target}<|/ref|> in the given image.'"]) == 0
    printed = capsys.readouterr().out
    assert "<|det|>" in printed and "drew " in printed and (tmp_path / "boxes.png").stat().st_size > 0
    # locate=REF asks the same question without Hydra's quoting
    assert main(["vqa", f"checkpoint={SHIPPED}", f"image={image}", f"locate=the {target}"]) == 0
    assert capsys.readouterr().out == printed.splitlines()[0] + "\n"
    assert main(["vqa", f"checkpoint={SHIPPED}", f"image={image}"]) == 2  # neither question nor locate
    assert "exactly one of question=... or locate=" in capsys.readouterr().err



def _script(*args: str) -> str:
    """Run one of docs/experiments' scripts on the shipped checkpoint; its stdout."""
    import os
    import subprocess
    import sys

    from helpers import REPO

    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                         env=os.environ | {"PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_a_hub_id_loads_from_the_local_hugging_face_cache(tmp_path, monkeypatch, capsys):
    """`load_deepseek_vl2`, `vla vqa` and `vla train init_from=` take a hub id as well as a folder: with the hub off
    (HF_HUB_OFFLINE=1, as in ./run.sh) it is read from the local cache, here one holding the shipped checkpoint."""
    import huggingface_hub.constants

    from backbone.checkpoint import CheckpointError, checkpoint_folder
    from backbone.deepseek_vl2 import load_deepseek_vl2
    from vla.cli import main

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--dsvl2-mini"
    shutil.copytree(SHIPPED, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    assert checkpoint_folder("someone/dsvl2-mini") == repo / "snapshots" / commit
    shipped, cached = load_deepseek_vl2(SHIPPED), load_deepseek_vl2("someone/dsvl2-mini")
    for (name, a), (_, b) in zip(shipped.state_dict().items(), cached.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(CheckpointError, match="someone/other: no such local folder, and not in the local Hugging Face"):
        checkpoint_folder("someone/other")
    with pytest.raises(CheckpointError, match="not a directory"):
        checkpoint_folder(tmp_path / "missing")

    image = tmp_path / "scene.png"
    from PIL import Image

    Image.new("RGB", (64, 64), "white").save(image)
    capsys.readouterr()
    assert main(["vqa", "checkpoint=someone/dsvl2-mini", f"image={image}", "question=How many shapes are there?"]) == 0
    assert main(["vqa", f"checkpoint={SHIPPED}", f"image={image}", "question=How many shapes are there?"]) == 0
    by_id, by_folder = capsys.readouterr().out.splitlines()
    assert by_id == by_folder
    from vla.train.entry import configs_from
    from vla.config import load_config

    class One:  # one process
        enabled, rank, world, barrier = False, 0, 1, None
    ctx, _ = configs_from(load_config("train", ["stage=sft", "init_from=someone/dsvl2-mini", f"out={tmp_path}"]), One)
    assert ctx.init_from == str(repo / "snapshots" / commit)


def test_grounding_errors_script_scores_the_shipped_checkpoint():
    out = _script("docs/experiments/grounding_errors.py", "checkpoints/dsvl2-mini", "--scenes", "4")
    assert re.search(r"\d+ boxes \(4 held-out scenes\): x1 within 40 units [01]\.\d\d, y1 within 40 [01]\.\d\d", out)


def test_token_probe_script_reads_the_shipped_checkpoints_tokens():
    out = _script("docs/experiments/token_probe.py", "checkpoints/dsvl2-mini", "--train", "60", "--test", "20")
    assert re.search(r"adaptor tokens, \d+ held-out objects \(\d+ to fit\): x1 within 40 units [01]\.\d\d \(R\^2 -?\d+\.\d\d\), "
                     r"y1 within 40 [01]\.\d\d \(R\^2 -?\d+\.\d\d\); colour [01]\.\d\d, shape [01]\.\d\d$", out.strip())
    out = _script("docs/experiments/token_probe.py", "checkpoints/dsvl2-mini", "--train", "60", "--test", "20",
                  "--tokens", "tower")
    assert out.startswith("tower tokens, ")
    out = _script("docs/experiments/token_probe.py", "checkpoints/dsvl2-mini", "--train", "60", "--test", "20",
                  "--camera", "wrist")
    assert out.startswith("wrist camera, adaptor tokens, ")
