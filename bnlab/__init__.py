"""bnlab: batch normalization, understood.

A hand-derived batch normalization (forward and backward) with exactly the semantics of
``torch.nn.BatchNorm*d``, a manual back-propagation engine, and experiments on CIFAR-10.

    >>> import torch, bnlab
    >>> bn = bnlab.nn.BatchNorm2d(8)
    >>> y = bn(torch.randn(4, 8, 5, 5))
"""

from bnlab import functional, nn

__all__ = ["functional", "nn"]
__version__ = "0.1.0"
