"""Scoring circuits the MIB way: edge-level faithfulness, CPR / CMD over MIB's k grid, and ROC AUC against a
ground truth.

Faithfulness of a circuit C (Mueller et al. 2025, MIB circuit track):
f(C) = (m(C) − m(∅)) / (m(M) − m(∅)), m averaged over the bases, everything outside C ablated
(``masked.py``).  For a method's scores, the circuit at k % keeps the round(k % × |E|) best-scored edges
(at least 1 above 0 %), pruned; CPR is the area under f against k / 100 (trapezoids over MIB's grid,
edges ranked by signed score: higher is better) and CMD the area under |1 − f| (ranked by |score|: lower is
better).  ROC AUC ranks the edges by score against a ground-truth edge set (Mann–Whitney U, ties halved).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor

from circuitkit.discovery.edge_graph import EdgeGraph, edge_count, masks_for
from circuitkit.discovery.masked import circuit_metric
from circuitkit.discovery.methods import DiscoveryProblem
from circuitkit.results import SettingsRecord, to_jsonable

#: MIB's circuit sizes, in % of all edges
MIB_PERCENTS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)


@torch.no_grad()
def faithfulness(p: DiscoveryProblem, keep: Tensor) -> Tensor:
    """f of each circuit keep [c, S, R] (or [S, R]) -> [c]; nan where m(M) = m(∅) (undefined)."""
    g = p.graph
    ends = circuit_metric(p.runner, g, p.base, p.ablated, torch.stack([g.full(), g.empty()]), p.ctx, p.metric)
    m_full, m_empty = ends.mean(1).tolist()
    vals = circuit_metric(p.runner, g, p.base, p.ablated, keep, p.ctx, p.metric).mean(1)
    if abs(m_full - m_empty) < 1e-9:
        return torch.full_like(vals, float("nan"))
    return (vals - m_empty) / (m_full - m_empty)


def _area(percents: Sequence[float], ys: np.ndarray) -> float:
    """Trapezoid area under ys against percents / 100."""
    x = np.asarray(percents, dtype=float) / 100.0
    return float(((ys[1:] + ys[:-1]) / 2 * np.diff(x)).sum())


@dataclass
class Curve(SettingsRecord):
    """Faithfulness of a method's top-k circuits over MIB's grid, and the areas under it."""

    percents: list[float]
    n_edges: list[int]  # edges kept after pruning, per percent (signed ranking)
    faithfulness: list[float]  # signed ranking (CPR's curve)
    faithfulness_abs: list[float]  # |score| ranking (CMD's curve)
    cpr: float
    cmd: float


def mib_curve(p: DiscoveryProblem, scores: Tensor, percents: Sequence[float] = MIB_PERCENTS) -> Curve:
    """CPR's and CMD's curves for ``scores`` [S, R] and their areas."""
    g = p.graph
    counts = [edge_count(g, k) for k in percents]
    signed, absolute = masks_for(g, scores, counts, absolute=False), masks_for(g, scores, counts, absolute=True)
    f = faithfulness(p, torch.cat([signed, absolute]))
    f_signed, f_abs = f[: len(counts)].numpy(), f[len(counts):].numpy()
    return Curve(list(percents), [int(m.sum()) for m in signed], to_jsonable(f_signed.round(6).tolist()),
                 to_jsonable(f_abs.round(6).tolist()), round(_area(percents, f_signed), 6),
                 round(_area(percents, np.abs(1 - f_abs)), 6))


def faithfulness_at(p: DiscoveryProblem, scores: Tensor, n_edges: int) -> float:
    """f of the circuit of the ``n_edges`` best-scored edges (signed ranking, pruned)."""
    return float(faithfulness(p, p.graph.top_edges(scores, min(n_edges, p.graph.n_edges)))[0])


def roc_auc(graph: EdgeGraph, scores: Tensor, truth: Tensor, absolute: bool = True,
            among: Tensor | None = None) -> float:
    """Area under the ROC curve of ranking the real edges (those in ``among`` [S, R] bool, when given) by score
    (|score| by default) against ``truth`` [S, R] bool; nan when the truth holds all or none of them."""
    real = graph.real if among is None else graph.real & among
    y = truth[real].numpy().astype(bool)
    s = (scores.abs() if absolute else scores)[real].double().numpy()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


__all__ = ["MIB_PERCENTS", "Curve", "faithfulness", "faithfulness_at", "mib_curve", "roc_auc"]
