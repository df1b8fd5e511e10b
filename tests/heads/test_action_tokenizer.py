"""Action tokenizer: round trip within half a bin, exact decode with offsets, clipping counts, degenerate dims,
mean/std scaling, shape and stats errors, numpy/torch agreement, saving."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from heads.action_tokenizer import ActionStatsError, ActionTokenizer

STATS = {
    "q01": np.array([-2.0, 0.0, 10.0]),
    "q99": np.array([2.0, 1.0, 30.0]),
    "mean": np.array([0.0, 0.5, 20.0]),
    "std": np.array([1.0, 0.25, 5.0]),
    "min": np.array([-3.0, -0.1, 5.0]),
    "max": np.array([3.0, 1.1, 35.0]),
}


def in_range_actions(generator: torch.Generator, n: int = 500) -> torch.Tensor:
    """Random actions inside [q01, q99] per dimension, (n, 3)."""
    u = torch.rand(n, 3, generator=generator, dtype=torch.float64)
    low, high = torch.as_tensor(STATS["q01"]), torch.as_tensor(STATS["q99"])
    return low + u * (high - low)


def test_bins_cover_minus_one_to_one_uniformly():
    tok = ActionTokenizer(STATS, n_bins=256)
    assert tok.bin_width == pytest.approx(2 / 256)
    centers = tok.bin_centers
    assert centers.shape == (256,)
    assert centers[0] == pytest.approx(-1 + 1 / 256) and centers[-1] == pytest.approx(1 - 1 / 256)
    # the range ends map to the edge bins
    edges = torch.tensor([[-2.0, 0.0, 10.0], [2.0, 1.0, 30.0]])
    assert tok.encode(edges).tolist() == [[0, 0, 0], [255, 255, 255]]
    assert tok.last_n_clipped == 0


@pytest.mark.parametrize("mode", ["quantile", "mean_std"])
@pytest.mark.parametrize("n_bins", [256, 7])
def test_round_trip_error_at_most_half_a_bin(mode, n_bins):
    tok = ActionTokenizer(STATS, mode=mode, n_bins=n_bins)
    generator = torch.Generator().manual_seed(0)
    if mode == "quantile":
        actions = in_range_actions(generator)
    else:  # inside mean +- 3 std
        z = (torch.rand(500, 3, generator=generator, dtype=torch.float64) * 2 - 1) * 3 * 0.999
        actions = torch.as_tensor(STATS["mean"]) + z * torch.as_tensor(STATS["std"])
    bins = tok.encode(actions)
    assert bins.dtype == torch.int64 and bins.shape == actions.shape
    assert int(bins.min()) >= 0 and int(bins.max()) < n_bins
    error = (tok.normalize(tok.decode(bins, dtype=torch.float64)) - tok.normalize(actions)).abs()
    assert float(error.max()) <= tok.bin_width / 2 + 1e-9
    assert float(error.max()) > tok.bin_width / 4  # the bound is not trivially loose: errors do reach near w/2
    assert tok.clip_count == 0


def test_exact_decode_with_true_offsets():
    tok = ActionTokenizer(STATS)
    actions = in_range_actions(torch.Generator().manual_seed(1)).float()
    bins, offsets = tok.encode_with_offsets(actions)
    assert float(offsets.abs().max()) <= 0.5
    torch.testing.assert_close(tok.decode(bins, offsets), actions, atol=1e-5, rtol=1e-5)
    # offsets outside [-0.5, 0.5] are clamped: they cannot leave the bin
    far = tok.decode(bins, torch.full_like(offsets, 3.0), dtype=torch.float64)
    torch.testing.assert_close(far, tok.decode(bins, torch.full_like(offsets, 0.5), dtype=torch.float64))


def test_normalize_formulas():
    q = ActionTokenizer(STATS, mode="quantile")
    np.testing.assert_allclose(q.normalize(np.array([0.0, 0.75, 10.0])), [0.0, 0.5, -1.0])
    m = ActionTokenizer(STATS, mode="mean_std", clip_sigma=2.0)
    # z = (x - mean) / std, then / clip_sigma
    np.testing.assert_allclose(m.normalize(np.array([1.0, 0.0, 30.0])), [0.5, -1.0, 1.0])
    np.testing.assert_allclose(m.unnormalize(m.normalize(np.array([1.0, 0.1, 22.0]))), [1.0, 0.1, 22.0])


def test_clipping_is_counted_and_lands_in_edge_bins():
    tok = ActionTokenizer(STATS)
    actions = torch.tensor([[5.0, 0.5, 20.0], [-5.0, 2.0, 20.0], [0.0, 0.5, 20.0]])
    bins = tok.encode(actions)
    assert bins[0, 0] == 255 and bins[1, 0] == 0 and bins[1, 1] == 255
    assert tok.last_n_clipped == 3 and tok.clip_count == 3 and tok.value_count == 9
    assert tok.clip_count_per_dim.tolist() == [2, 1, 0]
    np.testing.assert_allclose(tok.decode(bins.numpy(), np.full((3, 3), 0.5))[0, 0], 2.0)  # clipped to q99
    tok.encode(torch.zeros(2, 3) + torch.tensor([0.0, 0.5, 20.0]))
    assert tok.last_n_clipped == 0 and tok.clip_count == 3 and tok.clip_fraction == pytest.approx(3 / 15)
    tok.reset_clip_counts()
    assert tok.clip_count == 0 and tok.clip_fraction == 0.0


def test_degenerate_dimensions_give_no_nan():
    stats = {"q01": [0.0, 3.0], "q99": [1.0, 3.0], "mean": [0.5, 3.0], "std": [0.1, 0.0]}
    for mode, constant in (("quantile", 3.0), ("mean_std", 3.0)):
        tok = ActionTokenizer(stats, mode=mode)
        actions = torch.tensor([[0.5, 3.0], [0.2, 3.0]])
        norm = tok.normalize(actions)
        assert torch.isfinite(norm).all() and norm[:, 1].eq(0).all()
        bins, offsets = tok.encode_with_offsets(actions)
        decoded = tok.decode(bins, offsets)
        assert torch.isfinite(decoded).all() and decoded[:, 1].eq(constant).all()
        assert tok.last_n_clipped == 0
        tok.encode(torch.tensor([[0.5, 4.0]]))  # differs from the constant: counted as clipped
        assert tok.last_n_clipped == 1 and tok.clip_count_per_dim.tolist() == [0, 1]


def test_numpy_and_torch_agree_and_keep_their_kind():
    tok = ActionTokenizer(STATS)
    actions = in_range_actions(torch.Generator().manual_seed(2), n=50).reshape(5, 10, 3)
    bins_t = tok.encode(actions)
    bins_n = tok.encode(actions.numpy())
    assert isinstance(bins_n, np.ndarray) and bins_n.dtype == np.int64 and bins_n.shape == (5, 10, 3)
    np.testing.assert_array_equal(bins_n, bins_t.numpy())
    decoded = tok.decode(bins_t)
    assert isinstance(decoded, torch.Tensor) and decoded.dtype == torch.float32
    np.testing.assert_allclose(decoded.numpy(), tok.decode(bins_n), rtol=1e-6, atol=1e-5)
    assert tok.encode(actions.to(torch.bfloat16)).dtype == torch.int64  # low precision is upcast


def test_shape_and_value_errors():
    tok = ActionTokenizer(STATS)
    with pytest.raises(ValueError, match=r"last dimension 3 \(action_dim\), got shape \(4, 2\)"):
        tok.encode(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="last dimension 3"):
        tok.decode(torch.zeros(4, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"bins must lie in \[0, 256\)"):
        tok.decode(torch.tensor([[0, 256, 3]]))
    with pytest.raises(TypeError, match="integer"):
        tok.decode(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="offsets shape"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="NaN"):
        tok.encode(torch.tensor([[float("nan"), 0.0, 0.0]]))


def test_stats_errors_name_the_problem():
    with pytest.raises(ActionStatsError, match="lack 'q99'"):
        ActionTokenizer({"q01": [0.0]})
    with pytest.raises(ActionStatsError, match="lack 'std'"):
        ActionTokenizer({"mean": [0.0]}, mode="mean_std")
    with pytest.raises(ActionStatsError, match=r"stats\['action'\]"):
        ActionTokenizer({"action": {"q01": [0.0], "q99": [1.0]}})
    with pytest.raises(ActionStatsError, match="disagree in length"):
        ActionTokenizer({"q01": [0.0, 1.0], "q99": [1.0]})
    with pytest.raises(ActionStatsError, match="not finite"):
        ActionTokenizer({"q01": [0.0], "q99": [float("inf")]})
    with pytest.raises(ActionStatsError, match="q99 < q01"):
        ActionTokenizer({"q01": [1.0], "q99": [0.0]})
    with pytest.raises(ValueError, match="unknown normalization mode"):
        ActionTokenizer({"q01": [0.0], "q99": [1.0]}, mode="min_max")
    with pytest.raises(ValueError, match="n_bins"):
        ActionTokenizer({"q01": [0.0], "q99": [1.0]}, n_bins=1)


def test_save_load_round_trip():
    tok = ActionTokenizer({k: torch.as_tensor(v) for k, v in STATS.items()}, mode="mean_std", n_bins=64,
                          clip_sigma=2.5, name="arm3/action")
    restored = ActionTokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert (restored.mode, restored.n_bins, restored.clip_sigma, restored.name) == ("mean_std", 64, 2.5, "arm3/action")
    actions = in_range_actions(torch.Generator().manual_seed(3), n=20)
    assert torch.equal(restored.encode(actions), tok.encode(actions))
    assert set(restored.stats) == set(STATS)
