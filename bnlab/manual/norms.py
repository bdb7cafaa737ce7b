r"""The manual engine's BN variants: Batch Renorm, ghost BN and GroupNorm, no autograd.

Shape legend: x, y, dy, dx are (N, C, H, W); parameters and running statistics are (C,).
Each layer follows :class:`bnlab.manual.layers.Layer`'s protocol (``forward(x, training)``
keeps what ``backward(dy)`` needs) and calls the same functions as its autograd twin in
:mod:`bnlab.variants`, which hold the math and the derivations:

- :class:`BatchRenorm2d`    — :mod:`bnlab.variants.renorm` (Ioffe 2017); twin
  ``bnlab.nn.BatchRenorm2d``
- :class:`GhostBatchNorm2d` — :mod:`bnlab.variants.ghost` (Hoffer et al. 2017); twin
  ``bnlab.nn.GhostBatchNorm2d``
- :class:`GroupNorm`        — :mod:`bnlab.variants.groupnorm` (Wu & He 2018); twin
  ``bnlab.nn.GroupNorm``

Parameter and buffer names are the twins' (``weight``, ``bias``, ``running_mean``,
``running_var``, ``num_batches_tracked``), so state dicts copy across both ways.

Usage::

    >>> import torch
    >>> from bnlab.manual.norms import GroupNorm
    >>> gn = GroupNorm(2, 4)
    >>> y = gn.forward(torch.randn(3, 4, 5, 5), training=True)
    >>> dx = gn.backward(torch.randn_like(y))
    >>> sorted(gn.grads), tuple(dx.shape)
    (['bias', 'weight'], (3, 4, 5, 5))
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab.manual.layers import Layer, _check_4d, _check_channels, _NormLayer
from bnlab.variants import ghost, groupnorm, renorm

__all__ = ["BatchRenorm2d", "GhostBatchNorm2d", "GroupNorm"]


class BatchRenorm2d(_NormLayer):
    """Batch Renorm of (N, C, H, W) input (Ioffe 2017), the manual twin of
    ``bnlab.nn.BatchRenorm2d``: same arguments (``rmax``, ``dmax``, ``warmup_steps``),
    state and numbers. Forward :func:`~bnlab.variants.renorm.batch_renorm_step` then
    :func:`~bnlab.variants.renorm.batch_renorm_normalize`; backward
    :func:`~bnlab.variants.renorm.batch_renorm_backward` (r and d held constant).

    >>> layer = BatchRenorm2d(3, rmax=2.0, dmax=1.0)
    >>> y = layer.forward(torch.randn(4, 3, 2, 2), training=True)
    >>> int(layer.buffers["num_batches_tracked"])
    1
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        renorm.check_renorm_args(rmax, dmax, warmup_steps, track_running_stats)
        super().__init__(num_features, eps, momentum, affine, True, device=device, dtype=dtype)
        self.rmax, self.dmax, self.warmup_steps = float(rmax), float(dmax), int(warmup_steps)

    def forward(self, x: Tensor, training: bool) -> Tensor:
        """Renormalize with batch statistics (training) or BN's evaluation (running stats)."""
        _check_4d(x, "BatchRenorm2d")
        _check_channels(x, self.num_features)
        b = self.buffers
        saved = renorm.batch_renorm_step(
            x, b["running_mean"], b["running_var"], b["num_batches_tracked"],
            training=training, momentum=self.momentum, eps=self.eps, rmax=self.rmax,
            dmax=self.dmax, warmup_steps=self.warmup_steps,
        )
        self._cache = (x, saved)
        return renorm.batch_renorm_normalize(x, saved, self.params.get("weight"),
                                             self.params.get("bias"))

    def backward(self, dy: Tensor, need_dx: bool = True) -> Tensor | None:
        """``dx, dgamma, dbeta`` from :func:`~bnlab.variants.renorm.batch_renorm_backward`."""
        x, saved = self._cached()
        dx, dgamma, dbeta = renorm.batch_renorm_backward(dy, x, saved, self.params.get("weight"))
        self._set_grads(dgamma, dbeta)
        return dx if need_dx else None

    def extra_repr(self) -> str:
        return (super().extra_repr().replace(", track_running_stats=True", "")
                + f", rmax={self.rmax}, dmax={self.dmax}, warmup_steps={self.warmup_steps}")


