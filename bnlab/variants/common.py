"""Bookkeeping the BN variants share: the momentum factor of a step and the batch-size check.

Both follow ``torch.nn.BatchNorm*d`` (and :mod:`bnlab.nn`) exactly, so that a variant that
reduces to BN does so to the last bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_values_per_channel", "step_factor"]


def step_factor(num_batches_tracked: Tensor | None, momentum: float | None,
                training: bool) -> float:
    """Count one training step in ``num_batches_tracked`` (in place); return its factor.

    PyTorch's convention: ``momentum`` weights the *new* statistics; ``momentum=None``
    gives the cumulative average, factor ``1 / num_batches_tracked`` after the increment.
    Outside training (or without the buffer) nothing is counted and the factor is
    ``momentum`` (0 when None).

    >>> t = torch.tensor(0)
    >>> step_factor(t, None, True), int(t)
    (1.0, 1)
    """
    factor = 0.0 if momentum is None else momentum
    if training and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            factor = 1.0 / float(num_batches_tracked)
    return factor


def check_values_per_channel(x: Tensor, what: str = "input") -> None:
    """PyTorch's training-mode check: more than one value per channel of ``x`` (N, C, *S).

    Raises ``ValueError`` with PyTorch's message (and ``what`` names the tensor, e.g. a
    virtual batch).
    """
    if x.dim() >= 2 and x.numel() // max(1, x.shape[1]) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {what} size {x.size()}"
        )


def channel_view(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a (C,) tensor to broadcast against ``x`` (N, C, *S): (1, C, 1, ..., 1)."""
    return v.reshape(1, -1, *([1] * (x.dim() - 2)))


def same_memory_format(y: Tensor, like: Tensor) -> Tensor:
    """``y`` in ``like``'s memory format where that is channels_last (4D or 5D)."""
    if like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(
        memory_format=torch.channels_last
    ):
        return y.contiguous(memory_format=torch.channels_last)
    if like.dim() == 5 and not like.is_contiguous() and like.is_contiguous(
        memory_format=torch.channels_last_3d
    ):
        return y.contiguous(memory_format=torch.channels_last_3d)
    return y
