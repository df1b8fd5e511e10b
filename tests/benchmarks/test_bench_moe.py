"""`vla bench moe` checks that our MoE layer and transformers' compute the same function before it times them, and
fails (SystemExit, non-zero exit) when they do not."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")  # every test here builds transformers' DeepseekV2 MoE layer

import benchmarks.moe as moe
from vla.cli import main


pytestmark = pytest.mark.usefixtures("one_thread")


def test_identical_weights_agree_within_the_tolerance():
    ours, hf, cfg = moe.build_pair(0)
    x, g = torch.randn(1, 64, cfg.hidden_size), torch.randn(1, 64, cfg.hidden_size)
    diffs = moe.parity(ours, hf, x, g)
    assert set(diffs) == {"eager", "grouped_mm"} and max(diffs.values()) < 1e-6
    assert moe.check_parity(diffs, 1e-5) == max(diffs.values())


def test_bench_fails_when_the_layers_differ(monkeypatch, capsys):
    build = moe.build_pair

    def mismatched(seed: int = 0):
        ours, hf, cfg = build(seed)
        with torch.no_grad():
            hf.shared_experts.down_proj.weight.add_(1e-3)  # a small difference in one matrix
        return ours, hf, cfg

    monkeypatch.setattr(moe, "build_pair", mismatched)
    with pytest.raises(SystemExit) as failure:
        main(["bench", "moe", "quick=true"])
    message = str(failure.value.code)
    assert failure.value.code not in (0, None)  # a string code: printed, exit status 1
    assert message.startswith("vla bench moe: ours and transformers' MoE layer differ by") and "> tolerance 1e-05" in message
    assert "tokens/s" not in capsys.readouterr().out  # failed before timing anything
    # the check compares against the tolerance: over fails (NaN too), at or under passes
    with pytest.raises(SystemExit, match="tolerance 1e\\+00"):
        moe.check_parity({"eager": 2.0, "grouped_mm": 0.5}, 1.0)
    assert moe.check_parity({"eager": 0.5, "grouped_mm": 0.5}, 1.0) == 0.5
    with pytest.raises(SystemExit):
        moe.check_parity({"eager": float("nan"), "grouped_mm": 0.0}, 1.0)
