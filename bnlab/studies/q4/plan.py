"""Q4's plan: its constants, its claims with their minimum effects, and the size of each
experiment at each scale (:func:`drift_plan`, :func:`noisy_seeds`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from bnlab.studies.common import StudyScale

NAME = "q4"
TITLE = "Q4 — What is internal covariate shift, and does BN reduce it?"

LAYERS: tuple[int, ...] = (2, 5, 8)           # conv/bn/relu 2, 5 and 8 of All-CNN-C
PERCENTILES: tuple[float, ...] = (15.0, 50.0, 85.0)  # Ioffe & Szegedy's Fig. 1
NORMS: dict[str, str] = {"none": "no BN", "torch": "BN"}  # TrainConfig.norm -> label
NOISY = "noisy"             # the third network of the noisy-BN experiment: BN + noise
WHERE: dict[str, str] = {"pre_bn": "before BN (conv output)",
                         "relu_input": "after BN (ReLU input)"}
PROBE_IMAGES = 128          # the fixed probe batch of the percentile measurement
PERCENTILE_SAMPLE = 16384   # values per channel the percentiles are taken over (fixed ones)
# Probes per drift run: about POINTS of each kind, but never more often than every
# MIN_EVERY steps (a percentile probe costs about 2/3 of a training step, a gradient-shift
# measurement 4 steps, a smoothness measurement 5: at quick's 115 steps the probes alone
# would otherwise cost more than the training).
PROBE_POINTS: dict[str, int] = {"percentile": 48, "shift": 24, "smooth": 8}
PROBE_MIN_EVERY: dict[str, int] = {"percentile": 4, "shift": 8, "smooth": 16}
SMOOTH_DISTANCES: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)  # x lr along the gradient

# The drift runs: SGD (momentum 0.9, cosine schedule) at one common rate for both networks,
# scaled linearly with the batch size (Goyal et al. 2017): the same step for both, so the
# drift compares what the same optimizer does to each network's layer inputs.
SGD_LR_AT_64 = 0.02
SGD_MOMENTUM = 0.9
# At least this many SGD steps per drift run, by scale (the issue: >= 2,000 at standard);
# a scale not named (quick, the tests') trains its own epochs: as many steps as fit.
MIN_DRIFT_STEPS: dict[str, int] = {"standard": 2000, "paper": 2000}
# Where the scale's own runs cannot reach those steps in the budget, the drift runs are
# narrower and use smaller batches (more steps for the same images).
# At quick, width 0.125 (a third of the cost per step of 0.25) so that the six probed runs
# fit Q4's ~100 s.
DRIFT_OVERRIDES: dict[str, dict[str, Any]] = {"quick": {"width": 0.125},
                                              "standard": {"width": 0.25, "batch_size": 32}}

# Minimum effects, stated before the data (SPEC "Evidence"):
MIN_EFFECT_ACC = 0.01      # final test accuracy: one point
MIN_EFFECT_DRIFT = 0.1     # drift: a tenth of the 15-85 spread
MIN_EFFECT_LOG10 = 0.1     # ratios (gradient shift, smoothness) as log10(BN / no BN): x1.26
EQUIVALENCE_ACC = 0.02     # "trains as well as": BN + noise within two points of BN

CLAIMS: dict[str, tuple[str, str]] = {
    "post_distribution": ("the post", "BN \"limits the internal co-variate shift by "
                          "normalizing the data over and over again\": with BN a layer's input "
                          "distribution drifts less during training."),
    "santurkar_noise": ("Santurkar et al. 2018, Sec. 2.1", "BN followed by injected "
                        "non-stationary noise still trains far better than no BN: BN's "
                        "benefit does not come from a stable layer-input distribution."),
    "santurkar_noise_vs_bn": ("Santurkar et al. 2018, Sec. 2.1", "the noisy BN network "
                              "trains about as well as standard BN."),
    "santurkar_ics": ("Santurkar et al. 2018, Sec. 2.2", "BN does not reduce internal "
                      "covariate shift in the optimization sense (Definition 2.1): the "
                      "change of a layer's gradient caused by the earlier layers' update is "
                      "no smaller with BN, often larger."),
    "santurkar_smoothness": ("Santurkar et al. 2018, Sec. 3.1", "BN makes the loss "
                             "smoother: along the gradient the loss varies less and the "
                             "gradient changes less (effective beta-smoothness) with BN."),
}


def claim(key: str) -> dict[str, str]:
    source, text = CLAIMS[key]
    return {"source": source, "claim": text}


def noisy_seeds(scale: StudyScale, seeds: int) -> list[int]:
    """Seeds of the noisy-BN experiment, the study's headline claim: at least the scale's
    ``headline_seeds``.

    >>> from bnlab.studies.common import SCALES
    >>> noisy_seeds(SCALES["standard"], 3)
    [0, 1, 2, 3, 4]
    """
    return list(range(max(seeds, scale.headline_seeds)))


@dataclass(frozen=True)
class DriftPlan:
    """The SGD runs that carry the drift, gradient-shift and smoothness probes."""

    width: float
    batch_size: int
    epochs: int
    lr: float
    steps_per_epoch: int
    total_steps: int
    min_steps: int       # what the scale asks for (0: as many as fit)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def probe_every(total_steps: int) -> dict[str, int]:
    """Steps between two probes of each kind in a run of ``total_steps``.

    >>> probe_every(2054), probe_every(115)
    ({'percentile': 42, 'shift': 85, 'smooth': 256}, {'percentile': 4, 'shift': 8, 'smooth': 16})
    """
    return {kind: max(PROBE_MIN_EVERY[kind], total_steps // points)
            for kind, points in PROBE_POINTS.items()}


def drift_plan(scale: StudyScale, num_train: int, batch_size: int) -> DriftPlan:
    """The drift runs at ``scale`` on ``num_train`` images; ``batch_size`` is the scale's
    (already clamped to the images). Width and batch from :data:`DRIFT_OVERRIDES`, epochs
    the scale's or enough for :data:`MIN_DRIFT_STEPS`, the rate :data:`SGD_LR_AT_64` scaled
    by batch / 64.

    >>> from bnlab.studies.common import SCALES
    >>> p = drift_plan(SCALES["standard"], 5085, 64)
    >>> (p.width, p.batch_size, p.epochs, p.total_steps, p.lr)
    (0.25, 32, 13, 2054, 0.01)
    >>> drift_plan(SCALES["quick"], 1500, 64).total_steps
    115
    """
    override = DRIFT_OVERRIDES.get(scale.name, {})
    batch = min(override.get("batch_size", batch_size), num_train)
    steps_per_epoch = num_train // batch
    min_steps = MIN_DRIFT_STEPS.get(scale.name, 0)
    epochs = max(scale.epochs, math.ceil(min_steps / steps_per_epoch))
    return DriftPlan(width=override.get("width", scale.width), batch_size=batch, epochs=epochs,
                     lr=SGD_LR_AT_64 * batch / 64, steps_per_epoch=steps_per_epoch,
                     total_steps=epochs * steps_per_epoch, min_steps=min_steps)
