"""Per-example effects -> means with bootstrap confidence intervals (scipy.stats.bootstrap)."""
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
