"""Action tokenizer (bins only): round trip within half a bin, exact decode with offsets, clipping counts, shape and
value errors, numpy/torch agreement, saving, and binning after the one normalizer (envs.normalize)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from envs.normalize import Normalizer
from heads.action_tokenizer import ActionTokenizer


def bin_space_values(generator: torch.Generator, n: int = 500, dim: int = 3) -> torch.Tensor:
    """Random values inside [-1, 1], (n, dim), float64."""
    return torch.rand(n, dim, generator=generator, dtype=torch.float64) * 2 - 1


def test_bins_cover_minus_one_to_one_uniformly():
    tok = ActionTokenizer(3, n_bins=256)
    assert tok.bin_width == pytest.approx(2 / 256)
    centers = tok.bin_centers
    assert centers.shape == (256,)
    assert centers[0] == pytest.approx(-1 + 1 / 256) and centers[-1] == pytest.approx(1 - 1 / 256)
    edges = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])  # the range ends map to the edge bins
    assert tok.encode(edges).tolist() == [[0, 0, 0], [255, 255, 255]]
    assert tok.encode(torch.tensor([[-1 + 2 / 256, 0.0, 1 - 2 / 256]])).tolist() == [[1, 128, 255]]
    assert tok.last_n_clipped == 0


@pytest.mark.parametrize("n_bins", [256, 7])
def test_round_trip_error_at_most_half_a_bin(n_bins):
    tok = ActionTokenizer(3, n_bins=n_bins)
    values = bin_space_values(torch.Generator().manual_seed(0))
    bins = tok.encode(values)
    assert bins.dtype == torch.int64 and bins.shape == values.shape
    assert int(bins.min()) >= 0 and int(bins.max()) < n_bins
    error = (tok.decode(bins, dtype=torch.float64) - values).abs()
    assert float(error.max()) <= tok.bin_width / 2 + 1e-9
    assert float(error.max()) > tok.bin_width / 4  # the bound is not trivially loose: errors do reach near w/2
    assert tok.clip_count == 0


def test_exact_decode_with_true_offsets():
    tok = ActionTokenizer(3)
    values = bin_space_values(torch.Generator().manual_seed(1)).float()
    bins, offsets = tok.encode_with_offsets(values)
    assert float(offsets.abs().max()) <= 0.5
    torch.testing.assert_close(tok.decode(bins, offsets), values, atol=1e-6, rtol=1e-6)
    # offsets outside [-0.5, 0.5] are clamped: they cannot leave the bin
    far = tok.decode(bins, torch.full_like(offsets, 3.0), dtype=torch.float64)
    torch.testing.assert_close(far, tok.decode(bins, torch.full_like(offsets, 0.5), dtype=torch.float64))


def test_clipping_is_counted_and_lands_in_edge_bins():
    tok = ActionTokenizer(3)
    values = torch.tensor([[2.5, 0.0, 0.0], [-2.5, 1.5, 0.0], [0.0, 0.0, 0.0]])
    bins = tok.encode(values)
    assert bins[0, 0] == 255 and bins[1, 0] == 0 and bins[1, 1] == 255
    assert tok.last_n_clipped == 3 and tok.clip_count == 3 and tok.value_count == 9
    assert tok.clip_count_per_dim.tolist() == [2, 1, 0]
    np.testing.assert_allclose(tok.decode(bins.numpy(), np.full((3, 3), 0.5))[0, 0], 1.0)  # clipped to the edge
    tok.encode(torch.zeros(2, 3))
    assert tok.last_n_clipped == 0 and tok.clip_count == 3 and tok.clip_fraction == pytest.approx(3 / 15)
    tok.reset_clip_counts()
    assert tok.clip_count == 0 and tok.clip_fraction == 0.0


def test_binning_after_the_one_normalizer_equals_normalize_then_bin():
    """The tokenizer bins what envs.normalize gives: quantile-normalized actions inside [q01, q99] land in the bins
    of their position in that range, and decoding + unnormalizing is within half a bin of the action."""
    stats = {"action": {"q01": np.array([-2.0, 0.0, 10.0]), "q99": np.array([2.0, 1.0, 30.0])}}
    normalizer = Normalizer.from_stats(stats, {"action": "quantile"}, name="arm3")
    u = torch.rand(200, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    actions = torch.as_tensor(stats["action"]["q01"]) + u * torch.as_tensor(stats["action"]["q99"] - stats["action"]["q01"])
    tok = ActionTokenizer(3, n_bins=64)
    bins = tok.encode(normalizer.normalize("action", actions))
    assert torch.equal(bins, (u * 64).floor().clamp(max=63).long())
    back = normalizer.unnormalize("action", tok.decode(bins, dtype=torch.float64))
    half_bin = torch.as_tensor(stats["action"]["q99"] - stats["action"]["q01"]) / 64 / 2
    assert bool(((back - actions).abs() <= half_bin + 1e-9).all())


def test_numpy_and_torch_agree_and_keep_their_kind():
    tok = ActionTokenizer(3)
    values = bin_space_values(torch.Generator().manual_seed(2), n=50).reshape(5, 10, 3)
    bins_t = tok.encode(values)
    bins_n = tok.encode(values.numpy())
    assert isinstance(bins_n, np.ndarray) and bins_n.dtype == np.int64 and bins_n.shape == (5, 10, 3)
    np.testing.assert_array_equal(bins_n, bins_t.numpy())
    decoded = tok.decode(bins_t)
    assert isinstance(decoded, torch.Tensor) and decoded.dtype == torch.float32
    np.testing.assert_allclose(decoded.numpy(), tok.decode(bins_n), rtol=1e-6, atol=1e-6)
    assert tok.encode(values.to(torch.bfloat16)).dtype == torch.int64  # low precision is upcast


def test_shape_and_value_errors():
    tok = ActionTokenizer(3)
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
    with pytest.raises(ValueError, match="n_bins"):
        ActionTokenizer(3, n_bins=1)
    with pytest.raises(ValueError, match="action_dim"):
        ActionTokenizer(0)


def test_save_load_round_trip():
    tok = ActionTokenizer(3, n_bins=64, name="arm3")
    restored = ActionTokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert (restored.action_dim, restored.n_bins, restored.name) == (3, 64, "arm3")
    values = bin_space_values(torch.Generator().manual_seed(3), n=20)
    assert torch.equal(restored.encode(values), tok.encode(values))
    with pytest.raises(ValueError, match="lack"):
        ActionTokenizer.from_dict({"n_bins": 64})
