"""Numbers over seeds and the words that judge them: one place for every study and report.

Conventions (SPEC.md, "Evidence"):

- A statistic over seeds is a dict ``{mean, std, n, min, max}`` (:func:`mean_std`); ``std``
  is the sample standard deviation (ddof = 1), 0 for one value; non-finite values and
  ``None`` are left out (a diverged run has no final accuracy to average).
- Two settings run on the same seeds are compared by their *paired* differences
  (:func:`paired_difference`): the mean difference with a 95% Student-t interval,
  ``mean ± t_{0.975, n-1} · std / sqrt(n)`` (Student 1908; any statistics text).
- A verdict is one of three words, :data:`VERDICTS`: *supported*, *contradicted*,
  *inconclusive*. "No significant difference" is inconclusive, never support.

    >>> mean_std([0.5, 0.7])["mean"]
    0.6
    >>> d = paired_difference({0: 0.61, 1: 0.63, 2: 0.62}, {0: 0.55, 1: 0.56, 2: 0.54})
    >>> round(d["mean"], 3), d["n"], d["low"] > 0
    (0.07, 3, True)
    >>> interval_verdict(d, expected="above")
    'supported'
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "VERDICTS",
    "compare_means",
    "equivalence_verdict",
    "fmt_pct",
    "fmt_pm",
    "interval_verdict",
    "mean_std",
    "paired_difference",
    "plural",
    "prediction_interval",
    "relation",
    "t_interval",
    "verdict",
    "verdict_phrase",
]

VERDICTS = ("supported", "contradicted", "inconclusive")
_OPPOSITE = {"above": "below", "below": "above"}


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), n, min, max of the finite values.

    >>> mean_std([1.0, None, float("nan"), 3.0])
    {'mean': 2.0, 'std': 1.4142135623730951, 'n': 2, 'min': 1.0, 'max': 3.0}
    """
    xs = _finite(values)
    if not xs:
        return {"mean": None, "std": None, "n": 0, "min": None, "max": None}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "n": len(xs), "min": min(xs), "max": max(xs)}


def t_interval(stat: Mapping[str, Any], confidence: float = 0.95) -> tuple[float, float] | None:
    """The ``confidence`` Student-t interval of the mean of a :func:`mean_std` dict, or None
    with fewer than two values (no spread to scale by).

    ``mean ± t_{(1+confidence)/2, n-1} · std / sqrt(n)``; the quantile from
    ``scipy.stats.t``. Raises ValueError for a confidence outside (0, 1).

    >>> [round(x, 3) for x in t_interval({"mean": 1.0, "std": 1.0, "n": 4})]
    [-0.591, 2.591]
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n = stat.get("n") or 0
    if n < 2 or stat.get("mean") is None:
        return None
    from scipy.stats import t as student_t

    half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * stat["std"] / math.sqrt(n)
    return stat["mean"] - half, stat["mean"] + half


def paired_difference(a: Mapping[Any, float | None], b: Mapping[Any, float | None],
                      confidence: float = 0.95) -> dict[str, Any]:
    """``a[seed] - b[seed]`` over the seeds both have a finite value for.

    ``a``, ``b``: value per seed (``None`` or non-finite for a run without one). Returns the
    :func:`mean_std` of the differences plus ``low``, ``high`` (the :func:`t_interval`, None
    with fewer than two pairs), ``confidence`` and ``values`` (the differences, by seed order).
    """
    diffs = []
    for seed, value in a.items():
        other = b.get(seed)
        if value is not None and other is not None and math.isfinite(value) \
                and math.isfinite(other):
            diffs.append(float(value) - float(other))
    stat = mean_std(diffs)
    interval = t_interval(stat, confidence)
    low, high = interval if interval else (None, None)
    return {**stat, "low": low, "high": high, "confidence": confidence, "values": diffs}


# ---- verdicts ------------------------------------------------------------------------------

def compare_means(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Is mean(a) above, below or within the seed spread of mean(b)?

    ``a``, ``b``: :func:`mean_std` dicts. The difference counts when it exceeds the sum of
    the two sample standard deviations (the ±1 std error bars do not overlap) and both have
    at least two values (with one seed there is no spread to compare with). Returns
    ``difference`` (a - b), ``spread`` (std_a + std_b) and ``direction``: ``"above"``,
    ``"below"``, ``"within spread"`` or ``"one seed"`` (also when a mean is missing).

    >>> compare_means({"mean": 0.5, "std": 0.01, "n": 2}, {"mean": 0.4, "std": 0.02, "n": 2})
    {'difference': 0.09999999999999998, 'spread': 0.03, 'direction': 'above'}
    """
    if not a or not b or a.get("mean") is None or b.get("mean") is None:
        return {"difference": None, "spread": None, "direction": "one seed"}
    difference = a["mean"] - b["mean"]
    spread = a["std"] + b["std"]
    if min(a["n"], b["n"]) < 2:
        direction = "one seed"
    elif abs(difference) > spread:
        direction = "above" if difference > 0 else "below"
    else:
        direction = "within spread"
    return {"difference": difference, "spread": spread, "direction": direction}


