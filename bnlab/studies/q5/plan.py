"""Q5's constants: the averages studied, the momenta, the probes' schedule, and the plan.

The plan per scale (the quick budget is ~100 s of training on a 2-core CPU in float32,
standard ~700 s on a 2-core CPU with bfloat16, about 600 images/s at width 0.5):

- One BN run per seed (bnlab's BN, PyTorch's momentum 0.1) at the scale's batch size and
  rate, probed as it trains. Its length: the scale's epochs, lengthened to ``MIN_STEPS``
  (1,000) steps when that costs at most ``EXTEND_LIMIT`` (1.25) times the scale's epochs,
  so that the momentum sweep compares settings that have all forgotten their start
  (``(1 - m)^steps`` small for every m; issue 17, point 6). A run still shorter than
  ``MIN_STEPS`` is *short*: the section gives each momentum's remaining start weight and
  the momentum verdict is inconclusive.
- Probes in the first ``WINDOW`` steps (running vs population statistics of the *augmented*
  batches training sees, bias-corrected or not), and at ``PRECISE_POINTS`` epochs spread over
  training (first, middle, last): precise BN (Wu & Johnson 2021, :func:`bnlab.variants.
  precise_bn`: exact pooled statistics of one pass over the training images, augmented as
  in training, and un-augmented beside it) against the moving average, on all test images.
- ``quick`` (1,500 images, batch 64, 23 steps per epoch): 5 epochs = 115 steps, short
  (44 epochs would be needed); 3 seeds: 22k images of training plus probes (~60k forward
  images, a third of the cost each): ~100 s on a quiet 2-core CPU in float32.
- ``standard`` (5,085 images, batch 64, 79 steps per epoch): 13 epochs = 1,027 steps
  (12 would be 948), 3 seeds: 198k images plus probes: ~450 s with bfloat16.
- ``paper`` (50,000 images, batch 128): 30 epochs = 11,700 steps.
"""

from __future__ import annotations

import math

NAME = "q5"
TITLE = "Q5 — What are exponentially weighted averages, and does BN need bias correction?"

BETAS: tuple[float, ...] = (0.5, 0.9, 0.98, 0.999)   # weight of the old value (the post's)
THRESHOLDS: tuple[float, ...] = (1 / math.e, 0.01)   # start weight beta^t below these
SERIES_MEAN, SERIES_NOISE = 1.0, 0.2                 # x_t = mean + noise * N(0, 1)
REPLICATES = 4000                                    # realizations of the series
BN_MOMENTUM = 0.1                                    # PyTorch's default, the run's
MOMENTA: tuple[float | None, ...] = (0.01, 0.1, 0.5, None)  # None: cumulative average
WINDOW = 100                    # the first steps in which the running statistics are probed
EARLY = 10                      # "the very first steps": probed at every step up to this
PROBE_EVERY = 5                 # then every this many steps up to WINDOW
POPULATION_IMAGES = 512         # training images behind the population statistics
TEST_IMAGES = 500               # test images of the accuracy probes
MIN_STEPS = 1000                # steps a run needs before its momentum sweep counts
EXTEND_LIMIT = 1.25             # lengthen a run to MIN_STEPS up to this many times its epochs
PRECISE_POINTS = 3              # epochs (first, middle, last) where precise BN is measured
MIN_EFFECT = 0.01               # smallest accuracy difference (fraction) called an effect
MIN_ERROR_EFFECT = 0.01         # smallest change of a statistic's error called an effect
_SERIES_SEED, _POPULATION_SEED, _AUGMENT_SEED = 5, 2024, 17

VERDICT_TEXT = {
    "supported": "The data support it",
    "contradicted": "The data contradict it",
    "inconclusive": "Inconclusive at this scale",
}


def run_epochs(scale_epochs: int, steps_per_epoch: int) -> tuple[int, bool]:
    """Q5's run length in epochs and whether it reaches ``MIN_STEPS`` steps: the scale's
    epochs, or ``ceil(MIN_STEPS / steps_per_epoch)`` when more and at most ``EXTEND_LIMIT``
    times the scale's.

    >>> run_epochs(5, 23), run_epochs(12, 79), run_epochs(30, 390)
    ((5, False), (13, True), (30, True))
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be at least 1, got {steps_per_epoch}")
    needed = math.ceil(MIN_STEPS / steps_per_epoch)
    epochs = needed if scale_epochs < needed <= EXTEND_LIMIT * scale_epochs else scale_epochs
    return epochs, epochs * steps_per_epoch >= MIN_STEPS


def precise_epochs(epochs: int, points: int = PRECISE_POINTS) -> list[int]:
    """``points`` epochs spread over ``epochs`` (the first, the last, evenly between),
    distinct and ascending.

    >>> precise_epochs(5), precise_epochs(13), precise_epochs(2), precise_epochs(1)
    ([1, 3, 5], [1, 7, 13], [1, 2], [1])
    """
    if points < 2 or epochs < 2:
        return [epochs] if points < 2 else list(range(1, epochs + 1))[:points]
    return sorted({1 + round(k * (epochs - 1) / (points - 1)) for k in range(points)})
