r"""Batch normalization across processes: statistics merged over ranks, the backward's two sums.

Shape legend (per process, "rank" r of a process group of W ranks)::

    x, y, dy, dx : (N_r, C, *S)   this rank's slice of the batch; N_r may differ between
                                  ranks and may be 0
    gamma, beta  : (C,)           the same on every rank
    mu, var      : (C,)           statistics of the *whole* batch (all ranks), float64
    n_r          : N_r * prod(S)  values per channel on rank r;  M = sum_r n_r

Synchronized BN normalizes every rank's slice with the statistics of the concatenated
batch, so W processes holding slices of one batch compute exactly what one process
computes on the whole batch (Ioffe & Szegedy 2015, Algorithm 1, with the sums over every
rank). Two collectives per layer and step carry this:

- forward: each rank sends ``(n_r, mean_r, M2_r)`` (``M2_r = n_r * var_r``, the sum of
  squared deviations from its own mean, in float64) to every rank (``all_gather``); all
  ranks merge them with Chan, Golub & LeVeque's parallel formula
  (:func:`batch_norm_merge_moments`). Counts travel with the moments, so ranks may hold
  different batch sizes, including none at all.
- backward: each rank sums ``dy`` and ``dy * (x - mu)`` over its slice; one
  ``all_reduce`` adds the two (C,) vectors over ranks; each rank then applies the closed
  form to its own slice (:func:`sync_batch_norm_backward`).

Nothing here keeps state. :class:`bnlab.sync_batchnorm.SyncBatchNorm` wraps it as a
module; :mod:`bnlab.manual.distributed` uses it in the manual engine. Per-channel
quantities are float64 (float32 on MPS), the element-wise passes are
:mod:`bnlab.functional`'s.

Usage (one process: no group, the merge of one rank is that rank's statistics)::

    >>> import torch
    >>> from bnlab import functional_sync as FS
    >>> x = torch.randn(6, 3, dtype=torch.float64)
    >>> parts = [FS.batch_norm_local_moments(p) for p in (x[:4], x[4:])]
    >>> count, mean, var = FS.batch_norm_merge_moments(torch.stack(parts))
    >>> int(count), bool(torch.allclose(var, x.var(0, unbiased=False)))
    (6, True)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from bnlab import functional as F
from bnlab.functional import (
    BatchNormSaved,
    _backward_sums,
    _channel_view,
    _chunks,
    _compute_dtype,
    _needs_shift,
    _stat_dtype,
    reduce_dims,
)

__all__ = [
    "batch_norm_backward_elemt",
    "batch_norm_backward_reduce",
    "batch_norm_local_moments",
    "batch_norm_merge_moments",
    "sync_batch_norm_backward",
    "sync_batch_norm_stats",
    "sync_group",
]


def batch_norm_local_moments(x: Tensor) -> Tensor:
    """This rank's ``(n, mean, M2)`` per channel, packed as one float64 vector of 2C + 1.

    ``n`` = values per channel (``N * prod(S)``), ``mean`` and ``M2 = n * var`` (the sum of
    squared deviations from this rank's mean, biased ``var``) from the stable two-pass
    :func:`bnlab.functional.batch_norm_stats`. An empty slice (``n = 0``) gives zeros,
    which the merge ignores. Layout ``[n, mean_0..mean_{C-1}, M2_0..M2_{C-1}]``; float32
    on MPS.
    """
    reduce_dims(x)  # the (N, C, ...) check
    c = x.shape[1]
    n = x.numel() // c if c else 0
    packed = torch.zeros(2 * c + 1, dtype=_stat_dtype(x), device=x.device)
    if n == 0:
        return packed
    _, mean, var = F.batch_norm_stats(x)
    packed[0] = n
    packed[1 : c + 1] = mean
    packed[c + 1 :] = var * n
    return packed


def batch_norm_merge_moments(moments: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Merge per-rank ``(n_r, mean_r, M2_r)`` into the whole batch's ``(M, mu, var)``.

    ``moments`` has shape (W, 2C + 1), one row per rank as packed by
    :func:`batch_norm_local_moments`. The parallel formula (Chan, Golub & LeVeque 1979,
    "Updating formulae and a pairwise algorithm for computing sample variances", eq. 2.1
    generalized from two parts to W)::

        M   = sum_r n_r
        mu  = sum_r n_r mean_r / M
        M2  = sum_r M2_r + sum_r n_r (mean_r - mu)^2        var = M2 / M   (biased)

    It only adds non-negative terms and differences of means, never ``E[x^2] - E[x]^2``,
    so it is as stable as each rank's own two-pass statistics. Ranks with ``n_r = 0``
    contribute nothing. Returns ``M`` (a 0-d tensor), ``mu`` and ``var`` of shape (C,).
    Raises ``ValueError`` if ``M = 0`` (no rank holds a value).
    """
    if moments.dim() != 2 or moments.shape[1] % 2 != 1:
        raise ValueError(f"expected moments of shape (W, 2C + 1), got {tuple(moments.shape)}")
    c = moments.shape[1] // 2
    counts, means, m2s = moments[:, :1], moments[:, 1 : c + 1], moments[:, c + 1 :]
    total = counts.sum()
    if not bool(total > 0):
        raise ValueError("batch norm needs at least one value per channel on some rank, got none")
    mean = (counts * means).sum(0) / total
    m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
    return total, mean, m2 / total


def sync_batch_norm_stats(
    x: Tensor, eps: float, process_group: dist.ProcessGroup | None = None
) -> tuple[BatchNormSaved, int]:
    """Statistics of the batch split over the ranks of ``process_group`` (a collective).

    Every rank of the group must call this with its slice ``x`` (N_r, C, \\*S) of the same
    C; one ``all_gather`` of 2C + 1 float64 values per rank, then
    :func:`batch_norm_merge_moments`. Returns the :class:`~bnlab.functional.BatchNormSaved`
    that :func:`~bnlab.functional.batch_norm_normalize` and
    :func:`sync_batch_norm_backward` consume (``shift`` is the merged mean rounded to
    ``x.dtype``) and ``M``, the number of values per channel over all ranks (an int: one
    host synchronisation on accelerators).
    """
    if eps <= 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    local = batch_norm_local_moments(x)
    world_size = dist.get_world_size(process_group)
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local, group=process_group)  # gloo has no all_gather_into_tensor
    total, mean, var = batch_norm_merge_moments(torch.stack(gathered))
    saved = BatchNormSaved(mean.to(x.dtype), mean, var, (var + eps).rsqrt(), True)
    return saved, int(total)


