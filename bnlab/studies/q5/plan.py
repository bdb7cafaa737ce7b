"""Q5's constants: the averages studied, the momenta, the probes' schedule."""

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
_SERIES_SEED, _POPULATION_SEED = 5, 2024

VERDICT_TEXT = {
    "support": "The data support it",
    "contradict": "The data contradict it",
    "inconclusive": "Inconclusive at this scale",
}
