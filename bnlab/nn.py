"""Drop-in ``BatchNorm1d/2d/3d`` whose gradients come from bnlab's hand-derived backward.

Same constructor arguments, parameters, buffers, ``state_dict`` keys, train/eval
behaviour, momentum semantics (``momentum=None`` is the cumulative average) and errors as
``torch.nn.BatchNorm*d`` of the installed PyTorch: the classes share PyTorch's own base
(``torch.nn.modules.batchnorm._BatchNorm``, so ``isinstance`` checks treat them as BN),
which owns the parameters, buffers, ``reset_*``, ``extra_repr`` and state loading, and
replace only ``forward``. The forward and backward math is in
:mod:`bnlab.functional`, run by :mod:`bnlab.kernels` (a fused C++ kernel computing the
same math on CPU float32/float64 where it applies, the functional code elsewhere);
autograd never traces it (the backward is a ``torch.autograd.Function``).

Beyond plain training, the same things work on bnlab's modules as on PyTorch's (tested in
``tests/test_dropin.py`` and against PyTorch's own module test database): empty inputs
(a no-op that still counts the batch), double backward, the ``torch.func`` transforms
(``vmap``, ``grad``, ``jacrev``, ``jacfwd``/``jvp``, forward-mode AD), ``torch.export`` in
evaluation mode and ``torch.compile`` (without graph breaks). ``convert_batchnorm`` reuses
the very parameter and buffer objects.

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

from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from bnlab import functional as F
from bnlab import kernels

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormFunction",
    "batch_norm",
    "convert_batchnorm",
    "register_conversion",
]


class _BatchNormNode(torch.autograd.Function):
    """:class:`BatchNormFunction` without forward-mode AD: what ``torch.compile`` traces.

    Dynamo cannot trace an ``autograd.Function`` that defines ``jvp`` (it breaks the graph
    there), so under ``torch.compile`` :func:`batch_norm` applies this class; everything
    else is shared. It calls :mod:`bnlab.functional` directly, never the fused kernel
    (Dynamo traces the functional code into its graph; a custom C++ op would break it).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor, weight: Tensor | None, bias: Tensor | None, saved: F.BatchNormSaved
    ) -> Tensor:
        return F.batch_norm_normalize(x, saved, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, _, saved = inputs
        ctx.training = saved.training
        ctx.fused = False  # BatchNormFunction: whether the forward could use the kernel
        ctx.save_for_backward(x, weight, *saved[:4])
        ctx.save_for_forward(x, weight, *saved[:4])

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, *stats = ctx.saved_tensors
        saved = F.BatchNormSaved(*stats, ctx.training)
        backward = kernels.batch_norm_backward if ctx.fused else F.batch_norm_backward
        dx, dgamma, dbeta = backward(dy, x, saved, weight)
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        return (dx if need_x else None, dgamma if need_w else None, dbeta if need_b else None, None)


class BatchNormFunction(_BatchNormNode):
    """The normalization step as an autograd node whose backward is bnlab's.

    ``BatchNormFunction.apply(x, weight, bias, saved)`` returns
    :func:`~bnlab.functional.batch_norm_normalize` of ``x`` with the statistics in
    ``saved`` (from :func:`~bnlab.functional.batch_norm_prepare`, computed outside autograd);
    its backward is :func:`~bnlab.functional.batch_norm_backward`, which accounts for the
    dependence of batch statistics on ``x``, and its forward-mode derivative is
    :func:`~bnlab.functional.batch_norm_jvp`.

    The modern form (``setup_context``, ``generate_vmap_rule``): ``torch.func.vmap``,
    ``grad``, ``jacrev``, ``jacfwd``/``jvp`` and ``torch.autograd.forward_ad`` work through
    it. The backward is itself differentiable (it switches to its composite form when
    autograd records it), so double backward (``create_graph=True``, gradient penalties)
    works in training and evaluation mode.

    The forward and backward run on :mod:`bnlab.kernels`, which uses the fused C++ kernel
    where it applies (CPU float32/float64 in a dense layout, outside ``torch.func``
    transforms, ``vmap``, compile, export and double backward) and the functional
    reference everywhere else; ``with bnlab.kernels.disabled():`` around the forward keeps
    the whole step (forward and backward) on the reference.
    """

    @staticmethod
    def forward(
        x: Tensor, weight: Tensor | None, bias: Tensor | None, saved: F.BatchNormSaved
    ) -> Tensor:
        return kernels.batch_norm_normalize(x, saved, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _BatchNormNode.setup_context(ctx, inputs, output)
        ctx.fused = kernels.enabled()  # the choice made here holds for the backward too

    @staticmethod
    def jvp(ctx: Any, dx: Tensor | None, dweight: Tensor | None, dbias: Tensor | None,
            _dsaved: Any) -> Tensor:
        x, weight, *stats = ctx.saved_tensors
        saved = F.BatchNormSaved(*stats, ctx.training)
        return F.batch_norm_jvp(dx, dweight, dbias, x, saved, weight)


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
    ``momentum`` weighting the new batch statistics; an empty input (no values per
    channel) gives an empty output and leaves them untouched. Bad arguments raise what
    PyTorch raises (:func:`bnlab.functional.validate_batch_norm_args`). The statistics and
    the normalization run on :mod:`bnlab.kernels` (the fused CPU kernel where it applies,
    else :mod:`bnlab.functional`); under ``torch.compile`` on :mod:`bnlab.functional`.

    >>> x = torch.randn(8, 3, requires_grad=True)
    >>> batch_norm(x, None, None, training=True).sum().backward()
    """
    F.validate_batch_norm_args(x, weight, bias, running_mean, running_var, training=training,
                               eps=eps)
    if training:
        _verify_batch_size(x)
    weight = weight.reshape(-1) if weight is not None and weight.dim() != 1 else weight
    bias = bias.reshape(-1) if bias is not None and bias.dim() != 1 else bias
    compiling = torch.compiler.is_compiling()
    prepare = F.batch_norm_prepare if compiling else kernels.batch_norm_prepare
    saved = prepare(x.detach(), running_mean, running_var, training=training, eps=eps)
    if training and running_mean is not None and running_var is not None:
        F.update_running_stats(
            running_mean, running_var, saved.mean, saved.var, F.num_per_channel(x), momentum
        )
    node = _BatchNormNode if compiling else BatchNormFunction
    return node.apply(x, weight, bias, saved)


def _verify_batch_size(x: Tensor) -> None:
    """PyTorch's check: training needs more than one value per channel (0 is fine)."""
    if F.num_per_channel(x) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.size()}"
        )


