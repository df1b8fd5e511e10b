"""Routing analysis: per-group expert shares on a hand-built example, accumulation, NMI extremes, JSON and PNG."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vla.policy.routing import (
    RoutingStats,
    expert_usage,
    mutual_information,
    nmi_from_counts,
    plot_routing_heatmap,
    specialization_nmi,
    token_groups,
    write_routing_json,
)

E = 4


def example():
    """6 tokens, K = 2, one dense layer (None) and two MoE layers.

    tokens: text, image, image, action(arm), action(arm), action(nav)."""
    kinds = ["text", "image", "image", "action", "action", "action"]
    embodiments = [None, None, None, "arm", "arm", "nav"]
    layer1 = torch.tensor([[0, 1], [1, 2], [1, 3], [2, 3], [2, 0], [0, 1]])
    layer2 = torch.tensor([[3, 2], [0, 1], [0, 1], [2, 2], [2, 2], [3, 3]])
    return [None, layer1, layer2], kinds, embodiments


def test_token_groups():
    assert token_groups(["text", "action", "image", "action"], [None, "arm", None, None]) == [
        "text", "action:arm", "image", "action"]
    assert token_groups([["action", "text"]], "nav") == ["action:nav", "text"]  # (B, T) flattened, one name for all
    with pytest.raises(ValueError, match="2 embodiment labels for 3"):
        token_groups(["text", "text", "text"], ["a", "b"])


def test_expert_usage_on_a_constructed_example():
    layers, kinds, embodiments = example()
    usage = expert_usage(layers, kinds, embodiments, n_experts=E)
    assert sorted(usage) == [1, 2]  # dense layer 0 skipped
    shares = usage[1]
    assert list(shares) == ["action:arm", "action:nav", "image", "text"]
    np.testing.assert_allclose(shares["text"], [0.5, 0.5, 0, 0])
    np.testing.assert_allclose(shares["image"], [0, 0.5, 0.25, 0.25])
    np.testing.assert_allclose(shares["action:arm"], [0.25, 0, 0.5, 0.25])
    np.testing.assert_allclose(shares["action:nav"], [0.5, 0.5, 0, 0])
    np.testing.assert_allclose(usage[2]["action:arm"], [0, 0, 1, 0])
    for layer_shares in usage.values():
        for row in layer_shares.values():
            assert row.sum() == pytest.approx(1.0)


def test_weighted_usage_counts_router_weights():
    ids = torch.tensor([[0, 1], [0, 1]])
    weights = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    usage = expert_usage([ids], ["text", "text"], layer_weights=[weights], n_experts=2)
    np.testing.assert_allclose(usage[0]["text"], [0.625, 0.375])


def test_accumulation_over_batches_masks_and_padding():
    layers, kinds, embodiments = example()
    stats = RoutingStats(n_experts=E)
    stats.add(layers, kinds, embodiments)
    stats.add(layers, kinds, embodiments)
    assert stats.layers == [1, 2] and stats.top_k == 2 and stats.n_batches == 2
    assert stats.embodiments == ["arm", "nav"]
    np.testing.assert_allclose(stats.counts(1)["image"], [0, 4, 2, 2])
    # pad tokens and masked-out tokens are not counted
    stats.add([None, torch.tensor([[3, 3], [3, 3]]), torch.tensor([[3, 3], [3, 3]])], ["pad", "text"],
              mask=torch.tensor([True, False]))
    np.testing.assert_allclose(stats.counts(1)["text"], [2, 2, 0, 0])
    # (B, T, K) ids and (B, T) labels line up after flattening
    batched = RoutingStats(n_experts=E)
    batched.add([layers[1].reshape(2, 3, 2)], np.array(kinds).reshape(2, 3), np.array(embodiments, dtype=object).reshape(2, 3))
    np.testing.assert_allclose(batched.counts(0)["action:arm"], stats.counts(1)["action:arm"] / 2)
    with pytest.raises(KeyError, match="recorded layers"):
        stats.counts(0)


def test_input_errors():
    stats = RoutingStats(n_experts=E)
    with pytest.raises(ValueError, match="cover 2 tokens but 3"):
        stats.add([torch.zeros(2, 2, dtype=torch.long)], ["text"] * 3)
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        stats.add([torch.full((1, 2), 4)], ["text"])
    with pytest.raises(ValueError, match="integer"):
        stats.add([torch.zeros(1, 2)], ["text"])
    with pytest.raises(ValueError, match="needs router weights"):
        RoutingStats(n_experts=E, weighted=True).add([torch.zeros(1, 2, dtype=torch.long)], ["text"])
    with pytest.raises(ValueError, match="n_experts"):
        RoutingStats(n_experts=0)


def test_mutual_information_of_a_known_table():
    info, h_x, h_y = mutual_information(np.array([[1, 0], [0, 1]]))
    assert (info, h_x, h_y) == pytest.approx((1.0, 1.0, 1.0))
    info, h_x, h_y = mutual_information(np.array([[1, 1], [1, 1]]))
    assert info == pytest.approx(0.0) and h_x == pytest.approx(1.0)


def test_nmi_extremes():
    # each embodiment deterministically on its own expert (K = 1): NMI = 1
    disjoint = RoutingStats(n_experts=E)
    disjoint.add([torch.tensor([[0], [0], [3], [3], [3]])], ["action"] * 5, ["arm", "arm", "nav", "nav", "nav"])
    assert disjoint.nmi(0) == pytest.approx(1.0)
    assert disjoint.nmi(0, "embodiment") == pytest.approx(1.0)
    # identical expert distributions: NMI = 0
    shared = RoutingStats(n_experts=E)
    ids = torch.tensor([[0], [1], [2], [3]] * 2)
    shared.add([ids], ["action"] * 8, ["arm"] * 4 + ["nav"] * 4)
    assert shared.nmi(0) == pytest.approx(0.0, abs=1e-12)
    # random routing of many tokens: near 0
    generator = torch.Generator().manual_seed(0)
    noisy = RoutingStats(n_experts=8)
    noisy.add([torch.randint(0, 8, (4000, 2), generator=generator)], ["action"] * 4000, ["arm", "nav"] * 2000)
    assert noisy.nmi(0) < 0.01


def test_nmi_with_k_greater_than_one_and_theil_u():
    # two embodiments, each always on its own two experts (K = 2): I = 1 bit, H(X) = 1, H(Y) = 2
    stats = RoutingStats(n_experts=E)
    stats.add([torch.tensor([[0, 1], [0, 1], [2, 3], [2, 3]])], ["action"] * 4, ["arm", "arm", "nav", "nav"])
    assert stats.nmi(0) == pytest.approx(1 / math.sqrt(2))
    assert stats.nmi(0, "arithmetic") == pytest.approx(2 / 3)
    assert stats.nmi(0, "embodiment") == pytest.approx(1.0)


def test_nmi_undefined_with_one_embodiment_and_mean_skips_it():
    assert math.isnan(nmi_from_counts({"arm": [1, 2, 3]}))
    assert nmi_from_counts({"arm": [5, 0], "nav": [7, 0]}) == 0.0  # all on one expert: no information
    with pytest.raises(ValueError, match="unknown normalization"):
        nmi_from_counts({"a": [1], "b": [1]}, normalization="max")
    stats = RoutingStats(n_experts=E)
    stats.add([torch.tensor([[0], [3]]), torch.tensor([[0], [0]])], ["action", "action"], ["arm", "nav"])
    stats.add([None, torch.tensor([[1]])], ["action"], ["arm"])
    per_layer, mean = specialization_nmi(stats)
    # layer 1 joint table [[1, 1], [1, 0]]: H(X) = H(Y) = H(2/3, 1/3), H(X, Y) = log2 3
    h = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert per_layer[0] == pytest.approx(1.0) and per_layer[1] == pytest.approx((2 * h - math.log2(3)) / h)
    assert mean == pytest.approx((per_layer[0] + per_layer[1]) / 2)
    only_one = RoutingStats(n_experts=E)
    only_one.add([torch.tensor([[0]])], ["action"], ["arm"])
    per_layer, mean = specialization_nmi(only_one)
    assert math.isnan(per_layer[0]) and math.isnan(mean)


def test_json_report_is_well_formed(tmp_path):
    layers, kinds, embodiments = example()
    stats = RoutingStats(n_experts=E)
    stats.add(layers, kinds, embodiments)
    report = write_routing_json(stats, tmp_path / "out" / "routing.json")
    loaded = json.loads((tmp_path / "out" / "routing.json").read_text())
    assert loaded == report
    assert loaded["groups"] == ["action:arm", "action:nav", "image", "text"]
    assert [entry["layer"] for entry in loaded["layers"]] == [1, 2]
    for entry in loaded["layers"]:
        assert set(entry) == {"layer", "shares", "choices", "nmi", "theil_u"}
        for row in entry["shares"].values():
            assert len(row) == E and sum(row) == pytest.approx(1.0)
    assert loaded["layers"][0]["choices"]["action:arm"] == 4.0
    assert loaded["nmi_mean"] == pytest.approx(np.mean([e["nmi"] for e in loaded["layers"]]))
    assert loaded["layers"][1]["nmi"] == pytest.approx(1.0)  # layer 2: arm only expert 2, nav only expert 3
    # layer 1 by hand: choices arm {0: 1, 2: 2, 3: 1}, nav {0: 1, 1: 1}; H(X) = log2(3) - 2/3, H(Y) = log2(3) + 1/3,
    # H(Y|X) = 4/3, so I = log2(3) - 1
    log3 = math.log2(3)
    assert loaded["layers"][0]["nmi"] == pytest.approx((log3 - 1) / math.sqrt((log3 - 2 / 3) * (log3 + 1 / 3)))
    assert loaded["layers"][0]["theil_u"] == pytest.approx((log3 - 1) / (log3 - 2 / 3))
    # undefined NMI is written as null, not NaN (valid JSON)
    single = RoutingStats(n_experts=E)
    single.add([torch.tensor([[0]])], ["text"])
    text = json.dumps(write_routing_json(single, tmp_path / "single.json"))
    assert "NaN" not in text and json.loads(text)["nmi_mean"] is None
    # which frames the counts come from is recorded when given (the demo's are training frames)
    assert "measured_on" not in loaded
    labelled = write_routing_json(stats, tmp_path / "labelled.json", measured_on="training frames")
    assert json.loads((tmp_path / "labelled.json").read_text())["measured_on"] == labelled["measured_on"] == "training frames"


def test_heatmap_png_is_written(tmp_path):
    layers, kinds, embodiments = example()
    stats = RoutingStats(n_experts=E)
    stats.add(layers * 3, kinds, embodiments)  # 6 MoE layers -> a 2 x 4 grid with two empty cells
    path = plot_routing_heatmap(stats, tmp_path / "plots" / "routing.png", title="test")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    import matplotlib.image

    height, width = matplotlib.image.imread(path).shape[:2]
    assert width > height > 100
    with pytest.raises(ValueError, match="no routing recorded"):
        plot_routing_heatmap(RoutingStats(n_experts=E), tmp_path / "empty.png")