def relation(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """:func:`compare_means`' direction as a word: "higher", "lower", "within" (the
    spread), or "undetermined" (fewer than two seeds on a side).

    >>> relation({"mean": 0.1, "std": 0.01, "n": 2}, {"mean": 0.8, "std": 0.05, "n": 2})
    'lower'
    """
    return {"above": "higher", "below": "lower", "within spread": "within"}.get(
        compare_means(a, b)["direction"], "undetermined")


def verdict(direction: str, expected: str) -> str:
    """"supported" when ``direction`` (of :func:`compare_means`) is the ``expected`` one
    ("above"/"below"), "contradicted" when it is the opposite, else (within the spread, or
    one seed) "inconclusive".

    >>> verdict("above", "above"), verdict("below", "above"), verdict("one seed", "above")
    ('supported', 'contradicted', 'inconclusive')
    """
    if direction == expected:
        return "supported"
    if direction == _OPPOSITE.get(expected):
        return "contradicted"
    return "inconclusive"


def interval_verdict(difference: Mapping[str, Any], expected: str,
                     min_effect: float = 0.0) -> str:
    """The verdict of a :func:`paired_difference` on a claim that it lies ``expected``
    ("above" or "below") zero by more than ``min_effect``: "supported" when the whole
    interval lies beyond ``min_effect`` in the expected direction, "contradicted" when it
    lies wholly on the other side of zero, else "inconclusive" (also with no interval).

    >>> interval_verdict({"low": -0.3, "high": -0.1}, "above")
    'contradicted'
    """
    if expected not in _OPPOSITE:
        raise ValueError(f"expected must be 'above' or 'below', got {expected!r}")
    low, high = difference.get("low"), difference.get("high")
    if low is None or high is None:
        return "inconclusive"
    sign = 1.0 if expected == "above" else -1.0
    near, far = sorted((sign * low, sign * high))
    if near > min_effect:
        return "supported"
    if far < 0.0:
        return "contradicted"
    return "inconclusive"


def verdict_phrase(code: str) -> str:
    """The section's sentence for a :func:`verdict` code.

    >>> verdict_phrase("contradicted")
    'The data contradict it.'
    """
    return {"supported": "The data support it.",
            "contradicted": "The data contradict it."}.get(code, "Inconclusive at this scale.")


# ---- in words --------------------------------------------------------------------------------

def fmt_pm(stat: Mapping[str, Any] | None, digits: int = 3, scale: float = 1.0) -> str:
    """``0.612 ± 0.013`` from a :func:`mean_std` dict (``n/a`` when empty)."""
    if not stat or stat.get("mean") is None:
        return "n/a"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def fmt_pct(stat: Mapping[str, Any] | None, digits: int = 1) -> str:
    """``61.2 ± 1.3 %`` from a :func:`mean_std` dict of fractions (``n/a`` when empty).

    >>> fmt_pct(mean_std([0.60, 0.62]))
    '61.0 ± 1.4 %'
    """
    if not stat or stat.get("mean") is None:
        return "n/a"
    return f"{fmt_pm(stat, digits, 100.0)} %"


def plural(n: int, word: str) -> str:
    """``1 seed``, ``2 seeds``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# ---- one new run, and "no larger than" -------------------------------------------------------

def prediction_interval(stat: Mapping[str, Any], confidence: float = 0.95
                        ) -> tuple[float, float] | None:
    """Where one new run's value should fall, from the :func:`mean_std` dict of n runs: the
    ``confidence`` Student-t prediction interval
    ``mean ± t_{(1+confidence)/2, n-1} · std · sqrt(1 + 1/n)``, or None with fewer than two
    values (no spread to scale by).

    Unlike :func:`t_interval` (where the *mean* lies), it holds a single draw: the new
    value's deviation from the sample mean has variance sigma^2 (1 + 1/n), and
    (x_new - mean) / (std · sqrt(1 + 1/n)) follows Student's t with n - 1 degrees of freedom
    (normal values assumed; Hahn & Meeker, "Statistical Intervals", 1991).
    Raises ValueError for a confidence outside (0, 1).

    >>> [round(x, 3) for x in prediction_interval({"mean": 1.0, "std": 1.0, "n": 4})]
    [-2.558, 4.558]
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n = stat.get("n") or 0
    if n < 2 or stat.get("mean") is None:
        return None
    from scipy.stats import t as student_t

    quantile = float(student_t.ppf(0.5 + confidence / 2, n - 1))
    half = quantile * stat["std"] * math.sqrt(1.0 + 1.0 / n)
    return stat["mean"] - half, stat["mean"] + half


def equivalence_verdict(difference: Mapping[str, Any], margin: float) -> str:
    """The verdict of a :func:`paired_difference` on a claim that it is *negligible*, no
    larger than ``margin`` either way: "supported" when the whole interval lies inside
    (-margin, margin) (two one-sided tests, Schuirmann 1987, at the interval's level),
    "contradicted" when it lies wholly beyond one of the margins, else "inconclusive" (also
    with no interval). Raises ValueError for a margin that is not positive.

    >>> equivalence_verdict({"low": -0.004, "high": 0.006}, 0.01)
    'supported'
    >>> equivalence_verdict({"low": 0.02, "high": 0.05}, 0.01)
    'contradicted'
    """
    if not margin > 0:
        raise ValueError(f"margin must be positive, got {margin}")
    low, high = difference.get("low"), difference.get("high")
    if low is None or high is None:
        return "inconclusive"
    if -margin < low and high < margin:
        return "supported"
    if low > margin or high < -margin:
        return "contradicted"
    return "inconclusive"
