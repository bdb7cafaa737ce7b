r"""``SyncBatchNorm``: batch normalization over a batch split across processes, bnlab's math.

Same constructor, parameters, buffers, ``state_dict`` keys, train/eval behaviour, process
groups and errors as ``torch.nn.SyncBatchNorm`` (it subclasses the same PyTorch base,
``torch.nn.modules.batchnorm._BatchNorm``, so ``isinstance`` checks and DDP treat it
alike), with the statistics merged and the gradients computed by
:mod:`bnlab.functional_sync` (derivation there and in :class:`SyncBatchNormFunction`).

When it synchronizes (exactly as PyTorch's): in training mode, with
``torch.distributed`` initialized and more than one rank in ``process_group`` (default:
the whole world). Otherwise — evaluation, one process, no process group — it is plain
batch normalization of the local input, as ``torch.nn.BatchNorm*d``.

Differences from ``torch.nn.SyncBatchNorm`` (all deliberate):

- it runs on CPU (gloo) as well as on CUDA (NCCL); PyTorch's raises ``ValueError`` for
  CPU input because its kernels are CUDA-only;
- per-rank statistics travel and merge in float64 (PyTorch: the input's dtype), as
  ``(count, mean, M2)`` with Chan's parallel formula;
- a batch with at most one value per channel *over all ranks* raises ``ValueError`` on
  every rank (PyTorch checks one rank's count, and only when it runs alone).

Usage::

    >>> import torch
    >>> from bnlab.sync_batchnorm import SyncBatchNorm
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> model = SyncBatchNorm.convert_sync_batchnorm(model)   # before wrapping in DDP
    >>> type(model[1]).__name__
    'SyncBatchNorm'
    >>> model(torch.randn(4, 3, 6, 6)).shape   # no process group: local batch statistics
    torch.Size([4, 8, 4, 4])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm

from bnlab import functional as F
from bnlab import functional_sync as FS

__all__ = ["SyncBatchNorm", "SyncBatchNormFunction", "batchnorm_from_sync", "sync_from_batchnorm"]


class SyncBatchNormFunction(torch.autograd.Function):
    """Normalization with given statistics as an autograd node whose backward is bnlab's.

    ``SyncBatchNormFunction.apply(x, weight, bias, saved, count, process_group)``: the
    forward is :func:`~bnlab.functional.batch_norm_normalize` with ``saved`` (computed
    outside autograd: :func:`~bnlab.functional_sync.sync_batch_norm_stats` across ranks,
    or :func:`~bnlab.functional.batch_norm_prepare` locally). The backward, with a
    ``process_group``, is :func:`~bnlab.functional_sync.sync_batch_norm_backward`: each
    rank sums ``dy`` and ``dy * (x - mu)`` over its slice, one ``all_reduce`` adds them
    over ranks, and

        dx = gamma * invstd * (dy - sum(dy) / M - (x - mu) * invstd^2 * sum(dy (x - mu)) / M)

    with ``M = count``, the values per channel over all ranks (derivation in that
    function's docstring); ``dgamma``/``dbeta`` are this rank's part of the sums. Without a
    process group it is :func:`~bnlab.functional.batch_norm_backward`. Double backward is
    not supported (``once_differentiable``).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        saved: F.BatchNormSaved,
        count: int,
        process_group: dist.ProcessGroup | None,
    ) -> Tensor:
        ctx.saved, ctx.count, ctx.process_group = saved, count, process_group
        ctx.save_for_backward(x, weight)
        return F.batch_norm_normalize(x, saved, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.process_group is None:
            dx, dgamma, dbeta = F.batch_norm_backward(dy, x, ctx.saved, weight)
        else:
            dx, dgamma, dbeta = FS.sync_batch_norm_backward(
                dy, x, ctx.saved, weight, ctx.count, ctx.process_group, need_input_grad=need_x
            )
        return (
            dx if need_x else None, dgamma if need_w else None, dbeta if need_b else None,
            None, None, None,
        )


class SyncBatchNorm(_BatchNorm):
    r"""Batch normalization of (N, C, \*S) input with statistics over every rank's slice.

    In training mode with ``W > 1`` ranks in ``process_group``, each rank's slice is
    normalized with the mean and biased variance of the concatenated batch (all ranks)::

        y = (x - mu) / sqrt(var + eps) * gamma + beta,   mu, var over M = sum_r n_r values

    and ``running_mean``/``running_var`` move toward ``mu`` and the unbiased
    ``var * M / (M - 1)`` on every rank alike (``momentum`` weights the new value, as in
    PyTorch; ``None`` is the cumulative average). Ranks may hold different batch sizes,
    including zero (that rank's output and input gradient are empty, its ``dgamma`` and
    ``dbeta`` zero). Every rank of the group must call the layer in the same order, in
    training mode: each call is one ``all_gather`` forward and one ``all_reduce`` backward.

    Arguments as ``torch.nn.SyncBatchNorm``: ``num_features`` (C), ``eps``, ``momentum``,
    ``affine``, ``track_running_stats``, ``process_group`` (None: the default group),
    ``device``, ``dtype``, and keyword ``bias`` (False: a scale-only affine; needs
    PyTorch >= 2.12); bnlab's opt-in keyword ``bias_correction`` as in
    :class:`bnlab.nn.BatchNorm2d` (bias-corrected running averages in evaluation mode).

    Raises ``ValueError`` for input of fewer than 2 dimensions or with no channels,
    ``RuntimeError`` when C differs from ``num_features``, and ``ValueError`` when
    training sees at most one value per channel in the whole batch.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        bias_correction: bool = False,
    ) -> None:
        extra: dict[str, Any] = {} if bias else {"bias": False}  # keyword of PyTorch >= 2.12
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats,
            device=device, dtype=dtype, **extra,
        )
        self.process_group = process_group
        self.bias_correction = bias_correction

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text + ", bias_correction=True" if self.bias_correction else text

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        if input.shape[1] != self.num_features and (self.affine or self.track_running_stats):
            what = "running_mean" if self.running_mean is not None else "weight"
            raise RuntimeError(
                f"{what} should contain {input.shape[1]} elements not {self.num_features}"
            )
        counter = self.num_batches_tracked if self.track_running_stats else None
        factor = F.step_factor(counter, self.momentum, self.training)
        # Batch statistics in training mode, and in eval mode when there are no buffers;
        # buffers are updated only when tracked and training.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        running_mean = self.running_mean if keep else None
        running_var = self.running_var if keep else None
        if not bn_training and self.bias_correction and self.num_batches_tracked is not None:
            running_mean, running_var = F.bias_corrected_running_stats(
                running_mean, running_var, int(self.num_batches_tracked), self.momentum
            )
        group, world_size = FS.sync_group(self.process_group, bn_training and self.training)
        x = input.detach()
        if group is None:
            count = x.numel() // x.shape[1]
            if bn_training and count <= 1:
                raise ValueError(
                    "Expected more than 1 value per channel when training, "
                    f"got input size {input.size()}"
                )
            saved = F.batch_norm_prepare(
                x, running_mean, running_var, training=bn_training, eps=self.eps
            )
        else:
            saved, count = FS.sync_batch_norm_stats(x, self.eps, group)
            if count <= 1:
                raise ValueError(
                    "Expected more than 1 value per channel when training, got "
                    f"{count} over {world_size} processes (input size {input.size()} here)"
                )
        if bn_training and running_mean is not None and running_var is not None:
            F.update_running_stats(running_mean, running_var, saved.mean, saved.var, count, factor)
        return SyncBatchNormFunction.apply(input, self.weight, self.bias, saved, count, group)

    @classmethod
    def convert_sync_batchnorm(
        cls, module: torch.nn.Module, process_group: Any | None = None
    ) -> torch.nn.Module:
        """Replace every batch-norm layer in ``module`` by a :class:`SyncBatchNorm`.

        As ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: PyTorch's and bnlab's
        ``BatchNorm1d/2d/3d`` (and ``SyncBatchNorm``) are replaced in place, keeping the
        *same* parameter and buffer objects (an optimizer built before still holds them),
        the hyperparameters and train/eval mode; ``module`` is returned, or the new layer
        when ``module`` is itself a batch-norm layer. Call it before wrapping the model in
        ``DistributedDataParallel``.
        """
        if _is_batchnorm(module):
            return sync_from_batchnorm(module, process_group)
        for name, child in module.named_children():
            converted = cls.convert_sync_batchnorm(child, process_group)
            if converted is not child:
                setattr(module, name, converted)
        return module


def _is_batchnorm(module: torch.nn.Module) -> bool:
    """PyTorch's ``_BatchNorm`` subclasses and bnlab's BN (built on ``_NormBase``)."""
    return isinstance(module, _BatchNorm) or (
        isinstance(module, _NormBase) and not isinstance(module, _InstanceNorm)
    )


def _share_state(src: torch.nn.Module, dst: torch.nn.Module) -> torch.nn.Module:
    """Make ``dst`` hold ``src``'s own parameter and buffer objects and its mode."""
    dst.weight, dst.bias = src.weight, src.bias
    dst.running_mean, dst.running_var = src.running_mean, src.running_var
    dst.num_batches_tracked = src.num_batches_tracked
    dst.train(src.training)
    return dst


def sync_from_batchnorm(bn: torch.nn.Module, process_group: Any | None = None) -> SyncBatchNorm:
    """A :class:`SyncBatchNorm` that shares ``bn``'s parameters and buffers (same objects).

    ``bn`` is any batch-norm layer (PyTorch's or bnlab's ``BatchNorm*d``, a
    ``SyncBatchNorm``); its ``eps``, ``momentum``, ``affine``, ``track_running_stats``,
    ``bias_correction`` (bnlab's) and mode carry over. Raises ``TypeError`` for anything else.
    """
    if not _is_batchnorm(bn):
        raise TypeError(f"sync_from_batchnorm expects a batch-norm layer, got {type(bn).__name__}")
    # Built on the meta device: its own tensors are replaced by bn's at once.
    new = SyncBatchNorm(
        bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
        process_group, device="meta", bias=not bn.affine or bn.bias is not None,
        bias_correction=getattr(bn, "bias_correction", False),
    )
    return _share_state(bn, new)


def batchnorm_from_sync(sync_bn: SyncBatchNorm, target: type[torch.nn.Module]) -> torch.nn.Module:
    """A ``target`` layer (e.g. ``torch.nn.BatchNorm2d``) sharing ``sync_bn``'s tensors.

    The reverse of :func:`sync_from_batchnorm`. ``target`` must accept
    ``(num_features, eps, momentum, affine, track_running_stats, device=...)`` as
    ``torch.nn.BatchNorm*d`` and ``bnlab.nn.BatchNorm*d`` do; which one (1d, 2d, 3d) is the
    caller's choice, since a ``SyncBatchNorm`` accepts any input dimension.
    """
    kwargs: dict[str, Any] = {"device": "meta"}
    if sync_bn.affine and sync_bn.bias is None:
        kwargs["bias"] = False
    if sync_bn.bias_correction:  # bnlab's BN has it; PyTorch's raises TypeError
        kwargs["bias_correction"] = True
    new = target(
        sync_bn.num_features, sync_bn.eps, sync_bn.momentum, sync_bn.affine,
        sync_bn.track_running_stats, **kwargs,
    )
    return _share_state(sync_bn, new)