class _BatchNorm(_TorchBatchNorm):
    """Shared forward of bnlab's BatchNorm1d/2d/3d (subclasses add only the input check).

    A subclass of PyTorch's ``torch.nn.modules.batchnorm._BatchNorm``, so that the
    ecosystem's ``isinstance`` checks (freezing helpers,
    ``SyncBatchNorm.convert_sync_batchnorm``, ``torch.func.replace_all_batch_norm_modules_``)
    treat bnlab's modules as batch norm.
    """

    def __init__(self, *args: Any, bias_correction: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bias_correction = bias_correction

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text + ", bias_correction=True" if self.bias_correction else text

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor = F.step_factor(self.num_batches_tracked if self.track_running_stats else None,
                               self.momentum, self.training)

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

# For each target name, the exact source types converted and the class each becomes.
_CONVERSIONS: dict[str, dict[type[torch.nn.Module], type[torch.nn.Module]]] = {
    "bnlab": {src: dst for src, dst in _PAIRS},
    "torch": {dst: src for src, dst in _PAIRS},
}


def register_conversion(
    to: str, mapping: dict[type[torch.nn.Module], type[torch.nn.Module]]
) -> None:
    """Teach :func:`convert_batchnorm` a target: ``convert_batchnorm(model, to=to)`` then
    turns every module whose exact type is a key of ``mapping`` into its value (the
    value's constructor must take ``torch.nn.BatchNorm*d``'s arguments). Registering a
    name again adds to its mapping.

    >>> register_conversion("bnlab", {})  # e.g. {torch.nn.SyncBatchNorm: MySyncBatchNorm}
    """
    _CONVERSIONS.setdefault(to, {}).update(mapping)


def convert_batchnorm(model: torch.nn.Module, to: str = "bnlab") -> torch.nn.Module:
    """Swap every ``BatchNorm*d`` in ``model`` for bnlab's (``to="bnlab"``) or PyTorch's.

    The new modules *reuse* the old ones' ``Parameter`` and buffer objects (running
    statistics, ``num_batches_tracked``): ``requires_grad``, tensor hooks, sharing between
    modules and an optimizer built before the conversion all keep working. Hyperparameters,
    train/eval mode and the module's own hooks are kept; a module that appears several
    times in ``model`` is converted once and the copy shared the same way. The model is
    changed in place and returned (a bare BN module is returned converted). Only exact
    types convert: subclasses of PyTorch's BN (such as ``SyncBatchNorm`` or
    ``LazyBatchNorm*d``) are left alone. ``to="sync"`` gives bnlab's cross-process
    :class:`~bnlab.sync_batchnorm.SyncBatchNorm` (back with ``"bnlab"`` or ``"torch"``, as
    ``BatchNorm2d``). More targets: :func:`register_conversion`.

    Raises ``ValueError`` for an unknown ``to``.

    >>> m = convert_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(4)))
    >>> type(convert_batchnorm(m, to="torch")[0]) is torch.nn.BatchNorm1d
    True
    """
    if to not in _CONVERSIONS:
        names = " or ".join(repr(k) for k in _CONVERSIONS)
        raise ValueError(f"convert_batchnorm: to must be {names}, got {to!r}")
    return _convert(model, _CONVERSIONS[to], {})


def _convert(
    module: torch.nn.Module,
    mapping: dict[type[torch.nn.Module], type[torch.nn.Module]],
    done: dict[int, torch.nn.Module],
) -> torch.nn.Module:
    if id(module) in done:
        return done[id(module)]
    target = mapping.get(type(module))
    if target is not None:
        converted = _convert_one(module, target)
    else:
        converted = module
        for name, child in list(module._modules.items()):  # named_children skips repeats
            if child is None:
                continue
            new = _convert(child, mapping, done)
            if new is not child:
                setattr(module, name, new)
    done[id(module)] = converted
    return converted


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _convert_one(bn: torch.nn.Module, target: type[torch.nn.Module]) -> torch.nn.Module:
    """A ``target`` module with ``bn``'s hyperparameters holding ``bn``'s very tensors."""
    kwargs: dict[str, Any] = dict(
        eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
        track_running_stats=bn.track_running_stats, device="meta",
    )
    if getattr(bn, "bias", None) is None and bn.affine:
        kwargs["bias"] = False  # PyTorch >= 2.12's scale-only affine
    new = target(bn.num_features, **kwargs)  # on "meta": its own tensors are replaced below
    for name in list(new._parameters):
        new._parameters[name] = bn._parameters.get(name)
    for name in list(new._buffers):
        new._buffers[name] = bn._buffers.get(name)
    for name in _HOOK_DICTS:
        if hasattr(bn, name) and hasattr(new, name):
            getattr(new, name).update(getattr(bn, name))
    for name in ("qconfig", "bias_correction"):
        if hasattr(bn, name) and hasattr(new, name):
            setattr(new, name, getattr(bn, name))
    new.train(bn.training)
    return new


# Cross-process BN (its own module: bnlab.sync_batchnorm), re-exported beside the others.
from bnlab.sync_batchnorm import SyncBatchNorm  # noqa: E402

__all__ += ["SyncBatchNorm"]

# convert_batchnorm(model, to="sync") and back. A SyncBatchNorm takes any input dimension,
# so it returns as BatchNorm2d (the conv nets'); for 1d/3d use
# bnlab.sync_batchnorm.batchnorm_from_sync. Tensors keep their identity both ways.
register_conversion("sync", {torch.nn.BatchNorm1d: SyncBatchNorm,
                             torch.nn.BatchNorm2d: SyncBatchNorm,
                             torch.nn.BatchNorm3d: SyncBatchNorm, BatchNorm1d: SyncBatchNorm,
                             BatchNorm2d: SyncBatchNorm, BatchNorm3d: SyncBatchNorm})
register_conversion("torch", {SyncBatchNorm: torch.nn.BatchNorm2d})
register_conversion("bnlab", {SyncBatchNorm: BatchNorm2d})

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
