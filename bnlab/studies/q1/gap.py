"""Q1's gap measurement: how well one trained network fits its training images, and how
much worse it does on unseen ones.

Per epoch, from ``metrics.jsonl``:

    accuracy gap = train_acc - test_acc,        loss gap = test_loss - train_loss

where ``train_acc``/``train_loss`` are measured *in training mode during the epoch*, on
augmented images, with dropout active and BN on batch statistics. That number mixes the
fit with the noise, so after the run the final network is also evaluated in eval mode on
the un-augmented training subset (the checkpoint loaded into a fresh
:class:`~bnlab.train.Model`): the *eval-mode* train accuracy is the network's fit, and the
*eval-mode gap* (that accuracy minus the test accuracy) is the one that answers the
question.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bnlab import data as bdata
from bnlab.engines import load_model
from bnlab.train import RunResult

__all__ = ["FINAL_KEYS", "evaluate_on_train_set", "gap_curves", "run_entry"]

# the numbers kept per finished run (all fractions, or nats for losses)
FINAL_KEYS = ("test_acc", "train_acc", "train_acc_eval", "test_loss", "train_loss_eval",
              "acc_gap_train_mode", "acc_gap_eval", "loss_gap_eval")


def gap_curves(metrics: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Per epoch: ``acc_gap`` = train_acc - test_acc, ``loss_gap`` = test_loss - train_loss.

    >>> gap_curves([{"epoch": 1, "train_acc": 0.6, "test_acc": 0.5,
    ...              "train_loss": 1.0, "test_loss": 1.5}])["loss_gap"]
    [0.5]
    """
    return {
        "epoch": [int(m["epoch"]) for m in metrics],
        "acc_gap": [m["train_acc"] - m["test_acc"] for m in metrics],
        "loss_gap": [m["test_loss"] - m["train_loss"] for m in metrics],
    }


@torch.no_grad()
def evaluate_on_train_set(run_dir: Path, dataset: bdata.CIFAR10) -> dict[str, float]:
    """Eval-mode accuracy and mean loss of a run's final network on ``dataset``'s training
    images, un-augmented (``dataset`` must be the run's training set, subset included:
    :func:`bnlab.train.prepare_dataset` makes it). BN uses its running statistics and
    dropout is off, as at test time."""
    model = load_model(run_dir, dataset.device)
    config = model.config
    as_test = dataclasses.replace(dataset, test_images=dataset.train_images,
                                  test_labels=dataset.train_labels)
    loss_sum, correct = 0.0, 0
    for x, y in bdata.test_batches(as_test, config.eval_batch_size,
                                   channels_last=config.channels_last, dtype=model.dtype):
        loss, right = model.evaluate(x, y)
        loss_sum += float(loss)
        correct += int(right)
    n = dataset.num_train
    return {"train_acc_eval": correct / n, "train_loss_eval": loss_sum / n}


def run_entry(seed: int, result: RunResult, train_set: bdata.CIFAR10) -> dict[str, Any]:
    """One run's row of summary.json: ``seed``, ``status`` and, when it finished, the
    :data:`FINAL_KEYS` and its per-epoch ``curves`` (:func:`gap_curves`); else ``message``."""
    entry: dict[str, Any] = {"seed": seed, "status": result.status}
    if result.status != "finished" or not result.metrics:
        entry["message"] = result.message
        return entry
    final = result.metrics[-1]
    entry.update({k: final[k] for k in ("train_acc", "test_acc", "train_loss", "test_loss")})
    entry.update(evaluate_on_train_set(result.run_dir, train_set))
    entry["acc_gap_train_mode"] = final["train_acc"] - final["test_acc"]
    entry["acc_gap_eval"] = entry["train_acc_eval"] - final["test_acc"]
    entry["loss_gap_eval"] = final["test_loss"] - entry["train_loss_eval"]
    entry["curves"] = gap_curves(result.metrics)
    return entry
