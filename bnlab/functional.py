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
accumulated in float64 across chunks; float16/bfloat16 inputs are computed in float32.

Speed. Each element-wise formula is one fused PyTorch kernel (``addcmul``) where the
numerics allow it, and the reductions walk the batch in cache-sized chunks so that no
full-size temporary is allocated (on CPU a fresh tensor over 32 MiB page-faults on every
call). When ``|mu| / sigma`` is large, ``x * s + t`` would cancel catastrophically, so
the element-wise passes switch to the shifted form ``(x - K) * s + t'``; see
:func:`_needs_shift`.

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

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "BatchNormSaved",
    "batch_norm_backward",
    "batch_norm_backward_staged",
    "batch_norm_forward",
    "batch_norm_forward_staged",
    "batch_norm_normalize",
    "batch_norm_prepare",
    "batch_norm_stats",
    "bias_corrected_running_stats",
    "reduce_dims",
    "update_running_stats",
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

    ``shift`` is K, a value of the input's dtype near ``mean`` (so ``x - K`` is exact
    near the mean); ``mean``, ``var`` (biased) and ``invstd`` = 1 / sqrt(var + eps) are
    float64 (float32 on devices without float64). ``training`` says whether they are batch
    statistics (gradients flow through them) or running statistics (constants).
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


def _num_per_channel(x: Tensor) -> int:
    return x.numel() // x.shape[1]


