"""Q4's numbers: statistics over seeds, the paired differences BN − no BN, and the verdicts.

Every comparison pairs the runs of one seed (same initial-weight draw, same batches) and
judges the 95% t interval of the paired differences against a minimum effect stated in
:mod:`bnlab.studies.q4.plan` (:func:`bnlab.evidence.stats.interval_verdict`). Ratios (the
gradient shift, the smoothness measures) are compared as log10(BN) − log10(no BN).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from bnlab.evidence.stats import (
    equivalence_verdict,
    interval_verdict,
    mean_std,
    paired_difference,
)
from bnlab.studies.q4.measures import percentile_drift
from bnlab.studies.q4.plan import (
    EQUIVALENCE_ACC,
    MIN_EFFECT_ACC,
    MIN_EFFECT_DRIFT,
    MIN_EFFECT_LOG10,
    NOISY,
    WHERE,
    claim,
)

__all__ = ["drift_statistics", "noisy_statistics", "verdicts"]

SMOOTH_MEASURES = ("loss_range", "grad_change", "beta")


def noisy_statistics(acc: Mapping[str, Mapping[int, float | None]],
                     loss: Mapping[str, Mapping[int, float | None]]) -> dict[str, Any]:
    """Final test accuracy and training loss over seeds per network, and the paired
    differences noisy − no BN, BN − noisy and BN − no BN (test accuracy)."""
    return {
        "final_test_acc": {k: mean_std(list(v.values())) for k, v in acc.items()},
        "final_train_loss": {k: mean_std(list(v.values())) for k, v in loss.items()},
        "differences": {
            "noisy_minus_none": paired_difference(acc[NOISY], acc["none"]),
            "bn_minus_noisy": paired_difference(acc["torch"], acc[NOISY]),
            "bn_minus_none": paired_difference(acc["torch"], acc["none"]),
        },
    }


def _by_seed(seeds: Sequence[int], per_seed: Sequence[float]) -> dict[int, float]:
    return dict(zip(seeds, per_seed, strict=True))


def _layer_means(per_layer: Mapping[str, Sequence[float]]) -> list[float]:
    """Per seed, the mean over layers of ``{layer: [value per seed]}``."""
    columns = list(zip(*per_layer.values(), strict=True))
    return [sum(c) / len(c) for c in columns]


def _summarize(per_layer: Mapping[str, Sequence[float]], seeds: Sequence[int]
               ) -> dict[str, Any]:
    """{layer: mean_std, "all": mean_std of the layer means, "by_seed": {seed: layer mean}}."""
    stats: dict[str, Any] = {i: mean_std(v) for i, v in per_layer.items()}
    means = _layer_means(per_layer) if per_layer else []
    stats["all"] = mean_std(means)
    stats["by_seed"] = _by_seed(seeds, means) if means else {}
    return stats


def drift_statistics(curves: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per network over its seeds: the percentile drift (:func:`percentile_drift`) before
    and after BN; the gradient shift and the smoothness measures as the median of each
    run's measurements (robust to the large first steps from the initial weights)."""
    drift: dict[str, dict[str, Any]] = {where: {} for where in WHERE}
    shift: dict[str, dict[str, Any]] = {}
    smooth: dict[str, dict[str, Any]] = {}
    for norm, c in curves.items():
        seeds = c["seed_list"]
        for where in WHERE:
            drift[where][norm] = _summarize(
                {i: [percentile_drift(s) for s in runs] for i, runs in c[where].items()}, seeds)
        shift[norm] = {measure: _summarize(
            {i: [statistics.median(s) for s in runs] for i, runs in c[measure].items()}, seeds)
            for measure in ("rel_diff", "cosine")}
        smooth[norm] = {}
        for measure in SMOOTH_MEASURES:
            per_seed = [statistics.median(s) for s in c["smooth"].get(measure, [])]
            smooth[norm][measure] = {**mean_std(per_seed), "by_seed": _by_seed(seeds, per_seed)}
    return {"drift": drift, "shift": shift, "smoothness": smooth}


def _log10(values: Mapping[int, float | None]) -> dict[int, float | None]:
    return {k: math.log10(v) if v is not None and math.isfinite(v) and v > 0 else None
            for k, v in values.items()}


def _entry(key: str, measure: str, expected: str, min_effect: float,
           difference: Mapping[str, Any], word: str) -> dict[str, Any]:
    return {**claim(key), "measure": measure, "expected": expected, "min_effect": min_effect,
            "difference": dict(difference), "verdict": word}


def verdicts(summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each claim of :data:`~bnlab.studies.q4.plan.CLAIMS` against its paired difference:
    an entry with the claim, the measure, the difference (mean, 95% interval) and the
    verdict (supported / contradicted / inconclusive)."""
    out: dict[str, dict[str, Any]] = {}
    noisy = summary["noisy"]["differences"]
    out["santurkar_noise"] = _entry(
        "santurkar_noise", "final test accuracy, BN + noise − no BN", "above", MIN_EFFECT_ACC,
        noisy["noisy_minus_none"],
        interval_verdict(noisy["noisy_minus_none"], "above", MIN_EFFECT_ACC))
    out["santurkar_noise_vs_bn"] = _entry(
        "santurkar_noise_vs_bn", "final test accuracy, BN − (BN + noise)", "within",
        EQUIVALENCE_ACC, noisy["bn_minus_noisy"],
        equivalence_verdict(noisy["bn_minus_noisy"], EQUIVALENCE_ACC))
    for where, label in WHERE.items():
        d = summary["drift"][where]
        diff = paired_difference(d["torch"]["by_seed"], d["none"]["by_seed"])
        out[f"post_distribution_{where}"] = _entry(
            "post_distribution", f"drift {label}, mean over layers, BN − no BN", "below",
            MIN_EFFECT_DRIFT, diff, interval_verdict(diff, "below", MIN_EFFECT_DRIFT))
    shift = summary["shift"]
    diff = paired_difference(_log10(shift["torch"]["rel_diff"]["by_seed"]),
                             _log10(shift["none"]["rel_diff"]["by_seed"]))
    # "not smaller with BN": supported when the whole interval lies above -min_effect
    shifted = {"low": None if diff["low"] is None else diff["low"] + MIN_EFFECT_LOG10,
               "high": None if diff["high"] is None else diff["high"] + MIN_EFFECT_LOG10}
    out["santurkar_ics"] = _entry(
        "santurkar_ics", "log10 ‖G−G'‖/‖G‖, mean over layers, BN − no BN", "not below",
        MIN_EFFECT_LOG10, diff, interval_verdict(shifted, "above"))
    smooth = summary["smoothness"]
    for measure in ("loss_range", "beta"):
        diff = paired_difference(_log10(smooth["torch"][measure]["by_seed"]),
                                 _log10(smooth["none"][measure]["by_seed"]))
        out[f"santurkar_smoothness_{measure}"] = _entry(
            "santurkar_smoothness", f"log10 {measure.replace('_', ' ')}, BN − no BN", "below",
            MIN_EFFECT_LOG10,
            diff, interval_verdict(diff, "below", MIN_EFFECT_LOG10))
    return out
