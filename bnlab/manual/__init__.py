"""The manual engine: back propagation through a whole network with no autograd.

One idea per module:

- :mod:`bnlab.manual.layers`  — layers with ``forward(x, training)`` / ``backward(dy)``
- :mod:`bnlab.manual.loss`    — softmax cross-entropy and its gradient
- :mod:`bnlab.manual.network` — ``Sequential`` of named layers, ``train_step``
- :mod:`bnlab.manual.allcnn`  — All-CNN-C, built from the plan the autograd twin shares
- :mod:`bnlab.manual.postnet` — the blog post's network, with case c's gradient errors
- :mod:`bnlab.manual.check`   — the whole-network comparison against autograd

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
from bnlab.manual.postnet import GRADIENT_ERRORS, post_init_, post_net, post_net_plan

__all__ = [
    "ELU",
    "GRADIENT_ERRORS",
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
    "post_init_",
    "post_net",
    "post_net_plan",
    "set_compute_dtype",
    "softmax_cross_entropy",
    "train_step",
]
