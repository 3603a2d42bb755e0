"""Distances between a query activation and the activations of a sample (InversionView).

The distance of a sample x to a query q at a site is the minimum over x's non-special positions
p of ``‖a_p(x) − q‖₂ / ‖q‖₂`` (metric ``"l2"``, ε = 0.1) or of ``1 − cos(a_p(x), q)``
(metric ``"cosine"``, ε = 0.25).  A sample with no non-special position is infinitely far.
"""
from __future__ import annotations

from torch import Tensor

from circuitkit.errors import CircuitkitError

METRICS = ("l2", "cosine")
DEFAULT_EPS = {"l2": 0.1, "cosine": 0.25}


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise CircuitkitError(f"unknown distance metric {metric!r}; valid: {', '.join(METRICS)}")


def position_distances(acts: Tensor, query: Tensor, metric: str = "l2") -> Tensor:
    """Per-position distances [n, pos] of acts [n, pos, d] to query [d] (or [n, d])."""
    check_metric(metric)
    q = query if query.ndim == 2 else query.unsqueeze(0)
    q = q.unsqueeze(1).to(acts.dtype)  # [n|1, 1, d]
    if metric == "l2":
        return (acts - q).norm(dim=-1) / q.norm(dim=-1).clamp_min(1e-12)
    cos = (acts * q).sum(-1) / (acts.norm(dim=-1) * q.norm(dim=-1)).clamp_min(1e-12)
    return 1.0 - cos


def sample_distances(acts: Tensor, query: Tensor, special: Tensor, metric: str = "l2") -> tuple[Tensor, Tensor]:
    """(distance [n], argmin position [n]) over non-special positions (special: bool [n, pos])."""
    d = position_distances(acts, query, metric).masked_fill(special.to(acts.device), float("inf"))
    return d.min(dim=1)
