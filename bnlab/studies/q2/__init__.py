"""Q2 — What does BN buy? Faster convergence, higher accuracy, a wider range of usable
learning rates: each claim made at each network's own best rate and at a common one.

The post: with BN (its case b) the model "was able to achieve higher accuracy", and "batch
normalization really does help with generalization as well as faster convergence". The BN
paper adds that BN allows much higher learning rates (Ioffe & Szegedy 2015, Sec. 3.3), and
Bjorck et al. (NeurIPS 2018) find that most of BN's gain comes through those rates -- so a
comparison at one shared rate mixes "BN helps" with "this rate suits BN".

**The experiment is one sweep.** For each optimizer -- Adam, and SGD with momentum 0.9 --
and each network -- All-CNN-C with BN (``norm="torch"``) and without (He init) -- final
test accuracy at ``points`` learning rates a third of a decade apart (log-spaced around the
common rate: the scale's rate for Adam, 0.05 for SGD), every point at the scale's full
epochs (cosine schedule) and on ``ctx.seeds`` seeds (>= 3 at every preset). The sweep goes
through :func:`bnlab.studies.tuning.tune_lr`, so each network's **best rate** is the one
every study would choose (lowest mean final training loss); the best rate then gets the
scale's headline seeds (5 at ``standard``: two more runs per curve, same run names, so the
sweep's are reused). Everything else is read from these runs, none trained again:

- accuracy against the rate, and the **usable range**: the log10-width of the rate interval
  where final test accuracy keeps >= 80% of the best's gain over chance, interpolated in
  log-lr between grid points (:func:`~bnlab.studies.q2.measure.usable_range`), per seed, so
  it has an interval over seeds; censored where it reaches an end of the grid;
- **training loss against steps** at each network's best rate and at the common rate (the
  grid's middle point); the mean training loss over the run (the area under that curve per
  step) measures the speed of convergence;
- claims, BN minus no-BN paired by seed, 95% t interval (:mod:`bnlab.evidence.stats`),
  judged against minimum effects stated up front (:data:`~bnlab.studies.q2.plan.MIN_EFFECT`:
  0.05 nats, 1 point of accuracy, 0.25 decade): faster and more accurate at the best rates
  and at the common rate, wider usable range; *supported* / *contradicted* / *inconclusive*.

**The plan per scale** (:data:`~bnlab.studies.q2.plan.PLANS`; runs = 2 optimizers x
2 networks x points x seeds, plus 2 x 2 x 2 headline runs at standard). At these sizes a
CPU run's cost follows its optimizer steps more than its images (a step at width 0.25 and
batch 64 costs little more than one at width 0.125 and batch 32; the per-epoch evaluation of
the 1,017 test images is ~5-7% of a run), measured as ratios in one process on a loaded
2-core CPU: a quick-scale run (width 0.25, 1,500 images, batch 64, 5 epochs: 115 steps) is
about 20 s on a quiet one in fp32, ~0.17 s a step.

- ``quick`` (budget ~200 s): 5 points (4/3 decade), 3 seeds, 60 runs at the quick scale's
  width 0.25 and batch 64 on 512 images, 5 epochs (8 steps per epoch, 40 steps): ~5-7 s a
  run, **~300-400 s** in all here -- over the ~200 s budget, because 2 optimizers x 2 networks x
  5 rates x 3 seeds is 60 runs at the least; fewer images would leave too few steps to learn.
  Expect wide intervals and censored ranges: quick may answer *inconclusive*.
- ``standard`` (budget ~1200 s on a bf16 CPU, ~3.5x that here in fp32): 7 points
  (2 decades), 3 seeds, 84 runs + 8 headline runs, at width 0.25 on 1,280 images, batch 64,
  12 epochs (20 steps per epoch, 240 steps): ~22,000 steps, ~1,100 s in bf16 (~3,900 s
  here in fp32).
- ``paper``: 7 points, 3 seeds (5 at the best rates), the paper scale's own runs (full
  width, full CIFAR-10, 30 epochs): 92 GPU runs.
- any other scale (tests): 3 points at the scale's own run size, so its middle Adam point is
  the run the other studies train at the scale's rate (shared through ``finished_runs``).
"""

from bnlab.studies.q2.experiment import headline_seeds, run
from bnlab.studies.q2.measure import mean_train_loss, range_verdict, steps_to_loss, usable_range
from bnlab.studies.q2.plan import (
    CHANCE,
    KEEP,
    MIN_EFFECT,
    NAME,
    PLANS,
    TITLE,
    SweepPlan,
    sweep_plan,
)
from bnlab.studies.q2.section import render

__all__ = [
    "CHANCE",
    "KEEP",
    "MIN_EFFECT",
    "NAME",
    "PLANS",
    "TITLE",
    "SweepPlan",
    "headline_seeds",
    "mean_train_loss",
    "range_verdict",
    "render",
    "run",
    "steps_to_loss",
    "sweep_plan",
    "usable_range",
]
