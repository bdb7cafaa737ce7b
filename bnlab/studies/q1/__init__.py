"""Q1 — Is BN a regularizer? Generalization at equal fit, BN's noise alone, and its size.

The post says BN regularizes "as a side effect": like dropout it adds noise, and its case b
(BN) reached a higher test accuracy with a lower train accuracy than case a (no BN). A
regularizer, in the sense measured here, is something that (1) shrinks the gap between how
well the network fits its training images and how well it does on unseen ones, *at equal
fit*, and (2) does it by making the training-time function noisy.

Experiment 1, the gap (:mod:`~bnlab.studies.q1.gap`, :mod:`~bnlab.studies.q1.claims`).
All-CNN-C with and without BN, each at its own tuned learning rate
(:func:`bnlab.studies.tuning.tune_lr`, the sweep every study shares) on the headline seeds
and at the scale's common rate on the study's seeds, plus BN + dropout at BN's tuned rate
(the positive control: dropout is a regularizer by design, so if it does not move the gap,
this scale cannot show one). Each final network is evaluated in eval mode on its
un-augmented training images: that accuracy is its *fit*, and the fit minus the test
accuracy its *eval-mode gap*. Gaps are compared paired by seed, and only between networks
whose fits are equal within :data:`~bnlab.studies.q1.plan.FIT_TOLERANCE`; the verdict rule is
:func:`bnlab.evidence.stats.interval_verdict` against the minimum effects of
:mod:`~bnlab.studies.q1.plan`, stated before any run.

Experiment 2, BN's noise alone (Hoffer, Hubara & Soudry 2017): the same gradient batch, with
BN's statistics over ghost batches of fewer images (``norm_kind="ghost"``), at BN's tuned
rate, paired by seed with plain BN.

Experiment 3, the noise itself (:mod:`~bnlab.studies.q1.noise`): in a fixed trained network in
training mode, how much one image's logits move with its batch mates, against the batch
size (theory: ~ B^(-1/2)); and on the same BN + dropout networks, BN's noise beside
dropout's.

The plan and its budget. Runs are (arms x seeds), each ``epochs x images`` of the scale;
a run whose config the shared sweep already trained (seed 0, and seed 1 at standard, at the
tuned and at the common rate: both are grid points) is copied, not trained, in ``bnlab study
all``; arms with the same config (a network whose tuned rate is the common one) share runs.

Measured cost of one run, relative to PyTorch's BN (one process, loaded 2-core CPU, fp32):
no BN 0.5, bnlab's BN 0.9, ghost BN with virtual batch 8 of 64 1.9 (one slice at a time).

- ``quick`` (3 seeds; width 0.25, 1,500 images, 5 epochs, ~20 s a BN run on a quiet 2-core
  CPU in fp32): 2 networks x 2 rates x 3 seeds, of which the sweep's seed-0 runs are
  copied: at most 4 new no-BN runs (~50 s) and 4 BN runs (~80 s), half that when a tuned
  rate is the common one; BN + dropout x 3 (~60 s); no ghost experiment (3 ghost runs would
  add ~120 s). About 110-190 s of training plus ~15 s of measurement (the sweep is paid
  separately). Expect *inconclusive* gap verdicts: these networks are far from memorizing
  1,500 images in 5 epochs.
- ``standard`` (3 seeds, 5 headline; width 0.5, 5,085 images, 12 epochs, ~100 s a BN run on
  a bf16 2-core CPU): tuned arms 2 x 5 seeds (seeds 0 and 1 copied from the 2-seed sweep),
  common arms 2 x 3 (2 copied each), BN + dropout x 3, ghost (virtual batch 8) x 3: about
  15 BN-run equivalents at worst (the ghost runs are 6 of them), ~1,500 s, over the ~1,000 s
  Q1 is allotted; :data:`~bnlab.studies.q1.plan.GHOST_SKIPPED_AT` is the switch that trades
  the ghost experiment for the budget (~900 s without it).
- ``paper``: the same arms on full CIFAR-10 at width 1 (a GPU).
"""

from bnlab.studies.q1.experiment import headline_seeds, run
from bnlab.studies.q1.gap import evaluate_on_train_set, gap_curves
from bnlab.studies.q1.noise import (
    fit_slope,
    grouped_train_forward,
    logit_spread,
    noise_samples,
    noise_sources,
    noise_sweep,
)
from bnlab.studies.q1.plan import NAME, TITLE, ghost_sizes, plan_arms
from bnlab.studies.q1.section import render

__all__ = [
    "NAME",
    "TITLE",
    "evaluate_on_train_set",
    "fit_slope",
    "gap_curves",
    "ghost_sizes",
    "grouped_train_forward",
    "headline_seeds",
    "logit_spread",
    "noise_samples",
    "noise_sources",
    "noise_sweep",
    "plan_arms",
    "render",
    "run",
]
