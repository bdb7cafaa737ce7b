r"""Group normalization (Wu & He 2018), hand-derived: BN's math over a different reduction.

BN's statistics are per channel over the batch, so they depend on the batch size and on
which samples share a batch; GroupNorm's are per sample, over a group of channels::

    x, y, dy, dx : (N, C, *S)       any memory format;  G groups of C/G channels
    mu, var      : (N, G)           over the M = (C/G) * prod(S) values of one group of
                                    one sample (biased variance, as BN)
    gamma, beta  : (C,)             per channel, as BN's
    x_hat = (x - mu_{n,g(c)}) / sqrt(var_{n,g(c)} + eps)
    y     = gamma_c * x_hat + beta_c

This *is* BN's normalization once ``x`` is viewed as (1, N*G, M): every (sample, group)
pair becomes one "channel" of a batch of one, so the statistics, the normalization and the
backward of :mod:`bnlab.functional` apply unchanged (the code below calls them). Only the
affine map differs: gamma and beta are per channel, not per (sample, group). Where BN
reduces over (N, *S) per channel, GroupNorm reduces over (C/G, *S) per (n, g).
``num_groups = 1`` normalizes each sample over all its features (LayerNorm over (C, *S),
with per-channel affine); ``num_groups = C`` normalizes each channel of each sample
(InstanceNorm, with affine). There are no running statistics: training and evaluation
compute the same function, and a sample's output does not depend on the rest of its batch.

Usage::

    >>> import torch
    >>> from bnlab.variants.groupnorm import GroupNorm
    >>> gn = GroupNorm(2, 4)                      # same arguments as torch.nn.GroupNorm
    >>> x = torch.randn(3, 4, 5, 5)
    >>> bool((gn(x) - torch.nn.GroupNorm(2, 4)(x)).abs().max() < 1e-5)
    True
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from bnlab import functional as F

__all__ = [
    "GroupNorm",
    "GroupNormFunction",
    "GroupNormSaved",
    "group_norm_backward",
    "group_norm_check",
    "group_norm_check_args",
    "group_norm_forward",
]


def _same_memory_format(y: Tensor, like: Tensor) -> Tensor:
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


class GroupNormSaved(NamedTuple):
    """What GroupNorm's forward keeps: BN's statistics of the (1, N*G, M) view.

    ``groups`` is a :class:`~bnlab.functional.BatchNormSaved` whose (N*G,) entries are
    the (sample, group) pairs in row-major order; ``num_groups`` is G.
    """

    groups: F.BatchNormSaved
    num_groups: int


def _compute_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def group_norm_check_args(num_groups: int, num_channels: int) -> None:
    """``torch.nn.GroupNorm``'s constructor check: ``ValueError`` unless G divides C.

    >>> group_norm_check_args(3, 10)
    Traceback (most recent call last):
    ...
    ValueError: num_channels (10) must be divisible by num_groups (3)
    """
    if num_groups <= 0:
        raise ValueError(f"num_groups must be positive, got {num_groups}")
    if num_channels % num_groups != 0:
        raise ValueError(
            f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})"
        )


def group_norm_check(x: Tensor, num_groups: int, weight: Tensor | None) -> None:
    """``torch.nn.functional.group_norm``'s input checks, with its error types and messages.

    Raises ``RuntimeError`` for input with fewer than 2 dimensions, for a channel count
    not divisible by ``num_groups``, and for ``weight`` not of shape (C,); ``ValueError``
    (PyTorch's BN message, in any mode) when each group of one sample holds one value
    and there is a single (sample, group) pair per group index, ``N * C / G * prod(S) = 1``.
    """
    if x.dim() < 2:
        raise RuntimeError(
            f"Expected at least 2 dimensions for input tensor but received {x.dim()}"
        )
    size = [x.shape[0] * x.shape[1] // num_groups, num_groups, *x.shape[2:]]
    if math.prod([size[0], *size[2:]]) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}"
        )
    if x.shape[1] % num_groups != 0:
        raise RuntimeError(
            "Expected number of channels in input to be divisible by num_groups, but got "
            f"input of shape {list(x.shape)} and num_groups={num_groups}"
        )
    if weight is not None and (weight.dim() != 1 or weight.numel() != x.shape[1]):
        raise RuntimeError(
            "Expected weight to be a vector of size equal to the number of channels in "
            f"input, but got weight of shape {list(weight.shape)} and input of shape "
            f"{list(x.shape)}"
        )


def _per_channel(saved: GroupNormSaved, channels: int) -> F.BatchNormSaved:
    """The (N*G,) group statistics repeated for each channel of its group: (N*C,)."""
    rep = channels // saved.num_groups
    g = saved.groups
    return F.BatchNormSaved(*(t.repeat_interleave(rep) for t in (g.shift, g.mean, g.var,
                                                                g.invstd)), True)


def group_norm_forward(
    x: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, GroupNormSaved]:
    r"""GroupNorm of ``x`` (N, C, \*S); returns ``y`` (``x``'s shape and memory format) and
    what the backward needs.

    Statistics: :func:`bnlab.functional.batch_norm_stats` of ``x`` viewed as (1, N*G, M)
    (stable corrected two-pass, float64 per group). Normalization: BN's fused pass
    :func:`bnlab.functional.batch_norm_normalize` of ``x`` viewed as (1, N*C, prod(S)),
    with each channel's group statistics and the per-(n, c) scale ``gamma_c`` and shift
    ``beta_c``. ``weight``/``bias`` of None mean gamma = 1, beta = 0. Errors as
    :func:`group_norm_check`.

    >>> y, saved = group_norm_forward(torch.randn(2, 4, 3), 2)
    >>> tuple(saved.groups.mean.shape)  # one mean per (sample, group)
    (4,)
    """
    group_norm_check(x, num_groups, weight)
    n, c = x.shape[:2]
    xc = x.contiguous()
    if x.numel() == 0:
        empty = torch.empty(0, dtype=torch.float64, device=x.device)
        stats = F.BatchNormSaved(empty.to(x.dtype), empty, empty, empty, True)
        return torch.empty_like(x), GroupNormSaved(stats, num_groups)
    shift, mean, var = F.batch_norm_stats(xc.view(1, n * num_groups, -1))
    saved = GroupNormSaved(F.BatchNormSaved(shift, mean, var, (var + eps).rsqrt(), True),
                           num_groups)
    scale = None if weight is None else weight.repeat(n)
    offset = None if bias is None else bias.repeat(n)
    y = F.batch_norm_normalize(xc.view(1, n * c, -1), _per_channel(saved, c), scale, offset)
    return _same_memory_format(y.view(x.shape), x), saved


def group_norm_backward(
    dy: Tensor, x: Tensor, saved: GroupNormSaved, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Gradients of ``y = gamma_c * x_hat + beta_c`` with group statistics.

    The per-channel affine map comes first (in the backward): ``dx_hat = gamma_c dy``.
    From ``x_hat`` back to ``x`` it is BN's backward on the (1, N*G, M) view, with m = M
    values per (sample, group) and gamma = 1 (Ioffe & Szegedy 2015's derivation, see
    :func:`bnlab.functional.batch_norm_backward`)::

        dx_hat = gamma_c * dy                                                  # term 1
        dx     = invstd / M * (M dx_hat - sum(dx_hat) - x_hat * sum(dx_hat * x_hat))
                 (sums over the group of one sample)                          # term 2

    The parameters are per channel, so their sums run over the samples and ``S``::

        dbeta_c  = sum_{n, s} dy                                               # term 3
        dgamma_c = sum_{n, s} dy * x_hat
                 = sum_n invstd_{n,g(c)} * (sum_s dy * (x - K) - (mu - K) sum_s dy)  # term 4

    with K the statistics' shift (``x - K`` is exact near the mean, as in BN).

    Returns ``(dx, dgamma, dbeta)``: ``x``'s shape and memory format, (C,), (C,) in
    ``weight``'s dtype (``x``'s when None).
    """
    n, c = x.shape[:2]
    pdt = x.dtype if weight is None else weight.dtype
    if x.numel() == 0:
        zeros = torch.zeros(c, dtype=pdt, device=x.device)
        return torch.zeros_like(x), zeros, zeros.clone()
    cdt = _compute_dtype(x)
    xc, dyc = x.contiguous(), dy.contiguous()
    g = n * saved.num_groups
    dx_hat = dyc if weight is None else dyc * F._channel_view(weight.to(cdt), dyc)  # term 1
    dx, _, _ = F.batch_norm_backward(dx_hat.view(1, g, -1), xc.view(1, g, -1), saved.groups,
                                     None)  # term 2
    per_channel = _per_channel(saved, c)
    dy_nc = dyc.view(n, c, -1).to(cdt)
    sum_dy = dy_nc.sum(-1).to(per_channel.mean.dtype)  # (N, C)
    k = per_channel.shift.view(n, c, 1).to(cdt)
    sum_dy_d = (dy_nc * (xc.view(n, c, -1).to(cdt) - k)).sum(-1).to(sum_dy.dtype)
    mean_minus_k = (per_channel.mean - per_channel.shift.to(sum_dy.dtype)).view(n, c)
    dgamma = ((sum_dy_d - mean_minus_k * sum_dy) * per_channel.invstd.view(n, c)).sum(0)
    dbeta = sum_dy.sum(0)  # term 3
    return _same_memory_format(dx.view(x.shape), x), dgamma.to(pdt), dbeta.to(pdt)


class GroupNormFunction(torch.autograd.Function):
    """GroupNorm as an autograd node whose backward is bnlab's.

    ``GroupNormFunction.apply(x, weight, bias, num_groups, eps)``: forward
    :func:`group_norm_forward`, backward :func:`group_norm_backward`. Double backward is
    not supported.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                num_groups: int, eps: float) -> Tensor:
        y, saved = group_norm_forward(x, num_groups, weight, bias, eps)
        ctx.saved = saved
        ctx.save_for_backward(x, weight)
        # y is a reshaped view of the normalized (1, N*C, M) tensor; returned as a view,
        # autograd would forbid in-place ops on it (ReLU(inplace=True) after GroupNorm, as
        # torch.nn.GroupNorm allows). detach() drops the view tracking, copies nothing.
        return y.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        dx, dgamma, dbeta = group_norm_backward(dy, x, ctx.saved, weight)
        need_x, need_w, need_b, _, _ = ctx.needs_input_grad
        return (dx if need_x else None, dgamma if need_w else None, dbeta if need_b else None,
                None, None)


class GroupNorm(torch.nn.GroupNorm):
    """Drop-in ``torch.nn.GroupNorm`` whose gradients come from bnlab's hand-derived backward.

    Same constructor (``num_groups, num_channels, eps=1e-5, affine=True, device, dtype``,
    and ``bias`` where the installed PyTorch has it), parameters, ``state_dict`` keys,
    ``extra_repr`` and errors: it subclasses PyTorch's module and replaces only
    ``forward``. Input (N, C, *S) with C = ``num_channels``; output of the same shape and
    memory format. The math is in :mod:`bnlab.variants.groupnorm`'s docstring.
    """

    def forward(self, input: Tensor) -> Tensor:
        group_norm_check(input, self.num_groups, self.weight)
        return GroupNormFunction.apply(input, self.weight, self.bias, self.num_groups, self.eps)
