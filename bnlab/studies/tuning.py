"""Each network at its own best learning rate: the short sweep every study shares.

BN's gains come largely through the larger learning rates it tolerates (Bjorck et al.,
"Understanding Batch Normalization", NeurIPS 2018, Sec. 2), so a BN-vs-no-BN claim made at
one shared rate mixes "BN helps" with "this rate suits BN". Every such claim in the studies
is made at each network's own tuned rate (and, beside it, at the scale's common rate).

The sweep: a log-spaced grid of ``per_decade`` points per decade (default 3, so neighbours
are a third of a decade apart) around the scale's rate, each point trained for the scale's
epochs on ``seeds`` seeds through :meth:`StudyContext.train_run` (so a run another study
already trained with the same config is copied, and ``--resume`` retrains nothing). The
best rate minimises the mean over seeds of the **final training loss** (the last epoch's
mean loss over its batches; a diverged or non-finite run counts as +inf: a run whose loss
stops being finite raises :class:`~bnlab.train.DivergenceError`, which the sweep records
rather than lets through, so a grid may reach past the rates a network tolerates). The
training loss, not the test accuracy, chooses: choosing on the test set would bias every
test-accuracy comparison made afterwards at the chosen rate.

    >>> [f"{x:.3g}" for x in lr_grid(1e-3, decades=2.0, per_decade=3)]
    ['0.0001', '0.000215', '0.000464', '0.001', '0.00215', '0.00464', '0.01']
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnlab import runs
from bnlab.evidence.stats import mean_std
from bnlab.studies.common import StudyContext
from bnlab.train import DivergenceError

__all__ = ["TunedLR", "lr_grid", "tune_lr"]


def lr_grid(center: float, decades: float = 1.0, per_decade: int = 3) -> list[float]:
    """Log-spaced learning rates ``center · 10^(k / per_decade)``, k = -h..h with
    h = round(decades / 2 · per_decade): the grid spans ``decades`` decades centred on
    ``center``, neighbours ``1 / per_decade`` of a decade apart.

    Raises ValueError for a non-positive center, decades < 0 or per_decade < 1.
    """
    if not center > 0 or decades < 0 or per_decade < 1:
        raise ValueError(f"lr_grid needs center > 0, decades >= 0, per_decade >= 1; got "
                         f"{center}, {decades}, {per_decade}")
    half = round(decades / 2 * per_decade)
    return [center * 10.0 ** (k / per_decade) for k in range(-half, half + 1)]


@dataclass
class TunedLR:
    """The outcome of one sweep: ``best`` (the chosen rate), and per rate of ``grid`` the
    final training losses by seed (``losses[lr][seed]``, inf for a diverged run) and the
    final test accuracies by seed (``test_acc[lr][seed]``, None for a diverged run);
    ``run_dirs[lr][seed]`` is each run's folder and ``diverged[lr]`` the seeds whose loss
    stopped being finite (their folders keep the epochs before it)."""

    network: str
    optimizer: str
    best: float
    grid: list[float]
    losses: dict[float, dict[int, float]] = field(default_factory=dict)
    test_acc: dict[float, dict[int, float | None]] = field(default_factory=dict)
    edge: bool = False  # the best rate is at an end of the grid: the true best may lie beyond
    run_dirs: dict[float, dict[int, Path]] = field(default_factory=dict)
    diverged: dict[float, list[int]] = field(default_factory=dict)

    def metrics(self, lr: float, seed: int) -> list[dict[str, Any]]:
        """The per-epoch metrics of one run of the sweep (``metrics.jsonl``; a diverged run
        has the epochs before its loss stopped being finite). KeyError for a rate or seed
        the sweep did not train."""
        return runs.read_metrics(self.run_dirs[lr][seed] / runs.METRICS)

    def to_json(self) -> dict[str, Any]:
        return {"network": self.network, "optimizer": self.optimizer, "best": self.best,
                "grid": self.grid, "edge": self.edge,
                "loss": {f"{lr:.6g}": mean_std(list(v.values())) for lr, v in self.losses.items()},
                "test_acc": {f"{lr:.6g}": mean_std(list(v.values()))
                             for lr, v in self.test_acc.items()}}


def _final(metrics: list[dict], key: str) -> float | None:
    if not metrics:
        return None
    value = metrics[-1].get(key)
    return float(value) if value is not None and math.isfinite(float(value)) else None


def tune_lr(ctx: StudyContext, *, norm: str, optimizer: str = "adam",
            grid: list[float] | None = None, seeds: int | None = None,
            **fields: Any) -> TunedLR:
    """Sweep the learning rate of the All-CNN-C with ``norm`` ("none" or "torch", or any
    :class:`~bnlab.train.TrainConfig` norm) under ``optimizer`` at ``ctx``'s scale, and
    return the rate with the lowest mean final training loss.

    ``grid`` defaults to :func:`lr_grid` around the scale's rate, ``ctx.scale.tune_points``
    points a third of a decade apart; ``seeds`` to ``ctx.scale.tune_seeds`` (the sweep makes a
    choice, not a claim: the claims made at the chosen rate have their own seeds);
    ``fields`` override the config (the same for every point, so the sweep can be
    specialised: another batch size, SGD momentum...).
    Runs are named ``tune-<norm>-<optimizer>-lr<lr>-s<seed>`` under ``ctx.out/runs``.
    """
    grid = sorted(grid or lr_grid(ctx.scale.lr, decades=(ctx.scale.tune_points - 1) / 3,
                                  per_decade=3))
    seed_list = list(range(seeds if seeds is not None else ctx.scale.tune_seeds))
    tuned = TunedLR(network=norm, optimizer=optimizer, best=grid[0], grid=grid)
    tag = "-".join(f"{k}{v}" for k, v in sorted(fields.items()))
    for lr in grid:
        tuned.losses[lr], tuned.test_acc[lr], tuned.run_dirs[lr] = {}, {}, {}
        tuned.diverged[lr] = []
        for seed in seed_list:
            config = ctx.config(norm=norm, optimizer=optimizer, lr=lr, seed=seed, **fields)
            name = f"tune-{norm}-{optimizer}{'-' + tag if tag else ''}-lr{lr:.3g}-s{seed}"
            tuned.run_dirs[lr][seed] = ctx.out / "runs" / name
            try:
                result = ctx.train_run(name, config)
                status, metrics = result.status, result.metrics
            except DivergenceError:  # result.json says so: a resumed sweep reads it back
                status, metrics = "diverged", []
            if status == "diverged":
                tuned.diverged[lr].append(seed)
            loss = _final(metrics, "train_loss") if status == "finished" else None
            tuned.losses[lr][seed] = loss if loss is not None else math.inf
            tuned.test_acc[lr][seed] = (_final(metrics, "test_acc")
                                        if status == "finished" else None)
    mean_loss = {lr: sum(v.values()) / len(v) for lr, v in tuned.losses.items()}
    tuned.best = min(grid, key=lambda lr: (mean_loss[lr], lr))
    tuned.edge = len(grid) > 1 and tuned.best in (grid[0], grid[-1])
    return tuned
