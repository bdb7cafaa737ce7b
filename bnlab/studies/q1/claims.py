"""Q1's claims, each judged by one rule (:func:`bnlab.evidence.stats.paired_claim`) on
differences paired by seed, against the minimum effects of :mod:`bnlab.studies.q1.plan`.

A claim about the generalization gap is *gated on equal fit*: a network that has learned
little has little gap to show, so two gaps are compared only when the two networks fit
their training images equally well — the 95% interval of the paired difference of their
eval-mode train accuracy lies inside ±:data:`~bnlab.studies.q1.plan.FIT_TOLERANCE`
(:func:`bnlab.evidence.stats.within`). When it does not, the verdict is *inconclusive*
and the claim keeps, beside it, what the interval alone would have said
(``ungated_verdict``), so a reader sees both.
"""

from __future__ import annotations

import math
from typing import Any

from bnlab.evidence.stats import mean_std, paired_claim, paired_difference, within
from bnlab.studies.q1.plan import FIT_TOLERANCE, MIN_ACC_EFFECT, MIN_GAP_EFFECT, ghost_sizes

__all__ = ["by_seed", "gap_claim", "judge", "noise_ratio"]


def by_seed(arm: dict[str, Any], metric: str) -> dict[int, float | None]:
    """``metric`` of each of an arm's finished runs, by seed (None where it has none)."""
    return {e["seed"]: e.get(metric) for e in arm["runs"]}


def gap_claim(a: dict[str, Any], b: dict[str, Any], text: str,
              metric: str = "acc_gap_eval") -> dict[str, Any]:
    """"``a``'s eval-mode accuracy gap is below ``b``'s by at least the minimum effect",
    gated on equal fit (see the module docstring); ``a``, ``b``: arms of summary.json."""
    claim = paired_claim(by_seed(a, metric), by_seed(b, metric), "below", MIN_GAP_EFFECT)
    fit = paired_difference(by_seed(a, "train_acc_eval"), by_seed(b, "train_acc_eval"))
    equal = within(fit, FIT_TOLERANCE)
    claim.update({"claim": text, "a": a["key"], "b": b["key"], "metric": metric,
                  "fit": {**fit, "tolerance": FIT_TOLERANCE, "equal": equal},
                  "ungated_verdict": claim["verdict"]})
    if not equal:
        claim["verdict"] = "inconclusive"
    return claim


def _acc_claim(a: dict[str, Any], b: dict[str, Any], text: str) -> dict[str, Any]:
    claim = paired_claim(by_seed(a, "test_acc"), by_seed(b, "test_acc"), "above",
                         MIN_ACC_EFFECT)
    return {**claim, "claim": text, "a": a["key"], "b": b["key"], "metric": "test_acc"}


def _slope_claim(noise: dict[str, Any]) -> dict[str, Any]:
    slopes = dict(zip(noise["bn_trained"]["seeds_measured"],
                      noise["bn_trained"]["slope_per_seed"], strict=True))
    claim = paired_claim(slopes, dict.fromkeys(slopes, 0.0), "below")
    return {**claim, "claim": "BN's noise falls as the batch grows (slope of log relative "
            "std against log B below 0)", "metric": "slope"}


def judge(arms: dict[str, dict[str, Any]], noise: dict[str, Any],
          batch_size: int) -> dict[str, dict[str, Any]]:
    """Every claim of Q1 from the arms' runs and the noise measurement, by name."""
    claims = {}
    for rate in ("tuned", "common"):
        bn, none = arms[f"bn@{rate}"], arms[f"none@{rate}"]
        claims[f"gap_{rate}"] = gap_claim(
            bn, none, f"BN narrows the generalization gap at the {rate} learning rate")
        claims[f"test_acc_{rate}"] = _acc_claim(
            bn, none, f"BN raises test accuracy at the {rate} learning rate")
    claims["dropout_gap"] = gap_claim(
        arms["bn_dropout"], arms["bn@tuned"],
        "dropout (a regularizer by design) narrows the gap of the BN network: the positive "
        "control, whether this scale can show a regularizer at work")
    for size in ghost_sizes(batch_size):
        if f"ghost{size}" not in arms:  # a scale without the ghost experiment
            continue
        ghost = arms[f"ghost{size}"]
        claims[f"ghost{size}_gap"] = gap_claim(
            ghost, arms["bn@tuned"], f"BN's statistics over ghost batches of {size} (more "
            f"noise, same gradient batch of {batch_size}) narrow the gap")
        claims[f"ghost{size}_test_acc"] = _acc_claim(
            ghost, arms["bn@tuned"], f"ghost batches of {size} raise test accuracy")
    claims["noise_shrinks"] = _slope_claim(noise)
    return claims


def _exp(value: float | None) -> float | None:
    return None if value is None else math.exp(value)


def noise_ratio(same_network: list[dict[str, Any]]) -> dict[str, Any]:
    """BN's relative std over dropout's, on the same network, per seed: the geometric mean
    ratio with its 95% interval (a t interval of the log ratios, exponentiated)."""
    logs = {row["seed"]: math.log(row["bn"]["relative_std"] / row["dropout"]["relative_std"])
            for row in same_network
            if row["bn"]["relative_std"] > 0 and row["dropout"]["relative_std"] > 0}
    d = paired_difference(logs, dict.fromkeys(logs, 0.0))
    return {"ratio": _exp(d["mean"]), "low": _exp(d["low"]), "high": _exp(d["high"]),
            "n": d["n"], "per_seed": {s: math.exp(v) for s, v in logs.items()},
            "log_ratio": mean_std(list(logs.values()))}
