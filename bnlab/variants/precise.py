r"""Population statistics ("precise BN", Wu & Johnson 2021, section 4): exact running stats.

BN's running averages are an exponential moving average over the last ~1/momentum batches
of a network whose weights kept changing; at test time they can be far from the statistics
of the final network's activations. Precise BN freezes the weights and recomputes every
BN layer's statistics over many batches. bnlab combines the per-batch statistics *exactly*
(Chan, Golub & LeVeque 1983's pooled formula), not as a moving average: with batch b
contributing m_b values per channel of mean mu_b and biased variance var_b,

.. math::
    M = \sum_b m_b, \qquad \mu = \frac{1}{M}\sum_b m_b \mu_b, \qquad
    \sigma^2 = \frac{1}{M}\sum_b m_b\big(\mathrm{var}_b + (\mu_b - \mu)^2\big),

and ``running_var`` receives BN's *unbiased* convention ``sigma^2 * M / (M - 1)``: over
batches that cover a data set once, the result is that data set's per-channel mean and
unbiased variance. (Batch Renorm's layers, whose running statistics average the *biased*
standard deviation, get the same values; the two conventions differ by the factor
``M / (M - 1)``, negligible over the many values precise BN averages.)
(fvcore's ``update_bn_stats`` and ``torch.optim.swa_utils.update_bn``
instead average the per-batch *unbiased* variances, which omits the spread of the batch
means, the term ``(mu_b - mu)^2`` above.)

Like those tools, the statistics of a layer are those of its input in the model's
*training-mode* forward (each batch normalized by its own statistics in the layers
before it; dropout active), with gradients off. ``num_batches_tracked`` and every other
buffer (InstanceNorm's running statistics, say) are left as they were, and so is the
model's train/eval mode.

Usage::

    >>> import torch
    >>> from bnlab.variants.precise import precise_bn
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    >>> batches = [torch.randn(8, 3, 6, 6) for _ in range(5)]
    >>> precise_bn(model, batches, num_batches=3)  # batches used
    3
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm

from bnlab import functional as F

__all__ = ["PooledStats", "precise_bn"]


class PooledStats:
    """Per-channel statistics of many batches, combined exactly (Chan et al. 1983).

    ``add(x)`` takes a batch (N, C, *S) (or a feature view of one); ``mean`` and
    ``var(unbiased=True)`` are (C,) float64 over every value seen so far.

    >>> s = PooledStats()
    >>> s.add(torch.tensor([[1.0], [2.0]])); s.add(torch.tensor([[3.0], [6.0]]))
    >>> s.mean.item(), s.var().item()  # of [1, 2, 3, 6]: mean 3, unbiased variance 14/3
    (3.0, 4.666666666666667)
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self._m2: Tensor | None = None  # sum of squared deviations from self.mean

    def add(self, x: Tensor) -> None:
        """Merge one batch's mean and biased variance (from ``batch_norm_stats``)."""
        m = x.numel() // x.shape[1]
        if m == 0:
            return
        _, mean_b, var_b = F.batch_norm_stats(x.detach())
        mean_b, var_b = mean_b.double(), var_b.double()
        if self.mean is None or self._m2 is None:
            self.count, self.mean, self._m2 = m, mean_b, var_b * m
            return
        total = self.count + m
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (m / total)
        self._m2 = self._m2 + var_b * m + delta.square() * (self.count * m / total)
        self.count = total

    def var(self, unbiased: bool = True) -> Tensor:
        """The pooled variance: ``sum of squares / (M - 1)`` (BN's convention) or ``/ M``."""
        if self._m2 is None:
            raise ValueError("PooledStats.var: no values were added")
        denominator = self.count - 1 if unbiased and self.count > 1 else self.count
        return self._m2 / denominator


def _is_batch_norm(module: Any) -> bool:
    """A BN layer of either engine with running statistics (not InstanceNorm)."""
    if isinstance(module, torch.nn.Module):
        return (isinstance(module, _NormBase) and not isinstance(module, _InstanceNorm)
                and getattr(module, "running_mean", None) is not None
                and getattr(module, "running_var", None) is not None)
    buffers = getattr(module, "buffers", None)
    return isinstance(buffers, dict) and "running_mean" in buffers and "running_var" in buffers


