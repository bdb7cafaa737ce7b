"""Drop-in ``BatchNorm1d/2d/3d`` whose gradients come from bnlab's hand-derived backward.

Same constructor arguments, parameters, buffers, ``state_dict`` keys, train/eval
behaviour, momentum semantics (``momentum=None`` is the cumulative average) and errors as
``torch.nn.BatchNorm*d`` of the installed PyTorch: the classes share PyTorch's own base
(``_NormBase``), which owns the parameters, buffers, ``reset_*``, ``extra_repr`` and state
loading, and replace only ``forward``. The forward and backward math is in
:mod:`bnlab.functional`; autograd never traces it (the backward is a
``torch.autograd.Function``).

One opt-in addition, off by default: ``bias_correction=True`` uses bias-corrected running
averages in evaluation mode (the post's Q5; see
:func:`bnlab.functional.bias_corrected_running_stats`). The buffers themselves stay in
PyTorch's convention, so state dicts remain interchangeable.

Usage::

    >>> import torch
    >>> from bnlab.nn import BatchNorm2d, convert_batchnorm
    >>> bn = BatchNorm2d(16)
    >>> y = bn(torch.randn(8, 16, 4, 4))
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16))
    >>> model = convert_batchnorm(model, to="bnlab")       # and back with to="torch"
    >>> type(model[1]).__name__
    'BatchNorm2d'
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase

from bnlab import functional as F

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormFunction", "convert_batchnorm"]


class BatchNormFunction(torch.autograd.Function):
    """The normalization step as an autograd node whose backward is bnlab's.

    ``BatchNormFunction.apply(x, weight, bias, saved)`` returns
    :func:`~bnlab.functional.batch_norm_normalize` of ``x`` with the statistics in
    ``saved`` (from :func:`~bnlab.functional.batch_norm_prepare`, computed outside autograd);
    its backward is :func:`~bnlab.functional.batch_norm_backward`, which accounts for the
    dependence of batch statistics on ``x``. Double backward is not supported:
    ``once_differentiable`` raises a clear error if one is attempted.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, saved: F.BatchNormSaved
    ) -> Tensor:
        ctx.saved = saved
        ctx.save_for_backward(x, weight)
        return F.batch_norm_normalize(x, saved, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        dx, dgamma, dbeta = F.batch_norm_backward(dy, x, ctx.saved, weight)
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        return (dx if need_x else None, dgamma if need_w else None, dbeta if need_b else None, None)


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``torch.nn.functional.batch_norm`` with bnlab's math (same arguments, same semantics).

    In training mode the running buffers, when given, are updated in place with
    ``momentum`` weighting the new batch statistics.

    >>> x = torch.randn(8, 3, requires_grad=True)
    >>> batch_norm(x, None, None, training=True).sum().backward()
    """
    if training:
        _verify_batch_size(x)
    saved = F.batch_norm_prepare(
        x.detach(), running_mean, running_var, training=training, eps=eps
    )
    if training and running_mean is not None and running_var is not None:
        F.update_running_stats(
            running_mean, running_var, saved.mean, saved.var, x.numel() // x.shape[1], momentum
        )
    return BatchNormFunction.apply(x, weight, bias, saved)


def _verify_batch_size(x: Tensor) -> None:
    """PyTorch's check: training needs more than one value per channel."""
    size_prods = x.shape[0]
    for size in x.shape[2:]:
        size_prods *= size
    if size_prods == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.size()}"
        )


