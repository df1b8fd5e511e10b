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
