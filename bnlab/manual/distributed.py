r"""Data-parallel training of the manual engine, by hand: synchronized BN, bucketed gradients.

W processes (ranks) each hold the same network and a disjoint shard of every batch
(:func:`bnlab.distributed.shard_bounds`). One step, with nothing hidden in a wrapper::

    start:     broadcast_parameters(net)           rank 0's parameters and buffers to all
    forward:   every layer on the local shard; each SyncBatchNorm2d merges its statistics
               over ranks (one all_gather per layer), so every rank normalizes with the
               statistics of the whole batch
    loss:      dL/dlogits = (p - q) / N with N the *global* batch size: the gradient of
               the one loss of the whole batch, restricted to this rank's rows
    backward:  layer by layer; each SyncBatchNorm2d adds its two per-channel sums over
               ranks (one all_reduce per layer) and applies the closed form locally
    gradients: summed over ranks in buckets (all_reduce_gradients): each rank's gradient
               is its shard's part of the global-batch gradient, so the sum is that gradient
    update:    the same optimizer step on every rank, from the same gradients: the
               parameters stay identical without further communication

With float64 this is the one-process step on the whole batch to rounding (tested on 2
ranks). Dropout masks are drawn per rank, so with dropout on the run is a different
(equally valid) random draw than the one-process run's.

Usage (inside each rank, after ``torch.distributed`` is initialized)::

    net = convert_sync_batchnorm(all_cnn_c(bn=True))
    broadcast_parameters(net)
    opt = bnlab.optim.Adam(net.parameters(), amsgrad=True)
    lo, hi = shard_bounds(len(images), world_size, rank)
    loss, logits = data_parallel_train_step(net, opt, images[lo:hi], labels[lo:hi],
                                            global_batch_size=len(images))
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from bnlab import functional as F
from bnlab import functional_sync as FS
from bnlab.manual.layers import BatchNorm2d, PerActivationBatchNorm
from bnlab.manual.loss import softmax_cross_entropy
from bnlab.manual.network import Sequential, StepOptimizer

__all__ = [
    "SyncBatchNorm2d",
    "SyncPerActivationBatchNorm",
    "all_reduce_gradients",
    "broadcast_parameters",
    "convert_sync_batchnorm",
    "data_parallel_train_step",
]

# DistributedDataParallel's default bucket size.
BUCKET_CAP_MB = 25.0


class _SyncStatistics:
    """Mixin for a manual BN layer: statistics and gradients over every rank's slice.

    Overrides the two hooks of :class:`bnlab.manual.layers._BatchNorm`: in training mode
    with more than one rank in ``process_group`` the statistics come from
    :func:`bnlab.functional_sync.sync_batch_norm_stats` and the gradients from
    :func:`bnlab.functional_sync.sync_batch_norm_backward` (derivation there); otherwise
    the layer is its local self. Every rank must run the layer's forward and backward in
    the same order.
    """

    process_group: Any | None
    eps: float
    params: dict[str, Tensor]
    _sync_count: int | None

    def _statistics(
        self,
        xf: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        use_batch_stats: bool,
        training: bool,
    ) -> tuple[F.BatchNormSaved, int]:
        group, world_size = FS.sync_group(self.process_group, use_batch_stats and training)
        self._sync_count = None
        if group is None:
            return super()._statistics(  # type: ignore[misc]
                xf, running_mean, running_var, use_batch_stats, training
            )
        saved, count = FS.sync_batch_norm_stats(xf, self.eps, group)
        if count <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got {count} over "
                f"{world_size} processes"
            )
        self._sync_count, self._sync_group = count, group
        return saved, count

    def _gradients(
        self, dyf: Tensor, xf: Tensor, saved: F.BatchNormSaved
    ) -> tuple[Tensor, Tensor, Tensor]:
        if self._sync_count is None:
            return super()._gradients(dyf, xf, saved)  # type: ignore[misc]
        dx, dgamma, dbeta = FS.sync_batch_norm_backward(
            dyf, xf, saved, self.params.get("weight"), self._sync_count, self._sync_group
        )
        assert dx is not None
        return dx, dgamma, dbeta


class SyncBatchNorm2d(_SyncStatistics, BatchNorm2d):
    """Per-channel BN of (N, C, H, W) with statistics over all ranks (manual engine).

    Same arguments and state as :class:`bnlab.manual.layers.BatchNorm2d`, plus keyword
    ``process_group`` (None: the default group); the math is
    :class:`bnlab.sync_batchnorm.SyncBatchNorm`'s (see :class:`_SyncStatistics`).
    """

    def __init__(self, *args: Any, process_group: Any | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group
        self._sync_count = None


class SyncPerActivationBatchNorm(_SyncStatistics, PerActivationBatchNorm):
    """Per-activation BN (the post's case c) with statistics over all ranks (manual engine).

    Same arguments and state as :class:`bnlab.manual.layers.PerActivationBatchNorm`, plus
    keyword ``process_group``.
    """

    def __init__(self, *args: Any, process_group: Any | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group
        self._sync_count = None


_SYNC_OF: dict[type, type] = {
    BatchNorm2d: SyncBatchNorm2d,
    PerActivationBatchNorm: SyncPerActivationBatchNorm,
}


def convert_sync_batchnorm(network: Sequential, process_group: Any | None = None) -> Sequential:
    """Replace every manual BN layer of ``network`` by its synchronized form, in place.

    ``BatchNorm2d`` → :class:`SyncBatchNorm2d`, ``PerActivationBatchNorm`` →
    :class:`SyncPerActivationBatchNorm`; the new layers hold the *same* parameter and
    buffer tensors (an optimizer built before still holds them) and every setting of the
    old ones. Returns ``network``.
    """
    for name, layer in list(network.layers.items()):
        target = _SYNC_OF.get(type(layer))
        if target is None:
            continue
        sync = object.__new__(target)
        sync.__dict__.update(layer.__dict__)  # params, buffers, settings: the same objects
        sync.process_group = process_group
        sync._sync_count = None
        network.layers[name] = sync
    return network


@torch.no_grad()
def broadcast_parameters(network: Sequential, src: int = 0, group: Any | None = None) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank, in place (a collective).

    Run once before training, so that every rank starts from the same weights (as
    ``DistributedDataParallel`` does when it is built). One ``broadcast`` per tensor, in
    ``state_dict`` order.
    """
    for tensor in network.state_dict().values():
        dist.broadcast(tensor, src, group=group)


@torch.no_grad()
def all_reduce_gradients(
    grads: list[Tensor], group: Any | None = None, bucket_cap_mb: float = BUCKET_CAP_MB
) -> list[Tensor]:
    """Gradients summed over ranks, all-reduced in buckets; returns new tensors (a collective).

    The gradients are packed, last layer first (the order a backward pass finishes them,
    as DDP does), into flat buckets of at most ``bucket_cap_mb`` MiB of one dtype and
    device; one ``all_reduce(SUM)`` per bucket, launched asynchronously so that packing the
    next bucket overlaps the previous one's communication. Returns tensors shaped like
    ``grads`` (contiguous views into the buckets), in the same order. Gradients that are
    each rank's share of the global-batch gradient (see :func:`data_parallel_train_step`)
    sum to that gradient.
    """
    cap = max(1, int(bucket_cap_mb * 2**20))
    order = list(range(len(grads)))[::-1]
    buckets: list[list[int]] = []
    size = 0
    for i in order:
        g = grads[i]
        nbytes = g.numel() * g.element_size()
        last = buckets[-1] if buckets else None
        same_kind = last is not None and (
            grads[last[0]].dtype == g.dtype and grads[last[0]].device == g.device
        )
        if last is None or not same_kind or size + nbytes > cap:
            buckets.append([i])
            size = nbytes
        else:
            last.append(i)
            size += nbytes
    flats, works = [], []
    for bucket in buckets:
        flat = torch.cat([grads[i].reshape(-1) for i in bucket])
        works.append(dist.all_reduce(flat, dist.ReduceOp.SUM, group=group, async_op=True))
        flats.append(flat)
    out: list[Tensor | None] = [None] * len(grads)
    for bucket, flat, work in zip(buckets, flats, works, strict=True):
        work.wait()
        offset = 0
        for i in bucket:
            n = grads[i].numel()
            out[i] = flat[offset : offset + n].view(grads[i].shape)
            offset += n
    return out  # type: ignore[return-value]


@torch.no_grad()
def data_parallel_train_step(
    network: Sequential,
    optimizer: StepOptimizer,
    images: Tensor,
    labels: Tensor,
    global_batch_size: int,
    label_smoothing: float = 0.0,
    *,
    mean_gradient: bool = True,
    group: Any | None = None,
    bucket_cap_mb: float = BUCKET_CAP_MB,
) -> tuple[Tensor, Tensor]:
    r"""One data-parallel training step of the manual engine on this rank's shard.

    ``images`` (n_r, C, H, W) and ``labels`` (n_r,) are this rank's shard of a batch of
    ``global_batch_size`` = N = sum_r n_r examples (n_r >= 1); ``network`` has synchronized
    BN (:func:`convert_sync_batchnorm`) and the same parameters on every rank
    (:func:`broadcast_parameters`); ``optimizer`` holds ``network.parameters()``.

    The loss is the mean over the global batch, L = (1/N) sum_n l_n, so this rank
    back-propagates ``dL/dlogits = (p - q) / N`` for its rows (``mean_gradient=False``:
    ``p - q``, the post net's summed-loss gradient, as in
    :func:`bnlab.manual.network.train_step`). Synchronized BN makes every layer's ``dx``
    exact for the global loss, so each rank's parameter gradients are its rows' share of
    dL/dθ and their sum over ranks (:func:`all_reduce_gradients`) is dL/dθ of the global
    batch. Returns ``(loss, logits)``: the global-batch mean loss (one more scalar
    all-reduce) and this rank's logits (n_r, K).
    """
    n = images.shape[0]
    if n < 1:
        raise ValueError(
            f"data_parallel_train_step needs at least one example per rank, got {n} "
            f"(global batch {global_batch_size}): use a batch of at least world-size examples"
        )
    logits = network.forward(images, training=True)
    loss, dlogits = softmax_cross_entropy(logits, labels, label_smoothing, mean_gradient=False)
    if mean_gradient:
        dlogits.div_(global_batch_size)  # (p - q) / N: the global-batch mean
    network.backward(dlogits, need_input_grad=False)  # releases the activations
    grads = all_reduce_gradients(network.gradients(), group, bucket_cap_mb)
    optimizer.step(grads)
    total = (loss.detach() * (n / global_batch_size)).reshape(1).to(torch.float64)
    dist.all_reduce(total, dist.ReduceOp.SUM, group=group)
    return total[0].to(loss.dtype), logits
