"""components.evaluation.metrics: pass@k against the combinatorial formula, bootstrap intervals on known data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from arborl.components.evaluation.metrics import bootstrap_ci, paired_bootstrap, pass_at_k, t_interval


def test_pass_at_k_matches_the_unbiased_formula():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                want = 1.0 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12), (n, c, k)


def test_pass_at_k_edges_and_bad_input():
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(200, 5, 100) == pytest.approx(1 - math.comb(195, 100) / math.comb(200, 100), rel=1e-9)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(3, 4, 1)


def test_bootstrap_ci_matches_the_normal_approximation_on_known_data():
    # 400 coin flips with exactly 200 heads: mean 0.5, standard error sqrt(0.25 / 400) = 0.025
    x = np.array([1.0] * 200 + [0.0] * 200)
    ci = bootstrap_ci(x, resamples=4000, seed=3)
    assert ci.estimate == 0.5
    assert ci.low == pytest.approx(0.5 - 1.96 * 0.025, abs=0.006)
    assert ci.high == pytest.approx(0.5 + 1.96 * 0.025, abs=0.006)
    assert bootstrap_ci(x, resamples=500, seed=7) == bootstrap_ci(x, resamples=500, seed=7)  # seeded


def test_bootstrap_ci_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(11)
    covered = 0
    trials = 300
    for t in range(trials):
        ci = bootstrap_ci(rng.binomial(1, 0.3, size=120), resamples=500, seed=t)
        covered += ci.low <= 0.3 <= ci.high
    assert 0.89 <= covered / trials <= 0.99


def test_bootstrap_ci_rejects_empty_or_nan():
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([0.1, math.nan])


def test_paired_bootstrap_of_differences():
    b = np.random.default_rng(0).random(50)
    shifted = paired_bootstrap(b + 0.1, b, resamples=300)
    assert shifted.estimate == pytest.approx(0.1) and shifted.low == pytest.approx(0.1)
    assert shifted.high == pytest.approx(0.1)  # a constant difference has no spread, however noisy b is
    a = np.array([1, 1, 1, 0, 1, 0, 1, 1, 1, 1] * 5, dtype=float)
    base = np.array([0, 1, 0, 0, 1, 0, 1, 0, 1, 1] * 5, dtype=float)
    ci = paired_bootstrap(a, base, resamples=2000, seed=1)
    assert ci.estimate == pytest.approx(0.3)
    assert 0.0 < ci.low < 0.3 < ci.high
    with pytest.raises(ValueError, match="same shape"):
        paired_bootstrap([1.0, 0.0], [1.0])


def test_t_interval_uses_the_student_t_quantile():
    ci = t_interval([0.2, 0.4, 0.6])  # mean 0.4, sd 0.2, t(0.975, 2) = 4.302653
    assert ci.estimate == pytest.approx(0.4)
    assert ci.high - ci.estimate == pytest.approx(4.302653 * 0.2 / math.sqrt(3), rel=1e-5)
    assert t_interval([0.5]).low == 0.5
