"""Q3's plan: its constants, claims, sweep and the per-epoch time statistics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bnlab.evidence.stats import mean_std
from bnlab.studies.common import StudyScale

NAME = "q3"
TITLE = "Q3 — What does BN cost?"

SWEEP_BATCH_SIZES = (2, 8, 32, 256)  # plus the scale's batch size
FULL_LENGTH_FROM = 8                 # smaller batches train ceil(epochs * B / 8) epochs
EXACT_CHUNK = 250                    # images per forward of the exact-statistics passes
NORMS = (("torch", "BN"), ("none", "no BN"))
CHANCE = 0.1                         # accuracy of a guess among 10 classes
STAT_KINDS = (  # (key, legend label) of the train/test discrepancy
    ("running", "running averages (eval mode)"),
    ("batch", "test-batch statistics"),
    ("cumulative", "recomputed: cumulative average"),
    ("exact", "recomputed: exact, layer by layer"),
)
VERDICT_TEXT = {"supported": "The data support it.",
                "contradicted": "The data contradict it.",
                "inconclusive": "Inconclusive at this scale."}
CLAIMS = {
    "time": ("the post", "with BN the network \"took more time to train\", which the post "
             "expects \"since with batch normalization we have two more parameters to "
             "optimize\"."),
    "unrepresentative": ("the post", "a mini-batch that does not represent the whole data "
                         "could hurt a BN network through the moving averages used at test "
                         "time, but \"I don't think that would be a problem\"."),
    "small_batch": ("not in the post's text; the drawback most often listed beside its two",
                    "BN fails at small batch sizes: at the smallest batch a network with BN "
                    "does worse than one without."),
    "train_test": ("the post, its reason for caution: \"we are going to use the saved "
                   "moving exponential average in testing time\"",
                   "the moving averages used at test time are not the statistics the network "
                   "needs, and that costs accuracy — most at small batch sizes."),
}


# ---- the plan ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepPoint:
    """One batch size of experiment 1: how long it trains and at which learning rate."""

    batch_size: int
    epochs: int
    lr: float
    reduced: bool  # trains fewer epochs than the scale's


def sqrt_scaled_lr(base_lr: float, batch_size: int, base_batch_size: int) -> float:
    """The square-root rule for Adam: ``base_lr * sqrt(batch_size / base_batch_size)``.

    >>> sqrt_scaled_lr(2e-3, 256, 64)
    0.004
    """
    return base_lr * math.sqrt(batch_size / base_batch_size)


def study_epochs(scale: StudyScale) -> int:
    """The run length of this study: half the scale's epochs, at least 1.

    >>> from bnlab.studies.common import SCALES
    >>> study_epochs(SCALES["quick"]), study_epochs(SCALES["paper"])
    (2, 15)
    """
    return max(1, scale.epochs // 2)


def sweep_plan(scale: StudyScale, num_train: int) -> tuple[list[SweepPoint], list[int]]:
    """The batch sizes of experiment 1 at ``scale`` on ``num_train`` images, and those skipped.

    Sizes: ``SWEEP_BATCH_SIZES`` and the scale's own, ascending; a size above ``num_train``
    is skipped. A size below ``min(FULL_LENGTH_FROM, scale.batch_size)`` trains
    ``ceil(E * B / FULL_LENGTH_FROM)`` epochs (at least 1), the others E =
    :func:`study_epochs`.

    >>> from bnlab.studies.common import SCALES
    >>> points, skipped = sweep_plan(SCALES["quick"], 2000)
    >>> [(p.batch_size, p.epochs) for p in points], skipped
    ([(2, 1), (8, 2), (32, 2), (64, 2), (256, 2)], [])
    """
    sizes = sorted(set(SWEEP_BATCH_SIZES) | {scale.batch_size})
    full_from = min(FULL_LENGTH_FROM, scale.batch_size)
    full = study_epochs(scale)
    points, skipped = [], []
    for b in sizes:
        if b > num_train:
            skipped.append(b)
            continue
        epochs = full if b >= full_from else max(1, math.ceil(full * b / FULL_LENGTH_FROM))
        points.append(SweepPoint(b, epochs, sqrt_scaled_lr(scale.lr, b, scale.batch_size),
                                 epochs < full))
    return points, skipped


# ---- measurements on a trained network ----------------------------------------------------


def epoch_time_stats(runs: Sequence[Sequence[dict[str, Any]]], key: str = "epoch_time_s"
                     ) -> dict[str, Any]:
    """``mean_std`` of ``key`` over the epochs after the first of every run, pooled.

    The first epoch carries the warm-up (allocator, kernel selection) and is left out; a
    run of one epoch has nothing else, so when no run has a second epoch every epoch is
    used. ``skipped_first`` says which.

    >>> stats = epoch_time_stats([[{"epoch": 1, "epoch_time_s": 9.0},
    ...                             {"epoch": 2, "epoch_time_s": 2.0}],
    ...                           [{"epoch": 1, "epoch_time_s": 8.0},
    ...                            {"epoch": 2, "epoch_time_s": 4.0}]])
    >>> stats["mean"], stats["n"], stats["skipped_first"]
    (3.0, 2, True)
    """
    later = [m[key] for run in runs for m in run if m["epoch"] > 1]
    if later:
        return {**mean_std(later), "skipped_first": True}
    return {**mean_std([m[key] for run in runs for m in run]), "skipped_first": False}


def _claim(key: str) -> dict[str, str]:
    source, text = CLAIMS[key]
    return {"source": source, "claim": text}