class _BatchNorm(_NormBase):
    """Shared forward of bnlab's BatchNorm1d/2d/3d (subclasses add only the input check)."""

    def __init__(self, *args: Any, bias_correction: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bias_correction = bias_correction

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text + ", bias_correction=True" if self.bias_correction else text

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if input.dim() >= 2 and input.shape[1] != self.num_features and (
            self.affine or self.track_running_stats
        ):
            what = "running_mean" if self.running_mean is not None else "weight"
            raise RuntimeError(
                f"{what} should contain {input.shape[1]} elements not {self.num_features}"
            )

        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # the cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)

        # Batch statistics in training mode, and in eval mode when there are no buffers.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        update_buffers = self.training and self.track_running_stats
        running_mean, running_var = self.running_mean, self.running_var
        if not use_batch_stats and self.bias_correction and self.num_batches_tracked is not None:
            running_mean, running_var = F.bias_corrected_running_stats(
                running_mean, running_var, int(self.num_batches_tracked), self.momentum
            )
        return batch_norm(
            input,
            running_mean if (update_buffers or not use_batch_stats) else None,
            running_var if (update_buffers or not use_batch_stats) else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
        )


class BatchNorm1d(_BatchNorm):
    """Batch normalization over (N, C) or (N, C, L) input; see ``torch.nn.BatchNorm1d``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchNorm2d(_BatchNorm):
    """Batch normalization over (N, C, H, W) input; see ``torch.nn.BatchNorm2d``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchNorm3d(_BatchNorm):
    """Batch normalization over (N, C, D, H, W) input; see ``torch.nn.BatchNorm3d``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


_PAIRS: list[tuple[type[torch.nn.Module], type[torch.nn.Module]]] = [
    (torch.nn.BatchNorm1d, BatchNorm1d),
    (torch.nn.BatchNorm2d, BatchNorm2d),
    (torch.nn.BatchNorm3d, BatchNorm3d),
]


def convert_batchnorm(
    model: torch.nn.Module, to: Literal["bnlab", "torch"] = "bnlab"
) -> torch.nn.Module:
    """Swap every ``BatchNorm*d`` in ``model`` for bnlab's (``to="bnlab"``) or PyTorch's.

    Parameters, buffers (running statistics, ``num_batches_tracked``), hyperparameters,
    device, dtype and train/eval mode are kept; the model is changed in place and
    returned (a bare BN module is returned converted). Subclasses of PyTorch's BN (such
    as ``SyncBatchNorm`` or ``LazyBatchNorm*d``) are left alone.

    >>> m = convert_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(4)))
    >>> type(convert_batchnorm(m, to="torch")[0]) is torch.nn.BatchNorm1d
    True
    """
    if to not in ("bnlab", "torch"):
        raise ValueError(f"convert_batchnorm: to must be 'bnlab' or 'torch', got {to!r}")
    mapping = {src: dst for src, dst in _PAIRS} if to == "bnlab" else {d: s for s, d in _PAIRS}
    target = mapping.get(type(model))
    if target is not None:
        return _convert_one(model, target)
    for name, child in model.named_children():
        converted = convert_batchnorm(child, to)
        if converted is not child:
            setattr(model, name, converted)
    return model


def _convert_one(bn: torch.nn.Module, target: type[torch.nn.Module]) -> torch.nn.Module:
    p = bn.weight if bn.weight is not None else bn.running_mean
    kwargs: dict[str, Any] = dict(
        eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
        track_running_stats=bn.track_running_stats,
    )
    if p is not None:
        kwargs.update(device=p.device, dtype=p.dtype)
    if getattr(bn, "bias", None) is None and bn.affine:
        kwargs["bias"] = False  # PyTorch >= 2.12's scale-only affine
    new = target(bn.num_features, **kwargs)
    new.load_state_dict(bn.state_dict())
    new.train(bn.training)
    return new


# Cross-process BN (its own module: bnlab.sync_batchnorm), re-exported beside the others.
from bnlab.sync_batchnorm import SyncBatchNorm  # noqa: E402

__all__ += ["SyncBatchNorm"]

# The fixes for BN's drawbacks (bnlab.variants), for ``from bnlab.nn import ...``.
from bnlab.variants import (  # noqa: E402
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    GhostBatchNorm2d,
    GroupNorm,
    precise_bn,
)

__all__ += ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "GhostBatchNorm2d", "GroupNorm",
            "precise_bn"]
