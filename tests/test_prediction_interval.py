"""The prediction interval for one new run and the equivalence verdict, on synthetic samples
with known answers (bnlab.evidence.stats)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bnlab.evidence.stats import (
    equivalence_verdict,
    mean_std,
    paired_difference,
    prediction_interval,
    t_interval,
)


def test_prediction_interval_is_the_textbook_formula():
    # n = 3, t_{0.975, 2} = 4.302653 (tables), sqrt(1 + 1/3) = 1.154701
    stat = mean_std([0.880, 0.886, 0.890])
    low, high = prediction_interval(stat)
    half = 4.302653 * stat["std"] * math.sqrt(1 + 1 / 3)
    print("interval", low, high, "half width", half)
    assert (low, high) == pytest.approx((stat["mean"] - half, stat["mean"] + half), rel=1e-6)
    # wider than the interval of the mean by sqrt(n + 1)
    mean_low, mean_high = t_interval(stat)
    assert (high - low) / (mean_high - mean_low) == pytest.approx(2.0, rel=1e-9)


def test_prediction_interval_needs_two_values_and_a_valid_confidence():
    assert prediction_interval(mean_std([0.5])) is None
    assert prediction_interval(mean_std([])) is None
    with pytest.raises(ValueError, match=r"got 1\.5"):
        prediction_interval(mean_std([0.1, 0.2]), confidence=1.5)


@pytest.mark.parametrize("n", [3, 5])
def test_prediction_interval_covers_a_new_draw_95_percent_of_the_time(n):
    # 4,000 synthetic experiments: n runs and one new run from the same normal distribution
    rng = np.random.default_rng(n)
    draws = rng.normal(0.6, 0.02, size=(4000, n + 1))
    hits = 0
    for row in draws:
        low, high = prediction_interval(mean_std(row[:n].tolist()))
        hits += low <= row[n] <= high
    coverage = hits / len(draws)
    print(f"n={n}: coverage {coverage:.4f} (nominal 0.95; binomial sd 0.0034)")
    assert 0.935 <= coverage <= 0.965  # +-4.4 binomial sd around 0.95
    # the naive "within the seed range" rule covers (n - 1)/(n + 1) only: 50% at n = 3
    in_range = np.mean((draws[:, n] >= draws[:, :n].min(1)) & (draws[:, n] <= draws[:, :n].max(1)))
    print(f"n={n}: within the range of the n runs {in_range:.3f}")
    assert in_range == pytest.approx((n - 1) / (n + 1), abs=0.03)


@pytest.mark.parametrize("low, high, margin, want", [
    (-0.004, 0.006, 0.01, "supported"),     # wholly inside the margin
    (0.02, 0.05, 0.01, "contradicted"),     # wholly above it
    (-0.05, -0.02, 0.01, "contradicted"),   # wholly below it
    (-0.004, 0.02, 0.01, "inconclusive"),   # straddles a margin
    (None, None, 0.01, "inconclusive"),     # one seed: no interval
])
def test_equivalence_verdict(low, high, margin, want):
    assert equivalence_verdict({"low": low, "high": high}, margin) == want


def test_equivalence_verdict_on_synthetic_pairs():
    rng = np.random.default_rng(7)
    same = paired_difference(dict(enumerate(rng.normal(0.6, 0.001, 5))),
                             dict(enumerate(rng.normal(0.6, 0.001, 5))))
    apart = paired_difference(dict(enumerate(rng.normal(0.7, 0.001, 5))),
                              dict(enumerate(rng.normal(0.6, 0.001, 5))))
    print("same", same["low"], same["high"], "apart", apart["low"], apart["high"])
    assert equivalence_verdict(same, 0.01) == "supported"
    assert equivalence_verdict(apart, 0.01) == "contradicted"
    with pytest.raises(ValueError, match="got 0"):
        equivalence_verdict(same, 0)
