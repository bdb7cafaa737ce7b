"""Q2's measurements: the usable range of learning rates, interpolated in log-lr, and the
speed of convergence read from the training loss against steps.

**Usable range** (defined before the data). On one accuracy-vs-rate curve, with ``best`` its
highest final test accuracy and ``chance`` = 0.1, a rate is usable when its accuracy is at
least

    floor = chance + KEEP · (best - chance),   KEEP = 0.8

i.e. within X = 20% of the best's gain over chance of the best. Between grid points the
accuracy is interpolated linearly in log10(lr); the range is the interval of log10(lr) around
the best point where the interpolated curve stays at or above the floor, and its width
``decades = log10(high / low)`` is a continuous measurement, not a count of grid steps. Where
the curve is still above the floor at an end of the grid the range is *censored* there: the
width is a lower bound. A curve whose best is not above chance has no usable rate (width 0).
A diverged run counts at chance accuracy (the caller maps it so).

**Convergence.** A run's training loss per epoch is the mean over that epoch's steps, so the
mean of the epochs' losses is the mean training loss over every step of the run: the area
under the loss-vs-steps curve divided by the steps. Lower means the loss fell sooner
(:func:`mean_train_loss`). :func:`steps_to_loss` reads when a curve first reaches a loss.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from bnlab.evidence.stats import interval_verdict
from bnlab.studies.q2.plan import CHANCE, KEEP

__all__ = ["mean_train_loss", "range_verdict", "steps_to_loss", "usable_range"]


def _crossing(x0: float, y0: float, x1: float, y1: float, level: float) -> float:
    """Where the segment (x0, y0)-(x1, y1) crosses ``level`` (y0 >= level > y1 or reverse)."""
    return x0 + (level - y0) * (x1 - x0) / (y1 - y0)


def usable_range(lrs: Sequence[float], accs: Sequence[float | None], keep: float = KEEP,
                 chance: float = CHANCE) -> dict[str, Any]:
    """The usable learning rates of one curve (module docstring), interpolated in log10(lr).

    ``lrs``: ascending positive rates; ``accs``: final test accuracy (fraction) per rate,
    None for a missing point (the range stops at the last point before it, uninterpolated).
    Returns ``best_lr``, ``best_acc``, ``floor``, ``low``, ``high`` (rates), ``decades``
    (log10(high / low); 0.0 when nothing is usable), ``censored_low`` / ``censored_high``
    (still above the floor at that end of the grid) and ``usable``. Raises ValueError for
    lengths that differ, an empty curve, or rates not positive and ascending.

    >>> r = usable_range([1e-3, 1e-2, 1e-1], [0.1, 0.5, 0.1])
    >>> round(r["decades"], 3), round(r["floor"], 3)  # 0.42 crossed 0.2 decade either side
    (0.4, 0.42)
    """
    if len(lrs) != len(accs) or not lrs:
        raise ValueError(f"usable_range needs one accuracy per rate, got {len(lrs)} rates and "
                         f"{len(accs)} accuracies")
    if any(not lr > 0 for lr in lrs) or any(b <= a for a, b in itertools.pairwise(lrs)):
        raise ValueError(f"usable_range needs positive ascending rates, got {list(lrs)}")
    x = [math.log10(lr) for lr in lrs]
    present = [i for i, a in enumerate(accs) if a is not None]
    empty = {"best_lr": None, "best_acc": None, "floor": None, "low": None, "high": None,
             "decades": 0.0, "censored_low": False, "censored_high": False, "usable": False}
    if not present:
        return empty
    best = max(present, key=lambda i: (accs[i], -i))
    best_acc = float(accs[best])  # type: ignore[arg-type]
    if best_acc <= chance:
        return {**empty, "best_lr": lrs[best], "best_acc": best_acc}
    floor = chance + keep * (best_acc - chance)
    edges = []
    for step in (-1, 1):
        i, censored = best, False
        while True:
            j = i + step
            if j < 0 or j >= len(lrs):
                edge, censored = x[i], True
                break
            if accs[j] is None:
                edge = x[i]
                break
            if accs[j] < floor:
                edge = _crossing(x[i], accs[i], x[j], accs[j], floor)  # type: ignore[arg-type]
                break
            i = j
        edges.append((edge, censored))
    (low, censored_low), (high, censored_high) = edges
    return {"best_lr": lrs[best], "best_acc": best_acc, "floor": floor, "low": 10.0 ** low,
            "high": 10.0 ** high, "decades": high - low, "censored_low": censored_low,
            "censored_high": censored_high, "usable": True}


def mean_train_loss(metrics: Sequence[Mapping[str, Any]], epochs: int) -> float | None:
    """The mean training loss over every step of a run (nats): the mean of its ``epochs``
    per-epoch losses; None for a run that did not finish them (a diverged run) or a
    non-finite loss.

    >>> mean_train_loss([{"train_loss": 2.0}, {"train_loss": 1.0}], epochs=2)
    1.5
    """
    losses = [float(m["train_loss"]) for m in metrics]
    if len(losses) < epochs or not all(math.isfinite(v) for v in losses[:epochs]):
        return None
    return sum(losses[:epochs]) / epochs


def steps_to_loss(metrics: Sequence[Mapping[str, Any]], steps_per_epoch: int,
                  level: float) -> float | None:
    """The first step at which the training loss reaches ``level``, interpolated linearly
    between epoch ends (epoch e's mean loss plotted at step e · steps_per_epoch); the first
    epoch's end when it is already there; None when the run never reaches it.

    >>> steps_to_loss([{"train_loss": 2.0}, {"train_loss": 1.0}], 10, level=1.5)
    15.0
    """
    points = [((e + 1) * steps_per_epoch, float(m["train_loss"])) for e, m in enumerate(metrics)]
    for k, (step, loss) in enumerate(points):
        if math.isfinite(loss) and loss <= level:
            if k == 0:
                return float(step)
            previous_step, previous = points[k - 1]
            return _crossing(previous_step, previous, step, loss, level)
    return None


def range_verdict(difference: Mapping[str, Any], bn_censored: bool,
                  none_censored: bool, min_effect: float) -> str:
    """The verdict on "BN's usable range is wider" from the paired difference of widths
    (BN - no BN, decades): :func:`~bnlab.evidence.stats.interval_verdict`, except that a
    censored width is only a lower bound, so "supported" needs no-BN's range uncensored and
    "contradicted" needs BN's uncensored (else inconclusive).

    >>> range_verdict({"low": 0.5, "high": 1.0}, False, True, 0.25)
    'inconclusive'
    """
    verdict = interval_verdict(difference, "above", min_effect)
    if (verdict == "supported" and none_censored) or (verdict == "contradicted" and bn_censored):
        return "inconclusive"
    return verdict
