"""The blog post's network for the autograd engine: ``PostNet`` and its scale-only BN.

:class:`PostNet` is the autograd twin of :func:`bnlab.post.manual_net.post_net`: both walk
:func:`bnlab.plans.post_net_plan`, so their layers, names and ``state_dict`` keys are the
same and weights copy both ways. Its BN layers (:class:`ScaleOnlyBatchNorm`,
:class:`PerActivationScaleOnlyBatchNorm`) are the post's: a scale gamma, no shift, running
averages starting at 0.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from bnlab import functional as bF
from bnlab import nn as bnn
from bnlab.initializers import post_init_
from bnlab.models import check_norm, uninitialized_conv
from bnlab.plans import LayerSpec, post_net_plan

__all__ = ["BN_KINDS", "PerActivationScaleOnlyBatchNorm", "PostNet", "ScaleOnlyBatchNorm"]

BN_KINDS = ("channel", "activation")




class ScaleOnlyBatchNorm(nn.Module):
    r"""Per-channel batch normalization with a scale gamma and no shift: ``y = gamma x_hat``.

    ``x_hat = (x - mu) / sqrt(var + eps)`` with the batch mean and biased variance over
    (N, H, W) in training, the running averages in evaluation. The post's case b layer
    (``tf.layers.batch_normalization(center=False)``), on any PyTorch >= 2.4 (whose
    ``BatchNorm2d`` has no ``bias=False`` before 2.13).

    ``engine`` computes it: ``"torch"`` with ``torch.nn.functional.batch_norm`` (weight
    only, bias None; autograd's backward), ``"bnlab"`` with bnlab's hand-derived backward
    (:class:`bnlab.nn.BatchNormFunction`). Running averages: ``momentum`` weights the new
    batch; they start at 0 (mean) and ``running_var_init`` (variance; the post's 0), and the
    variance averaged is the unbiased batch variance (``unbiased_running_var=True``, as
    PyTorch and TensorFlow's fused BN) or the biased one.

    ``bias_correction=True`` (an attribute a trainer may also set later) normalizes in
    evaluation mode with the running averages' initial values divided out (the post's
    Q5; :func:`bnlab.functional.bias_corrected_running_stats` with ``initial_var =
    running_var_init``), as the manual engine's BN layers do.

    Parameter ``weight``; buffers ``running_mean``, ``running_var``,
    ``num_batches_tracked``: the ``state_dict`` of the manual engine's BN layers.

    >>> bn = ScaleOnlyBatchNorm(4)
    >>> bn(torch.randn(8, 4, 3, 3)).shape, [n for n, _ in bn.named_parameters()]
    (torch.Size([8, 4, 3, 3]), ['weight'])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-8,
        momentum: float = 0.1,
        *,
        engine: str = "torch",
        running_var_init: float = 0.0,
        unbiased_running_var: bool = True,
        bias_correction: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if engine not in ("torch", "bnlab"):
            raise ValueError(f"engine must be 'torch' or 'bnlab', got {engine!r}")
        if num_features <= 0:
            raise ValueError(f"num_features must be positive, got {num_features}")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.engine = engine
        self.running_var_init = running_var_init
        self.unbiased_running_var = unbiased_running_var
        self.bias_correction = bias_correction
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_features, **factory))
        self.register_buffer("running_mean", torch.empty(num_features, **factory))
        self.register_buffer("running_var", torch.empty(num_features, **factory))
        count = torch.tensor(0, dtype=torch.long, device=device)
        self.register_buffer("num_batches_tracked", count)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """gamma = 1, running mean 0, running variance ``running_var_init``, count 0."""
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.running_mean.zero_()
            self.running_var.fill_(self.running_var_init)
            self.num_batches_tracked.zero_()

    def _features(self, x: Tensor) -> Tensor:
        """The view of ``x`` whose axis 1 holds the features normalized separately."""
        return x

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")
        if x.shape[1] != self.num_features:
            raise RuntimeError(
                f"running_mean should contain {x.shape[1]} elements not {self.num_features}"
            )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        xf = self._features(x)
        m = xf.numel() // xf.shape[1]  # values per feature
        if self.training:
            if m <= 1:
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got input size "
                    f"{x.size()}"
                )
            self.num_batches_tracked.add_(1)
        y = self._normalize_torch(xf) if self.engine == "torch" else self._normalize_bnlab(xf)
        return y.reshape(x.shape) if y.shape != x.shape else y

    def _running_stats(self) -> tuple[Tensor, Tensor]:
        """The statistics evaluation mode normalizes with (bias-corrected if asked)."""
        if not self.bias_correction:
            return self.running_mean, self.running_var
        return bF.bias_corrected_running_stats(
            self.running_mean, self.running_var, int(self.num_batches_tracked), self.momentum,
            initial_var=self.running_var_init,
        )

    def _normalize_torch(self, xf: Tensor) -> Tensor:
        functional = nn.functional
        if not self.training:
            running_mean, running_var = self._running_stats()
            return functional.batch_norm(
                xf, running_mean, running_var, self.weight, None, False, 0.0, self.eps
            )
        if self.unbiased_running_var:  # torch updates the buffers with the unbiased variance
            return functional.batch_norm(
                xf, self.running_mean, self.running_var, self.weight, None, True,
                self.momentum, self.eps,
            )
        with torch.no_grad():  # the biased variance: torch's kernel cannot, bnlab's rule can
            dims = (0, *range(2, xf.dim()))
            var, mean = torch.var_mean(xf, dims, correction=0)
            bF.update_running_stats(self.running_mean, self.running_var, mean, var,
                                    xf.numel() // xf.shape[1], self.momentum, unbiased=False)
        return functional.batch_norm(xf, None, None, self.weight, None, True, 0.0, self.eps)

    def _normalize_bnlab(self, xf: Tensor) -> Tensor:
        running_mean, running_var = (
            (self.running_mean, self.running_var) if self.training else self._running_stats()
        )
        saved = bF.batch_norm_prepare(
            xf.detach(), running_mean, running_var, training=self.training, eps=self.eps
        )
        if self.training:
            bF.update_running_stats(
                self.running_mean, self.running_var, saved.mean, saved.var,
                xf.numel() // xf.shape[1], self.momentum, unbiased=self.unbiased_running_var,
            )
        return bnn.BatchNormFunction.apply(xf, self.weight, None, saved)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"engine={self.engine!r}, running_var_init={self.running_var_init}, "
            f"unbiased_running_var={self.unbiased_running_var}"
        ) + (", bias_correction=True" if self.bias_correction else "")


