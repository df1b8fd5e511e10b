"""Routing analysis: which MoE experts the action tokens of each robot use, next to image and text tokens.

Inputs, per forward pass: for each decoder layer, the router's expert ids per token, a (T, K) integer tensor (or
(B, T, K), flattened; `None` for dense layers, which are skipped; a `backbone.moe.RouterOutput` is accepted too),
and per-token labels: the token kind ("action", "image", "text", ...) and, for action tokens, the embodiment name.
Each token is put in a group:

- `action:NAME` for action tokens of embodiment NAME (`action` when no embodiment is given),
- otherwise the kind itself (`image`, `text`, `state`, ...); kinds in `ignore_kinds` (default: `pad`) are dropped.

Each of a token's K expert choices counts once (or with its router weight when `weighted=True`). `RoutingStats`
accumulates these counts per layer over many batches; `shares(layer)` gives each group's distribution over the
experts (each row sums to 1).

Specialization score: the normalized mutual information between the embodiment X and the chosen expert Y over action
tokens, every (embodiment, expert) choice one sample:

    NMI = I(X; Y) / sqrt(H(X) H(Y))          (geometric-mean normalization, in [0, 1])

It is 0 when all robots use the experts with the same distribution and 1 when each robot always uses its own single
expert (K = 1). With K > 1 choices per token, or when a robot spreads over several experts of its own, H(Y) exceeds
H(X) and NMI stays below 1 even for perfectly disjoint expert sets (two robots on two disjoint experts each, K = 2:
NMI = 1/sqrt(2)). So the report also gives Theil's uncertainty coefficient

    U = I(X; Y) / H(X)                       (in [0, 1])

the share of the embodiment's entropy that the expert choice explains: 1 whenever the expert sets are disjoint, for
any K. Both are undefined (NaN; `null` in JSON) with fewer than two embodiments; averages skip undefined layers.

Outputs: `write_routing_json` (format in its docstring) and `plot_routing_heatmap` (one panel per MoE layer,
rows = groups, columns = experts, colour = share, titled with the layer's NMI).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ACTION = "action"
IMAGE = "image"
TEXT = "text"
NORMALIZATIONS = ("sqrt", "arithmetic", "embodiment")


# ------------------------------------------------------------------------------------------------- token groups
def token_groups(kinds: Sequence[str] | np.ndarray, embodiments: Sequence[str | None] | str | None = None) -> list[str]:
    """Group label of each token: `action:NAME` for action tokens of embodiment NAME, else the kind.

    `kinds` has one string per token (nested (B, T) lists or arrays are flattened). `embodiments` is one name (or
    None) per token, a single name for all action tokens, or None."""
    kinds_flat = np.asarray(kinds, dtype=object).reshape(-1)
    if embodiments is None or isinstance(embodiments, str):
        embodiments_flat = np.full(kinds_flat.shape, embodiments, dtype=object)
    else:
        embodiments_flat = np.asarray(embodiments, dtype=object).reshape(-1)
        if embodiments_flat.shape != kinds_flat.shape:
            raise ValueError(f"{embodiments_flat.size} embodiment labels for {kinds_flat.size} token kinds")
    groups = []
    for kind, embodiment in zip(kinds_flat.tolist(), embodiments_flat.tolist()):
        if not isinstance(kind, str):
            raise TypeError(f"token kinds must be strings, got {kind!r}")
        groups.append(f"{ACTION}:{embodiment}" if kind == ACTION and embodiment else kind)
    return groups


def _group_order(group: str) -> tuple[int, str]:
    """Display order: action groups (by embodiment), then image, text, then any other kind."""
    if group.startswith(ACTION):
        return 0, group
    return {IMAGE: 1, TEXT: 2}.get(group, 3), group


# ------------------------------------------------------------------------------------------------- information
def _entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def mutual_information(joint: np.ndarray) -> tuple[float, float, float]:
    """(I(X;Y), H(X), H(Y)) in bits from a joint count (or probability) table with X on rows and Y on columns."""
    joint = np.asarray(joint, dtype=np.float64)
    total = joint.sum()
    if total <= 0:
        return 0.0, 0.0, 0.0
    p = joint / total
    h_x, h_y = _entropy_bits(p.sum(1)), _entropy_bits(p.sum(0))
    return max(0.0, h_x + h_y - _entropy_bits(p.reshape(-1))), h_x, h_y


def nmi_from_counts(counts_by_embodiment: Mapping[str, Any], normalization: str = "sqrt") -> float:
    """Specialization of expert choice by embodiment from {embodiment: (E,) expert counts}.

    `normalization`: "sqrt" (NMI = I / sqrt(H(X) H(Y)), the default), "arithmetic" (2 I / (H(X) + H(Y))) or
    "embodiment" (Theil's U = I / H(X)). NaN when fewer than two embodiments have counts; 0 when they do but all
    choices fall on one expert."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; known: {', '.join(NORMALIZATIONS)}")
    rows = [np.asarray(c, dtype=np.float64) for c in counts_by_embodiment.values()]
    rows = [r for r in rows if r.sum() > 0]
    if len(rows) < 2:
        return math.nan
    info, h_x, h_y = mutual_information(np.stack(rows))
    if normalization == "embodiment":
        denominator = h_x
    elif normalization == "arithmetic":
        denominator = (h_x + h_y) / 2
    else:
        denominator = math.sqrt(h_x * h_y)
    return min(1.0, info / denominator) if denominator > 0 else 0.0


