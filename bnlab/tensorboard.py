"""``--tensorboard``: a run's epochs and its BN layers as TensorBoard events in its folder.

    >>> from bnlab.tensorboard import TensorBoardLogger
    >>> with TensorBoardLogger("runs/ab/b/seed0") as logger:        # doctest: +SKIP
    ...     train(config, "runs/ab/b/seed0", on_epoch=logger)

Written through :class:`torch.utils.tensorboard.SummaryWriter` into ``<run>/tensorboard/``
(``tensorboard --logdir runs/ab`` then shows every case and seed side by side), at the step
of the epoch (1-based):

- scalars ``loss/train``, ``loss/test``, ``accuracy/train``, ``accuracy/test``,
  ``learning_rate``, ``images_per_s``, ``epoch_time_s`` (one per epoch);
- histograms per BN layer ``k`` (in network order, 0-based): ``bn<k>/running_mean``,
  ``bn<k>/running_var``, ``bn<k>/gamma`` (the weight) and ``bn<k>/beta`` (the bias), each
  over the layer's C channels, for both engines.

Needs the optional extra ``pip install bnlab[tensorboard]``; :func:`require_tensorboard`
says so in one line when it is missing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["SCALARS", "TensorBoardLogger", "require_tensorboard"]

# the metrics.jsonl key of each scalar's tag
SCALARS = {"loss/train": "train_loss", "loss/test": "test_loss", "accuracy/train": "train_acc",
           "accuracy/test": "test_acc", "learning_rate": "lr", "images_per_s": "images_per_s",
           "epoch_time_s": "epoch_time_s"}
FOLDER = "tensorboard"


def require_tensorboard() -> None:
    """Raise ImportError with the install command when TensorBoard is not installed."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as error:
        raise ImportError("--tensorboard needs the tensorboard package: pip install "
                          f"'bnlab[tensorboard]' ({error})") from None


def _bn_tensors(layer: Any) -> dict[str, Any]:
    """running_mean, running_var, gamma, beta of an nn.Module BN or a manual BN layer."""
    if hasattr(layer, "buffers") and isinstance(getattr(layer, "buffers", None), dict):
        found = {**layer.params, **layer.buffers}  # a bnlab.manual layer
    else:
        found = {"running_mean": layer.running_mean, "running_var": layer.running_var,
                 "weight": getattr(layer, "weight", None), "bias": getattr(layer, "bias", None)}
    names = {"running_mean": "running_mean", "running_var": "running_var", "weight": "gamma",
             "bias": "beta"}
    return {names[k]: v for k, v in found.items() if k in names and v is not None}


class TensorBoardLogger:
    """``on_epoch`` for :func:`bnlab.train.train`: one event file per run folder.

    Call it as ``logger(model, row)`` with the trainer's :class:`~bnlab.train.Model` and the
    epoch's metrics row; :meth:`close` (or ``with``) flushes the file.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        require_tensorboard()
        self.log_dir = Path(run_dir) / FOLDER
        self.writer: Any = None  # made at the first epoch: the trainer makes the run folder

    def __call__(self, model: Any, row: dict[str, Any]) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.log_dir))
        step = int(row["epoch"])
        for tag, key in SCALARS.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, float(row[key]), step)
        for index, layer in enumerate(model.bn_layers()):
            for name, tensor in _bn_tensors(layer).items():
                self.writer.add_histogram(f"bn{index}/{name}",
                                          tensor.detach().float().cpu(), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
