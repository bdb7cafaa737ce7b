"""Q4 — What is internal covariate shift, and does BN reduce it?

Internal covariate shift (ICS; Ioffe & Szegedy 2015) is the change in the distribution of a
layer's input while the layers before it learn. The post says BN "limits the internal
co-variate shift by normalizing the data over and over again". Santurkar, Tsipras, Ilyas &
Madry (2018, "How Does Batch Normalization Help Optimization?") argue that BN's benefit does
not come from there, and that BN instead makes the loss smoother. Three experiments on
All-CNN-C, no BN against BN (``torch.nn.BatchNorm2d``), paired by seed:

1. **Noisy BN** (Santurkar et al., Sec. 2.1; :mod:`~bnlab.studies.q4.noise`): no BN, BN,
   and BN followed by random per-channel scale and shift redrawn at every step, at the
   scale's config with Adam, each network at its own tuned rate
   (:func:`bnlab.studies.tuning.tune_lr`, the sweep every study shares; BN + noise at BN's
   rate, so the noise is the only change), on ``max(seeds, headline_seeds)`` seeds: the
   headline claim. Verdicts: BN + noise − no BN above +1 point; BN − (BN + noise) within
   ±2 points (equivalence).
2. **Drift before and after BN** (Ioffe & Szegedy's Fig. 1): no BN and BN trained with
   SGD (momentum 0.9) at one common rate (the same step for both; 0.02 at batch 64, scaled
   with the batch), the percentiles of each probed layer's input on a fixed batch, before
   BN (conv output) and after it (ReLU input), every few steps; drift = largest move of a
   percentile from step 0 in 15-85 spreads. Verdict: BN − no BN below −0.1 spreads.
3. **In the same SGD runs**: Santurkar et al.'s ICS (Definition 2.1, the change of a
   layer's gradient when the earlier layers take their optimizer step) and the smoothness
   of the loss along the gradient (their Fig. 4: loss range, gradient change, effective
   beta-smoothness over steps of 0.5-4 x lr along the gradient). Verdicts on
   log10(BN / no BN): ICS not below −0.1, smoothness below −0.1.

The plan at each scale, from the budgets (``quick`` ~100 s of training for Q4 on a 2-core
CPU; ``standard`` ~700 s on a 2-core bf16 CPU):

- quick (width 0.25, 1,500 images, batch 64, 5 epochs, 3 seeds): noisy BN = 3 new runs of
  the scale's length (BN and no BN at their tuned rates are shared with the other studies
  under ``study all``); drift = 2 x 3 SGD runs of 115 steps at width 0.125 (a third of the
  cost per step) with probes, which about double a run's cost (as many steps as fit; said
  in the section). About 3 x 20 s + 6 x 14 s on a quiet 2-core CPU.
- standard (width 0.5, 5,085 images, batch 64, 12 epochs, 5 headline seeds): noisy BN = 5
  new runs; drift = 2 x 3 SGD runs at width 0.25, batch 32, 13 epochs = 2,054 steps (the
  issue's >= 2,000; a quarter of the width-0.5 cost per image; probes add under 10%).
- paper (full CIFAR-10): the scale's own runs, >= 2,000 SGD steps.

Modules: :mod:`~.plan` (constants, claims, sizes), :mod:`~.measures` (the probes),
:mod:`~.noise`, :mod:`~.experiment` (the runs), :mod:`~.analysis` (statistics, verdicts),
:mod:`~.figures`, :mod:`~.section`. Measurements are appended to ``probes.jsonl`` in each
drift run's folder (one line per step; the last line of a step wins), so a finished run is
reused with its measurements and an interrupted one resumes and re-measures the steps it
replays.
"""

from bnlab.studies.common import ProbeLog
from bnlab.studies.q4.experiment import run
from bnlab.studies.q4.measures import (
    channel_percentiles,
    gradient_shift,
    layer_percentiles,
    percentile_drift,
    relu_input_percentiles,
    smoothness_along_gradient,
)
from bnlab.studies.q4.noise import NoiseSpec, injected_bn_noise
from bnlab.studies.q4.plan import LAYERS, NAME, PERCENTILES, TITLE, drift_plan
from bnlab.studies.q4.section import render

__all__ = [
    "LAYERS",
    "NAME",
    "PERCENTILES",
    "TITLE",
    "NoiseSpec",
    "ProbeLog",
    "channel_percentiles",
    "drift_plan",
    "gradient_shift",
    "injected_bn_noise",
    "layer_percentiles",
    "percentile_drift",
    "relu_input_percentiles",
    "render",
    "run",
    "smoothness_along_gradient",
]
