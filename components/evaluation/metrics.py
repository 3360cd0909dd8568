"""Evaluation statistics: the unbiased pass@k estimator, bootstrap confidence intervals of a mean, and
the paired bootstrap of per-question differences between two models. Pure numpy, seeded."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 − C(n−c, k) / C(n, k) (Chen et al. 2021).

    Computed as 1 − Π_{i=n−c+1}^{n} (1 − k/i) to stay exact for large n.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap percentile interval."""

    estimate: float
    low: float
    high: float


def bootstrap_ci(values, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> Interval:
    """Mean of `values` (shape [n]) and its percentile bootstrap interval: `resamples` draws of n values
    with replacement from a numpy Generator seeded with `seed`."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("bootstrap_ci: values contain NaN or inf")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))
    means = x[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(float(x.mean()), float(low), float(high))


def paired_bootstrap(a, b, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> Interval:
    """Mean per-question difference a − b (both shape [n], same question order) with its bootstrap interval.

    Resampling questions (not models) keeps each question's pair together, so the interval reflects how
    much the improvement depends on which questions were asked.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap needs arrays of the same shape, got {a.shape} and {b.shape}")
    return bootstrap_ci(a - b, resamples, seed, level)


def t_interval(values, level: float = 0.95) -> Interval:
    """Mean and Student-t interval over a few independent repeats (e.g. seeds); one value gives a point."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("t_interval needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return Interval(mean, mean, mean)
    half = float(stats.t.ppf(0.5 + level / 2.0, df=x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return Interval(mean, mean - half, mean + half)
