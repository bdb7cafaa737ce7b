"""Q5: exponentially weighted averages, on their own and as BN's running statistics.

Conventions. The post (after Andrew Ng's lectures) writes the average as
``v_t = beta * v_{t-1} + (1 - beta) * x_t`` with ``beta`` the weight of the *old* value
(0.9); PyTorch's BN ``momentum`` is the weight of the *new* value, ``momentum = 1 - beta``
(0.1). Started from ``v_0``, the average still holds ``beta^t`` of ``v_0`` after t steps;
*bias correction* divides that weight out, ``v_hat_t = (v_t - beta^t v_0) / (1 - beta^t)``
(:func:`bnlab.functional.bias_corrected_running_stats` for BN, where ``v_0`` is 0 for the
mean and 1 for the variance).

Five measurements:

1. **The averages themselves** (no training): many seeded realizations of a constant plus
   noise, averaged with several betas, raw and bias-corrected (:func:`ewa_experiment`).
   How long each needs to forget its start: computed (the first t with ``beta^t`` below
   1/e and below 0.01, :func:`steps_to_forget`) and measured (the step after which the
   error of the average over realizations stays below the same fractions of the true
   mean, :func:`settle_step`); and how much noise each leaves.
2. **BN's running statistics against the population statistics** over the first steps of
   a training run (PyTorch's convention, momentum 0.1): at probe steps, the running mean
   and variance of every BN layer, raw and bias-corrected, against the statistics they
   estimate, computed exactly for the current weights: Ioffe & Szegedy's Algorithm 2
   (the mean of the batch means and of the unbiased batch variances) over a fixed set of
   training images, randomly cropped and flipped as training augments them (the batches
   the running averages see), in batches of the training batch size
   (:func:`population_statistics`).
3. **Test accuracy in eval mode** at the same steps, with the raw running statistics, the
   bias-corrected ones and the population statistics.
4. **Precise BN against the moving average** at several epochs (first, middle, last):
   test accuracy with the run's running statistics, and with precise statistics
   (Wu & Johnson 2021, :func:`bnlab.variants.precise_bn`: the exact pooled statistics of
   one pass over the training images, augmented as in training, and plain beside it).
5. **Final accuracy across momentum values** (0.01, 0.1, 0.5 and the cumulative average),
   raw and bias-corrected. In training mode BN normalizes with batch statistics, so the
   momentum changes only the running buffers, never the weights: one run per seed gives
   every momentum. Each step's batch statistics are read back from the run's own buffers
   (``s_t = (r_t - (1 - m) r_{t-1}) / m``) and replayed into a running average per
   momentum (:class:`RunningReplay`); the tests check a replay against a run trained with
   that momentum. The sweep counts only in runs of at least ``MIN_STEPS`` (1,000) steps;
   a shorter run reports what each momentum still holds of its start, ``(1 - m)^steps``,
   and the verdict is inconclusive (the plan module gives each scale's run length).

Every claim is a paired difference over seeds with a 95% t interval, judged against a
minimum effect into *supported*, *contradicted* or *inconclusive*
(:mod:`bnlab.evidence.stats`).

Training runs go through :meth:`StudyContext.train_run`; the measurements are taken by its
``on_step`` hook and kept in each run folder (``probes.jsonl``, ``replay-epoch<e>.pt`` at
the end of every epoch, ``final.json``), so finished runs are reused and interrupted ones
resume.
"""

from bnlab.studies.q5.averages import ewa, ewa_experiment, settle_step, steps_to_forget
from bnlab.studies.q5.experiment import run
from bnlab.studies.q5.plan import (
    BETAS,
    MIN_STEPS,
    MOMENTA,
    NAME,
    TITLE,
    precise_epochs,
    run_epochs,
)
from bnlab.studies.q5.replay import RunningReplay, corrected
from bnlab.studies.q5.section import render

__all__ = [
    "BETAS",
    "MIN_STEPS",
    "MOMENTA",
    "NAME",
    "TITLE",
    "RunningReplay",
    "corrected",
    "ewa",
    "ewa_experiment",
    "precise_epochs",
    "render",
    "run",
    "run_epochs",
    "settle_step",
    "steps_to_forget",
]
