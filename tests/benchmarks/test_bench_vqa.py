"""`vla bench vqa`: the per-cell pixel shares its oracle image tokens are built from, and its `rows=` filter."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from benchmarks.vqa import pixel_shares
from envs.scene import COLOURS, SHAPES
from envs.scene_language import generate_scene_language, load_conversations


def test_pixel_shares_put_each_object_where_it_is_drawn(tmp_path):
    path = generate_scene_language(tmp_path, "sft", 4, seed=3, image_size=64, env_ids=["vla/PointNav-v0"])
    for record in load_conversations(path):
        objects = record.meta["objects"]
        shares = pixel_shares(str(record.images[0]), objects, cells=4)
        assert shares.shape == (16, len(COLOURS) + len(SHAPES))
        for obj in objects:
            colour = list(COLOURS).index(obj["colour"])
            shape = len(COLOURS) + SHAPES.index(obj["shape"])
            owned = [o for o in objects if o["colour"] == obj["colour"]]
            assert np.isclose(shares[:, colour].sum(), len(owned), atol=1e-5)  # each object's pixels sum to 1
            assert shares[:, shape].sum() >= 1 - 1e-5
            cx, cy = obj["center"]
            assert shares[min(int(cy // 16), 3) * 4 + min(int(cx // 16), 3), colour] > 0  # its centre cell holds it


def test_rows_filter_runs_only_the_named_settings_and_rejects_unknown_ones():
    from benchmarks.vqa import run

    with pytest.raises(SystemExit, match="unknown rows"):
        run(OmegaConf.create({"quick": True, "rows": ["no such row"]}))
    wanted = ["every kind, oracle", "every kind, oracle, q first"]
    result = run(OmegaConf.create({"quick": True, "steps": 2, "rows": wanted}))
    assert [r["setting"] for r in result["results"]] == wanted
    image_first, question_first = result["results"]
    assert [image_first["question_first"], question_first["question_first"]] == [False, True]
    for row in result["results"]:
        assert row["oracle_tokens"] and set(row["kinds"]) >= {"extreme", "left_of", "exists"}
        n = row["test_questions"]
        assert n > 0
        for key in ("accuracy", "blind_accuracy"):  # a share of the n test questions (rounded to 3 decimals)
            assert 0.0 <= row[key] <= 1.0 and row[key] == pytest.approx(round(row[key] * n) / n, abs=5e-4), key


def test_tower_option_starts_from_a_stage_vision_tower(tmp_path):
    """`tower=CKPT` builds the row's model with that checkpoint's SigLIP tower (its size), frozen with freeze_tower;
    the oracle rows, which have no tower, are left out."""
    import torch

    import benchmarks.vqa as bench
    from backbone.deepseek_vl2 import load_deepseek_vl2
    from vla.config import load_config
    from vla.train import run as train

    vision = train(load_config("train", ["stage=vision", f"out={tmp_path / 'vision'}", "stage.steps=1",
                                         "stage.data.generate=8", "micro_batch=4", "checkpoint.every=0",
                                         "log.progress=false", "log.tensorboard=false", "log.plot=false",
                                         "model.vision={width: 48, heads: 2, mlp_dim: 96}",
                                         "stage.data.text_width=32", "stage.data.embed_dim=32"]))
    pretrained = load_deepseek_vl2(vision["checkpoint"]).vision_encoder.vision.state_dict()
    seen = []
    real = bench._train_and_score

    def spy(*args, **kwargs):
        seen.append((kwargs["tower"], kwargs["freeze_tower"]))
        return real(*args, **kwargs)

    built = []
    import backbone.deepseek_vl2 as bdv

    original = bdv.build_deepseek_vl2

    def capture(config, *a, **k):
        model = original(config, *a, **k)
        built.append(model)
        return model

    bench._train_and_score = spy
    bdv.build_deepseek_vl2 = capture
    try:
        result = bench.run(OmegaConf.create({"quick": True, "steps": 2, "tower": vision["checkpoint"],
                                             "freeze_tower": True,
                                             "rows": ["2-4 objects: binding", "binding, oracle tokens"]}))
    finally:
        bench._train_and_score, bdv.build_deepseek_vl2 = real, original
    assert [r["setting"] for r in result["results"]] == ["2-4 objects: binding"] and result["freeze_tower"]
    assert seen == [(vision["checkpoint"], True)]
    tower = built[-1].vision_encoder.vision
    assert tower.config.hidden_size == 48
    for name, value in tower.state_dict().items():  # frozen: still the pretrained weights after training
        assert torch.equal(value, pretrained[name]), name


def test_language_option_changes_the_rows_language_model(monkeypatch):
    """`language={...}` overrides the demo's language model in every row (a capacity probe) and is reported."""
    import backbone.deepseek_vl2 as bdv
    import benchmarks.vqa as bench

    built, original = [], bdv.build_deepseek_vl2

    def capture(config, *a, **k):
        built.append(original(config, *a, **k))
        return built[-1]

    monkeypatch.setattr(bdv, "build_deepseek_vl2", capture)
    result = bench.run(OmegaConf.create({"quick": True, "steps": 1, "rows": ["every kind, oracle"],
                                         "language": {"kv_lora_rank": 16, "num_hidden_layers": 2}}))
    language = built[-1].config.language
    assert (language.kv_lora_rank, language.num_hidden_layers) == (16, 2)
    assert result["language"]["kv_lora_rank"] == 16 and result["language"]["hidden_size"] == language.hidden_size


