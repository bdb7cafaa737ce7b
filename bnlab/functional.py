r"""Batch normalization as pure functions: statistics, forward, and the hand-derived backward.

Shape legend (Ioffe & Szegedy 2015, Algorithm 1, per channel)::

    x, y, dy, dx : (N, C, *S)  with S = (), (L,), (H, W) or (D, H, W); any memory format
    gamma, beta  : (C,)         the affine weight and bias (``weight``/``bias`` in PyTorch)
    mu, var      : (C,)         batch mean and *biased* batch variance
    m            : N * prod(S)  values per channel

    x_hat = (x - mu) / sqrt(var + eps)
    y     = gamma * x_hat + beta

Nothing here keeps state: the running averages are updated by :func:`update_running_stats`
on buffers the caller owns (``bnlab.nn`` does that, as ``torch.nn.BatchNorm*d`` does).

Numerics. Statistics use the *corrected two-pass* algorithm (Chan, Golub & LeVeque 1983):
a first pass finds a rough mean ``K`` (rounded to the input's dtype), a second pass sums
``d = x - K`` and ``d**2``, and ``mu = K + mean(d)``, ``var = mean(d**2) - mean(d)**2``.
Near the mean ``x - K`` is exact (Sterbenz), so an input with mean 1e4 and standard
deviation 1 normalizes as accurately as one centred at zero. Per-channel quantities
(``mu``, ``invstd``, the backward's coefficients) are kept in float64 and sums are
accumulated in float64 across chunks; float16/bfloat16 inputs are computed in float32, and
``K`` is kept in that compute dtype (a float16 running mean of 7e4 would overflow). A
channel whose ``K`` is not finite (an inf in the input) uses ``K = 0``, the unshifted form,
and gets IEEE's answer.

Two implementations of each step, one set of formulas:

- the *fast path* (eager, plain tensors, nothing to differentiate through it): each
  element-wise formula is one fused PyTorch kernel (``addcmul``) where the numerics allow
  it, and the reductions walk the batch in cache-sized chunks so that no full-size
  temporary is allocated (on CPU a fresh tensor over 32 MiB page-faults on every call).
  When ``|mu| / sigma`` is large, ``x * s + t`` would cancel catastrophically, so the
  element-wise passes switch to the shifted form ``(x - K) * s + t'`` (:func:`_needs_shift`).
  Cheap per-channel checks on its (C,) results (a non-finite sum, a coefficient that
  underflows) hand the rare input it cannot do exactly to the composite path.
- the *composite path*: whole-tensor PyTorch operations with no ``out=``, no in-place
  writes to inputs and no Python branching on tensor values, so that autograd can
  differentiate it again (double backward), ``torch.func`` can batch it (``vmap``) and
  ``torch.export``/``torch.compile`` can trace it. Always shifted; each channel is scaled
  by a power of two (exact) before squares and products are formed, so no float32
  intermediate overflows (x = [3e19, 0, ...] has the finite variance 5.3e37).
  :func:`_fast_path_ok` chooses; both agree to rounding (tested).

Empty inputs (no values per channel) give empty outputs and zero parameter gradients, as
PyTorch's do; the statistics of an empty channel are 0 and the running update skips them.

Usage::

    >>> import torch
    >>> from bnlab import functional as F
    >>> x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    >>> gamma, beta = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    >>> y, saved = F.batch_norm_forward(x, gamma, beta, eps=1e-5)
    >>> dx, dgamma, dbeta = F.batch_norm_backward(torch.ones_like(y), x, saved, gamma)
    >>> bool(dx.abs().max() < 1e-12)  # a constant upstream gradient is normalized away
    True
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "BatchNormSaved",
    "batch_norm_backward",
    "batch_norm_backward_staged",
    "batch_norm_forward",
    "batch_norm_forward_staged",
    "batch_norm_jvp",
    "batch_norm_normalize",
    "batch_norm_prepare",
    "batch_norm_stats",
    "bias_corrected_running_stats",
    "check_values_per_channel",
    "num_per_channel",
    "reduce_dims",
    "step_factor",
    "update_running_stats",
    "validate_batch_norm_args",
]

# Elements per chunk of the batch axis in the CPU passes: 2**20 float32 values = 4 MiB, so a
# chunk's temporaries stay in cache and come from reused heap memory (glibc serves blocks
# over 32 MiB with fresh, page-faulting mmaps). Measured on a 2-core x86 box, forward +
# backward of (128, 96, 32, 32): chunked 1.28-1.39x PyTorch's native kernel, unchunked
# 1.84-1.96x; with another process busy on one core, every variant degrades to 1.8-3.5x
# (each kernel ends at a barrier of the intra-op threads).
_CHUNK_ELEMENTS = 1 << 20

# |K| * invstd above which x * s + t loses more than ~3 bits to cancellation; the
# element-wise passes then use the exact shifted form (x - K) * s + t'.
_SHIFT_RATIO = 8.0


class BatchNormSaved(NamedTuple):
    """What the forward pass keeps for the backward pass (per channel, shape (C,)).

    ``shift`` is K, a finite value near ``mean`` in the compute dtype (float32 for
    float16/bfloat16 input, else the input's; so ``x - K`` is exact near the mean);
    ``mean``, ``var`` (biased) and ``invstd`` = 1 / sqrt(var + eps) are float64 (float32 on
    devices without float64). ``training`` says whether they are batch statistics
    (gradients flow through them) or running statistics (constants).
    """

    shift: Tensor
    mean: Tensor
    var: Tensor
    invstd: Tensor
    training: bool


def reduce_dims(x: Tensor) -> tuple[int, ...]:
    """The axes BN reduces over: every axis but the channel axis 1.

    >>> reduce_dims(torch.empty(2, 3, 4, 5))
    (0, 2, 3)
    """
    if x.dim() < 2:
        raise ValueError(f"batch norm expects input of shape (N, C, ...), got {x.dim()}D input")
    return (0, *range(2, x.dim()))


def _stat_dtype(x: Tensor) -> torch.dtype:
    """Dtype of per-channel statistics: float64 wherever the device has it."""
    return torch.float32 if x.device.type == "mps" else torch.float64


def _compute_dtype(x: Tensor) -> torch.dtype:
    """Dtype of element-wise work: float16/bfloat16 are computed in float32."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _channel_view(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a (C,) tensor to broadcast against x: (1, C, 1, ..., 1)."""
    return v.reshape(1, -1, *([1] * (x.dim() - 2)))


def _memory_format(x: Tensor) -> torch.memory_format:
    """The layout of an output like ``x``, as PyTorch's kernels choose it.

    ``channels_last`` (``channels_last_3d``) for a 4D (5D) input in that layout, else
    contiguous: a transposed or strided input gives a contiguous output, as in
    ``torch.nn.functional.batch_norm`` (ATen's ``suggest_memory_format``); an empty input's
    strides are kept (PyTorch clones it).
    """
    if x.numel() == 0:
        return torch.preserve_format
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _chunks(*tensors: Tensor) -> list[tuple[Tensor, ...]]:
    """Split tensors of one batch into matching cache-sized chunks along the batch axis.

    On CUDA (and other devices with their own kernels) the whole tensor is one chunk.
    """
    x = tensors[0]
    if x.device.type != "cpu" or x.numel() <= _CHUNK_ELEMENTS or x.shape[0] == 0:
        return [tensors]
    per_item = max(1, x[0].numel())
    size = max(1, _CHUNK_ELEMENTS // per_item)
    return list(zip(*[t.split(size) for t in tensors], strict=True))


def _channel_sums(parts: Tensor) -> Tensor:
    """Add per-chunk partial sums (chunks, C) in float64 (float32 on MPS)."""
    return parts.to(_stat_dtype(parts)).sum(0)


def num_per_channel(x: Tensor) -> int:
    """m, the number of values per channel: the product of every size but axis 1's.

    0 for an empty batch or spatial axis (``x.numel() // C`` would divide by zero for C = 0).

    >>> num_per_channel(torch.empty(2, 3, 0, 4)), num_per_channel(torch.empty(4, 0))
    (0, 4)
    """
    m = 1
    for i, size in enumerate(x.shape):
        if i != 1:
            m *= size
    return m


def _finite_or_zero(k: Tensor) -> Tensor:
    """K where it is finite, else 0: a channel with an inf falls back to the unshifted form."""
    return torch.where(torch.isfinite(k), k, torch.zeros_like(k))


def _pow2_scale(amax: Tensor) -> Tensor:
    """Per channel, the power of two ``p`` with ``amax * p`` in [0.5, 1); 1 where amax is 0,
    not finite or NaN. Multiplying by ``p`` is exact, so it can rescale before squaring.

    ``amax`` (C,) of a floating dtype; the exponent is clamped so that ``p`` stays a normal
    number of that dtype.
    """
    limit = math.frexp(torch.finfo(amax.dtype).max)[1] - 3  # 125 for float32
    e = torch.floor(torch.log2(amax)).clamp(-limit, limit) + 1
    ok = torch.isfinite(amax) & (amax > 0)
    return torch.where(ok, torch.exp2(-e), torch.ones_like(amax)).detach()


def _fast_path_ok(*tensors: Tensor | None) -> bool:
    """Whether the eager fast path may run on these tensors.

    It may not under ``torch.compile``/``torch.export``/``torch.jit`` tracing, under a
    ``torch.func`` transform (``vmap``, ``grad``, ``jvp``, ...), for tensor subclasses or
    under a dispatch mode (fake tensors), nor when autograd records operations on one of
    them (a double backward): its ``out=`` reductions and in-place chunk writes are none of
    these things' business. Then the composite path runs, which all of them can handle.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if torch._C._len_torch_dispatch_stack() > 0:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not Tensor and type(t) is not torch.nn.Parameter:
            return False
        if torch._C._functorch.is_functorch_wrapped_tensor(t) or (grad and t.requires_grad):
            return False
    return True


# ---- statistics ---------------------------------------------------------------------------


def batch_norm_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Per-channel batch mean and biased variance, computed stably.

    Corrected two-pass algorithm: with ``K`` a rough mean (in the compute dtype),

    .. math::
        d = x - K, \quad \mu = K + \frac{1}{m}\sum d, \quad
        \sigma^2 = \frac{1}{m}\sum d^2 - \Big(\frac{1}{m}\sum d\Big)^2 .

    The correction term is tiny because ``K`` is already close to the mean, so nothing
    cancels; sums are accumulated across chunks in float64. Where ``d**2`` would overflow
    the compute dtype (float32 ``|d| > 1.8e19``), ``d`` is first scaled by a power of two
    per channel (composite path), so every finite variance comes out finite.

    Returns ``(shift, mean, var)``: ``shift`` is K of shape (C,) in the compute dtype;
    ``mean`` and ``var`` have shape (C,) in float64 (float32 on MPS). An empty input
    (m = 0) has zero statistics.

    >>> shift, mean, var = batch_norm_stats(torch.tensor([[1.0], [3.0]]))
    >>> mean.item(), var.item()
    (2.0, 1.0)
    """
    dims = reduce_dims(x)
    m = num_per_channel(x)
    sdt, cdt = _stat_dtype(x), _compute_dtype(x)
    if m == 0:
        zeros = torch.zeros(x.shape[1], dtype=sdt, device=x.device)
        return zeros.to(cdt), zeros, zeros.clone()
    if not _fast_path_ok(x):
        return _stats_composite(x)
    chunks = _chunks(x)
    # K: the mean of the first chunk, rounded to the compute dtype. Any value within a few
    # standard deviations of the mean will do; the correction term below removes the rest.
    # A K that is not finite makes the sums NaN, which hands the input to the composite path.
    first = chunks[0][0]
    shift = first.sum(dims, dtype=cdt) / num_per_channel(first)
    k = _channel_view(shift, x)
    sum_d = torch.empty(len(chunks), x.shape[1], dtype=cdt, device=x.device)
    sum_d2 = torch.empty_like(sum_d)
    for i, (xc,) in enumerate(chunks):
        d = xc.to(cdt) - k
        torch.sum(d, dims, out=sum_d[i])
        torch.sum(d.square_(), dims, out=sum_d2[i])
    sum_d, sum_d2 = _channel_sums(sum_d), _channel_sums(sum_d2)
    if not bool(torch.isfinite(sum_d + sum_d2).all()):  # an overflow, or an inf/NaN input
        return _stats_composite(x)
    mean_d = sum_d / m
    var = (sum_d2 / m - mean_d * mean_d).clamp_min_(0.0)
    return shift, shift.to(sdt) + mean_d, var


def _stats_composite(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`batch_norm_stats` as whole-tensor operations, differentiable in ``x``.

    ``d = x - K`` is scaled per channel by a power of two ``p`` (:func:`_pow2_scale` of
    max |d|) so that its square cannot overflow; then a corrected two-pass over ``d * p``
    and the exact unscaling ``mean_d = mean(d p) / p``, ``var = var(d p) / p / p``.
    Needs m > 0.
    """
    dims = reduce_dims(x)
    m = num_per_channel(x)
    sdt, cdt = _stat_dtype(x), _compute_dtype(x)
    xc = x.to(cdt)
    shift = _finite_or_zero(xc.detach().sum(dims) / m)
    d = xc - _channel_view(shift, x)
    p = _pow2_scale(d.detach().abs().amax(dims))
    ds = d * _channel_view(p, x)
    mean_ds = ds.sum(dims, dtype=sdt) / m
    centred = ds - _channel_view(mean_ds.detach().to(cdt), x)
    mean_c = centred.sum(dims, dtype=sdt) / m
    var_ds = (centred.square().sum(dims, dtype=sdt) / m - mean_c * mean_c).clamp_min(0.0)
    p = p.to(sdt)
    return shift, shift.to(sdt) + mean_ds / p, var_ds / p / p


def _needs_shift(shift: Tensor, invstd: Tensor) -> bool:
    r"""Whether ``x * s + t`` would cancel: ``max_c |K_c| / sigma_c > 8``.

    In ``y = x * s + t`` with ``s = gamma / sigma`` the product ``x * s`` is rounded with
    relative error ``u`` (2**-24 in float32), an absolute error of ``u * |x| * |s|``, while
    ``y`` itself is of order ``|gamma|``. The relative error is thus about
    ``u * |mu| / sigma``: with the ratio at most 8 it stays under 5e-7 in float32. Above
    that, the shifted form ``(x - K) * s + t'`` is used, which is exact up to ``u``.
    Costs one host synchronisation on accelerators, so there the shifted form is always used.
    """
    if shift.device.type != "cpu":
        return True
    if shift.dtype == torch.float64:
        return False  # float64 has 29 bits more than the 1e-12 we promise
    ratio = (shift.to(invstd.dtype).abs() * invstd).max()
    return not bool(ratio <= _SHIFT_RATIO)  # NaN → shifted (and NaN out, as it should)


# ---- forward ------------------------------------------------------------------------------


def batch_norm_normalize(
    x: Tensor, saved: BatchNormSaved, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    r"""``y = gamma * (x - mu) * invstd + beta`` as one fused pass per chunk.

    Written as ``y = x * s + t`` with ``s = gamma * invstd`` and ``t = beta - mu * s``
    (computed per channel in float64), or, when that would cancel, as
    ``y = (x - K) * s + (beta - (mu - K) * s)`` (always, on the composite path).

    ``x`` (N, C, \*S), ``weight``/``bias`` (C,) or None; returns ``y`` shaped, typed and laid
    out in memory like ``x``.
    """
    cdt = _compute_dtype(x)
    s = saved.invstd if weight is None else weight.to(saved.invstd.dtype) * saved.invstd
    t = -saved.mean * s if bias is None else bias.to(s.dtype) - saved.mean * s
    if not _fast_path_ok(x, weight, bias):
        k = saved.shift.to(cdt)
        t = t + k.to(s.dtype) * s
        y = (x.to(cdt) - _channel_view(k, x)) * _channel_view(s.to(cdt), x)
        return (y + _channel_view(t.to(cdt), x)).to(x.dtype)
    y = torch.empty_like(x, memory_format=_memory_format(x))
    if x.dtype == cdt and not _needs_shift(saved.shift, saved.invstd):
        s, t = _channel_view(s.to(cdt), x), _channel_view(t.to(cdt), x)
        for xc, yc in _chunks(x, y):
            torch.mul(xc, s, out=yc).add_(t)  # 2x faster than addcmul(t, ...) in NCHW
        return y
    t = t + saved.shift.to(s.dtype) * s  # t' = beta - (mu - K) * s
    k = _channel_view(saved.shift.to(cdt), x)
    s, t = _channel_view(s.to(cdt), x), _channel_view(t.to(cdt), x)
    for xc, yc in _chunks(x, y):
        d = xc.to(cdt) - k
        yc.copy_(d.mul_(s).add_(t))
    return y


def batch_norm_prepare(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    *,
    training: bool = True,
    eps: float = 1e-5,
) -> BatchNormSaved:
    """The statistics step of the forward pass: batch statistics, or the running ones.

    ``training=True`` computes the batch mean and biased variance
    (:func:`batch_norm_stats`); ``training=False`` takes ``running_mean``/``running_var``
    as constants (their K is the running mean in the compute dtype, or 0 where that is not
    finite). Returns the :class:`BatchNormSaved` that :func:`batch_norm_normalize` and
    :func:`batch_norm_backward` consume.

    Raises ``ValueError`` for ``eps <= 0`` in training (``eps < 0`` in evaluation) and for
    missing running statistics in evaluation mode.
    """
    sdt = _stat_dtype(x)
    if training:
        if eps <= 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
        shift, mean, var = batch_norm_stats(x)
    else:
        if eps < 0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
        if running_mean is None or running_var is None:
            raise ValueError("batch norm in evaluation mode needs running_mean and running_var")
        mean, var = running_mean.to(sdt), running_var.to(sdt)
        shift = _finite_or_zero(running_mean.to(_compute_dtype(x)))
    return BatchNormSaved(shift, mean, var, (var + eps).rsqrt(), training)


def batch_norm_forward(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    *,
    training: bool = True,
    eps: float = 1e-5,
) -> tuple[Tensor, BatchNormSaved]:
    r"""Normalize ``x`` (N, C, \*S) per channel; return ``y`` and what the backward needs.

    ``training=True`` uses batch statistics (pass ``saved.mean``/``saved.var`` to
    :func:`update_running_stats` to update running buffers); ``training=False`` uses
    ``running_mean``/``running_var`` as constants. ``weight``/``bias`` of ``None`` mean
    gamma = 1 and beta = 0. Arguments are checked as ``torch.nn.functional.batch_norm``
    checks them (:func:`validate_batch_norm_args`).

    >>> x = torch.randn(16, 4)
    >>> y, saved = batch_norm_forward(x, eps=1e-5)
    >>> bool(y.mean(0).abs().max() < 1e-6)
    True
    """
    validate_batch_norm_args(x, weight, bias, running_mean, running_var, training=training,
                             eps=eps)
    saved = batch_norm_prepare(x, running_mean, running_var, training=training, eps=eps)
    return batch_norm_normalize(x, saved, weight, bias), saved


# ---- backward -----------------------------------------------------------------------------


def batch_norm_backward(
    dy: Tensor, x: Tensor, saved: BatchNormSaved, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Gradients of ``y = gamma * x_hat + beta``, ``x_hat = (x - mu) / sqrt(var + eps)``.

    With m values per channel and sums over the batch and spatial axes::

        dbeta  = sum(dy)                                              # term 1
        dgamma = sum(dy * x_hat)                                      # term 2
        dx     = gamma / (m * sqrt(var + eps)) * (m * dy - dbeta - x_hat * dgamma)

    Derivation (Ioffe & Szegedy 2015, section 3). ``x_i`` reaches the loss through
    ``x_hat_i`` directly and through ``mu`` and ``var``:

        dL/dx_hat_i = gamma * dy_i
        dL/dvar     = sum_j dL/dx_hat_j * (x_j - mu) * (-1/2) (var + eps)^(-3/2)
        dL/dmu      = -invstd * sum_j dL/dx_hat_j   (the dvar/dmu term sums to zero)
        dL/dx_i     = dL/dx_hat_i * invstd + dL/dvar * 2 (x_i - mu) / m + dL/dmu / m

    and substituting ``x_j - mu = x_hat_j / invstd`` gives the closed form above.

    In evaluation mode ``mu`` and ``var`` are running statistics, constants, so only the
    direct path remains: ``dx = gamma * invstd * dy``.

    Fast path: ``dx = a * dy + b * x + c`` per channel with ``a = gamma * invstd``,
    ``b = -a * invstd**2 * sum(dy * (x - mu)) / m`` and ``c = -a * dbeta / m - b * mu``
    (in float64), one fused pass per chunk; ``x`` is replaced by ``x - K`` (and ``c``
    adjusted) where ``b * x`` would cancel, as in :func:`batch_norm_normalize`. Where a sum
    is not finite or ``b`` is not a normal number of the compute dtype (var ~ 1e37), the
    composite path (:func:`_backward_composite`) computes the closed form with ``dy``
    scaled by a power of two; it is differentiable, so the backward has a backward.

    ``dy`` and ``x`` (N, C, \*S); returns ``(dx, dgamma, dbeta)``: ``dx`` like ``x``,
    ``dgamma``/``dbeta`` of shape (C,) and the dtype of ``weight`` (of ``x`` when
    ``weight`` is None); all zero for an empty input.
    """
    if not _fast_path_ok(dy, x, weight, *saved[:4]):
        return _backward_composite(dy, x, saved, weight)
    m = max(num_per_channel(x), 1)
    cdt, sdt = _compute_dtype(x), saved.invstd.dtype
    shifted = x.dtype != cdt or _needs_shift(saved.shift, saved.invstd)
    k = _channel_view(saved.shift.to(cdt), x)
    sum_dy, sum_dy_xmu = _backward_sums(dy, x, saved)  # term 1 and sum(dy * (x - mu))
    mean_minus_k = saved.mean - saved.shift.to(sdt)
    dgamma = sum_dy_xmu * saved.invstd  # term 2
    dbeta = sum_dy

    gamma = torch.ones_like(saved.invstd) if weight is None else weight.to(sdt)
    a = gamma * saved.invstd
    if saved.training:
        b = -a * saved.invstd.square() * sum_dy_xmu / m
        c = -a * sum_dy / m - b * (mean_minus_k if shifted else saved.mean)
    else:
        b = torch.zeros_like(a)
        c = torch.zeros_like(a)
    # b * x is formed in the compute dtype: b must be 0 or a normal number there.
    underflow = (b.abs() < torch.finfo(cdt).tiny) & (b != 0)
    if not bool(torch.isfinite(torch.stack((a, b, c, dgamma, dbeta))).all() & ~underflow.any()):
        return _backward_composite(dy, x, saved, weight)
    a, b, c = (_channel_view(v.to(cdt), x) for v in (a, b, c))
    dx = torch.empty_like(x, memory_format=_memory_format(x))
    for xc, dyc, dxc in _chunks(x, dy, dx):
        if not saved.training:
            dxc.copy_(dyc.to(cdt) * a)
        elif shifted:
            dxc.copy_((dyc.to(cdt) * a).addcmul_(xc.to(cdt) - k, b).add_(c))
        else:
            torch.mul(dyc, a, out=dxc).addcmul_(xc, b).add_(c)
    pdt = x.dtype if weight is None else weight.dtype
    return dx, dgamma.to(pdt), dbeta.to(pdt)


def _backward_sums(dy: Tensor, x: Tensor, saved: BatchNormSaved) -> tuple[Tensor, Tensor]:
    r"""Per-channel ``sum(dy)`` and ``sum(dy * (x - mu))`` of ``dy``, ``x`` (N, C, \*S), each (C,)
    in the statistics dtype: term 1 of :func:`batch_norm_backward` and the sum of term 2.

    Computed as ``sum(dy * (x - K)) - (mu - K) sum(dy)`` with ``K = saved.shift``, so nothing
    cancels when ``|mu|`` is large against the spread; chunk sums are added in float64
    (:func:`_channel_sums`). An empty input gives zeros. Also the per-rank reduction of
    synchronized BN (:func:`bnlab.functional_sync.batch_norm_backward_reduce`).
    """
    dims = reduce_dims(x)
    cdt, sdt = _compute_dtype(x), saved.invstd.dtype
    k = _channel_view(saved.shift.to(cdt), x)
    chunks = _chunks(x, dy)
    parts_dy = torch.empty(len(chunks), x.shape[1], dtype=cdt, device=x.device)
    parts_dy_d = torch.empty_like(parts_dy)
    for i, (xc, dyc) in enumerate(chunks):
        dyc = dyc.to(cdt)
        torch.sum(dyc, dims, out=parts_dy[i])
        d = xc.to(cdt) - k
        torch.sum(d.mul_(dyc), dims, out=parts_dy_d[i])
    sum_dy, sum_dy_d = _channel_sums(parts_dy), _channel_sums(parts_dy_d)
    return sum_dy, sum_dy_d - (saved.mean - saved.shift.to(sdt)) * sum_dy


def _backward_composite(
    dy: Tensor, x: Tensor, saved: BatchNormSaved, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    r""":func:`batch_norm_backward`'s closed form as differentiable whole-tensor operations.

    ``dx = a / q * (dy q - mean(dy q) - x_hat * mean(dy q * x_hat))`` with ``a = gamma *
    invstd`` and ``q`` a power of two per channel that keeps ``dy q`` and its products from
    overflowing. In training mode, ``mu`` and ``invstd`` are those of ``saved`` in value but
    carry the derivative of the statistics recomputed from ``x``
    (``v + (v_x - v_x.detach())``, with ``invstd = (var + eps)^(-1/2)`` differentiated as
    ``-invstd**3 / 2``), so autograd differentiating this function gets the second
    derivative of BN right (double backward, ``torch.func`` transforms of transforms).
    """
    dims = reduce_dims(x)
    m = num_per_channel(x)
    cdt, sdt = _compute_dtype(x), saved.invstd.dtype
    pdt = x.dtype if weight is None else weight.dtype
    if m == 0:
        zeros = torch.zeros(x.shape[1], dtype=pdt, device=x.device)
        return torch.zeros_like(x), zeros, zeros.clone()
    mean, invstd = saved.mean, saved.invstd
    if saved.training and (torch.is_grad_enabled() or not _fast_path_ok(x)):
        _, mean_x, var_x = _stats_composite(x)
        mean = mean + (mean_x - mean_x.detach())
        invstd = invstd * (1 + (var_x - var_x.detach()) * invstd.square()).rsqrt()
    x_hat = _normalized(x, saved.shift, mean, invstd)
    dyc = dy.to(cdt)
    q = _pow2_scale(dyc.detach().abs().amax(dims))
    dys = dyc * _channel_view(q, x)
    sum_dys = dys.sum(dims, dtype=sdt)
    sum_dys_xhat = (dys * x_hat).sum(dims, dtype=sdt)
    q64 = q.to(sdt)
    dbeta = sum_dys / q64  # term 1
    dgamma = sum_dys_xhat / q64  # term 2
    gamma = torch.ones_like(invstd) if weight is None else weight.to(sdt)
    a = _channel_view((gamma * invstd).to(cdt), x)
    if saved.training:
        inner = dys - _channel_view((sum_dys / m).to(cdt), x) - x_hat * _channel_view(
            (sum_dys_xhat / m).to(cdt), x)
        dx = inner / _channel_view(q, x) * a
    else:
        dx = dyc * a
    return dx.to(x.dtype), dgamma.to(pdt), dbeta.to(pdt)


def _normalized(x: Tensor, shift: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    """``x_hat = ((x - K) - (mu - K)) * invstd`` in the compute dtype, differentiable.

    ``x - K`` is exact near the mean and ``mu - K`` is formed in float64, so nothing is lost
    to rounding ``mu`` (1e25 in float32 is off by up to 6e17, a percent of a sigma of 5e19).
    """
    cdt = _compute_dtype(x)
    d = x.to(cdt) - _channel_view(shift.to(cdt), x)
    mean_minus_k = (mean - shift.to(mean.dtype)).to(cdt)
    return (d - _channel_view(mean_minus_k, x)) * _channel_view(invstd.to(cdt), x)


def batch_norm_jvp(
    dx: Tensor | None,
    dweight: Tensor | None,
    dbias: Tensor | None,
    x: Tensor,
    saved: BatchNormSaved,
    weight: Tensor | None,
) -> Tensor:
    r"""Forward-mode derivative (tangent of ``y``) of :func:`batch_norm_normalize`.

    Differentiating ``y = gamma * x_hat + beta`` along tangents ``dx``, ``dgamma``,
    ``dbeta``, with ``dmu = mean(dx)`` and ``dvar = 2 mean((x - mu) dx)``::

        dx_hat = invstd * (dx - mean(dx) - x_hat * mean(x_hat * dx))   (training)
        dx_hat = invstd * dx                                           (evaluation)
        dy     = dgamma * x_hat + gamma * dx_hat + dbeta

    the transpose of :func:`batch_norm_backward` (same three terms). Tangents of ``None``
    are zero. ``dx`` (N, C, \*S), ``dweight``/``dbias`` (C,); returns a tensor like ``x``.
    """
    dims = reduce_dims(x)
    m = max(num_per_channel(x), 1)
    cdt, sdt = _compute_dtype(x), saved.invstd.dtype
    x_hat = _normalized(x, saved.shift, saved.mean, saved.invstd)
    dy = torch.zeros_like(x_hat)
    if dx is not None:
        gamma = saved.invstd if weight is None else weight.to(sdt) * saved.invstd
        dxc = dx.to(cdt)
        if saved.training:
            mean_dx = dxc.sum(dims, dtype=sdt) / m
            mean_xhat_dx = (x_hat * dxc).sum(dims, dtype=sdt) / m
            dxc = dxc - _channel_view(mean_dx.to(cdt), x) - x_hat * _channel_view(
                mean_xhat_dx.to(cdt), x)
        dy = dy + dxc * _channel_view(gamma.to(cdt), x)
    if dweight is not None:
        dy = dy + x_hat * _channel_view(dweight.to(cdt), x)
    if dbias is not None:
        dy = dy + _channel_view(dbias.to(cdt), x)
    return dy.to(x.dtype)


# ---- running statistics and argument checks -------------------------------------------------


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    num_per_channel: int,
    momentum: float,
    *,
    unbiased: bool = True,
) -> None:
    r"""Update the running averages in place, in PyTorch's convention.

    ``momentum`` weights the *new* batch (PyTorch: 0.1; Keras and the post write the
    same rule with 0.9 as the weight of the *old* value)::

        running_mean <- (1 - momentum) * running_mean + momentum * mu
        running_var  <- (1 - momentum) * running_var  + momentum * var * m / (m - 1)

    By default the running variance takes the unbiased batch variance (Bessel's
    correction), while the normalization itself uses the biased one, exactly as
    ``torch.nn.BatchNorm*d``. ``unbiased=False`` averages the biased ``var`` itself (no
    factor ``m / (m - 1)``), as the post's hand-written per-activation BN does (case c,
    whose ``tf.nn.moments`` variance is biased). An empty batch (m = 0) has no statistics
    and leaves the buffers untouched, as in PyTorch. The products are formed in the
    statistics' float64, so a variance near the float32 maximum does not overflow on the way.

    >>> rm, rv = torch.zeros(1), torch.zeros(1)
    >>> update_running_stats(rm, rv, torch.tensor([2.0]), torch.tensor([1.0]), 2, 0.5,
    ...                      unbiased=False)
    >>> rm.item(), rv.item()
    (1.0, 0.5)
    """
    m = num_per_channel
    if m == 0:
        return
    new_var = var * (m / (m - 1)) if unbiased and m > 1 else var
    with torch.no_grad():
        rm = running_mean.to(mean.dtype) * (1 - momentum) + mean * momentum
        rv = running_var.to(new_var.dtype) * (1 - momentum) + new_var * momentum
        running_mean.copy_(rm)
        running_var.copy_(rv)


_REDUCED_FLOATS = (torch.float16, torch.bfloat16)


def validate_batch_norm_args(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    training: bool,
    eps: float,
) -> None:
    """Raise what ``torch.nn.functional.batch_norm`` raises for these arguments (CPU rules).

    - ``x`` of fewer than 2 dims: ``IndexError``; not floating point: ``NotImplementedError``.
    - training with only one of ``running_mean``/``running_var``: ``ValueError``; evaluation
      without one of them: ``RuntimeError``.
    - a per-channel tensor of another size, or running statistics that are not 1-D:
      ``RuntimeError`` ("should contain C elements"); ``weight``/``bias`` may have any shape
      of C elements, as in PyTorch (:func:`bnlab.nn.batch_norm` flattens them).
    - dtypes: parameters all of ``x``'s dtype, or all float32 with a float16/bfloat16
      ``x`` ("mixed dtype"), else ``RuntimeError``.
    - ``eps <= 0`` in training, ``eps < 0`` in evaluation: ``ValueError``.

    Every message carries the offending value.
    """
    if x.dim() < 2:
        raise IndexError(f"batch norm expects input of shape (N, C, ...), got {x.dim()}D input "
                         f"of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise NotImplementedError(f'"batch_norm" not implemented for {x.dtype}')
    if training and (running_mean is None) != (running_var is None):
        raise ValueError(
            "running_mean and running_var must either both be None or neither be None, got "
            f"running_mean {_describe(running_mean)} and running_var {_describe(running_var)}"
        )
    if not training:
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is None:
                raise RuntimeError(f"{name} must be defined in evaluation mode")
    c = x.shape[1]
    named = [("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
             ("bias", bias)]
    for name, t in named:
        if t is not None and t.numel() != c:
            raise RuntimeError(f"{name} should contain {c} elements not {t.numel()}")
        if t is not None and name.startswith("running") and t.dim() != 1:
            raise RuntimeError(f"{name} must be 1-D of {c} elements, got shape {tuple(t.shape)}")
    params = [(n, t) for n, t in (named[2], named[3], named[0], named[1]) if t is not None]
    if params and params[0][1].dtype != x.dtype:  # mixed dtypes: PyTorch's only allowed mix
        for name, t in params:
            if t.dtype != torch.float32:
                raise RuntimeError(
                    f"mixed dtype (CPU): expect parameter to have scalar type of Float, got "
                    f"{name} of {t.dtype} for input of {x.dtype}"
                )
        if x.dtype not in _REDUCED_FLOATS:
            raise RuntimeError(
                f"mixed dtype (CPU): all inputs must share same datatype, got input of "
                f"{x.dtype} and parameters of torch.float32"
            )
    else:
        for name, t in params:
            if t.dtype != x.dtype:
                raise RuntimeError(f"expected scalar type {x.dtype} but found {t.dtype} "
                                   f"({name})")
    if training and eps <= 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def _describe(t: Tensor | None) -> str:
    return "None" if t is None else f"of shape {tuple(t.shape)}"


def bias_corrected_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: int,
    momentum: float | None,
    *,
    initial_var: float = 1.0,
) -> tuple[Tensor, Tensor]:
    r"""Running statistics with the weight of their initial values removed (the post's Q5).

    After t updates with ``alpha = momentum`` from the initial values ``r_0`` (0 for the
    mean, ``initial_var`` for the variance: PyTorch's 1, the post's 0), the running
    average is
    ``r_t = (1 - alpha)^t r_0 + sum_k alpha (1 - alpha)^(t-k) s_k``: the batch statistics
    ``s_k`` carry a total weight of only ``1 - (1 - alpha)^t``. The bias-corrected
    average divides that weight out (as Adam does for its moments)::

        r_hat_t = (r_t - (1 - alpha)^t r_0) / (1 - (1 - alpha)^t)

    With PyTorch's default alpha = 0.1, after 10 steps the raw running variance still
    holds 35% of its initial 1. ``momentum=None`` (the cumulative average) is already
    unbiased and is returned unchanged, as are statistics before the first update.
    This assumes ``momentum`` was constant since the last reset.

    >>> m, v = bias_corrected_running_stats(torch.tensor([0.1]), torch.tensor([1.0]), 1, 0.1)
    >>> round(m.item(), 6), round(v.item(), 6)
    (1.0, 1.0)
    """
    t = int(num_batches_tracked)
    if momentum is None or t == 0:
        return running_mean, running_var
    old_weight = (1.0 - momentum) ** t
    if old_weight >= 1.0:
        return running_mean, running_var
    mean = running_mean / (1.0 - old_weight)
    var = (running_var - old_weight * initial_var) / (1.0 - old_weight)
    return mean, var


# ---------------------------------------------------------------------------------------
# The staged computational graph, for teaching (Kratzert 2016): one node per line.
# ---------------------------------------------------------------------------------------


def batch_norm_forward_staged(
    x: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5
) -> tuple[Tensor, dict[str, Tensor]]:
    """Training-mode BN forward as a chain of elementary nodes; returns ``(y, cache)``.

    The nodes, in order: mean, centre, square, variance, sqrt, invert, scale (x_hat),
    scale by gamma, shift by beta. ``cache`` keeps every node's output for
    :func:`batch_norm_backward_staged`. Plain and slow; use :func:`batch_norm_forward`
    for real work.
    """
    dims = reduce_dims(x)
    m = num_per_channel(x)
    g, b = _channel_view(gamma, x), _channel_view(beta, x)
    mu = x.sum(dims, keepdim=True) / m  # 1. mean
    xmu = x - mu  # 2. centre
    sq = xmu * xmu  # 3. square
    var = sq.sum(dims, keepdim=True) / m  # 4. variance (biased)
    sqrtvar = torch.sqrt(var + eps)  # 5. sqrt
    ivar = 1.0 / sqrtvar  # 6. invert
    x_hat = xmu * ivar  # 7. normalize
    gx = g * x_hat  # 8. scale
    y = gx + b  # 9. shift
    cache = {"xmu": xmu, "var": var, "sqrtvar": sqrtvar, "ivar": ivar, "x_hat": x_hat, "gamma": g}
    return y, cache


def batch_norm_backward_staged(
    dy: Tensor, cache: dict[str, Tensor], eps: float = 1e-5
) -> tuple[Tensor, Tensor, Tensor]:
    """Walk the graph of :func:`batch_norm_forward_staged` backwards, node by node.

    Each line is the local derivative of one node times the gradient arriving at it;
    where a node fans out (``xmu`` feeds both the square and the normalize node, ``x``
    feeds both the centre and the mean node) the gradients add. Agrees with the closed
    form of :func:`batch_norm_backward` (tested).
    """
    xmu, var, ivar, x_hat, g = (cache[k] for k in ("xmu", "var", "ivar", "x_hat", "gamma"))
    dims = reduce_dims(dy)
    m = num_per_channel(dy)
    # 9. y = gx + beta
    dbeta = dy.sum(dims)
    dgx = dy
    # 8. gx = gamma * x_hat
    dgamma = (dgx * x_hat).sum(dims)
    dx_hat = dgx * g
    # 7. x_hat = xmu * ivar
    divar = (dx_hat * xmu).sum(dims, keepdim=True)
    dxmu1 = dx_hat * ivar
    # 6. ivar = 1 / sqrtvar
    dsqrtvar = -divar / (cache["sqrtvar"] ** 2)
    # 5. sqrtvar = sqrt(var + eps)
    dvar = 0.5 / torch.sqrt(var + eps) * dsqrtvar
    # 4. var = sum(sq) / m
    dsq = torch.ones_like(xmu) * dvar / m
    # 3. sq = xmu ** 2
    dxmu2 = 2 * xmu * dsq
    # 2. xmu = x - mu   (xmu fans out to nodes 3 and 7)
    dx1 = dxmu1 + dxmu2
    dmu = -(dxmu1 + dxmu2).sum(dims, keepdim=True)
    # 1. mu = sum(x) / m   (x fans out to nodes 1 and 2)
    dx2 = torch.ones_like(dy) * dmu / m
    dx = dx1 + dx2
    return dx, dgamma, dbeta



# ---- the step bookkeeping every BN layer shares ----------------------------------------------


def step_factor(num_batches_tracked: Tensor | None, momentum: float | None,
                training: bool) -> float:
    """Count one training step in ``num_batches_tracked`` (in place); return its factor.

    The factor is the ``momentum`` of :func:`update_running_stats` for this step, in
    PyTorch's convention (``torch.nn.BatchNorm*d.forward``): ``momentum`` weights the *new*
    statistics; ``momentum=None`` gives the cumulative average, factor
    ``1 / num_batches_tracked`` after the increment. Outside training (or without the
    buffer, e.g. ``track_running_stats=False``) nothing is counted and the factor is
    ``momentum`` (0 when None). Every BN layer of bnlab (both engines, the variants, sync
    BN) counts its steps here, so that a layer that reduces to BN does so to the last bit.

    >>> t = torch.tensor(0)
    >>> step_factor(t, None, True), int(t)
    (1.0, 1)
    """
    factor = 0.0 if momentum is None else momentum
    if training and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:  # the cumulative moving average
            factor = 1.0 / float(num_batches_tracked)
    return factor


def check_values_per_channel(x: Tensor, what: str = "input") -> None:
    """PyTorch's training-mode check: more than one value per channel of ``x`` (N, C, *S).

    Raises ``ValueError`` with PyTorch's message when every channel holds exactly one value
    (batch statistics would have zero variance); none at all (an empty batch) passes, as in
    PyTorch. ``what`` names the tensor in the message (e.g. a virtual batch).

    >>> check_values_per_channel(torch.zeros(2, 3))   # two values per channel: fine
    """
    if x.dim() >= 2 and x.numel() // max(1, x.shape[1]) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {what} size {x.size()}"
        )
