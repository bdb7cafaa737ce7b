"""Q3 — What does BN cost? Small batches, the train/test discrepancy, batches that do not
represent the data, and time.

The post names two drawbacks: BN "took more time to train" ("expected since with batch
normalization we have two more parameters to optimize"), and, through the moving averages
used at test time, a model whose mini-batches do not represent the data "could be heavily
decreased" — which the post then doubts: "I don't think that would be a problem". The
drawback most often listed beside these, the small-batch failure, is not in the post's text;
it is measured here too. Four experiments, All-CNN-C, Adam, cosine schedule, ``ctx.seeds``
seeds each:

Experiment 1, batch size. Final test accuracy at batch sizes B in ``SWEEP_BATCH_SIZES``
plus the scale's own batch size B0 (a size larger than the training set is skipped and
noted), with BN (``norm="torch"``) and without. The learning rate follows the square-root
rule for Adam, anchored at the scale's (lr0, B0):

    lr(B) = lr0 * sqrt(B / B0)

Every run of this study trains E = ``study_epochs(scale)`` = half the scale's epochs (at
least 1), so that the study fits its share of the quick budget; sizes below
``min(FULL_LENGTH_FROM, B0)`` (batch 2: a thousand steps per epoch on 2,000 images, slow per
image on a CPU) train ``ceil(E * B / FULL_LENGTH_FROM)`` epochs; the section and the figure
mark them.

Experiment 2, the train/test discrepancy. Each trained BN network of experiment 1 (and of
experiment 3) is loaded from its checkpoint and tested four ways, differing only in the
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

Experiment 3, batches that do not represent the data. ``batch_order="class_sorted"``: each
batch holds one class (two where a class ends), with and without BN, against the shuffled
runs of experiment 1 at B0. Per seed, the drop = acc(shuffled) - acc(class-sorted).

Experiment 4, time. ``epoch_time_s`` (training only, evaluation excluded) and
``images_per_s`` from ``metrics.jsonl``, pooled over the epochs after the first (warm-up)
and over seeds, for: autograd without BN, autograd with PyTorch's BN (both from experiment
1 at B0), autograd with bnlab's hand-derived BN, and the manual engine (bnlab BN, bnlab's
Adam) with and without BN. Overhead = time(with BN) / time(without BN) - 1, per engine.

A difference counts when the two means differ by more than the sum of their sample
standard deviations over seeds, with at least two seeds each (:func:`compare_means`).
"""

from bnlab.studies.q3.experiment import measure_discrepancy, run
from bnlab.studies.q3.plan import (
    NAME,
    STAT_KINDS,
    TITLE,
    VERDICT_TEXT,
    SweepPoint,
    epoch_time_stats,
    sqrt_scaled_lr,
    study_epochs,
    sweep_plan,
)
from bnlab.studies.q3.section import render

__all__ = [
    "NAME",
    "STAT_KINDS",
    "TITLE",
    "VERDICT_TEXT",
    "SweepPoint",
    "epoch_time_stats",
    "measure_discrepancy",
    "render",
    "run",
    "sqrt_scaled_lr",
    "study_epochs",
    "sweep_plan",
]
