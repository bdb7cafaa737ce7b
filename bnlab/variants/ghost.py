r"""Ghost batch normalization (Hoffer, Hubara & Soudry 2017, Algorithm 1): math and module.

Large batches generalize worse; Hoffer et al. trace part of that to BN seeing less noise,
and restore it by normalizing *virtual* ("ghost") batches: the batch of N is cut along
its first axis into slices of ``virtual_batch_size`` B (Keras's ``virtual_batch_size``),
and each slice is batch-normalized with its own statistics::

    x, y, dy, dx : (N, C, H, W)   any memory format
    x_k          : x[k B : (k + 1) B]       the k-th ghost batch, k = 0 .. ceil(N / B) - 1
    y_k          = BN(x_k)                   mu_k, var_k over the m_k = |x_k| * H * W values
                                             of each channel of x_k

Uneven last ghost batch: when B does not divide N, the last slice holds ``N mod B``
samples and is normalized with its own (noisier) statistics, exactly as BN would treat a
batch of that size; a last slice with a single value per channel fails in training as BN
does (``ValueError``). Keras instead requires B to divide N.

Backward: the ghost batches share no statistics, so the gradient is BN's closed form
(:func:`bnlab.functional.batch_norm_backward`) per slice; ``dgamma`` and ``dbeta`` are the
sums of the slices' (they are sums over all of the batch in BN as well).

Running statistics are updated as BN's, once *per ghost batch*, in order (each ghost batch
is one BN step, as in Hoffer et al.'s code): ``num_batches_tracked`` counts ghost batches,
and each update moves the running mean and variance by ``momentum`` toward that ghost
batch's mean and unbiased variance. A batch of N = k B thus equals BN applied to its k
slices one after the other, buffers included. (Keras makes one update per batch with the
ghost batches' averaged statistics, saying the difference is small.) Evaluation is BN's,
with the running statistics, sample by sample.

Usage::

    >>> import torch
    >>> from bnlab.variants.ghost import GhostBatchNorm2d
    >>> layer = GhostBatchNorm2d(4, virtual_batch_size=8)
    >>> y = layer(torch.randn(32, 4, 3, 3))
    >>> int(layer.num_batches_tracked)  # four ghost batches
    4
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase

from bnlab import functional as F

__all__ = [
    "GhostBatchNorm2d",
    "GhostBatchNormFunction",
    "check_virtual_batch_size",
    "ghost_batch_norm_backward",
    "ghost_batch_norm_forward",
    "ghost_batch_norm_normalize",
    "ghost_batch_norm_stats",
    "ghost_batch_norm_step",
]


def check_virtual_batch_size(virtual_batch_size: int) -> None:
    """Raise ``ValueError`` (with the value) unless ``virtual_batch_size`` is a positive int."""
    if isinstance(virtual_batch_size, bool) or int(virtual_batch_size) != virtual_batch_size \
            or virtual_batch_size < 1:
        raise ValueError(
            f"virtual_batch_size must be a positive integer, got {virtual_batch_size!r}"
        )


def ghost_batch_norm_normalize(
    x: Tensor, saved: list[F.BatchNormSaved], weight: Tensor | None, bias: Tensor | None,
    virtual_batch_size: int,
) -> Tensor:
    """BN's fused normalization pass on each ghost batch of ``x``, with its own statistics."""
    y = torch.empty_like(x)
    for xk, yk, sk in zip(x.split(virtual_batch_size), y.split(virtual_batch_size), saved,
                          strict=True):
        yk.copy_(F.batch_norm_normalize(xk, sk, weight, bias))
    return y


def ghost_batch_norm_stats(
    x: Tensor, virtual_batch_size: int, *, eps: float = 1e-5
) -> list[F.BatchNormSaved]:
    """BN's batch statistics of each ghost batch of ``x`` (N, C, *S), in order."""
    check_virtual_batch_size(virtual_batch_size)
    return [F.batch_norm_prepare(xk, training=True, eps=eps)
            for xk in x.split(virtual_batch_size)]


def ghost_batch_norm_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    virtual_batch_size: int,
    *,
    eps: float = 1e-5,
) -> tuple[Tensor, list[F.BatchNormSaved]]:
    r"""Training-mode ghost BN of ``x`` (N, C, \*S): BN on each slice of ``virtual_batch_size``.

    Returns ``y`` (``x``'s shape and memory format) and one
    :class:`~bnlab.functional.BatchNormSaved` per ghost batch. Stateless (no running
    statistics; :func:`ghost_batch_norm_step` does a layer's bookkeeping).

    >>> x = torch.randn(8, 2)
    >>> y, saved = ghost_batch_norm_forward(x, None, None, 3)
    >>> len(saved), saved[-1].mean.shape  # ghost batches of 3, 3 and 2 rows
    (3, torch.Size([2]))
    """
    saved = ghost_batch_norm_stats(x, virtual_batch_size, eps=eps)
    return ghost_batch_norm_normalize(x, saved, weight, bias, virtual_batch_size), saved


