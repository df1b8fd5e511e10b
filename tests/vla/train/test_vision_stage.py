"""Stage vision (vla/train/vision_stage.py): SigLIP's sigmoid contrastive loss on scene captions with hard negatives; its
checkpoint is an official-format DeepSeek-VL2 folder that the next stage starts from, and it resumes exactly."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from helpers import REPO
from vla.config import load_config


pytestmark = pytest.mark.usefixtures("one_thread")


def test_hard_negatives_change_only_what_goes_with_what(tmp_path):
    from envs.scene import COLOURS, SHAPES
    from envs.scene_language import (caption, generate_scene_language, hard_negative_captions, load_conversations,
                                     record_truth)

    words = set(COLOURS) | set(SHAPES)
    path = generate_scene_language(tmp_path, "align", 12, seed=1, image_size=64, env_kwargs={"num_objects": [2, 4]})
    for record in load_conversations(path):
        truth = record_truth(record.meta)
        positive = caption(truth)
        assert positive == record.answers[0]  # the record's own caption, rebuilt from its meta
        negatives = hard_negative_captions(truth, np.random.default_rng(0), 3)
        assert len(set(negatives)) == 3 and positive not in negatives
        skeleton = lambda text: re.sub("|".join(sorted(words)), "_", text)  # noqa: E731
        for negative in negatives:
            assert skeleton(negative) == skeleton(positive)  # same count, positions, robot: only colours / shapes
            changed = [(a, b) for a, b in zip(positive.split(), negative.split()) if a != b]
            assert 1 <= len(changed) <= 2 and all(a.strip(",.") in words for a, _ in changed)


def _vision(out, steps, *extra):
    from vla.train import run

    return run(load_config("train", ["stage=vision", f"out={out}", f"stage.steps={steps}", "stage.data.generate=24",
                                     "micro_batch=6", "checkpoint.every=2", "log.progress=false", "log.tensorboard=false",
                                     "log.plot=false", "stage.optim.lr=3e-3", "stage.schedule.warmup_steps=0",
                                     "stage.data.text_width=32", "stage.data.embed_dim=32", *extra]))


def test_vision_stage_trains_the_tower_and_align_starts_from_it(tmp_path):
    from backbone.deepseek_vl2 import load_deepseek_vl2
    from vla.train import run

    summary = _vision(tmp_path / "vision", 4)
    losses = summary["losses"]
    assert all(np.isfinite(v) for v in losses.values()) and losses[4] < losses[1]
    header = (tmp_path / "vision" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"binding_acc", "retrieval_acc"} <= set(header)
    trained = load_deepseek_vl2(summary["checkpoint"])
    init = load_deepseek_vl2(summary["checkpoint"])  # the same folder read twice is the same model ...
    tower = lambda m: torch.cat([p.flatten() for p in m.vision_encoder.vision.parameters()])  # noqa: E731
    assert torch.equal(tower(trained), tower(init))
    from vla.train.stages import StageContext, build_vl2_backbone  # ... and differs from a fresh random init
    fresh, _ = build_vl2_backbone(StageContext(name="vision", out_dir=tmp_path, seed=0))
    assert not torch.allclose(tower(trained), tower(fresh))
    align = run(load_config("train", ["stage=align", f"out={tmp_path / 'align'}", f"init_from={summary['checkpoint']}",
                                      "stage.steps=1", "stage.data.generate=4", "micro_batch=2", "checkpoint.every=0",
                                      "log.progress=false", "log.tensorboard=false", "log.plot=false"]))
    assert np.isfinite(align["final_loss"])


def test_vision_stage_resumes_on_the_same_trajectory(tmp_path):
    """A run that "died" after its step-2 checkpoint (a copy without the later ones) resumes on the same losses."""
    import shutil

    from helpers import drop_after

    full = _vision(tmp_path / "full", 4)["losses"]
    shutil.copytree(tmp_path / "full", tmp_path / "part")
    drop_after(tmp_path / "part", 2)
    resumed = _vision(tmp_path / "part", 4, "resume=true")["losses"]
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(full[step], abs=1e-5)


def test_pixel_labels_name_the_object_drawn_at_each_pixel():
    from envs.scene import COLOURS, SHAPES
    from vla.train.vision_stage import pixel_labels

    image = np.full((16, 16, 3), 185, dtype=np.uint8)  # the scene's grey floor
    image[2:5, 2:6] = COLOURS["red"]  # a red square, its box [2, 2, 6, 5]
    image[10, 10] = COLOURS["blue"]  # one blue pixel of a triangle, inside its box [9, 9, 13, 13]
    image[12, 12] = COLOURS["red"]  # red inside the triangle's box: not the triangle's colour, not labelled
    labels = pixel_labels(image, [{"colour": "red", "shape": "square", "bbox": [2, 2, 6, 5]},
                                  {"colour": "blue", "shape": "triangle", "bbox": [9, 9, 13, 13]}])
    assert labels.shape == (16, 16, 2)
    red = [list(COLOURS).index("red") + 1, SHAPES.index("square") + 1]
    assert labels[2:5, 2:6].reshape(-1, 2).tolist() == [red] * 12
    assert labels[10, 10].tolist() == [list(COLOURS).index("blue") + 1, SHAPES.index("triangle") + 1]
    assert labels[12, 12].tolist() == [0, 0] and int((labels[..., 0] > 0).sum()) == 13


def test_vision_stage_with_dense_labels_trains_both_terms_and_reloads(tmp_path):
    import subprocess
    import sys

    summary = _vision(tmp_path / "vision", 3, "stage.data.dense_weight=0.5")
    header = (tmp_path / "vision" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss/loss", "loss/dense", "dense_acc"} <= set(header)
    out = subprocess.run([sys.executable, "docs/experiments/vision_heldout.py", summary["checkpoint"], "--scenes", "32"],
                         capture_output=True, text=True, cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"per-pixel colour\+shape on object pixels 0\.\d{3}", out.stdout)


def test_pixel_boxes_give_each_object_pixel_its_objects_box_in_patch_units():
    from envs.scene import COLOURS
    from vla.train.vision_stage import pixel_boxes, pixel_labels

    image = np.full((16, 16, 3), 185, dtype=np.uint8)
    image[2:5, 2:6] = COLOURS["red"]
    image[9:13, 9:13] = COLOURS["blue"]
    objects = [{"colour": "red", "shape": "square", "bbox": [2, 2, 6, 5]},
               {"colour": "blue", "shape": "triangle", "bbox": [9, 9, 13, 13]}]
    boxes = pixel_boxes(pixel_labels(image, objects), objects, (16, 16), grid=4)  # 4 patches of 4 px across
    assert boxes.shape == (16, 16, 4)
    assert boxes[3, 3].tolist() == [0.5, 0.5, 1.5, 1.25] and boxes[10, 10].tolist() == [2.25, 2.25, 3.25, 3.25]
    assert boxes[0, 0].tolist() == [0, 0, 0, 0]


def test_vision_stage_without_captions_builds_no_text_tower_and_learns_boxes(tmp_path):
    from safetensors.torch import load_file

    from vla.train.vision_stage import HEADS_FILE

    summary = _vision(tmp_path / "vision", 3, "stage.data.dense_weight=1", "stage.data.box_weight=1",
                      "stage.data.contrastive_weight=0")
    header = (tmp_path / "vision" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss/dense", "loss/box", "box_iou50"} <= set(header) and "loss/loss" not in header
    assert "binding_acc" not in header
    heads = load_file(os.path.join(summary["checkpoint"], HEADS_FILE))
    assert {k.split(".")[0] for k in heads} == {"dense", "box"}  # no text tower, pooling head, t or b
    resumed = _vision(tmp_path / "vision", 4, "stage.data.dense_weight=1", "stage.data.box_weight=1",
                      "stage.data.contrastive_weight=0", "resume=true")
    assert sorted(resumed["losses"]) == [4]


def test_vision_stage_with_nothing_to_learn_is_refused(tmp_path):
    from vla.train.stages import StageTaskError

    with pytest.raises(StageTaskError, match="nothing to learn"):
        _vision(tmp_path / "vision", 1, "stage.data.contrastive_weight=0")


def test_patch_shares_give_each_patch_the_share_of_each_objects_kind():
    from envs.scene import COLOURS, SHAPES
    from vla.train.vision_stage import patch_shares, pixel_labels

    image = np.full((8, 8, 3), 185, dtype=np.uint8)
    image[0:2, 0:4] = COLOURS["red"]  # 8 red-square pixels in the top-left 4x4 patch
    image[6:8, 4:8] = COLOURS["blue"]  # 8 blue-triangle pixels in the bottom-right one
    image[4, 0] = COLOURS["blue"]  # outside the triangle's box: not labelled
    objects = [{"colour": "red", "shape": "square", "bbox": [0, 0, 4, 2]},
               {"colour": "blue", "shape": "triangle", "bbox": [4, 6, 8, 8]}]
    shares = patch_shares(pixel_labels(image, objects)[None], patch_size=4)
    assert shares.shape == (1, 4, 1 + len(COLOURS) * len(SHAPES))
    torch.testing.assert_close(shares.sum(-1), torch.ones(1, 4))
    red_square = 1 + list(COLOURS).index("red") * len(SHAPES) + SHAPES.index("square")
    blue_triangle = 1 + list(COLOURS).index("blue") * len(SHAPES) + SHAPES.index("triangle")
    assert shares[0, 0, red_square] == 0.5 and shares[0, 0, 0] == 0.5
    assert shares[0, 3, blue_triangle] == 0.5 and shares[0, 3, red_square] == 0
    assert shares[0, 1, 0] == 1 and shares[0, 2, 0] == 1  # no object (the stray blue pixel is floor)


def test_vision_stage_with_object_shares_alone_trains_only_that_head(tmp_path):
    from safetensors.torch import load_file

    from vla.train.vision_stage import HEADS_FILE

    summary = _vision(tmp_path / "vision", 2, "stage.data.share_weight=1", "stage.data.contrastive_weight=0")
    header = (tmp_path / "vision" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss/share", "share_acc"} <= set(header) and not {"loss/dense", "loss/box", "loss/loss"} & set(header)
    assert {k.split(".")[0] for k in load_file(os.path.join(summary["checkpoint"], HEADS_FILE))} == {"share"}


def test_cell_codes_average_the_code_of_the_objects_drawn_in_each_cell():
    from envs.scene import COLOURS, SHAPES
    from vla.train.vision_stage import cell_codes, pixel_boxes, pixel_labels

    image = np.full((8, 8, 3), 185, dtype=np.uint8)
    image[0:4, 0:2] = COLOURS["red"]  # 8 of the top-left cell's 16 pixels: a red square
    objects = [{"colour": "red", "shape": "square", "bbox": [0, 0, 2, 4]}]
    labels = pixel_labels(image, objects)
    boxes = pixel_boxes(labels, objects, (8, 8), grid=4)  # patches of 2 px: 4 across
    code = torch.eye(len(COLOURS) * len(SHAPES) + 4)
    codes = cell_codes(labels[None], boxes[None], code, cell=4, grid=4)
    assert codes.shape == (1, 4, code.shape[1])
    expected = torch.zeros(code.shape[1])
    expected[list(COLOURS).index("red") * len(SHAPES) + SHAPES.index("square")] = 0.5  # its kind, half the cell
    expected[-4:] = 0.5 * torch.tensor([0, 0, 2 / 8, 4 / 8])  # its box in frame units, times its share of the cell
    torch.testing.assert_close(codes[0, 0], expected)
    assert codes[0, 1:].abs().sum() == 0
    # with 3 bins per coordinate (at 0, 0.5, 1): x1 = y1 = 0 on the first bin, x2 = 1/4 halfway between the first two,
    # y2 = 1/2 on the middle one; halved, times the share of the cell
    binned = torch.eye(len(COLOURS) * len(SHAPES) + 4 * 3)
    codes = cell_codes(labels[None], boxes[None], binned, cell=4, grid=4, box_bins=3)
    expected = torch.zeros(binned.shape[1])
    expected[list(COLOURS).index("red") * len(SHAPES) + SHAPES.index("square")] = 0.5
    expected[-12:] = 0.5 * 0.5 * torch.tensor([1, 0, 0, 1, 0, 0, 0.5, 0.5, 0, 0, 1, 0])
    torch.testing.assert_close(codes[0, 0], expected)


def test_vision_stage_with_the_adaptor_target_trains_and_saves_the_adaptor(tmp_path):
    from backbone.deepseek_vl2 import load_deepseek_vl2

    summary = _vision(tmp_path / "vision", 2, "stage.data.adaptor_weight=1", "stage.data.box_bins=4",
                      "stage.data.contrastive_weight=0")
    header = (tmp_path / "vision" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss/adaptor", "adaptor_r2"} <= set(header) and "loss/dense" not in header
    # the same seed without the target: the same backbone init, and the adaptor is saved as initialised
    initial = _vision(tmp_path / "untrained", 1, "stage.data.dense_weight=1", "stage.data.contrastive_weight=0")
    trained = load_deepseek_vl2(summary["checkpoint"]).vision_encoder.projector.state_dict()
    untouched = load_deepseek_vl2(initial["checkpoint"]).vision_encoder.projector.state_dict()
    assert any(not torch.equal(trained[k], untouched[k]) for k in trained)  # the saved folder holds the trained adaptor


def test_code_scale_sets_the_norm_of_the_adaptor_code():
    from backbone.deepseek_vl2 import build_deepseek_vl2
    from vla.train.stages import StageTaskError
    from vla.train.vision_stage import ContrastiveTowers, VisionDataConfig

    encoder = build_deepseek_vl2("test").vision_encoder
    towers = {s: ContrastiveTowers(encoder.vision, 16, 0, VisionDataConfig(contrastive_weight=0, adaptor_weight=1,
                                                                            box_bins=4, code_scale=s),
                                   encoder.projector, encoder.center_tokens) for s in (1.0, 4.0)}
    torch.testing.assert_close(towers[4.0].object_code, 4 * towers[1.0].object_code)
    torch.testing.assert_close(towers[4.0].object_code.norm(dim=-1), torch.full((towers[4.0].object_code.shape[0],), 4.0))
    with pytest.raises(StageTaskError, match="code_scale is 0"):
        ContrastiveTowers(encoder.vision, 16, 0, VisionDataConfig(contrastive_weight=0, adaptor_weight=1, code_scale=0),
                          encoder.projector, encoder.center_tokens)


def test_code_pool_object_gives_a_cell_its_objects_whole_code():
    from backbone.deepseek_vl2 import build_deepseek_vl2
    from envs.scene import COLOURS, SHAPES
    from vla.train.stages import StageTaskError
    from vla.train.vision_stage import ContrastiveTowers, VisionDataConfig, cell_codes

    # one 8x8 frame of 4x4-px cells; one object of kind 1 over 4 pixels of cell 0 (a quarter of it) and 12 of cell 1
    labels_BHW2 = torch.zeros(1, 8, 8, 2, dtype=torch.long)
    labels_BHW2[0, 0:4, 3:7] = torch.tensor([1, 1])
    boxes_BHW4 = torch.zeros(1, 8, 8, 4)
    boxes_BHW4[0, 0:4, 3:7] = torch.tensor([0.75, 0.0, 1.75, 1.0])  # patch units over a grid of 2 patches
    kinds = len(COLOURS) * len(SHAPES)
    eye_KK = torch.eye(kinds + 4)
    share = cell_codes(labels_BHW2, boxes_BHW4, eye_KK, 4, 2.0)[0]  # (cells, facts): the code is the facts
    whole = cell_codes(labels_BHW2, boxes_BHW4, eye_KK, 4, 2.0, code_pool="object")[0]
    box = torch.tensor([0.375, 0.0, 0.875, 0.5])  # frame units
    torch.testing.assert_close(share[0, kinds:], box * 4 / 16)
    torch.testing.assert_close(share[1, kinds:], box * 12 / 16)
    torch.testing.assert_close(share[0, :kinds], torch.eye(kinds)[0] * 4 / 16)
    for cell in (0, 1):  # kind and box whole in both cells
        torch.testing.assert_close(whole[cell, :kinds], torch.eye(kinds)[0])
        torch.testing.assert_close(whole[cell, kinds:], box)
    torch.testing.assert_close(whole[2:], torch.zeros_like(whole[2:]))  # cells without an object stay empty
    encoder = build_deepseek_vl2("test").vision_encoder
    with pytest.raises(StageTaskError, match="code_pool is 'max'"):
        ContrastiveTowers(encoder.vision, 16, 0, VisionDataConfig(contrastive_weight=0, adaptor_weight=1, code_pool="max"),
                          encoder.projector, encoder.center_tokens)


def test_center_image_tokens_overrides_the_preset(tmp_path):
    from backbone.deepseek_vl2 import save_deepseek_vl2
    from vla.train.stages import StageContext, StageTaskError, build_vl2_backbone

    for value, expected in ((None, True), (False, False)):  # the test preset centres
        ctx = StageContext(name="vision", out_dir=tmp_path, seed=0, model_center_image_tokens=value)
        model, _ = build_vl2_backbone(ctx)
        assert model.config.center_image_tokens is expected and model.vision_encoder.center_tokens is expected
    save_deepseek_vl2(model, tmp_path / "made")  # made without centring
    ctx = StageContext(name="sft", out_dir=tmp_path, seed=0, init_from=str(tmp_path / "made"),
                       model_center_image_tokens=True)
    with pytest.raises(StageTaskError, match="was made with False"):
        build_vl2_backbone(ctx)
