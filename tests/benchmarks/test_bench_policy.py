"""`vla bench policy`: its "forward passes" column counts the language model's real forward passes."""

from __future__ import annotations

import pytest
import torch

from benchmarks.policy import DEMO_BACKBONE, GROUNDED, _measure, _policy, count_forward_passes


pytestmark = pytest.mark.usefixtures("one_thread")


def test_forward_passes_are_counted():
    policy = _policy("test", DEMO_BACKBONE, 3, torch.float32)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with torch.no_grad():
        assert count_forward_passes(policy, lambda: [policy.backbone.language(ids) for _ in range(5)]) == 5
        assert count_forward_passes(policy, lambda: None) == 0
    # the hook is gone afterwards
    assert not policy.backbone.language._forward_pre_hooks


def test_bench_rows_report_the_counted_passes(monkeypatch):
    rows = _measure("demo", "test", DEMO_BACKBONE, 32, 3, 1, torch.float32, grounded=True)
    passes = {decoding: n for _, decoding, n, _, _ in rows}
    # parallel: one pass; autoregressive over 3 x 2 action tokens: the prefill (the first token), one per further
    # token, the offset pass; grounding first: the prefill, one per further answer token (at most 48), the action pass
    grounded = passes.pop(GROUNDED)
    assert passes == {"parallel": 1, "autoregressive": 1 + 5 + 1}
    assert 2 <= grounded <= 1 + 47 + 1
    # a count, not a formula: a policy that decodes twice per chunk shows twice the passes
    import vla.policy

    predict = vla.policy.VLAPolicy.predict_action_chunk

    def twice(self, batch):
        predict(self, batch)
        return predict(self, batch)

    monkeypatch.setattr(vla.policy.VLAPolicy, "predict_action_chunk", twice)
    rows = _measure("demo", "test", DEMO_BACKBONE, 32, 3, 1, torch.float32)
    assert {decoding: n for _, decoding, n, _, _ in rows} == {"parallel": 2, "autoregressive": 14}