def ghost_batch_norm_backward(
    dy: Tensor, x: Tensor, saved: list[F.BatchNormSaved], weight: Tensor | None,
    virtual_batch_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Gradients of ghost BN: BN's closed form on each ghost batch, parameters summed.

    The loss depends on ghost batch k's statistics only through that batch's outputs, so
    with ``x_hat_k``, ``m_k`` and ``invstd_k`` of ghost batch k::

        dbeta  = sum_k sum_{i in k} dy_i                                        # term 1
        dgamma = sum_k sum_{i in k} dy_i * x_hat_i                              # term 2
        dx_i   = gamma invstd_k / m_k * (m_k dy_i - dbeta_k - x_hat_i dgamma_k) # i in k

    where ``dbeta_k``, ``dgamma_k`` are ghost batch k's own sums (the terms of
    :func:`bnlab.functional.batch_norm_backward`, which computes each slice). Evaluation
    mode needs no ghost batches (``dx = gamma invstd dy``, BN's).

    Returns ``(dx, dgamma, dbeta)``, shapes ``x``'s, (C,), (C,).
    """
    dx = torch.empty_like(x)
    dgamma = dbeta = None
    for xk, dyk, dxk, sk in zip(x.split(virtual_batch_size), dy.split(virtual_batch_size),
                                dx.split(virtual_batch_size), saved, strict=True):
        dxk_, dgk, dbk = F.batch_norm_backward(dyk, xk, sk, weight)
        dxk.copy_(dxk_)
        dgamma = dgk if dgamma is None else dgamma + dgk
        dbeta = dbk if dbeta is None else dbeta + dbk
    assert dgamma is not None and dbeta is not None  # at least one ghost batch (N >= 1)
    return dx, dgamma, dbeta


def ghost_batch_norm_step(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    *,
    training: bool,
    virtual_batch_size: int,
    momentum: float | None,
    eps: float,
) -> tuple[list[F.BatchNormSaved], int]:
    """One call of a ghost BN layer, short of the output: statistics and buffer updates.

    Training (or no running statistics): one :class:`~bnlab.functional.BatchNormSaved`
    per ghost batch, and, where buffers exist, one BN running-average update per ghost
    batch in order (``num_batches_tracked`` += 1 each; ``momentum=None`` is the cumulative
    average). Evaluation with buffers: one saved entry of the running statistics for the
    whole batch. Returns ``(saved, size)``: ``saved[k]`` holds the statistics of
    ``x.split(size)[k]`` (``size`` is ``virtual_batch_size``, or N for the evaluation entry).
    The buffers are the caller's, changed in place. Both engines call this.
    """
    check_virtual_batch_size(virtual_batch_size)
    use_batch_stats = training or running_mean is None
    if not use_batch_stats:
        return [F.batch_norm_prepare(x, running_mean, running_var, training=False,
                                     eps=eps)], max(1, x.shape[0])
    saved = []
    for xk in x.split(virtual_batch_size) if x.shape[0] else [x]:
        if training:
            F.check_values_per_channel(xk, f"virtual batch of size {xk.shape[0]}; input")
        sk = F.batch_norm_prepare(xk, training=True, eps=eps)
        if training and running_mean is not None and running_var is not None:
            factor = F.step_factor(num_batches_tracked, momentum, training)
            F.update_running_stats(running_mean, running_var, sk.mean, sk.var,
                                   xk.numel() // xk.shape[1], factor)
        saved.append(sk)
    return saved, virtual_batch_size


class GhostBatchNormFunction(torch.autograd.Function):
    """Ghost BN's normalization as one autograd node whose backward is bnlab's.

    ``GhostBatchNormFunction.apply(x, weight, bias, saved, size)`` with ``(saved, size)``
    from :func:`ghost_batch_norm_step` (``saved[k]`` normalizes ``x.split(size)[k]``).
    Double backward is not supported.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                saved: list[F.BatchNormSaved], size: int) -> Tensor:
        ctx.saved, ctx.size = saved, size
        ctx.save_for_backward(x, weight)
        return ghost_batch_norm_normalize(x, saved, weight, bias, size)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        dx, dgamma, dbeta = ghost_batch_norm_backward(dy, x, ctx.saved, weight, ctx.size)
        need_x, need_w, need_b, _, _ = ctx.needs_input_grad
        return (dx if need_x else None, dgamma if need_w else None, dbeta if need_b else None,
                None, None)


class GhostBatchNorm2d(_NormBase):
    """Ghost batch normalization over (N, C, H, W) input, in virtual batches of B samples.

    ``GhostBatchNorm2d(num_features, virtual_batch_size=B, eps=1e-5, momentum=0.1,
    affine=True, track_running_stats=True)``: arguments, parameters, buffers and
    ``state_dict`` keys of ``torch.nn.BatchNorm2d`` plus ``virtual_batch_size`` (a positive
    integer, Keras's name); ``momentum`` applies per ghost batch. The math, the uneven last
    ghost batch and the running-statistics rule are in :mod:`bnlab.variants.ghost`'s
    docstring. ``virtual_batch_size >= N`` is BN.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        virtual_batch_size: int,
        **kwargs: Any,
    ) -> None:
        check_virtual_batch_size(virtual_batch_size)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype, **kwargs)
        self.virtual_batch_size = int(virtual_batch_size)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise RuntimeError(
                f"running_mean should contain {input.shape[1]} elements not {self.num_features}"
            )
        saved, size = ghost_batch_norm_step(
            input.detach(), self.running_mean, self.running_var, self.num_batches_tracked,
            training=self.training, virtual_batch_size=self.virtual_batch_size,
            momentum=self.momentum, eps=self.eps,
        )
        return GhostBatchNormFunction.apply(input, self.weight, self.bias, saved, size)
