"""The shared learning-rate sweep: grid spacing and the choice by final training loss."""

from __future__ import annotations

import itertools
import math

import pytest

from bnlab.studies import tuning
from bnlab.studies.common import SCALES, StudyContext
from bnlab.train import RunResult


def test_lr_grid_is_log_spaced_a_third_of_a_decade_apart():
    grid = tuning.lr_grid(1e-3, decades=2.0, per_decade=3)
    assert len(grid) == 7 and grid[3] == pytest.approx(1e-3)
    steps = [math.log10(b / a) for a, b in itertools.pairwise(grid)]
    assert all(s == pytest.approx(1 / 3) for s in steps)
    with pytest.raises(ValueError, match="center > 0"):
        tuning.lr_grid(0.0)


def test_tune_lr_picks_the_lowest_mean_training_loss_and_counts_divergence(tmp_path, monkeypatch):
    # a fake trainer: loss is a parabola in log10(lr) with its minimum at 1e-3; 1e-2 diverges
    def fake_train_run(self, name, config, **kwargs):
        if config.lr > 5e-3:
            return RunResult(tmp_path / name, [], status="diverged")
        loss = (math.log10(config.lr) + 3.0) ** 2 + 0.01 * config.seed
        return RunResult(tmp_path / name, [{"train_loss": loss, "test_acc": 0.5}])

    monkeypatch.setattr(StudyContext, "train_run", fake_train_run)
    ctx = StudyContext(out=tmp_path, scale=SCALES["quick"], seeds=3)
    tuned = tuning.tune_lr(ctx, norm="none", grid=[1e-4, 1e-3, 1e-2], seeds=3)
    assert tuned.best == pytest.approx(1e-3) and not tuned.edge
    assert tuned.losses[1e-2] == {0: math.inf, 1: math.inf, 2: math.inf}
    assert tuned.to_json()["test_acc"]["0.01"]["n"] == 0

    edge = tuning.tune_lr(ctx, norm="none", grid=[1e-5, 1e-4])
    assert edge.best == pytest.approx(1e-4) and edge.edge
