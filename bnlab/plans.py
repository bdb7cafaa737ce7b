"""One plan per network: the layers both engines build, and the initial weights they share.

A plan is a list of :class:`LayerSpec` (name, kind, constructor arguments) in forward
order. The manual engine (:func:`bnlab.manual.all_cnn_c`, :func:`bnlab.manual.post_net`)
and the autograd models (:class:`bnlab.models.AllCNNC`, :class:`bnlab.post.net.PostNet`) walk
the same plan, so their layers, names and ``state_dict`` keys are the same, and
:func:`initial_parameters` draws a plan's initial weights once, from one generator, for
whichever engine loads them.

- :func:`all_cnn_c_plan`: All-CNN-C (Springenberg et al. 2015, model C; the layer table
  is in :mod:`bnlab.manual.allcnn`).
- :func:`post_net_plan`: the blog post's network (its table is in :mod:`bnlab.post.manual_net`).

    >>> plan = all_cnn_c_plan(bn=True, width=0.125)
    >>> sorted(initial_parameters(plan, "kaiming", torch.Generator().manual_seed(0)))[:2]
    ['conv1.weight', 'conv2.weight']
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from bnlab.initializers import INIT_SCHEMES, init_conv_

__all__ = ["BN_FLAVOURS", "INIT_SCHEMES", "MIN_IMAGE_SIZE", "MIN_INPUT_SIZE", "NORM_KINDS",
           "LayerSpec", "all_cnn_c_plan", "default_num_groups", "initial_parameters",
           "post_net_plan"]


# (out channels at width 1, kernel, stride, padding) of conv1 ... conv8; conv9 is 1x1 to K.
_CONVS = [
    (96, 3, 1, 1),
    (96, 3, 1, 1),
    (96, 3, 2, 1),
    (192, 3, 1, 1),
    (192, 3, 1, 1),
    (192, 3, 2, 1),
    (192, 3, 1, 0),
    (192, 1, 1, 0),
]
# The smallest square input: two stride-2 convs (9 → 5 → 3), then a valid 3x3 (3 → 1).
MIN_INPUT_SIZE = 9
# Dropout before conv1 (on the input) and after the ReLUs of the stride-2 convs.
_DROPOUT = {0: 0.2, 3: 0.5, 6: 0.5}


NORM_KINDS = ("bn", "renorm", "ghost", "group", "none")
"""``norm`` of :func:`all_cnn_c_plan`: the normalization after conv1-conv8. ``bn``: batch
normalization (Ioffe & Szegedy 2015); ``renorm``: Batch Renormalization (Ioffe 2017);
``ghost``: ghost batch normalization (Hoffer et al. 2017); ``group``: GroupNorm (Wu & He
2018); ``none``: no normalization layer. Every kind keeps the layer names ``bn1``-``bn8``
(parameters ``bnK.weight``, ``bnK.bias``), so weights copy across engines and kinds."""

# The keyword arguments each kind's layer takes beyond num_features (None: no default).
_NORM_OPTIONS: dict[str, dict[str, Any]] = {
    "bn": {},
    "renorm": {"rmax": 3.0, "dmax": 5.0, "warmup_steps": 0},
    "ghost": {"virtual_batch_size": None},
    "group": {"num_groups": None},
}


def default_num_groups(num_channels: int) -> int:
    """GroupNorm's default group count for C channels: ``gcd(32, C)``.

    Wu & He (2018) use G = 32 groups; at reduced width C may not be a multiple of 32, so
    the largest divisor of C that divides 32 is taken (C = 24 → 8, C = 48 → 16, C = 96 → 32).

    >>> default_num_groups(96), default_num_groups(24), default_num_groups(48)
    (32, 8, 16)
    """
    return math.gcd(32, num_channels)


BN_FLAVOURS = ("none", "channel", "activation")
"""``bn`` of :func:`post_net_plan` (and :func:`bnlab.manual.post_net`): case a (none),
case b (per channel), case c (per activation)."""

MIN_IMAGE_SIZE = 4  # two 2x2 pools leave a 1x1 map

# (out channels at width 1, kernel) of conv1 ... conv8; conv9 is 1x1 to the classes.
_POST_CONVS = [(96, 3), (96, 3), (192, 3), (192, 3), (192, 3), (192, 3), (192, 3), (192, 1)]
# After the ELU of these convs: BN (when on), then a 2x2 average pool.
_POOL_AFTER = {3: 1, 6: 2}



class LayerSpec(NamedTuple):
    """One layer of a plan: its name, its kind and its constructor arguments.

    kinds: ``dropout`` (p), ``conv`` (in_channels, out_channels, kernel_size, stride,
    padding, bias), ``bn`` (num_features), ``renorm`` (num_features, rmax, dmax,
    warmup_steps), ``ghost`` (num_features, virtual_batch_size), ``group`` (num_features,
    num_groups), ``relu``, ``pool``, ``flatten``.
    """

    name: str
    kind: str
    args: dict[str, Any]


def all_cnn_c_plan(
    bn: bool = True,
    dropout: bool = False,
    width: float = 1.0,
    num_classes: int = 10,
    in_channels: int = 3,
    final_relu: bool = False,
    *,
    norm: str = "bn",
    norm_options: dict[str, Any] | None = None,
) -> list[LayerSpec]:
    """The layers of All-CNN-C in order, shared by both engines (see the module docstring).

    ``final_relu``: a ReLU on the class scores (``relu9``, after conv9), as in the paper's
    Table 2. Off by default: behind it a class whose conv9 map is negative at every position
    has a logit of exactly 0 for every image and gets no gradient (a dead logit), which
    happens at initialization without BN. The softmax needs no ReLU before it.

    ``norm`` (one of :data:`NORM_KINDS`) is the normalization after conv1-conv8 when ``bn``
    is true (``bn=False`` or ``norm="none"``: none). ``norm_options`` are that kind's
    arguments: ``rmax`` (default 3), ``dmax`` (5), ``warmup_steps`` (0) for ``renorm``;
    ``virtual_batch_size`` (required) for ``ghost``; ``num_groups`` for ``group`` (default
    :func:`default_num_groups` of each layer's channels; a given count must divide every
    layer's channels). Options of another kind are ignored, so one dict serves every kind.

    Raises ValueError naming the bad value (an unknown kind, a missing virtual batch size,
    a group count that does not divide a layer's channels).

    >>> [s.name for s in all_cnn_c_plan(bn=False)][:3]
    ['conv1', 'relu1', 'conv2']
    >>> [s.name for s in all_cnn_c_plan(final_relu=True)][-3:]
    ['relu9', 'pool', 'flatten']
    >>> all_cnn_c_plan(width=0.25, norm="group")[1]
    LayerSpec(name='bn1', kind='group', args={'num_features': 24, 'num_groups': 8})
    """
    if norm not in NORM_KINDS:
        raise ValueError(f"norm must be one of {NORM_KINDS}, got {norm!r}")
    bn = bn and norm != "none"
    options = _norm_options(norm, norm_options or {}) if bn else {}
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    if num_classes < 1 or in_channels < 1:
        raise ValueError(
            f"num_classes and in_channels must be positive, got {num_classes}, {in_channels}"
        )
    plan: list[LayerSpec] = []
    channels = in_channels
    drops = 0
    for index, (base, kernel, stride, padding) in enumerate([*_CONVS, (None, 1, 1, 0)], start=1):
        if dropout and index - 1 in _DROPOUT:
            drops += 1
            plan.append(LayerSpec(f"drop{drops}", "dropout", {"p": _DROPOUT[index - 1]}))
        last = base is None
        out = num_classes if last else max(1, round(base * width))
        with_bn = bn and not last
        plan.append(
            LayerSpec(
                f"conv{index}", "conv",
                {"in_channels": channels, "out_channels": out, "kernel_size": kernel,
                 "stride": stride, "padding": padding, "bias": not with_bn},
            )
        )
        if with_bn:
            plan.append(LayerSpec(f"bn{index}", norm, _norm_args(norm, out, options)))
        if not last or final_relu:
            plan.append(LayerSpec(f"relu{index}", "relu", {}))
        channels = out
    plan.append(LayerSpec("pool", "pool", {}))
    plan.append(LayerSpec("flatten", "flatten", {}))
    return plan


def _norm_options(norm: str, given: dict[str, Any]) -> dict[str, Any]:
    """``norm``'s options: its defaults, updated by those given (other kinds' dropped)."""
    options = {**_NORM_OPTIONS[norm],
               **{k: v for k, v in given.items() if k in _NORM_OPTIONS[norm]}}
    if norm == "ghost" and options["virtual_batch_size"] is None:
        raise ValueError("norm 'ghost' needs a virtual_batch_size, got None")
    return options


def _norm_args(norm: str, num_features: int, options: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of one normalization layer of ``num_features`` channels."""
    if norm != "group":
        return {"num_features": num_features, **options}
    groups = options["num_groups"]
    groups = default_num_groups(num_features) if groups is None else groups
    if num_features % groups:
        raise ValueError(f"num_groups must divide every layer's channels: {groups} does not "
                         f"divide {num_features}")
    return {"num_features": num_features, "num_groups": groups}


def post_net_plan(
    bn: str = "none",
    width: float = 1.0,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
) -> list[LayerSpec]:
    """The post net's layers in order, shared by both engines (see the module docstring).

    Kinds and arguments: ``conv`` (in_channels, out_channels, kernel_size, stride,
    padding, bias=False), ``elu`` {}, ``bn`` (num_features, flavour ``"channel"`` or
    ``"activation"``, and for ``"activation"`` the ``shape`` (C, H, W) it normalizes;
    ``num_features`` is C or C·H·W), ``avgpool`` (kernel_size 2), ``gap`` {},
    ``flatten`` {}.

    >>> [s.name for s in post_net_plan(bn="channel")][6:10]
    ['bn1', 'pool1', 'conv4', 'elu4']
    >>> post_net_plan(bn="activation", width=0.125, image_size=8)[6].args
    {'num_features': 1536, 'flavour': 'activation', 'shape': (24, 8, 8)}
    """
    if bn not in BN_FLAVOURS:
        raise ValueError(f"bn must be one of {BN_FLAVOURS}, got {bn!r}")
    if not width > 0:
        raise ValueError(f"width must be positive, got {width}")
    if num_classes < 1 or in_channels < 1:
        raise ValueError(
            f"num_classes and in_channels must be positive, got {num_classes}, {in_channels}"
        )
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"image_size must be at least {MIN_IMAGE_SIZE} (two 2x2 pools), got {image_size}"
        )
    plan: list[LayerSpec] = []
    channels, size = in_channels, image_size
    for index, (base, kernel) in enumerate([*_POST_CONVS, (None, 1)], start=1):
        out = num_classes if base is None else max(1, round(base * width))
        plan.append(
            LayerSpec(
                f"conv{index}", "conv",
                {"in_channels": channels, "out_channels": out, "kernel_size": kernel,
                 "stride": 1, "padding": kernel // 2, "bias": False},
            )
        )
        plan.append(LayerSpec(f"elu{index}", "elu", {}))
        channels = out
        if index in _POOL_AFTER:
            k = _POOL_AFTER[index]
            if bn == "channel":
                plan.append(
                    LayerSpec(f"bn{k}", "bn", {"num_features": out, "flavour": "channel"})
                )
            elif bn == "activation":
                plan.append(
                    LayerSpec(
                        f"bn{k}", "bn",
                        {"num_features": out * size * size, "flavour": "activation",
                         "shape": (out, size, size)},
                    )
                )
            plan.append(LayerSpec(f"pool{k}", "avgpool", {"kernel_size": 2}))
            size //= 2
    plan.append(LayerSpec("gap", "gap", {}))
    plan.append(LayerSpec("flatten", "flatten", {}))
    return plan


def initial_parameters(plan: list[LayerSpec], scheme: str,
                       generator: torch.Generator | None) -> dict[str, Tensor]:
    """The initial conv weights (and biases) of ``plan``, drawn in layer order, float32.

    ``scheme`` (:data:`INIT_SCHEMES`, :func:`bnlab.initializers.init_conv_`): ``"kaiming"``
    (He's N(0, 2/fan_in), zero biases: All-CNN-C's default), ``"torch"`` (PyTorch's
    ``nn.Conv2d`` init: weight, then bias, per conv) or ``"post"`` (the post's N(0, 0.05²)
    per weight; its convs have no bias). Keys are the
    ``state_dict`` keys of both engines (``conv1.weight``, ``conv1.bias``, ...); the other
    parameters (BN's gamma 1, beta 0) and buffers are the constructors' own. ``generator``
    None draws from the global RNG. Raises ValueError for an unknown scheme.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"scheme must be one of {INIT_SCHEMES}, got {scheme!r}")
    params: dict[str, Tensor] = {}
    for spec in plan:
        if spec.kind != "conv":
            continue
        a = spec.args
        weight = torch.empty(a["out_channels"], a["in_channels"], a["kernel_size"],
                             a["kernel_size"])
        bias = torch.empty(a["out_channels"]) if a["bias"] else None
        init_conv_(weight, bias, scheme, generator)
        params[f"{spec.name}.weight"] = weight
        if bias is not None:
            params[f"{spec.name}.bias"] = bias
    return params
