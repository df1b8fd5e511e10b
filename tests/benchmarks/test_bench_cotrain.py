"""`vla bench cotrain --quick`: the vla stage twice from one start, with and without scene-VQA co-training; the JSON
line the issue names, rates that are counts over the episodes / questions, and a clear error for a bad start."""

from __future__ import annotations

import json

import pytest

from vla.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cotrain_quick_runs_both_and_reports(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "cotrain", "--quick"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    for key in ("vqa_with", "vqa_without", "grounding_with", "grounding_without", "start_vqa", "start_grounding"):
        assert 0.0 <= result[key] <= 1.0, key
    assert set(result["success_with"]) == set(result["success_without"]) == {"nav", "arm"}
    assert result["steps"] >= 1 and result["vqa_ratio"] > 0
    assert result["start"].endswith("checkpoints/dsvl2-mini")  # the demo's start: the shipped checkpoint
    assert any(line.startswith("vla with co-training") or "vla with co-training" in line for line in out)
    assert (tmp_path / "outputs" / "bench" / "cotrain_quick" / "train" / "vla-without").is_dir()


def test_cotrain_refuses_a_start_that_is_not_a_checkpoint(tmp_path, capsys):
    assert main(["bench", "cotrain", "--quick", f"start={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tmp_path) in err
