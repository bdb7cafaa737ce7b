r"""The post's network ("post net") for the manual engine, with its three gradient errors.

The blog post (see ``shared/post/README.md``) trains this network on CIFAR-10 three times:
a) no BN, b) TensorFlow's per-channel BN, c) a hand-written per-activation BN with a
hand-written backward pass. Layer by layer, at ``width`` w (96 → round(96 w), 192 →
round(192 w)) and 32x32 input::

    conv1  3x3   3 →  96  padding 1   elu1                      32x32
    conv2  3x3  96 →  96  padding 1   elu2
    conv3  3x3  96 → 192  padding 1   elu3   [bn1]
    pool1  2x2 average                                           16x16
    conv4  3x3 192 → 192  padding 1   elu4
    conv5  3x3 192 → 192  padding 1   elu5
    conv6  3x3 192 → 192  padding 1   elu6   [bn2]
    pool2  2x2 average                                            8x8
    conv7  3x3 192 → 192  padding 1   elu7
    conv8  1x1 192 → 192              elu8
    conv9  1x1 192 →  10              elu9   (ELU after the last conv too)
    gap    global average pool, flatten; the softmax is in the loss

No conv bias, no dropout; conv weights ~ N(0, 0.05²) (:func:`post_init_`). BN sits after
the ELU (conv → ELU → BN → pool) and has a scale gamma but no shift beta.

The plan (:func:`post_net_plan`) is shared with the autograd twin
(``bnlab.post.net.PostNet``): same layers, same names, same ``state_dict`` keys, and from
the same generator the same weights.

Case c's hand-written backward has three errors (:data:`GRADIENT_ERRORS`), each a switch
of :func:`post_net`; with all switches off the manual engine computes the true gradient.

Usage::

    >>> import torch
    >>> from bnlab.manual import train_step
    >>> from bnlab.post.manual_net import post_net
    >>> from bnlab.optim import Adam
    >>> net = post_net(bn="activation", width=0.125, gradient_errors=("elu", "pool", "loss"))
    >>> opt = Adam(net.parameters(), lr=3e-4, betas=(0.9, 0.9))
    >>> images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    >>> loss, logits = train_step(net, opt, images, labels, mean_gradient=net.mean_gradient)
    >>> logits.shape, net.mean_gradient
    (torch.Size([4, 10]), False)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from bnlab.initializers import INIT_STD, post_init_
from bnlab.manual.layers import (
    ELU,
    AvgPool2d,
    BatchNorm2d,
    Conv2d,
    Flatten,
    GlobalAvgPool2d,
    Layer,
    PerActivationBatchNorm,
)
from bnlab.manual.network import Sequential
from bnlab.plans import BN_FLAVOURS, MIN_IMAGE_SIZE, LayerSpec, post_net_plan

__all__ = [
    "BN_FLAVOURS",
    "GRADIENT_ERRORS",
    "INIT_STD",
    "MIN_IMAGE_SIZE",
    "post_init_",
    "post_net",
    "post_net_plan",
]

GRADIENT_ERRORS = ("elu", "pool", "loss")
"""The three errors of the post's hand-written backward (case c), by switch name:

- ``"elu"``: the ELU derivative is 2 for x > 0 (should be 1); e^x for x <= 0 is right.
- ``"pool"``: the 2x2 average-pool backward copies dy to its four inputs without the 1/4.
- ``"loss"``: the loss gradient is softmax − onehot without the 1/N of the batch mean,
  AND the global-average-pool backward lacks its 1/(H W) (1/64 at 32x32 input): the
  post fed softmax − onehot straight into the 8x8 map. Together a factor N·H·W
  (50·64 = 3200 in the post).
