"""The manual engine: back propagation through a whole network with no autograd.

One idea per module (the post's network for this engine is :mod:`bnlab.post.manual_net`):

- :mod:`bnlab.manual.layers`  — layers with ``forward(x, training)`` / ``backward(dy)``
- :mod:`bnlab.manual.loss`    — softmax cross-entropy and its gradient
- :mod:`bnlab.manual.network` — ``Sequential`` of named layers, ``train_step``
- :mod:`bnlab.manual.allcnn`  — All-CNN-C, built from the plan the autograd twin shares

Usage::

    >>> import torch
    >>> from bnlab.manual import all_cnn_c, train_step
    >>> from bnlab.optim import Adam
    >>> net = all_cnn_c(bn=True, width=0.125)
    >>> opt = Adam(net.parameters(), lr=1e-3, amsgrad=True)
    >>> images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    >>> loss, logits = train_step(net, opt, images, labels)
    >>> loss.grad_fn is None
    True
"""

from bnlab.manual.allcnn import MIN_INPUT_SIZE, LayerSpec, all_cnn_c, all_cnn_c_plan
from bnlab.manual.layers import (
    ELU,
    AvgPool2d,
    BatchNorm2d,
    Conv2d,
    Dropout,
    Flatten,
    GlobalAvgPool2d,
    Layer,
    PerActivationBatchNorm,
    ReLU,
    dropout_mask,
    set_compute_dtype,
)
from bnlab.manual.loss import softmax_cross_entropy
from bnlab.manual.network import Sequential, train_step

__all__ = [
    "ELU",
    "MIN_INPUT_SIZE",
    "AvgPool2d",
    "BatchNorm2d",
    "Conv2d",
    "Dropout",
    "Flatten",
    "GlobalAvgPool2d",
    "Layer",
    "LayerSpec",
    "PerActivationBatchNorm",
    "ReLU",
    "Sequential",
    "all_cnn_c",
    "all_cnn_c_plan",
    "dropout_mask",
    "set_compute_dtype",
    "softmax_cross_entropy",
    "train_step",
]

# BN's variants (bnlab.manual.norms), for ``from bnlab.manual import ...``.
from bnlab.manual.norms import BatchRenorm2d, GhostBatchNorm2d, GroupNorm

__all__ += ["BatchRenorm2d", "GhostBatchNorm2d", "GroupNorm"]
