"""What both engines draw at random, from a generator: initial weights and dropout masks.

The manual engine (:mod:`bnlab.manual`) and the autograd models (:mod:`bnlab.models`) call
these same functions, so one generator state gives both the same weights and the same
masks, in any memory format and on any device (a CPU generator draws on the CPU and the
values are copied over).

- :func:`kaiming_init_`: He et al.'s normal initialization with zero biases, All-CNN-C's
  default (scheme ``"kaiming"``).
- :func:`conv_default_init_`: PyTorch's default ``nn.Conv2d`` initialization (scheme
  ``"torch"``; All-CNN-C had it before He's became the default, and a run folder whose
  ``config.json`` predates the ``init`` field still means it).
- :func:`post_init_`: the post's ``N(0, 0.05²)`` for every conv weight (scheme ``"post"``).
- :func:`init_conv_`: one convolution, by scheme name (:data:`INIT_SCHEMES`).
- :func:`dropout_mask`: inverted dropout's scaled Bernoulli mask.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["INIT_SCHEMES", "INIT_STD", "check_dropout_p", "conv_default_init_", "draw_target",
           "dropout_mask", "init_conv_", "kaiming_init_", "post_init_"]

INIT_STD = 0.05  # the post's tf.random_normal(stddev=0.05) for every conv weight
INIT_SCHEMES = ("kaiming", "torch", "post")  # kaiming_init_ | conv_default_init_ | post_init_


def draw_target(t: Tensor, generator: torch.Generator | None) -> Tensor:
    """``t`` itself, or a contiguous tensor on the generator's device to draw into first.

    Random draws fill memory in order, so a channels_last tensor is drawn contiguous (as
    ``nn.Conv2d`` does) to give the same values in every memory format.
    """
    same_device = generator is None or generator.device.type == t.device.type
    if same_device and t.is_contiguous():
        return t
    device = t.device if generator is None else generator.device
    return torch.empty(t.shape, dtype=t.dtype, device=device)


def conv_default_init_(
    weight: Tensor, bias: Tensor | None, generator: torch.Generator | None = None
) -> None:
    r"""PyTorch's default ``nn.Conv2d`` initialization, in place, drawn from ``generator``.

    ``weight ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (Kaiming-uniform with ``a = sqrt(5)``)
    and then ``bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, with
    ``fan_in = C_in * kH * kW``. The draws come in the same order as in
    ``torch.nn.Conv2d.reset_parameters``, so with ``generator=None`` (the global RNG) a
    network built after ``torch.manual_seed(s)`` equals its ``nn.Module`` twin built after
    the same seed.

    A ``generator`` on another device than the tensors (a CPU generator for CUDA weights)
    draws on its own device, and the values are copied over.
    """
    with torch.no_grad():
        target = draw_target(weight, generator)
        torch.nn.init.kaiming_uniform_(target, a=math.sqrt(5), generator=generator)
        if target is not weight:
            weight.copy_(target)
        if bias is not None:
            fan_in = weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            target = draw_target(bias, generator)
            torch.nn.init.uniform_(target, -bound, bound, generator=generator)
            if target is not bias:
                bias.copy_(target)


def kaiming_init_(
    weight: Tensor, bias: Tensor | None, generator: torch.Generator | None = None
) -> None:
    r"""He (Kaiming) normal initialization, in place: ``weight ~ N(0, 2 / fan_in)``, ``bias = 0``.

    He et al. 2015 ("Delving deep into rectifiers", eq. 10): a layer ``z = W x`` followed by
    a ReLU keeps the second moment of its input, ``E[z_l²] = fan_in · Var[w] · E[x_l²]`` with
    ``E[x_l²] = E[z_{l-1}²] / 2`` (a ReLU of a zero-mean symmetric input keeps half of it),
    when ``Var[w] = 2 / fan_in`` (gain ``sqrt(2)``, ``fan_in = C_in * kH * kW``). PyTorch's
    default (:func:`conv_default_init_`) has ``Var[w] = 1 / (3 fan_in)``, which shrinks the
    second moment 6x per ReLU layer: nine layers of All-CNN-C without BN leave the class
    scores nearly independent of the image.

    ``weight``: (C_out, C_in, kH, kW), drawn from ``generator`` (None: the global RNG of the
    weight's device; another device's generator draws there and the values are copied over,
    a channels_last weight gets the contiguous draw); ``bias`` (C_out,) or None is zeroed
    and draws nothing.

    >>> w = torch.empty(192, 192, 3, 3)
    >>> kaiming_init_(w, None, torch.Generator().manual_seed(0))
    >>> round(w.var().item() * 192 * 9, 1)
    2.0
    """
    with torch.no_grad():
        target = draw_target(weight, generator)
        torch.nn.init.kaiming_normal_(target, mode="fan_in", nonlinearity="relu",
                                      generator=generator)
        if target is not weight:
            weight.copy_(target)
        if bias is not None:
            bias.zero_()


def init_conv_(weight: Tensor, bias: Tensor | None, scheme: str,
               generator: torch.Generator | None = None) -> None:
    """Initialize one convolution in place by scheme: ``"kaiming"`` (:func:`kaiming_init_`),
    ``"torch"`` (:func:`conv_default_init_`) or ``"post"`` (:func:`post_init_`, weight only;
    a bias, if any, is zeroed). Raises ValueError naming an unknown scheme.
    """
    if scheme == "kaiming":
        kaiming_init_(weight, bias, generator)
    elif scheme == "torch":
        conv_default_init_(weight, bias, generator)
    elif scheme == "post":
        post_init_(weight, generator)
        if bias is not None:
            with torch.no_grad():
                bias.zero_()
    else:
        raise ValueError(f"init scheme must be one of {INIT_SCHEMES}, got {scheme!r}")


def post_init_(weight: Tensor, generator: torch.Generator | None = None) -> None:
    """The post's initialization, in place: ``weight ~ N(0, 0.05²)``, drawn from ``generator``.

    None draws from the global RNG of the weight's device. As with
    :func:`conv_default_init_`, a generator on another device draws
    there and the values are copied over, and a channels_last weight gets the same values
    as a contiguous one.

    >>> w = torch.empty(192, 192, 3, 3)
    >>> post_init_(w, torch.Generator().manual_seed(0))
    >>> round(w.std().item(), 2)
    0.05
    """
    with torch.no_grad():
        target = draw_target(weight, generator)
        target.normal_(0.0, INIT_STD, generator=generator)
        if target is not weight:
            weight.copy_(target)


def check_dropout_p(p: float) -> None:
    """Raise ``ValueError`` (PyTorch's message, with ``p``) unless 0 <= ``p`` < 1.

    The one check of a dropout probability, for both engines' dropout layers and
    :func:`dropout_mask` (``p = 1`` would divide by zero in the mask's ``1 / (1 - p)``).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability has to be in [0, 1), but got {p}")


def dropout_mask(x: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    r"""The scaled mask of inverted dropout: ``b / (1 - p)`` with ``b ~ Bernoulli(1 - p)``.

    Shape, dtype, device and memory format of ``x``; the draws come from ``generator``
    (the default generator of ``x``'s device when None). Both engines draw their masks
    with this one function, so the same generator state gives the same masks.

    >>> mask = dropout_mask(torch.ones(1000), 0.5, torch.Generator().manual_seed(0))
    >>> sorted(set(mask.tolist()))
    [0.0, 2.0]
    """
    check_dropout_p(p)
    if generator is None or generator.device.type == x.device.type:
        mask = torch.empty_like(x).bernoulli_(1.0 - p, generator=generator)
    else:  # e.g. a CPU generator for CUDA activations: draw there, then move
        mask = torch.empty_like(x, device=generator.device).bernoulli_(1.0 - p, generator=generator)
        mask = mask.to(x.device)
    return mask.div_(1.0 - p)
