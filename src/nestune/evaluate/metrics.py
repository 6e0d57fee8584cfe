"""Rates with bootstrap confidence intervals.

Every reported rate is `{"rate": r, "ci": [lo, hi], "n": n}`: the mean of 0/1 outcomes and its 95%
percentile bootstrap interval (resampling the items with replacement), so small evaluation sets show
how little they can tell apart.
"""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi) of the values; the interval is the percentile bootstrap of the mean."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    if x.size == 1 or n_boot <= 0:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    # Percentiles of a discrete bootstrap can miss the mean by rounding; the interval always holds it.
    return mean, float(min(lo, mean)), float(max(hi, mean))


def rate(values, n_boot: int = 1000, seed: int = 0) -> dict:
    """{"rate", "ci", "n"} for 0/1 (or bool) outcomes."""
    values = [float(v) for v in values]
    mean, lo, hi = bootstrap_ci(values, n_boot, seed)
    return {"rate": mean, "ci": [lo, hi], "n": len(values)}


def accuracy(values, n_boot: int = 1000, seed: int = 0) -> dict:
    """Like `rate`, under the key a utility table reads: {"acc", "ci", "n"}."""
    r = rate(values, n_boot, seed)
    return {"acc": r["rate"], "ci": r["ci"], "n": r["n"]}