"""

def _check_gradient_errors(gradient_errors: Iterable[str]) -> frozenset[str]:
    if isinstance(gradient_errors, str):
        gradient_errors = (gradient_errors,)
    errors = frozenset(gradient_errors)
    unknown = sorted(errors - set(GRADIENT_ERRORS))
    if unknown:
        raise ValueError(
            f"unknown gradient_errors {unknown}: the valid ones are {GRADIENT_ERRORS}"
        )
    return errors


def _build_layer(
    spec: LayerSpec,
    errors: frozenset[str],
    momentum: float,
    eps: float,
    factory: dict,
) -> Layer:
    """The manual layer for one :class:`LayerSpec` of the post net's plan."""
    if spec.kind == "conv":
        return Conv2d(**spec.args, init=False, **factory)  # post_init_ draws the weights
    if spec.kind == "elu":
        return ELU(positive_slope=2.0 if "elu" in errors else 1.0)
    if spec.kind == "bn":
        # both flavours: scale only, running averages from 0, momentum weighting the new batch
        kwargs = dict(eps=eps, momentum=momentum, bias=False, running_var_init=0.0, **factory)
        if spec.args["flavour"] == "channel":
            return BatchNorm2d(spec.args["num_features"], **kwargs)
        return PerActivationBatchNorm(*spec.args["shape"], unbiased_running_var=False, **kwargs)
    if spec.kind == "avgpool":
        return AvgPool2d(spec.args["kernel_size"], divide_gradient="pool" not in errors)
    if spec.kind == "gap":
        return GlobalAvgPool2d(divide_gradient="loss" not in errors)
    if spec.kind == "flatten":
        return Flatten()
    raise ValueError(f"unknown layer kind {spec.kind!r} in {spec}")


def post_net(
    bn: str = "none",
    width: float = 1.0,
    num_classes: int = 10,
    in_channels: int = 3,
    *,
    image_size: int = 32,
    gradient_errors: Iterable[str] = (),
    momentum: float = 0.1,
    eps: float = 1e-8,
    generator: torch.Generator | None = None,
    init: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    memory_format: torch.memory_format | None = None,
) -> Sequential:
    """The post's network as a manual :class:`~bnlab.manual.network.Sequential`.

    Arguments:
        bn: ``"none"`` (case a), ``"channel"`` (case b) or ``"activation"`` (case c), as
            the post ran them:

            - ``"channel"``: ``tf.layers.batch_normalization(scale=True, center=False,
              moving_variance_initializer=zeros, momentum=0.9, epsilon=1e-8)``: per
              channel over (N, H, W), gamma only, running mean and variance starting at
              0. The running variance averages the *unbiased* batch variance, the
              convention of TensorFlow's fused BN kernel, which ``tf.layers`` picks for
              4-D input when it can; its non-fused path averages the biased variance.
              Which one ran is not recorded (an ambiguity of a factor m/(m-1) =
              50·32·32/(50·32·32 - 1), 1.00002 at bn1, in the running variance only).
            - ``"activation"``: the hand-written BN: per activation (statistics over the
              batch axis only, :class:`~bnlab.manual.layers.PerActivationBatchNorm`),
              gamma only, running mean and variance starting at 0, the running variance
              averaging the *biased* batch variance (``tf.nn.moments``), no bias
              correction.

            ``momentum`` weights the new batch (PyTorch's convention): 0.1 here is
            TensorFlow's and the post's 0.9 weight of the old value. ``eps`` is 1e-8 as
            in the post.
        width: multiplies the 96 and 192 channels (rounded, at least 1).
        image_size: the input's height and width (square), for the per-activation BN's
            (C, H, W); at least 4.
        gradient_errors: any of :data:`GRADIENT_ERRORS` (``"elu"``, ``"pool"``,
            ``"loss"``): reproduce that error of case c's backward pass. ``"loss"`` is
            half in the network (the global average pool's backward) and half in the
            loss: the returned network's ``mean_gradient`` attribute is False then, and
            the trainer passes it to :func:`~bnlab.manual.network.train_step`.
        generator: draws the conv weights, N(0, 0.05²), in layer order (None: the global
            RNG); nothing else is drawn, so ``bnlab.post.net.PostNet`` built with a
            generator in the same state gets the same weights.
        init: False draws nothing (weights loaded next, as the trainer does).
        device, dtype, memory_format: of the parameters and buffers.

    >>> net = post_net(bn="channel", width=0.125, gradient_errors=["pool"])
    >>> net["pool1"], net["bn1"].params["weight"].shape, net.mean_gradient
    (AvgPool2d(kernel_size=2, divide_gradient=False), torch.Size([24]), True)
    """
    errors = _check_gradient_errors(gradient_errors)
    plan = post_net_plan(bn, width, num_classes, in_channels, image_size)
    factory = {"device": device, "dtype": dtype}
    network = Sequential([(s.name, _build_layer(s, errors, momentum, eps, factory)) for s in plan])
    for layer in network.layers.values():
        if init and isinstance(layer, Conv2d):
            post_init_(layer.params["weight"], generator)
    if memory_format is not None:
        network.to(memory_format=memory_format)
    network.mean_gradient = "loss" not in errors
    return network
