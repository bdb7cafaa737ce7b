"""Q3's plan: its constants, claims, sweep and the per-epoch time statistics.

The plan per scale (:data:`PLANS`; images = training images seen, summed over runs; the
quick budget is ~150 s of training on a 2-core CPU in float32, standard ~1200 s on a
2-core CPU with bfloat16, about 600 images/s at width 0.5):

- Learning rate: each network at its own rate, tuned once at the scale's batch size B0 by
  :func:`bnlab.studies.tuning.tune_lr` (the sweep every study shares; BN's rate also serves
  GroupNorm, Batch Renorm and ghost BN, which are not tuned apart at this budget), then
  scaled to each batch size by the square-root rule ``lr(B) = lr_tuned * sqrt(B / B0)``.
  Not tuned per batch size: that is one sweep per size and network.
- Length: every batch size trains ``ceil(MIN_UPDATES / steps per epoch)`` epochs, capped
  at ``max_epochs``; a size that stops short of ``MIN_UPDATES`` (1,000) updates has its
  update count in the section and its verdicts are *inconclusive* (its running averages,
  and its training, are too short to judge BN by: issue 17, point 6).
- ``quick`` (1,500 images, width 0.25): BN and no BN at B = 2, 64, 256 for 1 epoch
  (750, 23, 5 updates: only batch 2 gets near 1,000), 3 seeds: 18 runs, 27k images;
  GroupNorm and Batch Renorm at B = 2 and 256, ghost BN at 256 (at B <= its virtual batch
  of 32 ghost BN *is* BN): 15 runs, 22k images; class-sorted, 6 runs, 9k images; timing,
  15 dedicated runs of 2 epochs (the sweep's single epoch would time the warm-up), 45k
  images (the manual engine is slower). About 100k images: ~250 s on a quiet 2-core CPU
  in float32, over the ~150 s share (the first place to cut: the variants at 256, or
  the timing runs); quick answers are inconclusive wherever the updates fall short
  anyway.
- ``standard`` (5,085 images, width 0.5): BN and no BN at B = 2, 8, 32, 64, 256, at most
  3 epochs (2,542, 1,270, 474, 237, 57 updates: the answer counts at 2 and 8 only), 3
  seeds: 30 runs, 366k images; variants at 2 and 256: 15 runs, 168k; class-sorted, 92k;
  timing, 92k. About 720k images: ~1,200 s with bfloat16. 1,000 updates at batch 256
  would be 50 epochs per run, 25 times this budget.
- ``paper`` (50,000 images, a GPU): every size at its 1,000 updates (1 to 6 epochs), the
  variants at every size.
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
EXACT_CHUNK = 250                    # images per forward of the exact-statistics passes
AUGMENT_SEED = 17                    # the crops and flips of the augmented exact statistics
NORMS = (("torch", "BN"), ("none", "no BN"))
CHANCE = 0.1                         # accuracy of a guess among 10 classes
STAT_KINDS = (  # (key, legend label) of the train/test discrepancy
    ("running", "running averages (eval mode)"),
    ("batch", "test-batch statistics"),
    ("cumulative", "recomputed: cumulative average"),
    ("exact", "recomputed: exact, layer by layer"),
    ("exact_augmented", "recomputed: exact, on augmented batches"),
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
    "sorted_recovery": ("the post's reason: \"the moving averages used at test time\"",
                        "what class-sorted batches cost BN lies in its test-time statistics, "
                        "so recomputing them exactly after training recovers it."),
    "small_batch": ("not in the post's text; the drawback most often listed beside its two",
                    "BN fails at small batch sizes: at the smallest batch a network with BN "
                    "does worse than one without."),
    "train_test": ("the post, its reason for caution: \"we are going to use the saved "
                   "moving exponential average in testing time\"",
                   "the moving averages used at test time are not the statistics the network "
                   "needs, and that costs accuracy — most at small batch sizes."),
    "group": ("Wu & He 2018, Group Normalization",
              "GroupNorm, which does not normalize across the batch, beats BN at the smallest "
              "batch size."),
    "renorm": ("Ioffe 2017, Batch Renormalization",
               "Batch Renorm, which corrects the batch statistics toward the moving averages, "
               "beats BN at the smallest batch size."),
    "ghost": ("Hoffer, Hubara & Soudry 2017, Train longer, generalize better",
              "ghost BN, which normalizes over virtual batches inside a large batch, beats BN "
              "at the largest batch size."),
}
LITERATURE = {  # what the papers report at full scale (only numbers we are sure of)
    "small_batch": "Wu & He 2018 (ResNet-50 on ImageNet): BN's error rises sharply below "
                   "batch 8 per worker while GroupNorm's stays flat; at batch 2, GroupNorm's "
                   "error is 10.6 points lower than BN's.",
    "renorm": "Ioffe 2017 (Inception on ImageNet): Batch Renorm recovers much of what BN "
              "loses on small and on non-i.i.d. minibatches, and matches BN where BN works.",
    "ghost": "Hoffer et al. 2017: with ghost BN, a longer schedule and a scaled rate, large-"
             "batch training closes most of its generalization gap to small batches.",
    "statistics": "Wu & Johnson 2021 (Rethinking BN): the moving average is an inaccurate "
                  "estimate of the population statistics when the weights still change fast "
                  "or training is short; recomputing them (precise BN) removes that error.",
    "unrepresentative": "Ioffe 2017: on non-i.i.d. minibatches BN's test accuracy drops "
                        "because the network learns to rely on the batch's composition, which "
                        "the moving averages do not reproduce; Batch Renorm reduces the drop.",
}


# ---- the plan ------------------------------------------------------------------------------

MIN_UPDATES = 1000   # updates every batch size needs before its answer counts (issue 17)
MIN_EFFECT = 0.01    # smallest difference in test accuracy (fraction) a verdict calls an effect
VARIANTS = (  # (key, label, TrainConfig fields): normalizations beside BN at small and large B
    ("group", "GroupNorm", {"norm": "torch", "norm_kind": "group"}),
    ("renorm", "Batch Renorm", {"norm": "bnlab", "norm_kind": "renorm"}),
    ("ghost", "ghost BN", {"norm": "bnlab", "norm_kind": "ghost"}),
)


@dataclass(frozen=True)
class Q3Plan:
    """How much Q3 trains at one scale (module ``plan`` docstring: the budget arithmetic).

    ``batch_sizes``: BN and no BN (the scale's own batch size is always added);
    ``variant_batch_sizes``: GroupNorm, Batch Renorm and ghost BN beside BN; ``max_epochs``:
    the cap on a run's length; every size trains ``ceil(MIN_UPDATES / steps per epoch)``
    epochs, at most ``max_epochs`` (at least 1), so it reaches ``MIN_UPDATES`` updates
    unless the cap stops it.
    """

    batch_sizes: tuple[int, ...]
    variant_batch_sizes: tuple[int, ...]
    max_epochs: int


PLANS: dict[str, Q3Plan] = {
    "quick": Q3Plan((2, 64, 256), (2, 256), max_epochs=1),
    "standard": Q3Plan((2, 8, 32, 64, 256), (2, 256), max_epochs=3),
    "paper": Q3Plan((2, 8, 32, 128, 256), (2, 8, 32, 128, 256), max_epochs=30),
}


def scale_plan(scale: StudyScale) -> Q3Plan:
    """The :data:`PLANS` entry of ``scale``; for another scale (tests), ``SWEEP_BATCH_SIZES``
    for BN and no BN, the smallest and largest of them for the variants, and
    :func:`study_epochs` as the cap."""
    if scale.name in PLANS:
        return PLANS[scale.name]
    return Q3Plan(SWEEP_BATCH_SIZES, (SWEEP_BATCH_SIZES[0], SWEEP_BATCH_SIZES[-1]),
                  study_epochs(scale))


@dataclass(frozen=True)
class SweepPoint:
    """One batch size of experiment 1: how long it trains (epochs, ``updates`` = optimizer
    steps) and ``lr``, the scale's rate scaled to it (the study scales each network's tuned
    rate by the same factor, ``lr / scale.lr``)."""

    batch_size: int
    epochs: int
    updates: int
    lr: float
    enough_updates: bool  # updates >= MIN_UPDATES: its answer can count
    variants: bool = False  # GroupNorm, Batch Renorm and ghost BN train here too


def sqrt_scaled_lr(base_lr: float, batch_size: int, base_batch_size: int) -> float:
    """The square-root rule for Adam: ``base_lr * sqrt(batch_size / base_batch_size)``
    (Hoffer, Hubara & Soudry 2017, Sec. 3: keep the covariance of the update constant).

    >>> sqrt_scaled_lr(2e-3, 256, 64)
    0.004
    """
    return base_lr * math.sqrt(batch_size / base_batch_size)


def study_epochs(scale: StudyScale) -> int:
    """Half the scale's epochs, at least 1: the cap of a scale without a :data:`PLANS`
    entry, and the length of the timing runs.

    >>> from bnlab.studies.common import SCALES
    >>> study_epochs(SCALES["quick"]), study_epochs(SCALES["paper"])
    (2, 15)
    """
    return max(1, scale.epochs // 2)


def sweep_plan(scale: StudyScale, num_train: int) -> tuple[list[SweepPoint], list[int]]:
    """The batch sizes of experiment 1 at ``scale`` on ``num_train`` images, and those skipped.

    Sizes: :func:`scale_plan`'s and the scale's own, ascending; a size above ``num_train``
    is skipped. Each trains ``ceil(MIN_UPDATES / (num_train // B))`` epochs, clipped to
    [1, max_epochs], at the scale's rate scaled by :func:`sqrt_scaled_lr` (the study
    replaces the scale's rate by each network's tuned one).

    >>> from bnlab.studies.common import SCALES
    >>> points, skipped = sweep_plan(SCALES["paper"], 50000)
    >>> [(p.batch_size, p.epochs, p.updates) for p in points][-2:], skipped
    ([(128, 3, 1170), (256, 6, 1170)], [])
    """
    plan = scale_plan(scale)
    sizes = sorted(set(plan.batch_sizes) | set(plan.variant_batch_sizes) | {scale.batch_size})
    points, skipped = [], []
    for b in sizes:
        if b > num_train:
            skipped.append(b)
            continue
        steps = num_train // b
        epochs = min(plan.max_epochs, max(1, math.ceil(MIN_UPDATES / steps)))
        points.append(SweepPoint(b, epochs, epochs * steps,
                                 sqrt_scaled_lr(scale.lr, b, scale.batch_size),
                                 epochs * steps >= MIN_UPDATES,
                                 b in plan.variant_batch_sizes))
    return points, skipped


def start_weight(momentum: float | None, updates: int) -> float | None:
    """What BN's running averages still hold of their initial values (mean 0, variance 1)
    after ``updates`` steps: ``(1 - momentum)^updates`` in PyTorch's convention (momentum
    weights the new batch); None for the cumulative average (momentum None).

    >>> round(start_weight(0.1, 21), 3)
    0.109
    """
    return None if momentum is None else (1.0 - momentum) ** updates


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