def test_adaptor_option_starts_from_the_towers_folders_adaptor(tmp_path, monkeypatch, capsys):
    """`adaptor=true` takes the tower folder's adaptor too (after one AdamW step at lr 1e-3 each weight is within
    ~1e-3 of it; a fresh adaptor differs by far more); without `tower=` it is refused."""
    import torch

    import backbone.deepseek_vl2 as bdv
    import benchmarks.vqa as bench
    from backbone.deepseek_vl2 import load_deepseek_vl2
    from vla.config import load_config
    from vla.train import run as train

    with pytest.raises(SystemExit, match="give tower="):
        bench.run(OmegaConf.create({"quick": True, "adaptor": True}))
    vision = train(load_config("train", ["stage=vision", f"out={tmp_path / 'vision'}", "stage.steps=2",
                                         "stage.data.generate=8", "micro_batch=4", "checkpoint.every=0",
                                         "log.progress=false", "log.tensorboard=false", "log.plot=false",
                                         "stage.data.contrastive_weight=0", "stage.data.adaptor_weight=1",
                                         "model.language={hidden_size: 128}"]))  # the demo's width, which the bench uses
    saved = load_deepseek_vl2(vision["checkpoint"]).vision_encoder.projector.state_dict()
    built, original = [], bdv.build_deepseek_vl2

    def capture(config, *a, **k):
        built.append(original(config, *a, **k))
        return built[-1]

    monkeypatch.setattr(bdv, "build_deepseek_vl2", capture)
    result = bench.run(OmegaConf.create({"quick": True, "steps": 1, "tower": vision["checkpoint"], "adaptor": True,
                                         "rows": ["2-4 objects: binding"]}))
    assert result["adaptor"]
    used = built[-1].vision_encoder.projector.state_dict()
    assert max(float((used[k] - saved[k]).abs().max()) for k in saved) < 5e-3
    bench.run(OmegaConf.create({"quick": True, "steps": 1, "tower": vision["checkpoint"], "adaptor": True,
                                "freeze_adaptor": True, "rows": ["2-4 objects: binding"]}))
    used = built[-1].vision_encoder.projector.state_dict()
    assert all(torch.equal(used[k], saved[k]) for k in saved)  # frozen: exactly the folder's
    assert f"tower: {vision['checkpoint']}, and its adaptor (frozen)" in capsys.readouterr().out


def test_tower_shares_row_reads_the_towers_share_head_and_needs_one(tmp_path):
    """The 'binding, tower shares' row builds its image tokens from the tower folder's share head (the tower frozen);
    it is left out without `tower=` and refused for a folder without a share head."""
    import benchmarks.vqa as bench
    from vla.config import load_config
    from vla.train import run as train

    def vision(out, *extra):
        return train(load_config("train", ["stage=vision", f"out={out}", "stage.steps=1", "stage.data.generate=8",
                                           "micro_batch=4", "checkpoint.every=0", "log.progress=false",
                                           "log.tensorboard=false", "log.plot=false", "stage.data.contrastive_weight=0",
                                           *extra]))["checkpoint"]

    row = ["binding, tower shares"]
    assert bench.run(OmegaConf.create({"quick": True, "steps": 1, "rows": row}))["results"] == []
    with pytest.raises(SystemExit, match="no share head"):
        bench.run(OmegaConf.create({"quick": True, "steps": 1, "rows": row,
                                    "tower": vision(tmp_path / "dense", "stage.data.dense_weight=1")}))
    result = bench.run(OmegaConf.create({"quick": True, "steps": 1, "rows": row,
                                         "tower": vision(tmp_path / "share", "stage.data.share_weight=1")}))
    assert [(r["setting"], r["tower_shares"]) for r in result["results"]] == [("binding, tower shares", True)]


def test_grounding_rows_ask_for_every_object_and_score_the_box_by_iou(tmp_path):
    """The grounding rows ask one "Locate ..." per object; an answer is right by its box (IoU >= 0.5), so a box off
    by a few units still counts and a far one does not, and the decoded tokens of the true answer score right."""
    from backbone.tokenizer import build_bpe_tokenizer
    from benchmarks.vqa import _questions, _right

    path = generate_scene_language(tmp_path, "sft", 3, seed=5, image_size=64, env_ids=["vla/PointNav-v0"])
    records = load_conversations(path)
    items = _questions(records, ("grounding",), seed=0)
    assert len(items) == sum(len(r.meta["objects"]) for r in records) and {i[3] for i in items} == {"grounding"}
    _, question, answer, _ = items[0]
    assert question.startswith("Locate <|ref|>") and "<|det|>[[" in answer
    x1, y1, x2, y2 = (int(v) for v in answer.split("[[")[1].split("]]")[0].split(","))
    near = answer.replace(f"[[{x1},", f"[[{x1 + 5},")
    far = answer.replace(f"[[{x1},{y1},{x2},{y2}]]", f"[[{(x1 + 500) % 900},{y1},{(x1 + 500) % 900 + x2 - x1},{y2}]]")
    assert _right(near, answer, "grounding") and not _right(far, answer, "grounding")
    tokenizer = build_bpe_tokenizer([answer], vocab_size=300)
    spelled = tokenizer.decode(tokenizer.encode(answer) + [tokenizer.eos_id])  # as the argmax tokens are decoded
    assert _right(spelled, answer, "grounding")
    assert _right("blue", "blue", "colour_of_shape") and not _right("red", "blue", "colour_of_shape")
