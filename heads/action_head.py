"""The action-token head: what sits at the action positions of the sequence, and what is read off them.

A robot with chunk length H and action size A emits H*A action tokens per control step, laid out step-major
(position h*A + d holds step h, dimension d); robots keep their own counts, nothing is padded to a global maximum.

* Parallel decoding (default): every action position holds a learned query, `step_embedding[h] + dim_embedding[d]`;
  the positions attend to each other bidirectionally and causally to the prompt, and one forward pass predicts all
  H*A bins (logits over the 256 action-bin tokens only, read through the language model's own LM-head rows).
* Autoregressive decoding (RT-2 / OpenVLA style): action positions hold the previous action tokens; decoding is
  constrained to the action-bin tokens.
* A continuous refinement head predicts where inside the chosen bin the value lies (offset in [-0.5, 0.5] of a bin
  width, L1 loss), so actions are not limited to bin centres; switchable.
* Proprio state enters as one token per control step through a per-embodiment linear projection of the normalized
  state. (Discretized state tokens would cost A_state positions and quantize the state; one projected token is
  cheaper and exact, and robots with different state sizes only differ in a small input matrix.)
* An optional embodiment-aware router prior: a learned bias per (embodiment, MoE layer, expert) added to the router
  logits of that embodiment's action tokens (zero-initialised, off by default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def chunk_layout(chunk_len: int, action_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(steps, dims) index vectors of the H*A action positions, step-major."""
    steps = torch.arange(chunk_len, device=device).repeat_interleave(action_dim)
    dims = torch.arange(action_dim, device=device).repeat(chunk_len)
    return steps, dims


class ActionQueries(nn.Module):
    """Learned query embeddings for parallel decoding: one per chunk step plus one per action dimension."""

    def __init__(self, max_steps: int, max_dims: int, width: int, init_std: float = 0.02):
        super().__init__()
        self.step_embedding = nn.Parameter(torch.randn(max_steps, width) * init_std)
        self.dim_embedding = nn.Parameter(torch.randn(max_dims, width) * init_std)
        self._layouts: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # chunk_layout per (H, A, device)

    def forward(self, chunk_len: int, action_dim: int) -> torch.Tensor:
        if chunk_len > self.step_embedding.shape[0] or action_dim > self.dim_embedding.shape[0]:
            raise ValueError(f"chunk {chunk_len}x{action_dim} exceeds the query tables "
                             f"({self.step_embedding.shape[0]} steps x {self.dim_embedding.shape[0]} dims)")
        key = (chunk_len, action_dim, self.step_embedding.device)
        if key not in self._layouts:  # built once, not per sample and step (device ops, on a GPU kernel launches)
            self._layouts[key] = chunk_layout(chunk_len, action_dim, self.step_embedding.device)
        steps, dims = self._layouts[key]
        return self.step_embedding[steps] + self.dim_embedding[dims]  # (H*A, width)


class OffsetHead(nn.Module):
    """Hidden state at an action position -> offset inside the chosen bin, in [-0.5, 0.5] bin widths."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden_ND: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.tanh(self.proj(hidden_ND).squeeze(-1))


class StateProjection(nn.Module):
    """One linear map per embodiment from its normalized state (S_e values) to one token embedding."""

    def __init__(self, state_dims: dict[str, int], width: int):
        super().__init__()
        self.proj = nn.ModuleDict({name: nn.Linear(max(dim, 1), width) for name, dim in state_dims.items()})
        for layer in self.proj.values():
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, embodiment: str, state_S: torch.Tensor) -> torch.Tensor:
        layer = self.proj[embodiment]
        if state_S.shape[-1] == 0:
            state_S = state_S.new_zeros(*state_S.shape[:-1], 1)
        if state_S.shape[-1] != layer.in_features:
            raise ValueError(f"embodiment {embodiment!r}: state has {state_S.shape[-1]} values, expected {layer.in_features}")
        return layer(state_S.to(layer.weight.dtype))


class BoxProjection(nn.Module):
    """One linear map from a box (x1, y1, x2, y2 in 0..999, DeepSeek-VL2's grounding units) to one token embedding:
    the box as numbers the action positions can compare with the state, beside the digit tokens that say it.
    `box_4` None (no box read) gives the embedding of the flag alone."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(5, width)  # the box in [-1, 1], then 1 where there is one
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, box_4: list[float] | None) -> torch.Tensor:
        values = [0.0] * 5 if box_4 is None else [v / 999 * 2 - 1 for v in box_4] + [1.0]
        return self.proj(torch.tensor(values, dtype=self.proj.weight.dtype, device=self.proj.weight.device))


class RouterPrior(nn.Module):
    """Learned per-embodiment bias on the router logits of action tokens, for each MoE layer."""

    def __init__(self, num_embodiments: int, moe_layers: list[int], num_experts: int):
        super().__init__()
        self.moe_layers = list(moe_layers)
        self.bias = nn.Parameter(torch.zeros(num_embodiments, len(self.moe_layers), num_experts))

    def forward(self, embodiment_index_BT: torch.Tensor) -> dict[int, torch.Tensor]:
        """embodiment_index_BT: index of the embodiment at action positions, -1 elsewhere -> {layer: (B, T, E)}."""
        active_BT = embodiment_index_BT >= 0
        bias_BTLE = self.bias[embodiment_index_BT.clamp(min=0)] * active_BT[..., None, None]
        return {layer: bias_BTLE[:, :, i] for i, layer in enumerate(self.moe_layers)}


def soft_bin_targets(target_bins_N: torch.Tensor, n_bins: int, sigma: float) -> torch.Tensor:
    """(N, n_bins) Gaussian targets centred on each target bin: neighbouring bins are nearly right, far ones wrong."""
    centers = torch.arange(n_bins, device=target_bins_N.device, dtype=torch.float32)
    logits = -0.5 * ((centers[None] - target_bins_N[:, None].float()) / sigma) ** 2
    return logits.softmax(-1)


def action_losses(bin_logits_NB: torch.Tensor, target_bins_N: torch.Tensor, weight_N: torch.Tensor,
                  offsets_N: torch.Tensor | None = None, target_offsets_N: torch.Tensor | None = None,
                  target_sigma_bins: float = 0.0) -> dict[str, torch.Tensor]:
    """Cross-entropy over the action bins (masked by `weight_N`: padded chunk steps get 0) and, when given, the L1
    loss of the in-bin offsets. Returns {"action_ce", "offset_l1", "bin_accuracy"} (scalars).

    With `target_sigma_bins` > 0 the one-hot target becomes a Gaussian over bins of that width: plain cross-entropy
    treats a bin off by one like a bin off by a hundred, which makes 256-way bins slow to learn; the soft target
    keeps the order of the bins (the decoded bin is still the argmax)."""
    denom = weight_N.sum().clamp(min=1.0)
    if target_sigma_bins > 0:
        soft = soft_bin_targets(target_bins_N, bin_logits_NB.shape[-1], target_sigma_bins)
        ce_N = -(soft * bin_logits_NB.float().log_softmax(-1)).sum(-1)
    else:
        ce_N = F.cross_entropy(bin_logits_NB.float(), target_bins_N, reduction="none")
    out = {"action_ce": (ce_N * weight_N).sum() / denom}
    with torch.no_grad():
        out["bin_accuracy"] = ((bin_logits_NB.argmax(-1) == target_bins_N).float() * weight_N).sum() / denom
    if offsets_N is not None and target_offsets_N is not None:
        out["offset_l1"] = ((offsets_N.float() - target_offsets_N.float()).abs() * weight_N).sum() / denom
    return out
