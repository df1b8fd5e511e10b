"""VLAPolicy.select_action: the plain chunk queue (n_action_steps) and ACT temporal ensembling, checked against hand
computations with `predict_action_chunk` replaced by known chunks."""

import math

import pytest
import torch

from heads.embodiment import Embodiment
from helpers import tiny_policy

CAM = "observation.images.top"
H = {"point2d": 4, "arm3": 3}  # chunk lengths
A = {"point2d": 2, "arm3": 3}  # action sizes


def make_policy(**cfg):
    return tiny_policy([Embodiment("point2d", action_dim=2, state_dim=2, cameras=(CAM,), fps=10, chunk_len=H["point2d"]),
                        Embodiment("arm3", action_dim=3, state_dim=5, cameras=(CAM,), fps=20, chunk_len=H["arm3"])], **cfg)


def chunk_value(call: int, b: int, h: int, a: int) -> float:
    """The known action the `call`-th predicted chunk holds for sample b at step h, dimension a."""
    return 100.0 * call + 10.0 * h + a + 1000.0 * b


class KnownChunks:
    """Stands in for predict_action_chunk: call k returns chunk_value(k, ...) in each robot's own H x A block (zeros
    beyond, as the real one pads to the batch's largest H and A)."""

    def __init__(self, embodiments: list[str]):
        self.embodiments, self.calls = embodiments, 0

    def __call__(self, batch):
        Hm, Am = max(H[e] for e in self.embodiments), max(A[e] for e in self.embodiments)
        chunk = torch.zeros(len(self.embodiments), Hm, Am)
        for b, e in enumerate(self.embodiments):
            for h in range(H[e]):
                for a in range(A[e]):
                    chunk[b, h, a] = chunk_value(self.calls, b, h, a)
        self.calls += 1
        return chunk


def batch_of(embodiments: list[str]) -> dict:
    return {"observation.state": torch.zeros(len(embodiments), 5), "embodiment": list(embodiments)}


def run(policy, embodiments: list[str], steps: int, monkeypatch) -> tuple[list[torch.Tensor], KnownChunks]:
    known = KnownChunks(embodiments)
    monkeypatch.setattr(policy, "predict_action_chunk", known)
    policy.reset()
    return [policy.select_action(batch_of(embodiments)) for _ in range(steps)], known


def ensembled_by_hand(t: int, b: int, a: int, horizon: int, coeff: float) -> float:
    """ACT: at step t every chunk predicted at s in (t - horizon, t] holds an action for t (its step t - s); weights
    exp(-coeff * i) with i = 0 for the oldest of them."""
    sources = [s for s in range(t + 1) if t - s < horizon]  # oldest first
    weights = [math.exp(-coeff * i) for i in range(len(sources))]
    return sum(w * chunk_value(s, b, t - s, a) for w, s in zip(weights, sources)) / sum(weights)


@pytest.mark.parametrize("embodiments", [["point2d", "point2d"], ["point2d", "arm3"]])
def test_temporal_ensembling_matches_a_hand_computation(embodiments, monkeypatch):
    coeff = 0.3
    policy = make_policy(temporal_ensemble_coeff=coeff)
    actions, known = run(policy, embodiments, 7, monkeypatch)
    assert known.calls == 7  # a new chunk every step
    for t, action in enumerate(actions):
        for b, e in enumerate(embodiments):
            want = [ensembled_by_hand(t, b, a, H[e], coeff) for a in range(A[e])]
            assert action[b, : A[e]].tolist() == pytest.approx(want, rel=1e-6), (t, e)
    # by hand at t = 2 for point2d: chunks 0, 1, 2 at their steps 2, 1, 0 with weights 1, e^-0.3, e^-0.6
    w = [1.0, math.exp(-coeff), math.exp(-2 * coeff)]
    assert actions[2][0, 0].item() == pytest.approx((w[0] * 20 + w[1] * 110 + w[2] * 200) / sum(w), rel=1e-6)
    # chunks expire after H steps: at t = 5 point2d averages chunks 2..5 (chunk 1 is H = 4 steps old), arm3 chunks 3..5
    t = 5
    w4 = [math.exp(-coeff * i) for i in range(4)]
    assert actions[t][0, 0].item() == pytest.approx(sum(wi * (100 * s + 10 * (t - s)) for wi, s in zip(w4, range(2, 6))) / sum(w4), rel=1e-6)
    if embodiments[1] == "arm3":
        w3 = w4[:3]
        want = sum(wi * (1000 + 100 * s + 10 * (t - s)) for wi, s in zip(w3, range(3, 6))) / sum(w3)
        assert actions[t][1, 0].item() == pytest.approx(want, rel=1e-6)


def test_temporal_ensembling_restarts_after_reset(monkeypatch):
    policy = make_policy(temporal_ensemble_coeff=0.5)
    run(policy, ["point2d"], 3, monkeypatch)
    actions, _ = run(policy, ["point2d"], 1, monkeypatch)  # run() resets: only the new chunk counts
    assert actions[0][0, :2].tolist() == [0.0, 1.0]


@pytest.mark.parametrize("n_action_steps", [None, 2, 99])
def test_chunk_queue_serves_n_action_steps_then_replans(n_action_steps, monkeypatch):
    policy = make_policy(n_action_steps=n_action_steps)
    actions, known = run(policy, ["point2d"], 9, monkeypatch)
    served = min(n_action_steps or H["point2d"], H["point2d"])  # never more than the chunk holds
    assert known.calls == math.ceil(9 / served)
    for t, action in enumerate(actions):
        call, h = divmod(t, served)
        assert action[0, :2].tolist() == [chunk_value(call, 0, h, 0), chunk_value(call, 0, h, 1)], t


def test_chunk_queue_replans_every_robot_when_one_runs_out(monkeypatch):
    policy = make_policy()
    actions, known = run(policy, ["point2d", "arm3"], 4, monkeypatch)
    # arm3's chunk (H = 3) runs out first: step 3 starts new chunks for both robots
    assert known.calls == 2
    assert [a[0, 0].item() for a in actions] == [0.0, 10.0, 20.0, 100.0]
    assert [a[1, 2].item() for a in actions] == [1002.0, 1012.0, 1022.0, 1102.0]