def batch_norm_backward_reduce(
    dy: Tensor, x: Tensor, saved: BatchNormSaved
) -> tuple[Tensor, Tensor]:
    """This rank's per-channel ``sum(dy)`` and ``sum(dy * (x - mu))``, float64, shape (C,).

    Computed as ``sum(dy * (x - K)) - (mu - K) sum(dy)`` with ``K = saved.shift``, so
    nothing cancels when ``|mu|`` is large against the spread (see
    :func:`bnlab.functional.batch_norm_backward`); chunk sums are added in float64. An
    empty slice gives zeros.
    """
    return _backward_sums(dy, x, saved)  # the one-process backward's sums, on this rank's slice


def batch_norm_backward_elemt(
    dy: Tensor,
    x: Tensor,
    saved: BatchNormSaved,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xmu: Tensor,
    count: int,
) -> Tensor:
    r"""``dx`` of this rank's slice from the batch-wide sums: the closed form, applied locally.

    With ``M = count`` values per channel in the whole batch and the sums over all of it::

        dx = gamma * invstd * (dy - sum(dy) / M - (x - mu) * invstd^2 * sum(dy (x - mu)) / M)

    written as ``dx = a * dy + b * x + c`` per channel (``a = gamma * invstd``,
    ``b = -a * invstd^2 * sum(dy (x - mu)) / M``, ``c = -a * sum(dy) / M - b * mu``), or
    with ``x - K`` in place of ``x`` where ``b * x`` would cancel. ``dx`` has the shape,
    dtype and memory format of ``x``.
    """
    cdt = _compute_dtype(x)
    shifted = x.dtype != cdt or _needs_shift(saved.shift, saved.invstd)
    k = _channel_view(saved.shift.to(cdt), x)
    gamma = torch.ones_like(saved.invstd) if weight is None else weight.to(saved.invstd.dtype)
    a = gamma * saved.invstd  # term 1: the direct path through x_hat
    b = -a * saved.invstd.square() * sum_dy_xmu / count  # term 2: through var
    mean = saved.mean - saved.shift.to(saved.mean.dtype) if shifted else saved.mean
    c = -a * sum_dy / count - b * mean  # term 3: through mu (and term 2's centring)
    a, b, c = (_channel_view(v.to(cdt), x) for v in (a, b, c))
    dx = torch.empty_like(x)
    for xc, dyc, dxc in _chunks(x, dy, dx):
        if shifted:
            dxc.copy_((dyc.to(cdt) * a).addcmul_(xc.to(cdt) - k, b).add_(c))
        else:
            torch.mul(dyc, a, out=dxc).addcmul_(xc, b).add_(c)
    return dx


