"""Q2's plan: which networks, optimizers and learning rates, at what size, per scale.

The sweep is the experiment: every number of the study is read from its runs (final test
accuracy against the rate; training loss against steps at each network's best rate and at
the common rate; the usable range). Its size per scale is :data:`PLANS`; the reasoning
behind each budget is in the package docstring (:mod:`bnlab.studies.q2`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bnlab.studies.common import StudyScale

__all__ = [
    "CHANCE",
    "KEEP",
    "MIN_EFFECT",
    "NAME",
    "NETWORKS",
    "OPTIMIZERS",
    "OPTIMIZER_LABELS",
    "PLANS",
    "POST_CLAIM",
    "SGD_CENTER",
    "TITLE",
    "SweepPlan",
    "sweep_plan",
]

NAME = "q2"
TITLE = "Q2 — What does BN buy?"

CHANCE = 0.1          # accuracy of a guess among 10 classes
KEEP = 0.8            # usable: keeps >= 80% of the best's gain over chance (X = 20% of it)
NETWORKS = (("none", "no BN"), ("torch", "BN"))
OPTIMIZERS = ("adam", "sgd")
OPTIMIZER_LABELS = {"adam": "Adam", "sgd": "SGD (momentum 0.9)"}
SGD_CENTER = 0.05     # the centre (and common rate) of the SGD grid, momentum 0.9
# the smallest difference each claim must clear, stated before the data (BN - no BN):
MIN_EFFECT = {
    "mean_train_loss": 0.05,   # nats: mean training loss over the run (faster convergence)
    "test_acc": 0.01,          # fraction: final test accuracy (1 point)
    "decades": 0.25,           # log10(lr): width of the usable range (3/4 of a grid step)
}
POST_CLAIM = ("with BN the model reached a higher test accuracy, and BN \"really does help "
              "with generalization as well as faster convergence\".")


@dataclass(frozen=True)
class SweepPlan:
    """The size of Q2's runs and its grids at one scale.

    ``width``, ``subset`` (training images, None = all), ``batch_size`` and ``epochs`` are
    the fields of every run of the sweep (the epochs are the scale's: the sweep runs at full
    length); ``points`` rates per optimizer, ``per_decade`` of them per decade, centred on
    ``centers[optimizer]`` (which is also that optimizer's *common rate*); ``grids``, when
    given, replaces the log-spaced grids (tests). ``seeds`` per point is the study's; the
    two best rates get ``headline_seeds`` (extra seeds trained only there).
    """

    width: float
    subset: int | None
    batch_size: int
    epochs: int
    points: int
    centers: dict[str, float]
    per_decade: int = 3
    grids: dict[str, tuple[float, ...]] | None = field(default=None)

    def grid(self, optimizer: str) -> list[float]:
        """The rates of ``optimizer``, ascending: ``center · 10^(k / per_decade)``,
        k = -(points-1)/2 .. (points-1)/2 (so the common rate is the middle point)."""
        if self.grids is not None:
            return sorted(self.grids[optimizer])
        half = (self.points - 1) // 2
        center = self.centers[optimizer]
        return [center * 10.0 ** (k / self.per_decade) for k in range(-half, half + 1)]

    def common_rate(self, optimizer: str) -> float:
        """The rate both networks are also compared at: the grid's middle point."""
        grid = self.grid(optimizer)
        return grid[(len(grid) - 1) // 2]

    def fields(self) -> dict[str, Any]:
        """The :class:`~bnlab.train.TrainConfig` fields every run of the sweep shares."""
        return {"width": self.width, "subset": self.subset, "batch_size": self.batch_size,
                "epochs": self.epochs}

    def steps_per_epoch(self, train_images: int) -> int:
        """Optimizer steps per epoch on ``train_images`` images (drop-last batches)."""
        return min(self.subset or train_images, train_images) // self.batch_size


def _plan(scale: StudyScale, points: int, **fields: Any) -> SweepPlan:
    base: dict[str, Any] = {"width": scale.width, "subset": scale.subset,
                            "batch_size": scale.batch_size, "epochs": scale.epochs}
    return SweepPlan(**{**base, **fields}, points=points,
                     centers={"adam": scale.lr, "sgd": SGD_CENTER})


# per scale: (points per optimizer, the fields that differ from the scale's runs)
PLANS: dict[str, tuple[int, dict[str, Any]]] = {
    "quick": (5, {"subset": 512}),
    "standard": (7, {"width": 0.25, "subset": 1280}),
    "paper": (7, {}),
}


def sweep_plan(scale: StudyScale) -> SweepPlan:
    """Q2's plan at ``scale``: :data:`PLANS` for the named presets; any other scale (a test's)
    sweeps 3 points at the scale's own run size, so its middle Adam point is the very run
    the other studies train at the scale's rate (shared through ``finished_runs``)."""
    points, fields = PLANS.get(scale.name, (3, {}))
    return _plan(scale, points, **fields)
