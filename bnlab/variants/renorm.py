r"""Batch Renormalization (Ioffe 2017, Algorithm 1), hand-derived: math and modules.

BN normalizes a training batch with its own statistics but a test example with the running
ones; with small or non-i.i.d. batches the two differ and the network trains on one
function and is tested on another. Batch Renorm keeps BN's batch normalization and
corrects it, per channel, toward what the running statistics would give::

    x, y, dy, dx : (N, C, *S)   any memory format
    mu_B, var_B  : (C,)         batch mean and biased batch variance (as BN)
    sigma_B      = sqrt(var_B + eps)
    mu, sigma    : (C,)         running mean and running standard deviation
    r = stop_gradient(clip(sigma_B / sigma,      1/rmax, rmax))
    d = stop_gradient(clip((mu_B - mu) / sigma,  -dmax,  dmax))
    x_hat = (x - mu_B) / sigma_B * r + d
    y     = gamma * x_hat + beta

When the clips do not bind, ``x_hat = (x - mu) / sigma``: the training output is the
evaluation output. With ``rmax = 1, dmax = 0`` (so r = 1, d = 0) it *is* BN, to the bit.

Running statistics (Algorithm 1's last lines; ``momentum`` = the paper's alpha, weighting
the new value as in PyTorch)::

    mu    <- mu    + momentum * (mu_B    - mu)
    sigma <- sigma + momentum * (sigma_B - sigma)       (a moving *standard deviation*)

They live in BN's buffers: ``running_var`` holds ``sigma**2 - eps``, so evaluation is BN's
evaluation, ``y = gamma (x - running_mean) / sqrt(running_var + eps) + beta``, and a state
dict loads into ``BatchNorm*d`` and back. Note that this is the moving average of the
*biased* batch standard deviation (the quantity ``r`` compares against), not BN's moving
average of the unbiased variance: the running statistics follow renorm's rule even when
``rmax = 1, dmax = 0``.

Warm-up (the paper trains with ``rmax = 1, dmax = 0`` first and relaxes them gradually):
after ``t`` training steps (``num_batches_tracked`` before the current one),
``rmax_t = 1 + (rmax - 1) * min(1, t / warmup_steps)`` and
``dmax_t = dmax * min(1, t / warmup_steps)``; ``warmup_steps = 0`` uses the final values
from the first step. (The paper holds 1 and 0 for 5,000 steps, then ramps; a linear ramp
from step 0 is the simplest schedule with one knob.)

Keras spells the same ideas ``BatchNormalization(renorm=True, renorm_clipping={"rmax": R,
"rmin": 1/R, "dmax": D}, renorm_momentum=0.99)``: ``rmax`` is ``renorm_clipping["rmax"]``
(with ``rmin`` fixed at ``1/rmax`` as in the paper), ``dmax`` is ``renorm_clipping["dmax"]``
(Keras's default, no clipping, is ``rmax = dmax = inf``), and ``momentum`` is
``1 - renorm_momentum`` (Keras weights the *old* value). Keras keeps a second pair of
moving averages for inference (updated with its ``momentum``); here, as in the paper, one
pair serves both. ``warmup_steps`` has no Keras name (Keras users feed a schedule into
``renorm_clipping``'s variables).

Usage::

    >>> import torch
    >>> from bnlab.variants.renorm import BatchRenorm2d
    >>> layer = BatchRenorm2d(4, rmax=3.0, dmax=5.0, warmup_steps=1000)
    >>> y = layer(torch.randn(8, 4, 5, 5))
    >>> y.shape, int(layer.num_batches_tracked)
    (torch.Size([8, 4, 5, 5]), 1)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase

from bnlab import functional as F

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "BatchRenormFunction",
    "BatchRenormSaved",
    "batch_renorm_backward",
    "batch_renorm_forward",
    "batch_renorm_normalize",
    "batch_renorm_stats",
    "batch_renorm_step",
    "check_renorm_args",
    "renorm_limits",
    "update_renorm_running_stats",
]


class BatchRenormSaved(NamedTuple):
    """What the forward keeps for the backward: BN's statistics and the corrections.

    ``bn`` holds the batch statistics in training (the running ones in evaluation, where
    the layer is BN's eval); ``r`` and ``d`` are (C,) float64 tensors, the constants of
    this step (r = 1, d = 0 in evaluation).
    """

    bn: F.BatchNormSaved
    r: Tensor
    d: Tensor


def renorm_limits(step: int, rmax: float, dmax: float, warmup_steps: int) -> tuple[float, float]:
    """The clipping limits ``(rmax_t, dmax_t)`` after ``step`` training steps (linear warm-up).

    ``rmax_t = 1 + (rmax - 1) * min(1, step / warmup_steps)``,
    ``dmax_t = dmax * min(1, step / warmup_steps)``; ``warmup_steps = 0``: no warm-up.

    >>> renorm_limits(0, 3.0, 5.0, 100), renorm_limits(50, 3.0, 5.0, 100)
    ((1.0, 0.0), (2.0, 2.5))
    """
    if warmup_steps <= 0:
        return rmax, dmax
    fraction = min(1.0, step / warmup_steps)
    if fraction == 0.0:
        return 1.0, 0.0  # also for rmax = inf, where (rmax - 1) * 0 is NaN
    return 1.0 + (rmax - 1.0) * fraction, dmax * fraction


def _correction(
    bn: F.BatchNormSaved, running_mean: Tensor, running_var: Tensor, eps: float,
    rmax: float, dmax: float,
) -> tuple[Tensor, Tensor]:
    """``r = clip(sigma_B / sigma, 1/rmax, rmax)``, ``d = clip((mu_B - mu) / sigma, ±dmax)``."""
    sdt = bn.invstd.dtype
    sigma = (running_var.to(sdt) + eps).sqrt()
    sigma_b = (bn.var + eps).sqrt()
    r = (sigma_b / sigma).clamp(1.0 / rmax, rmax)
    d = ((bn.mean - running_mean.to(sdt)) / sigma).clamp(-dmax, dmax)
    return r, d


def batch_renorm_stats(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    *,
    training: bool = True,
    rmax: float = 3.0,
    dmax: float = 5.0,
    eps: float = 1e-5,
) -> BatchRenormSaved:
    r"""The statistics step of the forward: BN's batch statistics and the corrections r, d.

    Training: ``mu_B``, ``var_B`` of ``x`` (N, C, \*S) as BN computes them
    (:func:`bnlab.functional.batch_norm_prepare`), and ``r``, ``d`` against the running
    statistics (C,). Evaluation: the running statistics, with r = 1, d = 0. Changes nothing.
    """
    if not training:
        bn = F.batch_norm_prepare(x, running_mean, running_var, training=False, eps=eps)
        return BatchRenormSaved(bn, torch.ones_like(bn.invstd), torch.zeros_like(bn.invstd))
    bn = F.batch_norm_prepare(x, training=True, eps=eps)
    r, d = _correction(bn, running_mean, running_var, eps, rmax, dmax)
    return BatchRenormSaved(bn, r, d)


def batch_renorm_normalize(
    x: Tensor, saved: BatchRenormSaved, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """``y = gamma * ((x - mu_B) / sigma_B * r + d) + beta``: BN's one fused pass with scale
    ``gamma * r`` and shift ``beta + gamma * d`` (in evaluation, BN's evaluation pass)."""
    if not saved.bn.training:
        return F.batch_norm_normalize(x, saved.bn, weight, bias)
    scale, shift = _scale_shift(saved, weight, bias)
    return F.batch_norm_normalize(x, saved.bn, scale, shift)


def batch_renorm_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    *,
    training: bool = True,
    rmax: float = 3.0,
    dmax: float = 5.0,
    eps: float = 1e-5,
) -> tuple[Tensor, BatchRenormSaved]:
    r"""Batch Renorm of ``x`` (N, C, \*S); returns ``y`` and what the backward needs.

    Training: ``y = gamma * ((x - mu_B) / sigma_B * r + d) + beta`` with ``r`` and ``d`` from
    the running statistics (see the module docstring). Evaluation: BN's evaluation with the
    running statistics. Stateless: the running statistics are *not* updated here
    (:func:`batch_renorm_step` does the bookkeeping of a layer). ``weight``/``bias`` of
    ``None`` mean gamma = 1, beta = 0; ``running_mean``/``running_var`` are (C,).

    >>> x = torch.randn(16, 3)
    >>> y, saved = batch_renorm_forward(x, None, None, torch.zeros(3), torch.ones(3))
    >>> tuple(saved.r.shape), bool((saved.r >= 1 / 3).all() and (saved.r <= 3).all())
    ((3,), True)
    """
    saved = batch_renorm_stats(x, running_mean, running_var, training=training, rmax=rmax,
                               dmax=dmax, eps=eps)
    return batch_renorm_normalize(x, saved, weight, bias), saved


def _scale_shift(
    saved: BatchRenormSaved, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """BN's gamma and beta that give renorm: ``gamma * r`` and ``beta + gamma * d`` (float64)."""
    gamma = saved.r.new_ones(()) if weight is None else weight.to(saved.r.dtype)
    beta = saved.r.new_zeros(()) if bias is None else bias.to(saved.r.dtype)
    return gamma * saved.r, beta + gamma * saved.d


def batch_renorm_backward(
    dy: Tensor, x: Tensor, saved: BatchRenormSaved, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Gradients of Batch Renorm's forward, with ``r`` and ``d`` held constant (stop-gradient).

    Write the training forward as BN with a rescaled affine map:
    ``y = (gamma r) * x_hat_B + (beta + gamma d)``, ``x_hat_B = (x - mu_B) / sigma_B``.
    Since ``r`` and ``d`` are constants of the step (Ioffe 2017, Algorithm 1: "treated as
    constants for the gradient computation"), ``x`` reaches the loss exactly as in BN
    with gamma replaced by ``gamma r``, so with m values per channel::

        dbeta  = sum(dy)                                                    # term 1
        dgamma = sum(dy * (r x_hat_B + d)) = r * sum(dy * x_hat_B) + d * dbeta   # term 2
        dx     = gamma r / (m sigma_B) * (m dy - dbeta - x_hat_B * sum(dy * x_hat_B))

    which is the paper's Algorithm 2 (its ``dL/dx_hat = dL/dy * gamma`` then times ``r``):
    BN's closed form (:func:`bnlab.functional.batch_norm_backward`) evaluated with weight
    ``gamma r``. In evaluation mode it is BN's evaluation backward, ``dx = gamma dy / sigma``.

    Returns ``(dx, dgamma, dbeta)``; ``dgamma``/``dbeta`` have shape (C,) and ``weight``'s
    dtype (``x``'s when ``weight`` is None).
    """
    pdt = x.dtype if weight is None else weight.dtype
    if not saved.bn.training:
        dx, dgamma, dbeta = F.batch_norm_backward(dy, x, saved.bn, weight)
        return dx, dgamma.to(pdt), dbeta.to(pdt)
    scale, _ = _scale_shift(saved, weight, None)
    dx, dgamma_hat, dbeta = F.batch_norm_backward(dy, x, saved.bn, scale)
    dgamma = saved.r * dgamma_hat + saved.d * dbeta  # term 2
    return dx, dgamma.to(pdt), dbeta.to(pdt)


def update_renorm_running_stats(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, momentum: float,
    eps: float,
) -> None:
    """Algorithm 1's update, in place: a moving mean and a moving standard deviation.

    ``mu <- mu + momentum (mu_B - mu)``; ``sigma <- sigma + momentum (sigma_B - sigma)``
    with ``sigma = sqrt(running_var + eps)`` and ``sigma_B = sqrt(var_B + eps)`` (biased
    ``var``), stored back as ``running_var = sigma**2 - eps`` (clamped at 0, which it can
    only cross by rounding: sigma is an average of values >= sqrt(eps)).

    >>> rm, rv = torch.zeros(1), torch.full((1,), 3.0)
    >>> update_renorm_running_stats(rm, rv, torch.tensor([2.0]), torch.tensor([15.0]), 0.5, 1.0)
    >>> rm.item(), rv.item()  # sigma: 2 -> 3, so running_var = 9 - 1
    (1.0, 8.0)
    """
    sdt = mean.dtype
    sigma = (running_var.to(sdt) + eps).sqrt()
    sigma = sigma + momentum * ((var.to(sdt) + eps).sqrt() - sigma)
    with torch.no_grad():
        running_mean.add_((mean.to(sdt) - running_mean.to(sdt)).to(running_mean.dtype),
                          alpha=momentum)
        running_var.copy_((sigma.square() - eps).clamp_min(0.0))


def batch_renorm_step(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
    *,
    training: bool,
    momentum: float | None,
    eps: float,
    rmax: float,
    dmax: float,
    warmup_steps: int,
) -> BatchRenormSaved:
    """One call of a Batch Renorm layer, short of the output: count, warm up, correct, update.

    In training mode: checks the batch, counts the step in ``num_batches_tracked``, takes
    the limits of :func:`renorm_limits` at the number of steps *before* this one, computes
    ``r`` and ``d`` against the running statistics *before* this step's update, then
    updates them (:func:`update_renorm_running_stats`; ``momentum=None`` is the cumulative
    average). The buffers are the caller's, changed in place. Both engines call this, then
    :func:`batch_renorm_normalize` (or :class:`BatchRenormFunction`).
    """
    if training:
        F.check_values_per_channel(x)
    steps_before = int(num_batches_tracked)
    factor = F.step_factor(num_batches_tracked, momentum, training)
    rmax_t, dmax_t = renorm_limits(steps_before, rmax, dmax, warmup_steps)
    saved = batch_renorm_stats(x, running_mean, running_var, training=training, rmax=rmax_t,
                               dmax=dmax_t, eps=eps)
    if training:
        update_renorm_running_stats(running_mean, running_var, saved.bn.mean, saved.bn.var,
                                    factor, eps)
    return saved


class BatchRenormFunction(torch.autograd.Function):
    """Batch Renorm's normalization as an autograd node whose backward is bnlab's.

    ``BatchRenormFunction.apply(x, weight, bias, saved)``: ``saved`` comes from
    :func:`batch_renorm_forward` (statistics and ``r``, ``d`` computed outside autograd);
    the backward is :func:`batch_renorm_backward`. Double backward is not supported.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                saved: BatchRenormSaved) -> Tensor:
        ctx.saved = saved
        ctx.save_for_backward(x, weight)
        return batch_renorm_normalize(x, saved, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        dx, dgamma, dbeta = batch_renorm_backward(dy, x, ctx.saved, weight)
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        return (dx if need_x else None, dgamma if need_w else None, dbeta if need_b else None,
                None)


def check_renorm_args(rmax: float, dmax: float, warmup_steps: int,
                      track_running_stats: bool = True) -> None:
    """Raise ``ValueError`` (with the value) for arguments a Batch Renorm layer cannot use."""
    if not track_running_stats:
        raise ValueError(
            "Batch Renorm needs running statistics to correct toward: "
            "track_running_stats must be True (got False); use BatchNorm instead"
        )
    if not rmax >= 1.0:
        raise ValueError(f"rmax must be >= 1 (r is clipped to [1/rmax, rmax]), got {rmax}")
    if not dmax >= 0.0:
        raise ValueError(f"dmax must be >= 0 (d is clipped to [-dmax, dmax]), got {dmax}")
    if isinstance(warmup_steps, bool) or int(warmup_steps) != warmup_steps or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")


class _BatchRenorm(_NormBase):
    """Shared forward of BatchRenorm1d/2d/3d (subclasses add only the input check).

    Arguments, parameters, buffers and ``state_dict`` keys are ``torch.nn.BatchNorm*d``'s,
    plus ``rmax`` (>= 1), ``dmax`` (>= 0) and ``warmup_steps`` (>= 0); the math and the
    Keras names are in :mod:`bnlab.variants.renorm`'s docstring. Running statistics are
    required (``track_running_stats=False`` raises ``ValueError``): without them there is
    nothing to renormalize toward.
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
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        check_renorm_args(rmax, dmax, warmup_steps, track_running_stats)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype, **kwargs)
        self.rmax = float(rmax)
        self.dmax = float(dmax)
        self.warmup_steps = int(warmup_steps)

    def extra_repr(self) -> str:
        return (super().extra_repr()
                + f", rmax={self.rmax}, dmax={self.dmax}, warmup_steps={self.warmup_steps}")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if input.dim() >= 2 and input.shape[1] != self.num_features:
            raise RuntimeError(
                f"running_mean should contain {input.shape[1]} elements not {self.num_features}"
            )
        saved = batch_renorm_step(
            input.detach(), self.running_mean, self.running_var, self.num_batches_tracked,
            training=self.training, momentum=self.momentum, eps=self.eps, rmax=self.rmax,
            dmax=self.dmax, warmup_steps=self.warmup_steps,
        )
        return BatchRenormFunction.apply(input, self.weight, self.bias, saved)


class BatchRenorm1d(_BatchRenorm):
    """Batch Renorm over (N, C) or (N, C, L) input; arguments as ``torch.nn.BatchNorm1d``
    plus ``rmax``, ``dmax``, ``warmup_steps`` (see :mod:`bnlab.variants.renorm`)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchRenorm2d(_BatchRenorm):
    """Batch Renorm over (N, C, H, W) input; arguments as ``torch.nn.BatchNorm2d``
    plus ``rmax``, ``dmax``, ``warmup_steps`` (see :mod:`bnlab.variants.renorm`)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchRenorm3d(_BatchRenorm):
    """Batch Renorm over (N, C, D, H, W) input; arguments as ``torch.nn.BatchNorm3d``
    plus ``rmax``, ``dmax``, ``warmup_steps`` (see :mod:`bnlab.variants.renorm`)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")