class GhostBatchNorm2d(_NormLayer):
    """Ghost BN of (N, C, H, W) input in virtual batches of ``virtual_batch_size`` (Hoffer et
    al. 2017), the manual twin of ``bnlab.nn.GhostBatchNorm2d``: same arguments, state and
    numbers (one running-average update per ghost batch). Forward
    :func:`~bnlab.variants.ghost.ghost_batch_norm_step`; backward
    :func:`~bnlab.variants.ghost.ghost_batch_norm_backward` (BN's per ghost batch).

    >>> layer = GhostBatchNorm2d(3, virtual_batch_size=2)
    >>> y = layer.forward(torch.randn(6, 3, 2, 2), training=True)
    >>> int(layer.buffers["num_batches_tracked"])
    3
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        virtual_batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        ghost.check_virtual_batch_size(virtual_batch_size)
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.virtual_batch_size = int(virtual_batch_size)

    def forward(self, x: Tensor, training: bool) -> Tensor:
        """BN per ghost batch (training, or no running statistics), else BN's evaluation."""
        _check_4d(x, "GhostBatchNorm2d")
        _check_channels(x, self.num_features)
        b = self.buffers
        saved, size = ghost.ghost_batch_norm_step(
            x, b.get("running_mean"), b.get("running_var"), b.get("num_batches_tracked"),
            training=training, virtual_batch_size=self.virtual_batch_size,
            momentum=self.momentum, eps=self.eps,
        )
        self._cache = (x, saved, size)
        return ghost.ghost_batch_norm_normalize(x, saved, self.params.get("weight"),
                                                self.params.get("bias"), size)

    def backward(self, dy: Tensor, need_dx: bool = True) -> Tensor | None:
        """``dx, dgamma, dbeta`` from :func:`~bnlab.variants.ghost.ghost_batch_norm_backward`."""
        x, saved, size = self._cached()
        dx, dgamma, dbeta = ghost.ghost_batch_norm_backward(dy, x, saved,
                                                            self.params.get("weight"), size)
        self._set_grads(dgamma, dbeta)
        return dx if need_dx else None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"


class GroupNorm(Layer):
    """GroupNorm of (N, C, \\*S) input (Wu & He 2018), the manual twin of ``bnlab.nn.GroupNorm``
    and ``torch.nn.GroupNorm``: same arguments, parameters and errors, no buffers; the same
    function in training and evaluation. Forward
    :func:`~bnlab.variants.groupnorm.group_norm_forward`; backward
    :func:`~bnlab.variants.groupnorm.group_norm_backward` (BN's over the groups).
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        groupnorm.group_norm_check_args(num_groups, num_channels)
        self.num_groups, self.num_channels = num_groups, num_channels
        self.eps, self.affine = eps, affine
        if affine:
            self.params["weight"] = torch.ones(num_channels, device=device, dtype=dtype)
            self.params["bias"] = torch.zeros(num_channels, device=device, dtype=dtype)
        self._cache: tuple[Tensor, groupnorm.GroupNormSaved] | None = None

    def forward(self, x: Tensor, training: bool) -> Tensor:
        """Normalize each sample over its groups of channels (``training`` changes nothing)."""
        y, saved = groupnorm.group_norm_forward(x, self.num_groups, self.params.get("weight"),
                                                self.params.get("bias"), self.eps)
        self._cache = (x, saved)
        return y

    def backward(self, dy: Tensor, need_dx: bool = True) -> Tensor | None:
        """``dx, dgamma, dbeta`` from :func:`~bnlab.variants.groupnorm.group_norm_backward`."""
        if self._cache is None:
            raise RuntimeError("GroupNorm.backward called before forward")
        x, saved = self._cache
        dx, dgamma, dbeta = groupnorm.group_norm_backward(dy, x, saved,
                                                          self.params.get("weight"))
        if self.affine:
            self.grads["weight"], self.grads["bias"] = dgamma, dbeta
        return dx if need_dx else None

    def clear(self) -> None:
        self._cache = None

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"

