r"""All-CNN-C (Springenberg et al. 2015, model C, Table 2) for the manual engine.

The layer plan (:func:`all_cnn_c_plan`) is the one description of the architecture: the
manual builder (:func:`all_cnn_c`) and the autograd twin (``bnlab.models.AllCNNC``) both
walk it, so their layers, names and initialization order are the same.

    input 32x32x3 (any size >= 9x9 works; 32x32 gives the paper's 6x6 final map)
    [dropout 20%]
    conv1  3x3  96        padding 1         BN  ReLU
    conv2  3x3  96        padding 1         BN  ReLU
    conv3  3x3  96  stride 2, padding 1     BN  ReLU   [dropout 50%]
    conv4  3x3 192        padding 1         BN  ReLU
    conv5  3x3 192        padding 1         BN  ReLU
    conv6  3x3 192  stride 2, padding 1     BN  ReLU   [dropout 50%]
    conv7  3x3 192        valid             BN  ReLU
    conv8  1x1 192                          BN  ReLU
    conv9  1x1  10                             [ReLU]  (the paper's table; final_relu=True)
    global average pooling (6x6 for 32x32 input), flatten; softmax is in the loss

With ``width`` w the 96 and 192 become ``round(96 w)`` and ``round(192 w)``. BN (when on;
or Batch Renorm, ghost BN or GroupNorm, the plan's ``norm`` kind, under the same names)
follows every convolution but the last; a convolution has a bias only when no BN follows
it. The convolutions get He's normal initialization by default (``init_scheme``, see
:mod:`bnlab.initializers`). Names: ``drop1``-``drop3``, ``conv1``-``conv9``, ``bn1``-``bn8``,
``relu1``-``relu8`` (and ``relu9`` with the final ReLU),
``pool``, ``flatten``; so the parameters are ``conv1.weight``, ``bn1.weight``,
``bn1.bias``, ..., ``conv9.weight``, ``conv9.bias``.

Usage::

    >>> import torch
    >>> from bnlab.manual import all_cnn_c
    >>> net = all_cnn_c(bn=True, width=0.25)
    >>> net.forward(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch

from bnlab.initializers import init_conv_
from bnlab.manual.layers import (
    BatchNorm2d,
    Conv2d,
    Dropout,
    Flatten,
    GlobalAvgPool2d,
    Layer,
    ReLU,
)
from bnlab.manual.network import Sequential
from bnlab.manual.norms import BatchRenorm2d, GhostBatchNorm2d, GroupNorm
from bnlab.plans import MIN_INPUT_SIZE, LayerSpec, all_cnn_c_plan

__all__ = ["MIN_INPUT_SIZE", "LayerSpec", "all_cnn_c", "all_cnn_c_plan", "build_layer"]

def build_layer(
    spec: LayerSpec,
    *,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    generator: torch.Generator | None = None,
    dropout_generator: torch.Generator | None = None,
    init: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Layer:
    """The manual layer for one :class:`LayerSpec` (``init=False``: conv weights undrawn).

    Normalization kinds: ``bn`` → :class:`~bnlab.manual.layers.BatchNorm2d`, ``renorm`` →
    :class:`~bnlab.manual.norms.BatchRenorm2d`, ``ghost`` →
    :class:`~bnlab.manual.norms.GhostBatchNorm2d`, ``group`` →
    :class:`~bnlab.manual.norms.GroupNorm` (``momentum`` unused: it keeps no running
    statistics); ``eps`` goes to each.
    """
    if spec.kind == "conv":
        return Conv2d(**spec.args, generator=generator, init=init, device=device, dtype=dtype)
    if spec.kind in ("bn", "renorm", "ghost"):
        cls = {"bn": BatchNorm2d, "renorm": BatchRenorm2d, "ghost": GhostBatchNorm2d}[spec.kind]
        return cls(**spec.args, eps=eps, momentum=momentum, device=device, dtype=dtype)
    if spec.kind == "group":
        return GroupNorm(spec.args["num_groups"], spec.args["num_features"], eps=eps,
                         device=device, dtype=dtype)
    if spec.kind == "relu":
        return ReLU(inplace=True)  # its input is a BN or conv output that nothing else keeps
    if spec.kind == "dropout":
        return Dropout(spec.args["p"], generator=dropout_generator)
    if spec.kind == "pool":
        return GlobalAvgPool2d()
    if spec.kind == "flatten":
        return Flatten()
    raise ValueError(f"unknown layer kind {spec.kind!r} in {spec}")


def all_cnn_c(
    bn: bool = True,
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
    memory_format: torch.memory_format | None = None,
    norm: str = "bn",
    norm_options: dict | None = None,
) -> Sequential:
    """All-CNN-C as a manual :class:`~bnlab.manual.network.Sequential`.

    ``bn`` puts bnlab's :class:`~bnlab.manual.layers.BatchNorm2d` (``momentum``, ``eps``)
    after conv1-conv8, or the layer of another ``norm`` kind (``renorm``, ``ghost``,
    ``group``, ``none``; its ``norm_options``: see :func:`bnlab.plans.all_cnn_c_plan`);
    ``dropout`` adds the paper's 20% input and 50% hidden dropout, its
    masks drawn from ``dropout_generator`` (None: the global RNG). The convolutions get
    ``init_scheme`` (``"kaiming"``: He's normal init, zero biases; ``"torch"``: PyTorch's
    default; ``"post"``) drawn in layer order from ``generator`` (None: the global RNG), so
    ``bnlab.models.AllCNNC`` built from the same seed has the same weights; ``init=False``
    draws nothing (weights loaded next, as the trainer does). ``final_relu`` puts the
    paper's ReLU on the class scores (see :func:`bnlab.plans.all_cnn_c_plan`).

    >>> net = all_cnn_c(bn=False, width=0.125, dtype=torch.float64)
    >>> sorted(net.named_parameters())[:2]
    ['conv1.bias', 'conv1.weight']
    """
    plan = all_cnn_c_plan(bn, dropout, width, num_classes, in_channels, final_relu, norm=norm,
                          norm_options=norm_options)
    layers = [
        (
            spec.name,
            build_layer(
                spec, momentum=momentum, eps=eps, dropout_generator=dropout_generator,
                init=False, device=device, dtype=dtype,
            ),
        )
        for spec in plan
    ]
    if init:  # in layer order, as bnlab.models.AllCNNC.reset_parameters draws them
        for _, layer in layers:
            if isinstance(layer, Conv2d):
                init_conv_(layer.params["weight"], layer.params.get("bias"), init_scheme,
                           generator)
    network = Sequential(layers)
    if memory_format is not None:
        network.to(memory_format=memory_format)
    return network
