"""All-CNN-C for the autograd engine: an ``nn.Sequential`` twin of the manual network.

The architecture comes from :func:`bnlab.plans.all_cnn_c_plan`, the plan the manual
engine builds from too, so both engines have the same layers, the same
``state_dict`` keys (``conv1.weight``, ``bn1.weight``, ``bn1.running_mean``, ...,
``conv9.bias``) and, from the same seed, the same initial weights::

    >>> import torch
    >>> from bnlab.models import AllCNNC
    >>> from bnlab.manual import all_cnn_c
    >>> model = AllCNNC(norm="torch", width=0.25)
    >>> net = all_cnn_c(bn=True, width=0.25)
    >>> net.load_state_dict(model.state_dict())          # and model.load_state_dict(...)
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])

``norm`` picks the BN module: ``"none"`` (case a), ``"torch"`` (``torch.nn.BatchNorm2d``,
case b) or ``"bnlab"`` (``bnlab.nn.BatchNorm2d``, bnlab's hand-derived backward inside
autograd; ``"manual"`` is accepted as another name for it). ``norm_kind`` picks what the
layer computes (:data:`bnlab.plans.NORM_KINDS`): ``"bn"``, ``"renorm"``
(``bnlab.nn.BatchRenorm2d``), ``"ghost"`` (``bnlab.nn.GhostBatchNorm2d``) or ``"group"``
(``bnlab.nn.GroupNorm``, or ``torch.nn.GroupNorm`` with ``norm="torch"``); torch has no
Batch Renorm or ghost BN, so those need ``norm="bnlab"``.

The blog post's own network has its twin in :mod:`bnlab.post.net` (``PostNet``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from bnlab import nn as bnn
from bnlab.initializers import check_dropout_p, dropout_mask, init_conv_
from bnlab.plans import LayerSpec, all_cnn_c_plan

__all__ = [
    "NORMS",
    "AllCNNC",
    "Dropout",
]

NORMS = ("none", "torch", "bnlab")


class Dropout(nn.Module):
    """Inverted dropout whose masks come from a ``torch.Generator`` (None: the global RNG).

    ``y = x * mask`` with ``mask = Bernoulli(1 - p) / (1 - p)`` drawn by
    :func:`bnlab.manual.layers.dropout_mask`, the manual engine's own mask function, so a
    generator in the same state gives both engines the same masks. Autograd differentiates
    the product. Identity in evaluation mode, like ``torch.nn.Dropout``.

    >>> drop = Dropout(0.5, generator=torch.Generator().manual_seed(0))
    >>> drop(torch.ones(3)).shape
    torch.Size([3])
    """

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        super().__init__()
        check_dropout_p(p)
        self.p = p
        self.generator = generator

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        return x * dropout_mask(x, self.p, self.generator)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class AllCNNC(nn.Sequential):
    """All-CNN-C (Springenberg et al. 2015, model C) as an ``nn.Sequential``.

    Arguments:
        norm: ``"none"``, ``"torch"`` or ``"bnlab"``: the BN after conv1-conv8 (before the
            ReLU); a convolution has a bias only when no BN follows it.
        norm_kind, norm_options: what that layer computes (``"bn"``, ``"renorm"``,
            ``"ghost"``, ``"group"``, ``"none"``) and its arguments; see the module
            docstring and :func:`bnlab.plans.all_cnn_c_plan`. Raises ValueError for Batch
            Renorm or ghost BN with ``norm="torch"``.
        dropout: the paper's dropout, 20% on the input and 50% after each stride-2 layer,
            masks from ``dropout_generator`` (None: the global RNG).
        width: multiplier of the channel counts (96 → round(96 w), 192 → round(192 w)).
        num_classes, in_channels: 10 and 3 for CIFAR-10.
        momentum, eps: of the BN layers (PyTorch's convention and defaults).
        generator: draws the convolutions' initial weights in layer order; None uses the
            global RNG (with ``init_scheme="torch"`` exactly as ``nn.Conv2d`` does).
        init: False draws nothing and leaves the convolutions' weights uninitialized, for
            weights loaded next (the trainer's, from :func:`bnlab.plans.initial_parameters`).
        init_scheme: ``"kaiming"`` (He's normal init, zero biases; the default), ``"torch"``
            (PyTorch's default) or ``"post"`` (see :mod:`bnlab.initializers`).
        final_relu: a ReLU on the class scores, as in the paper's table (see
            :func:`bnlab.plans.all_cnn_c_plan`; off by default).
        device, dtype: of the parameters and buffers.

    The output is the logits (N, num_classes); the softmax is in the loss. Layer names and
    order: see :mod:`bnlab.manual.allcnn`.
    """

    def __init__(
        self,
        norm: str = "none",
        dropout: bool = False,
        width: float = 1.0,
        num_classes: int = 10,
        in_channels: int = 3,
        *,
        momentum: float | None = 0.1,
        eps: float = 1e-5,
        generator: torch.Generator | None = None,
        dropout_generator: torch.Generator | None = None,
        init: bool = True,
        init_scheme: str = "kaiming",
        final_relu: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        norm_kind: str = "bn",
        norm_options: dict | None = None,
    ) -> None:
        norm = check_norm(norm)
        if norm == "torch" and norm_kind in ("renorm", "ghost"):
            raise ValueError(f"torch has no layer for norm_kind {norm_kind!r}: use norm "
                             f"'bnlab' (bnlab.nn's), got norm 'torch'")
        plan = all_cnn_c_plan(norm != "none", dropout, width, num_classes, in_channels,
                              final_relu, norm=norm_kind, norm_options=norm_options)
        factory = {"device": device, "dtype": dtype}
        modules: OrderedDict[str, nn.Module] = OrderedDict()
        for spec in plan:
            modules[spec.name] = _build_module(
                spec, norm, momentum, eps, dropout_generator, factory
            )
        super().__init__(modules)
        self.norm, self.dropout, self.width = norm, dropout, width
        self.norm_kind = norm_kind if norm != "none" else "none"
        self.num_classes, self.in_channels = num_classes, in_channels
        self.init_scheme, self.final_relu = init_scheme, final_relu
        if init:
            self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-initialize the convolutions (``init_scheme``) in layer order, and BN."""
        for module in self:
            if isinstance(module, nn.Conv2d):
                init_conv_(module.weight, module.bias, self.init_scheme, generator)
            elif hasattr(module, "reset_parameters"):  # the normalization layers
                module.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"norm={self.norm!r}, norm_kind={self.norm_kind!r}, dropout={self.dropout}, "
            f"width={self.width}, num_classes={self.num_classes}, "
            f"init_scheme={self.init_scheme!r}, final_relu={self.final_relu}"
        )


def check_norm(norm: str) -> str:
    """``norm`` checked against :data:`NORMS` ("manual" is another name for "bnlab").

    Raises ValueError naming the bad value.
    """
    norm = "bnlab" if norm == "manual" else norm
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return norm


def uninitialized_conv(spec: LayerSpec, factory: dict) -> nn.Conv2d:
    """``nn.Conv2d`` built on the meta device, so PyTorch's default init draws nothing from
    the global RNG; its weights are drawn (or loaded) by the caller."""
    device = factory["device"]
    conv = nn.Conv2d(**spec.args, device="meta", dtype=factory["dtype"])
    return conv.to_empty(device=torch.get_default_device() if device is None else device)


def _build_module(
    spec: LayerSpec,
    norm: str,
    momentum: float | None,
    eps: float,
    dropout_generator: torch.Generator | None,
    factory: dict,
) -> nn.Module:
    """The ``nn.Module`` for one layer of the shared plan."""
    if spec.kind == "conv":
        return uninitialized_conv(spec, factory)
    if spec.kind == "bn":
        cls = nn.BatchNorm2d if norm == "torch" else bnn.BatchNorm2d
        return cls(spec.args["num_features"], eps=eps, momentum=momentum, **factory)
    if spec.kind in ("renorm", "ghost"):
        cls = bnn.BatchRenorm2d if spec.kind == "renorm" else bnn.GhostBatchNorm2d
        return cls(**spec.args, eps=eps, momentum=momentum, **factory)
    if spec.kind == "group":
        cls = nn.GroupNorm if norm == "torch" else bnn.GroupNorm
        return cls(spec.args["num_groups"], spec.args["num_features"], eps=eps, **factory)
    if spec.kind == "relu":
        return nn.ReLU(inplace=True)
    if spec.kind == "dropout":
        return Dropout(spec.args["p"], generator=dropout_generator)
    if spec.kind == "pool":
        return nn.AdaptiveAvgPool2d(1)
    if spec.kind == "flatten":
        return nn.Flatten()
    raise ValueError(f"unknown layer kind {spec.kind!r} in {spec}")
