"""Q3 — What does BN cost? Small batches, the train/test discrepancy, batches that do not
represent the data, and time.

The post names two drawbacks: BN "took more time to train" ("expected since with batch
normalization we have two more parameters to optimize"), and, through the moving averages
used at test time, a model whose mini-batches do not represent the data "could be heavily
decreased" — which the post then doubts: "I don't think that would be a problem". The
drawback most often listed beside these, the small-batch failure, is not in the post's text;
it is measured here too. Four experiments, All-CNN-C, Adam, cosine schedule, ``ctx.seeds``
seeds each:

Experiment 1, batch size. Final test accuracy at the batch sizes of the scale's plan
(:data:`~bnlab.studies.q3.plan.PLANS`, plus the scale's own B0; a size larger than the
training set is skipped and noted), with BN (``norm="torch"``) and without, and GroupNorm,
Batch Renorm and ghost BN beside BN at the plan's variant sizes. Each network trains at its
own rate, tuned at B0 by the shared sweep (:func:`bnlab.studies.tuning.tune_lr`; the
variants use BN's), scaled by the square-root rule for Adam:

    lr(B) = lr_tuned * sqrt(B / B0)

Every size trains toward ``MIN_UPDATES`` = 1,000 updates, at most the plan's
``max_epochs``; a comparison resting on fewer updates is reported with its update count and
judged *inconclusive* (the plan module gives each scale's arithmetic).

Experiment 2, the train/test discrepancy. Each trained BN network of experiment 1 (and of
experiment 3) is loaded from its checkpoint and tested five ways, differing only in the
mean and variance each BN layer normalizes with:

    running      eval mode: the exponential moving averages kept during training
    batch        the statistics of the test batch itself (BN modules in training mode for
                 the forward only, test batches of the run's own B; running buffers saved
                 and restored)
    cumulative   PyTorch's recipe: momentum=None, reset_running_stats(), one pass over the
                 un-augmented training set in training mode (so each layer sees inputs
                 normalized with batch statistics upstream), in equal batches of B0; this
                 gives the plain average over batches of the batch means (the exact mean,
                 since the batches are equal) and of the *unbiased batch variances*, which
                 is the population variance only if a batch's values were independent
                 (pixels of one image are not; the variance of the batch means is missed)
    exact        the population statistics of the training set, layer by layer: layer k's
                 input mean and (biased) variance over the whole training set (chunks merged
                 in float64), with layers 1..k-1 already in eval mode on their exact
                 statistics — the statistics the eval-mode network actually sees
    exact_augmented  the same over one pass of the training set randomly cropped and
                 flipped as in training: what the running averages estimate (the plain
                 images differ: padding adds black pixels and raises the input variance)

Experiment 3, batches that do not represent the data. ``batch_order="class_sorted"``: each
batch holds one class (two where a class ends), with and without BN, against the shuffled
runs of experiment 1 at B0 (same seeds, same rates). Per seed, the drop =
acc(shuffled) - acc(class-sorted); BN's own cost is its drop minus the no-BN drop, paired
by seed; what recomputed statistics recover is exact minus running on the sorted BN net.

Experiment 4, time. ``epoch_time_s`` (training only, evaluation excluded) and
``images_per_s`` from ``metrics.jsonl``, pooled over the epochs after the first (warm-up)
and over seeds, for: autograd without BN, autograd with PyTorch's BN (both from experiment
1 at B0), autograd with bnlab's hand-derived BN, and the manual engine (bnlab BN, bnlab's
Adam) with and without BN. Overhead = time(with BN) / time(without BN) - 1, per engine.

Every comparison is paired by seed: the mean difference with its 95% Student-t interval
(:func:`bnlab.evidence.stats.paired_difference`), judged by
:func:`~bnlab.evidence.stats.interval_verdict` against a minimum effect of one accuracy
point (``MIN_EFFECT``) into *supported*, *contradicted* or *inconclusive*; the post's "not a
problem" is judged as a non-inferiority claim (:func:`no_worse_verdict`).
"""

from bnlab.studies.q3.experiment import (
    augmented_train_batches,
    judged,
    measure_discrepancy,
    no_worse_verdict,
    run,
)
from bnlab.studies.q3.plan import (
    MIN_EFFECT,
    MIN_UPDATES,
    NAME,
    PLANS,
    STAT_KINDS,
    TITLE,
    VERDICT_TEXT,
    Q3Plan,
    SweepPoint,
    epoch_time_stats,
    scale_plan,
    sqrt_scaled_lr,
    start_weight,
    study_epochs,
    sweep_plan,
)
from bnlab.studies.q3.section import render

__all__ = [
    "MIN_EFFECT",
    "MIN_UPDATES",
    "NAME",
    "PLANS",
    "STAT_KINDS",
    "TITLE",
    "VERDICT_TEXT",
    "Q3Plan",
    "SweepPoint",
    "augmented_train_batches",
    "epoch_time_stats",
    "judged",
    "measure_discrepancy",
    "no_worse_verdict",
    "render",
    "run",
    "scale_plan",
    "sqrt_scaled_lr",
    "start_weight",
    "study_epochs",
    "sweep_plan",
]