def _batch_norm_layers(model: Any) -> list[tuple[str, Any]]:
    if isinstance(model, torch.nn.Module):
        return [(name, m) for name, m in model.named_modules() if _is_batch_norm(m)]
    return [(name, layer) for name, layer in model if _is_batch_norm(layer)]  # manual engine


def precise_bn(
    model: Any,
    batches: Iterable[Any],
    num_batches: int | None = None,
    *,
    device: torch.device | str | None = None,
) -> int:
    """Set every BN layer's running statistics to the exact statistics over ``batches``.

    ``model``: a ``torch.nn.Module`` holding ``torch.nn.BatchNorm*d``, ``bnlab.nn``'s BN
    layers or its variants (anything built on ``_NormBase`` with running statistics, except
    InstanceNorm), or a manual-engine network (:class:`bnlab.manual.Sequential`, whose
    layers with ``running_mean``/``running_var`` buffers count as BN). ``batches``: an
    iterable of input tensors (N, ...), or of tuples/lists whose first element is the input
    (a data loader's ``(images, labels)``); ``num_batches`` stops after that many (None:
    all); ``device`` moves each input first. For each layer, ``running_mean`` becomes the
    per-channel mean and ``running_var`` the unbiased variance (``M / (M - 1)``) over all the
    values its input took, in the running buffers' dtype; see the module docstring for the
    formula. Returns the number of batches used.

    Raises ``ValueError`` when ``num_batches`` is not positive or no batch was given.
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"precise_bn: num_batches must be positive or None, got {num_batches}")
    layers = _batch_norm_layers(model)
    if not layers:
        return 0
    stats = {name: PooledStats() for name, _ in layers}
    is_module = isinstance(model, torch.nn.Module)
    buffers = _all_buffers(model)
    saved = {k: v.clone() for k, v in buffers.items()}
    restore: list[Callable[[], None]] = []
    for name, layer in layers:
        restore.append(_observe(layer, stats[name]))
    was_training = model.training
    used = 0
    try:
        model.train()
        with torch.no_grad():
            for batch in batches:
                if num_batches is not None and used >= num_batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                if device is not None:
                    x = x.to(device)
                if is_module:
                    model(x)
                else:
                    model.forward(x, training=True)
                    model.clear()
                used += 1
    finally:
        for undo in restore:
            undo()
        for key, value in saved.items():  # the forward passes moved them; put them back
            buffers[key].copy_(value)
        model.train(was_training)
    if used == 0:
        raise ValueError("precise_bn: no batches were given")
    for name, layer in layers:
        buffers = _buffers(layer)
        if stats[name].mean is None:
            continue
        buffers["running_mean"].copy_(stats[name].mean)
        buffers["running_var"].copy_(stats[name].var(unbiased=True))
    return used


def _buffers(layer: Any) -> dict[str, Tensor]:
    if isinstance(layer, torch.nn.Module):
        return {k: v for k, v in layer.named_buffers(recurse=False) if v is not None}
    return layer.buffers


def _all_buffers(model: Any) -> dict[str, Tensor]:
    """Every buffer of the model (of either engine), by name."""
    if isinstance(model, torch.nn.Module):
        return dict(model.named_buffers())
    return model.named_buffers()


def _observe(layer: Any, stats: PooledStats) -> Callable[[], None]:
    """Record the statistics of ``layer``'s input on each call; returns the undo."""
    if isinstance(layer, torch.nn.Module):
        handle = layer.register_forward_pre_hook(lambda _, args: stats.add(args[0]))
        return handle.remove
    features = getattr(layer, "_features", lambda x: x)  # per-activation BN's view
    original = layer.forward

    def forward(x: Tensor, training: bool) -> Tensor:
        stats.add(features(x))
        return original(x, training)

    layer.forward = forward
    return lambda: delattr(layer, "forward")
