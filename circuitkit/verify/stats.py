"""Effect sizes with bootstrap confidence intervals (scipy.stats.bootstrap).

One-sample means reuse the patching engine's ``estimate`` (``circuitkit.patching.stats``); the
difference of two independent means (necessity: change rate when f differs minus change rate
when f agrees) is bootstrapped here with both samples resampled independently.
"""
from __future__ import annotations

import numpy as np
from scipy import stats as sps

from circuitkit.patching.stats import Estimate, estimate  # one CI method everywhere


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


__all__ = ["Estimate", "estimate", "diff_estimate"]