class PerActivationScaleOnlyBatchNorm(ScaleOnlyBatchNorm):
    """Per-activation scale-only BN: every (c, h, w) of (N, C, H, W) is its own feature.

    The input is viewed as (N, C*H*W) in NCHW order (``torch.nn.BatchNorm1d`` semantics on
    the flattened features), so gamma and the running statistics have shape (C*H*W,), as
    in :class:`bnlab.manual.PerActivationBatchNorm`. By default the running variance
    averages the *biased* batch variance, as the post's hand-written BN (case c).

    >>> bn = PerActivationScaleOnlyBatchNorm(2, 3, 3)
    >>> bn(torch.randn(5, 2, 3, 3)).shape, bn.weight.shape
    (torch.Size([5, 2, 3, 3]), torch.Size([18]))
    """

    def __init__(
        self,
        channels: int,
        height: int,
        width: int,
        eps: float = 1e-8,
        momentum: float = 0.1,
        *,
        engine: str = "torch",
        running_var_init: float = 0.0,
        unbiased_running_var: bool = False,
        bias_correction: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if min(channels, height, width) <= 0:
            raise ValueError(
                f"PerActivationScaleOnlyBatchNorm needs positive sizes, got channels={channels}, "
                f"height={height}, width={width}"
            )
        super().__init__(
            channels * height * width, eps, momentum, engine=engine,
            running_var_init=running_var_init, unbiased_running_var=unbiased_running_var,
            bias_correction=bias_correction, device=device, dtype=dtype,
        )
        self.feature_shape = (channels, height, width)

    def _features(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1)  # NCHW order (a copy for channels_last input)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.feature_shape:
            c, h, w = self.feature_shape
            raise ValueError(
                f"PerActivationScaleOnlyBatchNorm: expected input of shape (N, {c}, {h}, {w}), "
                f"got {tuple(x.shape)}"
            )

    def extra_repr(self) -> str:
        c, h, w = self.feature_shape
        return f"{c}, {h}, {w}, " + super().extra_repr().split(", ", 1)[1]


class PostNet(nn.Sequential):
    """The blog post's network as an ``nn.Sequential``: autograd twin of ``post_net``.

    Arguments:
        norm: ``"none"`` (case a), ``"torch"`` or ``"bnlab"`` (``"manual"`` is another
            name for it): no BN, or the BN computed by PyTorch's ``batch_norm`` or by
            bnlab's hand-derived backward inside autograd.
        bn_kind: ``"channel"`` (case b: :class:`ScaleOnlyBatchNorm`, running variance
            from 0 averaging the unbiased batch variance) or ``"activation"`` (case c:
            :class:`PerActivationScaleOnlyBatchNorm`, running variance from 0 averaging
            the biased batch variance); ignored when ``norm="none"``.
        width, num_classes, in_channels, image_size: as
            :func:`bnlab.plans.post_net_plan`.
        momentum, eps: of the BN layers (0.1 weighting the new batch = the post's 0.9 of
            the old; 1e-8).
        generator: draws the conv weights, N(0, 0.05²), in layer order (None: the global
            RNG); nothing else is drawn (the convolutions skip PyTorch's default init),
            so :func:`bnlab.manual.post_net` from a generator in the same state has the
            same weights.
        init: False draws nothing (weights loaded next), as for :class:`AllCNNC`.
        device, dtype: of the parameters and buffers.

    Layers, names and ``state_dict`` keys are the manual network's (see
    :mod:`bnlab.post.manual_net`); weights copy both ways with ``load_state_dict``.
    This twin always computes the true gradient: case c's errors exist only in the manual
    engine.

    >>> model = PostNet(norm="torch", bn_kind="activation", width=0.125)
    >>> model(torch.randn(2, 3, 32, 32)).shape, model.bn2.weight.shape
    (torch.Size([2, 10]), torch.Size([6144]))
    """

    def __init__(
        self,
        norm: str = "none",
        bn_kind: str = "channel",
        width: float = 1.0,
        num_classes: int = 10,
        in_channels: int = 3,
        *,
        image_size: int = 32,
        momentum: float = 0.1,
        eps: float = 1e-8,
        generator: torch.Generator | None = None,
        init: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        norm = check_norm(norm)
        if bn_kind not in BN_KINDS:
            raise ValueError(f"bn_kind must be one of {BN_KINDS}, got {bn_kind!r}")
        bn = "none" if norm == "none" else bn_kind
        plan = post_net_plan(bn, width, num_classes, in_channels, image_size)
        factory = {"device": device, "dtype": dtype}
        modules: OrderedDict[str, nn.Module] = OrderedDict(
            (spec.name, _build_post_module(spec, norm, momentum, eps, factory)) for spec in plan
        )
        super().__init__(modules)
        self.norm, self.bn_kind, self.width = norm, bn_kind, width
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        if init:
            self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw the conv weights (N(0, 0.05²)) in layer order; reset the BN layers."""
        for module in self:
            if isinstance(module, nn.Conv2d):
                post_init_(module.weight, generator)
            elif isinstance(module, ScaleOnlyBatchNorm):
                module.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"norm={self.norm!r}, bn_kind={self.bn_kind!r}, width={self.width}, "
            f"num_classes={self.num_classes}, image_size={self.image_size}"
        )


def _build_post_module(
    spec: LayerSpec, norm: str, momentum: float, eps: float, factory: dict
) -> nn.Module:
    """The ``nn.Module`` for one layer of the post net's plan."""
    if spec.kind == "conv":
        return uninitialized_conv(spec, factory)
    if spec.kind == "elu":
        return nn.ELU()
    if spec.kind == "bn":
        kwargs = dict(eps=eps, momentum=momentum, engine=norm, running_var_init=0.0, **factory)
        if spec.args["flavour"] == "channel":  # case b: TF's fused BN, unbiased running var
            return ScaleOnlyBatchNorm(spec.args["num_features"], **kwargs)
        # case c: the hand-written BN, biased running var
        return PerActivationScaleOnlyBatchNorm(*spec.args["shape"], **kwargs)
    if spec.kind == "avgpool":
        return nn.AvgPool2d(spec.args["kernel_size"])
    if spec.kind == "gap":
        return nn.AdaptiveAvgPool2d(1)
    if spec.kind == "flatten":
        return nn.Flatten()
    raise ValueError(f"unknown layer kind {spec.kind!r} in {spec}")