def batch_norm_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Per-channel batch mean and biased variance, computed stably.

    Corrected two-pass algorithm: with ``K`` a rough mean rounded to ``x.dtype``,

    .. math::
        d = x - K, \quad \mu = K + \frac{1}{m}\sum d, \quad
        \sigma^2 = \frac{1}{m}\sum d^2 - \Big(\frac{1}{m}\sum d\Big)^2 .

    The correction term is tiny because ``K`` is already close to the mean, so nothing
    cancels; sums are accumulated across chunks in float64.

    Returns ``(shift, mean, var)``: ``shift`` is K of shape (C,) in ``x.dtype``; ``mean``
    and ``var`` have shape (C,) in float64 (float32 on MPS).

    >>> shift, mean, var = batch_norm_stats(torch.tensor([[1.0], [3.0]]))
    >>> mean.item(), var.item()
    (2.0, 1.0)
    """
    dims = reduce_dims(x)
    m = _num_per_channel(x)
    if m == 0:
        raise ValueError(
            f"batch norm needs at least one value per channel, got input size {tuple(x.shape)}"
        )
    sdt, cdt = _stat_dtype(x), _compute_dtype(x)
    chunks = _chunks(x)
    # K: the mean of the first chunk, rounded to x.dtype. Any value within a few standard
    # deviations of the mean will do; the correction term below removes the rest.
    first = chunks[0][0]
    shift = (first.sum(dims, dtype=cdt) / (first.numel() // first.shape[1])).to(x.dtype)
    k = _channel_view(shift.to(cdt), x)
    sum_d = torch.empty(len(chunks), x.shape[1], dtype=cdt, device=x.device)
    sum_d2 = torch.empty_like(sum_d)
    for i, (xc,) in enumerate(chunks):
        d = xc.to(cdt) - k
        torch.sum(d, dims, out=sum_d[i])
        torch.sum(d.square_(), dims, out=sum_d2[i])
    mean_d = _channel_sums(sum_d) / m
    var = (_channel_sums(sum_d2) / m - mean_d * mean_d).clamp_min_(0.0)
    mean = shift.to(sdt) + mean_d
    return shift, mean, var


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


def batch_norm_normalize(
    x: Tensor, saved: BatchNormSaved, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    r"""``y = gamma * (x - mu) * invstd + beta`` as one fused pass per chunk.

    Written as ``y = x * s + t`` with ``s = gamma * invstd`` and ``t = beta - mu * s``
    (computed per channel in float64), or, when that would cancel, as
    ``y = (x - K) * s + (beta - (mu - K) * s)``.
    """
    cdt = _compute_dtype(x)
    s = saved.invstd if weight is None else weight.to(saved.invstd.dtype) * saved.invstd
    t = -saved.mean * s if bias is None else bias.to(s.dtype) - saved.mean * s
    y = torch.empty_like(x)
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
    as constants. Returns the :class:`BatchNormSaved` that :func:`batch_norm_normalize`
    and :func:`batch_norm_backward` consume.
    """
    sdt = _stat_dtype(x)
    if training:
        if eps <= 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
        shift, mean, var = batch_norm_stats(x)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("batch norm in evaluation mode needs running_mean and running_var")
        mean, var = running_mean.to(sdt), running_var.to(sdt)
        shift = running_mean.to(x.dtype)
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
    gamma = 1 and beta = 0.

    >>> x = torch.randn(16, 4)
    >>> y, saved = batch_norm_forward(x, eps=1e-5)
    >>> bool(y.mean(0).abs().max() < 1e-6)
    True
    """
    saved = batch_norm_prepare(x, running_mean, running_var, training=training, eps=eps)
    return batch_norm_normalize(x, saved, weight, bias), saved


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

    Implementation: ``dx = a * dy + b * x + c`` per channel with ``a = gamma * invstd``,
    ``b = -a * invstd**2 * sum(dy * (x - mu)) / m`` and ``c = -a * dbeta / m - b * mu``
    (in float64), one fused pass per chunk; ``x`` is replaced by ``x - K`` (and ``c``
    adjusted) where ``b * x`` would cancel, as in :func:`batch_norm_normalize`.

    Returns ``(dx, dgamma, dbeta)``; ``dgamma``/``dbeta`` have shape (C,) and the dtype of
    ``weight`` (of ``x`` when ``weight`` is None).
    """
    dims = reduce_dims(x)
    m = _num_per_channel(x)
    cdt, sdt = _compute_dtype(x), saved.invstd.dtype
    shifted = x.dtype != cdt or _needs_shift(saved.shift, saved.invstd)
    k = _channel_view(saved.shift.to(cdt), x)
    # term 1 and sum(dy * (x - K)); then sum(dy * (x - mu)) = sum(dy * (x - K)) - (mu - K) dbeta
    chunks = _chunks(x, dy)
    parts_dy = torch.empty(len(chunks), x.shape[1], dtype=cdt, device=x.device)
    parts_dy_d = torch.empty_like(parts_dy)
    for i, (xc, dyc) in enumerate(chunks):
        dyc = dyc.to(cdt)
        torch.sum(dyc, dims, out=parts_dy[i])
        d = xc.to(cdt) - k
        torch.sum(d.mul_(dyc), dims, out=parts_dy_d[i])
    sum_dy, sum_dy_d = _channel_sums(parts_dy), _channel_sums(parts_dy_d)
    mean_minus_k = saved.mean - saved.shift.to(sdt)
    sum_dy_xmu = sum_dy_d - mean_minus_k * sum_dy
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
    a, b, c = (_channel_view(v.to(cdt), x) for v in (a, b, c))
    dx = torch.empty_like(x)
    for xc, dyc, dxc in _chunks(x, dy, dx):
        if not saved.training:
            dxc.copy_(dyc.to(cdt) * a)
        elif shifted:
            dxc.copy_((dyc.to(cdt) * a).addcmul_(xc.to(cdt) - k, b).add_(c))
        else:
            torch.mul(dyc, a, out=dxc).addcmul_(xc, b).add_(c)
    pdt = x.dtype if weight is None else weight.dtype
    return dx, dgamma.to(pdt), dbeta.to(pdt)


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
    whose ``tf.nn.moments`` variance is biased).

    >>> rm, rv = torch.zeros(1), torch.zeros(1)
    >>> update_running_stats(rm, rv, torch.tensor([2.0]), torch.tensor([1.0]), 2, 0.5,
    ...                      unbiased=False)
    >>> rm.item(), rv.item()
    (1.0, 0.5)
    """
    m = num_per_channel
    new_var = var * (m / (m - 1)) if unbiased and m > 1 else var
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(new_var.to(running_var.dtype), alpha=momentum)


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
    m = _num_per_channel(x)
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
    m = _num_per_channel(dy)
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