# ------------------------------------------------------------------------------------------------- accumulation
def _expert_ids(entry: Any) -> torch.Tensor:
    ids = getattr(entry, "expert_ids_TK", entry)
    ids = torch.as_tensor(ids)
    if ids.is_floating_point() or ids.dim() < 2:
        raise ValueError(f"expert ids must be an integer (T, K) or (B, T, K) tensor, got {ids.dtype} {tuple(ids.shape)}")
    return ids.reshape(-1, ids.shape[-1])


class RoutingStats:
    """Expert-choice counts per MoE layer and token group, accumulated over batches.

    `n_experts`: routed experts per layer. `weighted`: count router weights instead of choices (then `add` needs the
    weights, or RouterOutput entries that carry them). `ignore_kinds`: token kinds never counted (padding)."""

    def __init__(self, n_experts: int, weighted: bool = False, ignore_kinds: Sequence[str] = ("pad",)) -> None:
        if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
            raise ValueError(f"n_experts must be a positive int, got {n_experts!r}")
        self.n_experts = n_experts
        self.weighted = weighted
        self.ignore_kinds = tuple(ignore_kinds)
        self._counts: dict[int, dict[str, np.ndarray]] = {}
        self.top_k: int | None = None
        self.n_batches = 0

    def add(
        self,
        layer_expert_ids: Sequence[Any],
        kinds: Sequence[str] | np.ndarray,
        embodiments: Sequence[str | None] | str | None = None,
        layer_weights: Sequence[Any] | None = None,
        mask: Any = None,
    ) -> None:
        """Count one forward pass.

        `layer_expert_ids[i]`: layer i's (T, K) expert ids (or (B, T, K), or a RouterOutput), None for a dense
        layer. `kinds`/`embodiments`: per-token labels as in `token_groups`, T = B * T' tokens in the same order.
        `layer_weights[i]`: matching (T, K) router weights when `weighted`. `mask`: optional (T,) bool, False = skip."""
        groups = token_groups(kinds, embodiments)
        keep = np.array([g not in self.ignore_kinds for g in groups], dtype=bool)
        if mask is not None:
            mask = torch.as_tensor(mask).reshape(-1).cpu().numpy().astype(bool)
            if mask.shape != keep.shape:
                raise ValueError(f"mask has {mask.size} entries for {keep.size} tokens")
            keep &= mask
        names = sorted(set(g for g, k in zip(groups, keep) if k))
        group_index = np.array([names.index(g) if k else -1 for g, k in zip(groups, keep)], dtype=np.int64)
        for layer, entry in enumerate(layer_expert_ids):
            if entry is None:
                continue
            ids = _expert_ids(entry)
            if ids.shape[0] != len(groups):
                raise ValueError(f"layer {layer}: expert ids cover {ids.shape[0]} tokens but {len(groups)} tokens are labelled")
            if ids.numel() == 0:
                continue
            if int(ids.min()) < 0 or int(ids.max()) >= self.n_experts:
                raise ValueError(f"layer {layer}: expert ids outside [0, {self.n_experts}): [{int(ids.min())}, {int(ids.max())}]")
            if self.top_k is not None and ids.shape[1] != self.top_k:
                raise ValueError(f"layer {layer}: K = {ids.shape[1]} choices per token, earlier batches had {self.top_k}")
            self.top_k = ids.shape[1]
            weights = self._weights(layer, entry, layer_weights, ids.shape)
            self._count(layer, ids, group_index, names, weights)
        self.n_batches += 1

    def _weights(self, layer: int, entry: Any, layer_weights: Sequence[Any] | None, shape: torch.Size):
        if not self.weighted:
            return None
        weights = layer_weights[layer] if layer_weights is not None else getattr(entry, "weights_TK", None)
        if weights is None:
            raise ValueError(f"layer {layer}: weighted RoutingStats needs router weights")
        weights = torch.as_tensor(weights).reshape(-1, shape[-1])
        if weights.shape != shape:
            raise ValueError(f"layer {layer}: weights shape {tuple(weights.shape)} != expert ids shape {tuple(shape)}")
        return weights

    def _count(self, layer: int, ids: torch.Tensor, group_index: np.ndarray, names: list[str], weights) -> None:
        """Add one layer's counts: a single bincount over (group, expert) pairs, on the ids' device."""
        group_TK = torch.as_tensor(group_index, device=ids.device)[:, None].expand_as(ids)
        keep = group_TK >= 0
        pair = group_TK[keep] * self.n_experts + ids[keep].long()
        pair_weights = weights.to(ids.device, torch.float64)[keep] if weights is not None else None
        counts = torch.bincount(pair, weights=pair_weights, minlength=len(names) * self.n_experts)
        counts = counts.double().cpu().numpy().reshape(len(names), self.n_experts)
        layer_counts = self._counts.setdefault(layer, {})
        for name, row in zip(names, counts):
            layer_counts[name] = layer_counts.get(name, np.zeros(self.n_experts)) + row

    # --------------------------------------------------------------------------------------------- reading
    @property
    def layers(self) -> list[int]:
        """Indices of the layers with counts (the MoE layers), ascending."""
        return sorted(self._counts)

    @property
    def groups(self) -> list[str]:
        """Every group seen in any layer, in display order (action:NAME..., image, text, others)."""
        return sorted({g for counts in self._counts.values() for g in counts}, key=_group_order)

    @property
    def embodiments(self) -> list[str]:
        return [g.split(":", 1)[1] for g in self.groups if g.startswith(f"{ACTION}:")]

    def counts(self, layer: int) -> dict[str, np.ndarray]:
        """{group: (n_experts,) choice counts (or summed weights)} for `layer`, groups in display order."""
        if layer not in self._counts:
            raise KeyError(f"no routing recorded for layer {layer}; recorded layers: {self.layers}")
        counts = self._counts[layer]
        return {g: counts[g].copy() for g in sorted(counts, key=_group_order)}

    def shares(self, layer: int) -> dict[str, np.ndarray]:
        """{group: (n_experts,) share of that group's expert choices per expert}; each row sums to 1."""
        return {g: c / c.sum() for g, c in self.counts(layer).items() if c.sum() > 0}

    def nmi(self, layer: int, normalization: str = "sqrt") -> float:
        """Specialization of expert choice by embodiment over the action tokens of `layer` (see the module doc)."""
        action_counts = {g: c for g, c in self.counts(layer).items() if g.startswith(f"{ACTION}:")}
        return nmi_from_counts(action_counts, normalization)

    def to_dict(self, normalization: str = "sqrt") -> dict[str, Any]:
        """The JSON report (see `write_routing_json`)."""
        layers = []
        for layer in self.layers:
            counts = self.counts(layer)
            layers.append({
                "layer": layer,
                "shares": {g: s.tolist() for g, s in self.shares(layer).items()},
                "choices": {g: float(c.sum()) for g, c in counts.items()},
                "nmi": _json_number(self.nmi(layer, normalization)),
                "theil_u": _json_number(self.nmi(layer, "embodiment")),
            })
        per_layer_nmi = [entry["nmi"] for entry in layers]
        per_layer_u = [entry["theil_u"] for entry in layers]
        return {
            "n_experts": self.n_experts,
            "top_k": self.top_k,
            "weighted": self.weighted,
            "normalization": normalization,
            "groups": self.groups,
            "embodiments": self.embodiments,
            "n_batches": self.n_batches,
            "layers": layers,
            "nmi_mean": _mean_defined(per_layer_nmi),
            "theil_u_mean": _mean_defined(per_layer_u),
        }


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _mean_defined(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


# ------------------------------------------------------------------------------------------------- one-batch helpers
def expert_usage(
    layer_expert_ids: Sequence[Any],
    kinds: Sequence[str] | np.ndarray,
    embodiments: Sequence[str | None] | str | None = None,
    n_experts: int | None = None,
    layer_weights: Sequence[Any] | None = None,
) -> dict[int, dict[str, np.ndarray]]:
    """{layer: {group: (n_experts,) shares}} for one forward pass (rows sum to 1; dense layers absent).

    `n_experts` defaults to the largest expert id seen + 1; pass the config's `n_routed_experts` to be exact.
    With `layer_weights`, shares are of summed router weights rather than of choices."""
    if n_experts is None:
        seen = [int(_expert_ids(e).max()) for e in layer_expert_ids if e is not None]
        n_experts = max(seen, default=0) + 1
    stats = RoutingStats(n_experts, weighted=layer_weights is not None)
    stats.add(layer_expert_ids, kinds, embodiments, layer_weights=layer_weights)
    return {layer: stats.shares(layer) for layer in stats.layers}


def specialization_nmi(stats: RoutingStats, normalization: str = "sqrt") -> tuple[dict[int, float], float]:
    """({layer: NMI}, mean over layers where it is defined) from accumulated stats; NaN where undefined."""
    per_layer = {layer: stats.nmi(layer, normalization) for layer in stats.layers}
    defined = [v for v in per_layer.values() if not math.isnan(v)]
    return per_layer, float(np.mean(defined)) if defined else math.nan


# ------------------------------------------------------------------------------------------------- outputs
def write_routing_json(stats: RoutingStats, out_json: str | Path, normalization: str = "sqrt",
                       measured_on: str | None = None) -> dict[str, Any]:
    """Write the report and return it. Format:

        {"n_experts": E, "top_k": K, "weighted": false, "normalization": "sqrt",
         "groups": ["action:arm3", "action:point2d", "image", "text"], "embodiments": ["arm3", "point2d"],
         "n_batches": N,
         "layers": [{"layer": i, "shares": {group: [E floats summing to 1]}, "choices": {group: total},
                     "nmi": x or null, "theil_u": u or null}, ...],
         "nmi_mean": x or null, "theil_u_mean": u or null, "measured_on": "..." (only when given)}

    `layers` lists MoE layers only, by their decoder-layer index; `choices` is the number of expert choices (or summed
    weights) behind each share row. `measured_on` says which frames the counts come from (e.g. training frames, so
    a reader does not take them for held-out numbers)."""
    report = stats.to_dict(normalization)
    if measured_on is not None:
        report["measured_on"] = measured_on
    path = Path(out_json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return report


def plot_routing_heatmap(stats: RoutingStats, out_png: str | Path, max_columns: int = 4, title: str = "") -> Path:
    """One panel per MoE layer: rows = groups, columns = experts, colour = share (one scale for all panels),
    each titled with the layer's NMI and Theil's U; the figure title carries the mean NMI. Uses the Agg canvas
    directly (no pyplot state, no display), so it is safe in headless runs and threads."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers, groups = stats.layers, stats.groups
    if not layers:
        raise ValueError("no routing recorded: call RoutingStats.add before plotting")
    matrices = []
    for layer in layers:
        shares = stats.shares(layer)
        matrices.append(np.stack([shares.get(g, np.zeros(stats.n_experts)) for g in groups]))
    vmax = max(float(m.max()) for m in matrices) or 1.0

    n_cols = min(max_columns, len(layers))
    n_rows = math.ceil(len(layers) / n_cols)
    panel_w = min(10.0, max(3.0, 0.08 * stats.n_experts + 1.5))
    panel_h = max(1.6, 0.35 * len(groups) + 1.0)
    figure = Figure(figsize=(panel_w * n_cols + 1.0, panel_h * n_rows + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(n_rows, n_cols, squeeze=False)
    tick_step = max(1, stats.n_experts // 8)
    image = None
    for ax, layer, matrix in zip(axes.flat, layers, matrices):
        image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"layer {layer}  NMI {_fmt(stats.nmi(layer))}  U {_fmt(stats.nmi(layer, 'embodiment'))}", fontsize=9)
        ax.set_yticks(range(len(groups)), groups, fontsize=7)
        ax.set_xticks(range(0, stats.n_experts, tick_step))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel("expert", fontsize=8)
    for ax in list(axes.flat)[len(layers):]:
        ax.set_visible(False)
    figure.colorbar(image, ax=axes, label="share of group's expert choices", shrink=0.8)
    _, mean_nmi = specialization_nmi(stats)
    heading = f"expert usage by token group  (mean NMI {_fmt(mean_nmi)}; U = Theil's uncertainty coefficient)"
    figure.suptitle(f"{title}  {heading}" if title else heading, fontsize=10)
    path = Path(out_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def collect_policy_routing(policy, batches, max_batches: int | None = None) -> RoutingStats:
    """Run `policy.route(batch)` (one forward pass each) over `batches` and count which experts every token group
    uses: action tokens per embodiment, image, state and text tokens."""
    from vla.policy import KIND_NAMES

    language = policy.backbone.language.config
    stats = RoutingStats(language.n_routed_experts)
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        routes, kinds_BT, embodiments = policy.route(batch)
        B, T = kinds_BT.shape
        kinds = [KIND_NAMES[int(k)] for k in kinds_BT.reshape(-1).tolist()]
        token_embodiments = [embodiments[b] for b in range(B) for _ in range(T)]
        stats.add([None if r is None else r.expert_ids_TK for r in routes], kinds, token_embodiments)
    return stats
