"""Effect sizes with confidence intervals, one module for every engine.

Means over examples get a percentile bootstrap (``estimate``, ``bootstrap_ci``: scipy.stats.bootstrap);
``diff_estimate`` bootstraps a difference of two independent means, ``directional_share`` the share of
signed shifts that go the predicted way (the logit-level criterion of ``verification/interchange.py``).
Rates of binary outcomes (a prediction changed, an interchange hit what the feature predicts) get
score intervals: Wilson's for one proportion and Newcombe's hybrid score interval (his method 10)
for the difference of two independent proportions.  Unlike a percentile bootstrap they do not
collapse to a point when every outcome is the same (60 hits of 60 is [0.94, 1], not [1, 1]).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sps
from torch import Tensor


@dataclass(frozen=True)
class Estimate:
    """A mean over examples with its bootstrap confidence interval."""

    mean: float
    ci_low: float
    ci_high: float
    n: int
    confidence: float = 0.95

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}]"


def bootstrap_ci(values: np.ndarray | Tensor, confidence: float = 0.95, n_resamples: int = 2000,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile-BCa bootstrap CI of the mean along the last axis.

    values: [..., n].  Returns (low, high), each [...].  Degenerate samples (n < 2 or all equal)
    get the mean as both ends instead of scipy's NaN.
    """
    x = values.detach().cpu().double().numpy() if isinstance(values, Tensor) else np.asarray(values, dtype=float)
    mean = x.mean(axis=-1)
    if x.shape[-1] < 2:
        return mean.copy(), mean.copy()
    res = sps.bootstrap((x,), np.mean, axis=-1, vectorized=True, confidence_level=confidence,
                        n_resamples=n_resamples, method="percentile", random_state=np.random.default_rng(seed))
    lo, hi = np.asarray(res.confidence_interval.low), np.asarray(res.confidence_interval.high)
    flat = np.ptp(x, axis=-1) == 0
    lo = np.where(flat | np.isnan(lo), mean, lo)
    hi = np.where(flat | np.isnan(hi), mean, hi)
    return lo, hi


def estimate(values: np.ndarray | Tensor, confidence: float = 0.95, n_resamples: int = 2000,
             seed: int = 0) -> Estimate:
    """Mean and bootstrap CI of a 1-D sample [n]."""
    x = values.detach().cpu().double().numpy() if isinstance(values, Tensor) else np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"estimate needs a non-empty 1-D sample, got shape {x.shape}")
    lo, hi = bootstrap_ci(x, confidence, n_resamples, seed)
    return Estimate(float(x.mean()), float(lo), float(hi), int(x.size), confidence)


def diff_estimate(x: np.ndarray, y: np.ndarray, confidence: float = 0.95, n_resamples: int = 2000,
                  seed: int = 0) -> Estimate:
    """mean(x) − mean(y) with a percentile bootstrap CI (x and y resampled independently)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size == 0 or y.size == 0:
        raise ValueError("diff_estimate needs two non-empty samples")
    d = float(x.mean() - y.mean())
    if x.size < 2 or y.size < 2 or (np.ptp(x) == 0 and np.ptp(y) == 0):
        return Estimate(d, d, d, int(x.size + y.size), confidence)
    res = sps.bootstrap((x, y), lambda a, b, axis=-1: a.mean(axis=axis) - b.mean(axis=axis), vectorized=True,
                        paired=False, confidence_level=confidence, n_resamples=n_resamples, method="percentile",
                        random_state=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if np.isnan(lo) or np.isnan(hi):
        lo = hi = d
    return Estimate(d, lo, hi, int(x.size + y.size), confidence)


def directional_share(x: np.ndarray, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> Estimate:
    """Σ max(x, 0) / Σ |x| of signed shifts [n] (the share of the movement that goes the predicted way; 0 when
    nothing moves) with a percentile bootstrap CI over the pairs; where every shift goes one way, Wilson's
    interval of the share of upward pairs (which then equals it), so 30 of 30 upward is not [1, 1]."""
    x = np.asarray(x, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"a directional share needs a non-empty 1-D sample, got shape {x.shape}")

    def share(a: np.ndarray, axis: int = -1) -> np.ndarray:
        total = np.abs(a).sum(axis=axis)
        return np.where(total > 0, np.clip(a, 0, None).sum(axis=axis) / np.where(total > 0, total, 1.0), 0.0)

    d = float(share(x))
    if (x > 0).all() or (x <= 0).all():  # every pair one way: a bootstrap collapses to a point, Wilson's does not
        w = proportion((x > 0).astype(float), confidence)
        return Estimate(d, w.ci_low, w.ci_high, int(x.size), confidence)
    res = sps.bootstrap((x,), share, vectorized=True, confidence_level=confidence, n_resamples=n_resamples,
                        method="percentile", random_state=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if np.isnan(lo) or np.isnan(hi):
        lo = hi = d
    return Estimate(d, lo, hi, int(x.size), confidence)


def _wilson(k: float, n: int, z: float) -> tuple[float, float]:
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def _binary(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"a rate needs a non-empty 1-D sample of 0/1 outcomes, got shape {x.shape}")
    if not np.isin(x, (0.0, 1.0)).all():
        raise ValueError("a rate needs 0/1 outcomes")
    return x


def proportion(x: np.ndarray, confidence: float = 0.95) -> Estimate:
    """The rate of 0/1 outcomes with Wilson's score interval."""
    x = _binary(x)
    z = float(sps.norm.ppf(0.5 + confidence / 2))
    lo, hi = _wilson(float(x.sum()), x.size, z)
    return Estimate(float(x.mean()), lo, hi, int(x.size), confidence)


def proportion_diff(x: np.ndarray, y: np.ndarray, confidence: float = 0.95) -> Estimate:
    """rate(x) − rate(y) of two independent 0/1 samples with Newcombe's hybrid score interval."""
    x, y = _binary(x), _binary(y)
    z = float(sps.norm.ppf(0.5 + confidence / 2))
    p1, p2 = float(x.mean()), float(y.mean())
    l1, u1 = _wilson(float(x.sum()), x.size, z)
    l2, u2 = _wilson(float(y.sum()), y.size, z)
    d = p1 - p2
    lo = d - float(np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2))
    hi = d + float(np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))
    return Estimate(d, max(-1.0, lo), min(1.0, hi), int(x.size + y.size), confidence)


__all__ = ["Estimate", "bootstrap_ci", "estimate", "diff_estimate", "directional_share", "proportion", "proportion_diff"]