def sync_batch_norm_backward(
    dy: Tensor,
    x: Tensor,
    saved: BatchNormSaved,
    weight: Tensor | None,
    count: int,
    process_group: dist.ProcessGroup | None = None,
    *,
    need_input_grad: bool = True,
) -> tuple[Tensor | None, Tensor, Tensor]:
    r"""Gradients of synchronized BN on this rank: ``(dx, dgamma, dbeta)`` (a collective).

    Derivation. The loss ``L`` depends on every rank's outputs, and ``mu``, ``var`` depend
    on every rank's inputs. For an element ``x_i`` on rank r, with sums ``sum_j`` over the
    whole batch (all ranks), the chain rule of the one-process case (Ioffe & Szegedy 2015,
    section 3; :func:`bnlab.functional.batch_norm_backward`) holds unchanged::

        dL/dx_hat_j = gamma * dy_j
        dL/dvar     = -1/2 (var + eps)^(-3/2) sum_j dL/dx_hat_j (x_j - mu)
        dL/dmu      = -invstd sum_j dL/dx_hat_j
        dL/dx_i     = dL/dx_hat_i * invstd + dL/dvar * 2 (x_i - mu) / M + dL/dmu / M

    so ``dx_i`` needs only its own ``dy_i``, ``x_i`` and two batch-wide per-channel sums,
    ``sum_j dy_j`` and ``sum_j dy_j (x_j - mu)``. Each rank sums over its slice
    (:func:`batch_norm_backward_reduce`), one ``all_reduce(SUM)`` of those 2C values
    gives the batch-wide sums, and each rank applies the closed form to its slice
    (:func:`batch_norm_backward_elemt`).

    ``dgamma = invstd * sum(dy (x - mu))`` and ``dbeta = sum(dy)`` are returned over this
    rank's slice only (as ``torch.nn.SyncBatchNorm`` does): adding them over ranks — the
    data-parallel gradient all-reduce — gives the whole batch's. ``dy`` must be the
    gradient of one loss for the whole batch (the same scale on every rank).

    ``need_input_grad=False`` skips the collective and returns ``dx = None``; it must then
    be False on every rank. ``dgamma``/``dbeta`` have the dtype of ``weight`` (of ``x``
    when ``weight`` is None).
    """
    sum_dy, sum_dy_xmu = batch_norm_backward_reduce(dy, x, saved)
    pdt = x.dtype if weight is None else weight.dtype
    dgamma, dbeta = (sum_dy_xmu * saved.invstd).to(pdt), sum_dy.to(pdt)
    if not need_input_grad:
        return None, dgamma, dbeta
    combined = torch.cat([sum_dy, sum_dy_xmu])
    dist.all_reduce(combined, dist.ReduceOp.SUM, group=process_group)
    total_dy, total_dy_xmu = combined.split(sum_dy.shape[0])
    dx = batch_norm_backward_elemt(dy, x, saved, weight, total_dy, total_dy_xmu, count)
    return dx, dgamma, dbeta


def sync_group(process_group: Any | None, active: bool) -> tuple[Any | None, int]:
    """The group a synchronized BN call merges over and its size W, or ``(None, 1)``.

    PyTorch's rule (``torch.nn.SyncBatchNorm.forward``): statistics are synchronized only
    when ``active`` (the layer uses batch statistics in training mode) and
    ``torch.distributed`` is initialized with more than one rank in ``process_group``
    (None: the default group, ``dist.group.WORLD``); otherwise the layer is its local self.
    """
    if not (active and dist.is_available() and dist.is_initialized()):
        return None, 1
    group = process_group if process_group is not None else dist.group.WORLD
    world_size = dist.get_world_size(group)
    return (group, world_size) if world_size > 1 else (None, 1)
