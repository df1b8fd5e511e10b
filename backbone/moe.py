"""DeepSeekMoE: fine-grained routed experts plus always-on shared experts.

Shape legend: T tokens (batch and time flattened), D model width, F expert hidden size, E routed experts, K experts
per token, M = T*K routed token copies.

Routing (fp32, as the official `MoEGate`):
  * softmax `greedy`: top-K of softmax scores.
  * softmax `group_limited_greedy`: keep the best `topk_group` of `n_group` expert groups (by group max), then top-K.
  * sigmoid `noaux_tc` (VL2-Base): choose with score + e_score_correction_bias (groups ranked by the sum of their top-2),
    weight with the unbiased sigmoid score.
  Then `norm_topk_prob` (renormalize the K weights) and `routed_scaling_factor`.
Load balancing in training: the sequence-level auxiliary loss (softmax routing, `aux_loss_alpha`), or, for noaux_tc,
the DeepSeek-V3 bias update: after each optimizer step, bias_e += rate * sign(mean_load - load_e).

Dispatch: sort the M token copies by expert, run every expert with one grouped matrix multiply per projection
(`torch._grouped_mm`, offsets = cumulative counts), weight, and scatter-add back. A per-expert loop over contiguous
slices is the fallback where the grouped kernel does not apply (and the reference in tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from backbone.config import LanguageModelConfig


class MLP(nn.Module):
    """SwiGLU MLP, no biases: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class RouterOutput:
    expert_ids_TK: torch.Tensor  # long
    weights_TK: torch.Tensor  # fp32, after normalization and scaling
    scores_TE: torch.Tensor  # fp32 softmax or sigmoid scores (unbiased)


