"""`vla bench train --quick compile=false`: a row per stage and the eager repeat, the JSON keys, and two eager runs of
the vla stage from the same seed give the same losses on one CPU (the floor the compiled row is read against)."""

import pytest
from omegaconf import OmegaConf

pytestmark = pytest.mark.usefixtures("one_thread")  # the benchmark sets one torch thread; the fixture restores it


def test_bench_train_quick_rows_and_the_eager_floor(capsys):
    from benchmarks.train import run

    cfg = OmegaConf.create({"name": "train", "quick": True, "threads": 0, "seed": 0, "steps": 0, "compile": False,
                            "device": "cpu", "precision": "auto", "compile_mode": None})
    out = run(cfg)
    assert set(out["stages"]) == {"align", "pretrain", "sft", "vla", "vla_repeat"}
    assert out["device"] == "cpu" and out["micro_batch"] == 4 and out["vla_steps"] == 3
    assert out["eager_repeat_max_loss_diff"] == 0.0
    assert "compiled_speedup" not in out
    vla = out["stages"]["vla"]
    assert vla["trainable_params"] == vla["params"] > out["stages"]["align"]["trainable_params"]
    assert abs(vla["samples_per_s"] * vla["s_per_step"] - 4) < 0.2  # micro-batch 4 per step (both rounded)
    printed = capsys.readouterr().out
    assert "vla repeat" in printed and "eager run twice" in printed
    assert vla["graphs_compiled_in_timed_steps"] == 0


def test_graphs_compiled_counts_what_torch_compile_makes():
    """The count behind `graphs_compiled_in_timed_steps` (a compiled row whose timed steps compiled is not timed):
    one new graph per new specialization, none on a repeated call."""
    import torch

    from benchmarks.train import _graphs_compiled

    f = torch.compile(lambda x: x * 2 + 1, backend="eager", dynamic=False)
    before = _graphs_compiled()
    f(torch.ones(3))
    f(torch.ones(3))
    assert _graphs_compiled() - before == 1
    f(torch.ones(5))  # a new shape: a new graph
    assert _graphs_compiled() - before == 2


def test_bench_train_vla_rows_only_with_data_workers():
    from benchmarks.train import run

    cfg = OmegaConf.create({"name": "train", "quick": True, "seed": 0, "compile": False, "device": "cpu",
                            "rows": ["vla"], "data_workers": 1})
    out = run(cfg)
    assert set(out["stages"]) == {"vla", "vla_repeat"} and out["data_workers"] == 1
    assert out["eager_repeat_max_loss_diff"] == 0.0  # batches drawn by a worker: the same ones, run after run
    with pytest.raises(ValueError, match=r"rows=\['sfft'\]: the stages are"):
        run(OmegaConf.create({"name": "train", "quick": True, "compile": False, "rows": ["sfft"]}))


def test_vla_stage_losses_with_data_workers_equal_those_without(tmp_path):
    """The vla stage's batches (robot mixture from LeRobot datasets + scene conversations) drawn by two worker
    processes: the same losses, step for step, as drawn in the step."""
    from benchmarks.train import bench_stage, demo_model

    language, vision, _ = demo_model()
    losses = [bench_stage("vla", tmp_path / f"w{w}", 4, 3, 1, 0, dict(language), dict(vision), data_workers=w)["losses"]
              for w in (0, 2)]
    assert losses[0] == losses[1]