class Router(nn.Module):
    """The official MoEGate: a bias-free linear scored in fp32, with the configured top-K method."""

    def __init__(self, config: LanguageModelConfig):
        super().__init__()
        E = config.n_routed_experts
        self.num_experts, self.top_k = E, config.num_experts_per_tok
        self.topk_method, self.scoring_func = config.topk_method, config.scoring_func
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size))
        if self.topk_method == "noaux_tc":
            # Updated by the load-balancing rule, not by gradients: a buffer, saved with the weights.
            self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        # Routed token counts since the last bias update (training only).
        self.register_buffer("tokens_per_expert_E", torch.zeros(E, dtype=torch.float32), persistent=False)

    def forward(self, x_TD: torch.Tensor, logit_bias_TE: torch.Tensor | None = None) -> RouterOutput:
        """`logit_bias_TE` (optional) is added to the router logits before scoring (e.g. an embodiment prior)."""
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        if logit_bias_TE is not None:
            logits_TE = logits_TE + logit_bias_TE.float()
        scores_TE = logits_TE.softmax(-1) if self.scoring_func == "softmax" else logits_TE.sigmoid()
        T, E, K = scores_TE.shape[0], self.num_experts, self.top_k
        if self.topk_method == "greedy":
            weights_TK, ids_TK = torch.topk(scores_TE, K, dim=-1, sorted=False)
        elif self.topk_method == "group_limited_greedy":
            group_scores_TG = scores_TE.view(T, self.n_group, -1).max(dim=-1).values
            ids_TK = torch.topk(self._mask_groups(scores_TE, group_scores_TG), K, dim=-1, sorted=False)[1]
            weights_TK = scores_TE.gather(1, ids_TK)
        else:  # noaux_tc
            choice_TE = scores_TE + self.e_score_correction_bias
            group_scores_TG = choice_TE.view(T, self.n_group, -1).topk(min(2, E // self.n_group), dim=-1)[0].sum(-1)
            ids_TK = torch.topk(self._mask_groups(choice_TE, group_scores_TG), K, dim=-1, sorted=False)[1]
            weights_TK = scores_TE.gather(1, ids_TK)
        if K > 1 and self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
        weights_TK = weights_TK * self.routed_scaling_factor
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert_E += expert_counts(ids_TK, E).float()
        return RouterOutput(ids_TK, weights_TK, scores_TE)

    def _mask_groups(self, scores_TE: torch.Tensor, group_scores_TG: torch.Tensor) -> torch.Tensor:
        """Zero the experts outside the best `topk_group` groups (scores are > 0 for softmax; -inf for biased)."""
        T = scores_TE.shape[0]
        group_ids = torch.topk(group_scores_TG, self.topk_group, dim=-1, sorted=False)[1]
        keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, group_ids, True)
        keep_TE = keep_TG[:, :, None].expand(T, self.n_group, self.num_experts // self.n_group).reshape(T, -1)
        fill = 0.0 if self.topk_method == "group_limited_greedy" else float("-inf")
        return scores_TE.masked_fill(~keep_TE, fill)

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        """DeepSeek-V3 auxiliary-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones."""
        load_E = self.tokens_per_expert_E
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load_E)
        if load_E.sum() > 0:
            self.e_score_correction_bias += rate * torch.sign(load_E.mean() - load_E)
        load_E.zero_()


def balance_aux_loss(router: RouterOutput, batch_size: int, alpha: float, seq_aux: bool = True,
                     normalize_scores: bool = False, token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """The official auxiliary balance loss.

    seq_aux:  alpha * mean_b sum_e (count_be / (T_b*K/E)) * mean_t score_bte        (per sequence)
    else:     alpha * sum_e (E * count_e / (T*K)) * mean_t score_te                  (over all tokens)
    `normalize_scores` divides sigmoid scores by their per-token sum first (DeepSeek-V3). With `token_mask_T`,
    padding tokens are left out (the official code, which has no mask, counts every position).
    """
    E = router.scores_TE.shape[-1]
    K = router.expert_ids_TK.shape[-1]
    scores_TE = router.scores_TE
    if normalize_scores:
        scores_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
    B = batch_size if seq_aux else 1
    scores_BTE = scores_TE.view(B, -1, E)
    T = scores_BTE.shape[1]
    mask_BT = torch.ones(B, T, device=scores_TE.device) if token_mask_T is None else token_mask_T.reshape(B, T).float()
    tokens_B = mask_BT.sum(-1).clamp(min=1)
    counts_BE = torch.zeros(B, E, device=scores_TE.device).scatter_add_(
        1, router.expert_ids_TK.view(B, T * K), mask_BT[:, :, None].expand(B, T, K).reshape(B, T * K))
    load_BE = counts_BE / (tokens_B[:, None] * K / E)
    mean_scores_BE = (scores_BTE * mask_BT[:, :, None]).sum(1) / tokens_B[:, None]
    return alpha * (load_BE * mean_scores_BE).sum(-1).mean()


def _grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16) and (x.shape[-1] * x.element_size()) % 16 == 0 \
            and (w.shape[-2] * w.element_size()) % 16 == 0
    return x.dtype == torch.bfloat16 and x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] >= 9


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) int64 number of entries of `ids` routed to each expert: bincount with a fixed output size, which
    torch.compile keeps in the graph (bincount's output size depends on the data)."""
    flat = ids.reshape(-1)
    return flat.new_zeros(num_experts).scatter_add_(0, flat, torch.ones_like(flat))


@torch.compiler.disable
def _grouped_mm_eager(x_MK: torch.Tensor, w_EKN: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(x_MK, w_EKN, offs=offsets_E)


def grouped_mm(x_MK: torch.Tensor, w_EKN: torch.Tensor, offsets_E: torch.Tensor, counts: list[int] | None = None,
               use_grouped: bool = True) -> torch.Tensor:
    """Rows of x sorted by expert; rows offsets[e-1]:offsets[e] are multiplied by w[e]. Returns (M, N)."""
    if use_grouped and _grouped_mm_supported(x_MK, w_EKN):
        if x_MK.device.type == "cpu" and torch.compiler.is_compiling():
            # torch.compile's shape rules for _grouped_mm accept bf16 CUDA inputs only: on CPU it runs eager
            return _grouped_mm_eager(x_MK, w_EKN, offsets_E)
        return torch._grouped_mm(x_MK, w_EKN, offs=offsets_E)
    # Fallback: one matmul per non-empty expert on its contiguous slice.
    counts = counts if counts is not None else torch.diff(offsets_E, prepend=offsets_E.new_zeros(1)).tolist()
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            outs.append(x_MK[start:start + n] @ w_EKN[e])
        start += n
    return torch.cat(outs) if outs else x_MK.new_zeros(0, w_EKN.shape[-1])


# Decoding's token copies gather their experts' weights when these copies hold at most this many values (the
# demo-size model: 24,576 a copy; VL2-Tiny's 3.4 M are left to the grouped matmul, which reads the same weights
# without copying them: gathering them made its decode 1.5x slower, `vla bench policy`), and, eager, when there are
# no more copies than experts (the demo size, 1 thread, a decode pass: 1 x 2 copies 2.7 ms gathered against 3.0 ms,
# 10 x 2 copies 4.7 against 4.3 ms; compiled, where the grouped matmul breaks the graph on CPU, 10 x 2 copies take
# 1.2 ms gathered against 3.2 ms: docs/experiments/decode_pass.py)
GATHER_MAX_ELEMENTS = 1 << 20


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored stacked: gate_up_proj (E, 2F, D) = [gate; up], down_proj (E, D, F) (nn.Linear layout)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.use_grouped_mm = True

    def forward(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        T, D = x_TD.shape
        K = ids_TK.shape[1]
        gate_up_EFD, down_EDF = self.gate_up_proj, self.down_proj
        if torch.is_autocast_enabled(x_TD.device.type):
            # autocast's lists hold nn.Linear's matmuls, not the grouped one: cast as autocast would (bf16 on CUDA is
            # also what the grouped kernel takes; fp32 inputs fell back to one matmul per expert)
            dtype = torch.get_autocast_dtype(x_TD.device.type)
            x_TD, gate_up_EFD, down_EDF = x_TD.to(dtype), gate_up_EFD.to(dtype), down_EDF.to(dtype)
        # compiled, any small number of copies gathers: the grouped matmul is a graph break on CPU
        few = T * K <= self.num_experts or torch.compiler.is_compiling()
        if few and T * K * 3 * down_EDF[0].numel() <= GATHER_MAX_ELEMENTS:
            return self._gathered(x_TD, ids_TK, weights_TK, gate_up_EFD, down_EDF)
        flat_ids_M = ids_TK.reshape(-1)
        order_M = torch.argsort(flat_ids_M, stable=True)  # token copies sorted by expert
        counts_E = expert_counts(flat_ids_M, self.num_experts)
        offsets_E = counts_E.cumsum(0).to(torch.int32)
        counts = None if (self.use_grouped_mm and _grouped_mm_supported(x_TD, down_EDF)) else counts_E.tolist()

        x_MD = x_TD[order_M // K]
        gate_up_MF2 = grouped_mm(x_MD, gate_up_EFD.transpose(1, 2), offsets_E, counts, self.use_grouped_mm)
        gate_MF, up_MF = gate_up_MF2.chunk(2, dim=-1)
        # The routing weight scales the (narrower) hidden activation: down(w * h) == w * down(h).
        w_M1 = weights_TK.reshape(-1)[order_M, None].to(x_TD.dtype)
        h_MF = F.silu(gate_MF) * up_MF * w_M1
        y_MD = grouped_mm(h_MF, down_EDF.transpose(1, 2), offsets_E, counts, self.use_grouped_mm)
        # Un-sort with gathers (cheap backward) and sum each token's K copies slot by slot, in fp32 as a sum over K
        # would accumulate bf16. Compiled on CPU, the scatter of arange that inverts a permutation and a sum over the
        # short K axis each became a scalar loop (4 ms a call at the demo size); an argsort and K gathers stay vectorized.
        unsort_TK = torch.argsort(order_M).view(T, K)
        y_TD = y_MD[unsort_TK[:, 0]].float()
        for k in range(1, K):
            y_TD = y_TD + y_MD[unsort_TK[:, k]]
        return y_TD.to(y_MD.dtype)

    @staticmethod
    def _gathered(x_TD, ids_TK, weights_TK, gate_up_EFD, down_EDF) -> torch.Tensor:
        """Decoding's few token copies of small experts (`GATHER_MAX_ELEMENTS`): each copy's expert weights gathered,
        no sort and no grouped matmul (whose CPU kernel runs one matmul per expert, empty ones too, reading each
        expert's offset on the host)."""
        gate_MF, up_MF = torch.einsum("td,tkfd->tkf", x_TD, gate_up_EFD[ids_TK]).chunk(2, dim=-1)
        h_TKF = F.silu(gate_MF) * up_MF * weights_TK[..., None].to(x_TD.dtype)
        y_TKD = torch.einsum("tkf,tkdf->tkd", h_TKF, down_EDF[ids_TK])
        return y_TKD.float().sum(1).to(y_TKD.dtype)

    def forward_reference(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """Naive per-expert, per-slot loop (the official training path); for tests only."""
        out = torch.zeros_like(x_TD, dtype=torch.float32)
        for e in range(self.num_experts):
            tok, slot = torch.where(ids_TK == e)
            if tok.numel() == 0:
                continue
            gate, up = (x_TD[tok] @ self.gate_up_proj[e].T).chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ self.down_proj[e].T
            out = out.index_add(0, tok, y.float() * weights_TK[tok, slot, None])
        return out.to(x_TD.dtype)


class MoE(nn.Module):
    def __init__(self, config: LanguageModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = GroupedExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts else None
        )

    def forward(self, x_BTD: torch.Tensor, router_bias_BTE: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterOutput]:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        route = self.gate(x_TD, None if router_bias_BTE is None else router_bias_BTE.reshape(B * T, -1))
        y_TD = self.experts(x_TD, route.expert_ids_TK, route.weights_TK)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view(B, T, D), route
