"""The BN-statistics toolkit: what the studies and reports do to a trained network's BN.

Works on any ``nn.Module`` whose BN layers derive from ``torch.nn.modules.batchnorm._NormBase``
(``torch.nn.BatchNorm*d`` and ``bnlab.nn.BatchNorm*d`` alike):

| function                 | what it does                                                   |
|--------------------------|----------------------------------------------------------------|
| :func:`bn_modules`       | the BN layers in forward order                                 |
| :func:`preserved_bn_state` | restore every BN buffer, momentum and module mode on exit    |
| :func:`batch_mode`       | BN on batch statistics, the rest in eval mode, all restored    |
| :func:`accuracy`         | accuracy with the running or the batch statistics              |
| :func:`recompute_cumulative` | running stats := the cumulative average over batches    |
| :func:`population_statistics` | the same on a copy, returned (Ioffe & Szegedy, Algorithm 2) |
| :func:`recompute_exact`  | running stats := the exact population statistics, layer by layer |
| :func:`stats_mismatch`   | how far two networks' running statistics are apart (log scale) |
| :func:`statistics_error` | how far estimated statistics are from the population's (relative) |

The last two measure different things on purpose: Q3 compares networks whose variances can
differ by orders of magnitude (a log ratio), Q5 follows an estimate converging to its target
(a relative error). Both express the mean's error in standard deviations.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from bnlab.functional import batch_norm_stats

__all__ = [
    "Stats",
    "accuracy",
    "batch_mode",
    "bn_modules",
    "population_statistics",
    "preserved_bn_state",
    "recompute_cumulative",
    "recompute_exact",
    "statistics_error",
    "stats_mismatch",
]

Stats = list[tuple[Tensor, Tensor]]  # per BN layer, in order: (mean (C,), var (C,))


def bn_modules(module: nn.Module) -> list[_NormBase]:
    """The BN layers of ``module`` in forward order (``torch.nn`` and ``bnlab.nn`` alike)."""
    return [m for m in module.modules() if isinstance(m, _NormBase)]


@contextlib.contextmanager
def preserved_bn_state(module: nn.Module) -> Iterator[None]:
    """Restore every BN buffer (running mean/var, batch count), momentum, and every
    module's train/eval mode on exit, whatever ran inside."""
    modes = [(m, m.training) for m in module.modules()]
    saved = [(m, m.momentum, {name: b.clone() for name, b in m.named_buffers(recurse=False)})
             for m in bn_modules(module)]
    try:
        yield
    finally:
        for m, momentum, buffers in saved:
            m.momentum = momentum
            for name, value in buffers.items():
                getattr(m, name).copy_(value)
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def batch_mode(module: nn.Module) -> Iterator[None]:
    """BN normalizes with each batch's own statistics inside, everything else is in eval
    mode (dropout off); every BN buffer, momentum and module mode is restored on exit.

    The BN layers are in training mode, so they also update their running buffers: those
    updates are undone on exit (:func:`preserved_bn_state`).
    """
    with preserved_bn_state(module):
        module.eval()
        for m in bn_modules(module):
            m.train()
        yield


@torch.no_grad()
def accuracy(module: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
             statistics: str = "running") -> float:
    """Fraction of correct predictions over ``batches`` of (images, labels).

    ``statistics="running"``: eval mode, BN normalizes with its running averages.
    ``statistics="batch"``: every other module in eval mode, the BN modules in training
    mode, so each batch is normalized with its own mean and biased variance; the running
    buffers this updates are restored afterwards (:func:`batch_mode`).
    """
    if statistics not in ("running", "batch"):
        raise ValueError(f"statistics must be 'running' or 'batch', got {statistics!r}")
    correct = total = 0
    with batch_mode(module) if statistics == "batch" else preserved_bn_state(module):
        if statistics == "running":
            module.eval()
        for x, y in batches:
            correct += int((module(x).argmax(1) == y).sum())
            total += y.shape[0]
    if total == 0:
        raise ValueError("accuracy of no images: the batches were empty")
    return correct / total


@torch.no_grad()
def recompute_cumulative(module: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> int:
    """Replace the running statistics by their cumulative average over ``batches``.

    PyTorch's own recipe: ``momentum=None`` (then ``running = running + (x - running) / n``
    after the n-th batch) and ``reset_running_stats()`` on every BN module, one forward per
    batch with the BN modules in training mode (the rest in eval mode), no gradients.
    Afterwards ``running_mean`` = the mean of the batch means (the exact mean when the
    batches are equal in size) and ``running_var`` = the mean of the *unbiased* batch
    variances. Momenta and modes are restored; returns the number of batches.
    """
    layers = bn_modules(module)
    modes = [(m, m.training) for m in module.modules()]
    momenta = [m.momentum for m in layers]
    count = 0
    try:
        module.eval()
        for m in layers:
            m.momentum = None
            m.reset_running_stats()
            m.train()
        for x, _ in batches:
            module(x)
            count += 1
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        for m, training in modes:
            m.training = training
    return count


class _Moments:
    """Per-channel count, mean and sum of squared deviations (M2) in float64, merged chunk
    by chunk with Chan, Golub & LeVeque's update:

        delta = mean_b - mean_a,  n = n_a + n_b
        mean  = mean_a + delta * n_b / n
        M2    = M2_a + M2_b + delta^2 * n_a * n_b / n
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, x: Tensor) -> None:
        """``x``: (N, C, *S); every value of channel c is one sample of channel c. The chunk's
        own mean and biased variance come from :func:`bnlab.functional.batch_norm_stats`
        (corrected two-pass, float64 sums; 4x faster than ``torch.var_mean`` on a
        channels-last CPU tensor), the merge is in float64."""
        n_b = x.numel() // x.shape[1]
        _, mean_b, var_b = batch_norm_stats(x)
        mean_b, m2_b = mean_b.double(), var_b.double() * n_b
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.square() * (self.n * n_b / n)
        self.n = n

    def mean_var(self) -> tuple[Tensor, Tensor]:
        """The mean and the biased (population) variance, (C,) float64."""
        if self.mean is None:
            raise ValueError("no values were seen")
        return self.mean, self.m2 / self.n


@torch.no_grad()
def recompute_exact(module: nn.Module,
                    batches: Callable[[], Iterable[tuple[Tensor, Tensor]]], *,
                    cache_limit_bytes: int = 2 << 30) -> int:
    """Set each BN layer's running mean/variance to the exact population statistics of its
    input over the images of ``batches()``, layer by layer.

    For layer k = 1..L, with layers 1..k-1 in eval mode on their (already exact) statistics,
    layer k's input mean and biased variance are accumulated over every image
    (:class:`_Moments`; any batch sizes) and written to its running buffers. So
    ``running_var`` becomes the variance of the values the eval-mode network gives layer k,
    over the whole set. ``num_batches_tracked`` is left as it was; modes are restored.

    Two ways, same numbers: an ``nn.Sequential`` whose BN layers are its children keeps
    every chunk's activation at the current layer and moves it one segment on (one forward
    in all), when those activations fit in ``cache_limit_bytes``; otherwise each layer gets
    a forward of the whole set, cut short at that layer by a hook (L forwards of growing
    depth). Returns the number of BN layers set.
    """
    layers = bn_modules(module)
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        if _fits_cache(module, layers, batches, cache_limit_bytes):
            _exact_by_segments(module, batches)
        else:
            _exact_by_prefixes(module, layers, batches)
    finally:
        for m, training in modes:
            m.training = training
    return len(layers)


def _set_running(layer: _NormBase, moments: _Moments) -> None:
    mean, var = moments.mean_var()
    layer.running_mean.copy_(mean)
    layer.running_var.copy_(var)


def _fits_cache(module: nn.Module, layers: list[_NormBase],
                batches: Callable[[], Iterable[tuple[Tensor, Tensor]]], limit: int) -> bool:
    """Is ``module`` a Sequential with its BN layers as children, and would the largest BN
    input of all images fit in ``limit`` bytes? (One probe forward of the first batch.)"""
    if not isinstance(module, nn.Sequential) or \
            [m for m in module if isinstance(m, _NormBase)] != layers or not layers:
        return False
    sizes: list[int] = []
    images = 0
    for x, _ in batches():
        if not sizes:
            handles = [m.register_forward_pre_hook(
                lambda _m, args: sizes.append(args[0][0].numel() * args[0].element_size()))
                for m in layers]
            try:
                module(x)
            finally:
                for h in handles:
                    h.remove()
        images += x.shape[0]
    per_image = max(sizes, default=0)
    return images * per_image <= limit


def _exact_by_segments(module: nn.Sequential,
                       batches: Callable[[], Iterable[tuple[Tensor, Tensor]]]) -> None:
    children = list(module)
    positions = [i for i, m in enumerate(children) if isinstance(m, _NormBase)]
    cache = [x for x, _ in batches()]
    start = 0
    for position in positions:
        moments = _Moments()
        for i, x in enumerate(cache):
            for child in children[start:position]:  # BN k-1 (exact), ReLU, conv ...
                x = child(x)
            cache[i] = x
            moments.add(x)
        _set_running(children[position], moments)
        start = position


class _Stop(Exception):
    """Raised by a hook to end a forward once the layer of interest has seen its input."""


def _exact_by_prefixes(module: nn.Module, layers: list[_NormBase],
                       batches: Callable[[], Iterable[tuple[Tensor, Tensor]]]) -> None:
    for layer in layers:
        moments = _Moments()

        def hook(_module: nn.Module, args: tuple[Tensor, ...],
                 moments: _Moments = moments) -> None:
            moments.add(args[0])
            raise _Stop

        handle = layer.register_forward_pre_hook(hook)
        try:
            for x, _ in batches():
                with contextlib.suppress(_Stop):
                    module(x)
        finally:
            handle.remove()
        _set_running(layer, moments)


def stats_mismatch(reference: nn.Module, other: nn.Module) -> dict[str, float]:
    """How far ``other``'s running statistics are from ``reference``'s, averaged over all
    channels of all BN layers: ``mean_shift`` = mean |mu_o - mu_r| / sqrt(var_r + eps)
    (in standard deviations) and ``log_var_ratio`` = mean |ln((var_o + eps)/(var_r + eps))|."""
    shifts, ratios = [], []
    for r, o in zip(bn_modules(reference), bn_modules(other), strict=True):
        var_r = r.running_var.double() + r.eps
        var_o = o.running_var.double() + o.eps
        shifts.append(((o.running_mean.double() - r.running_mean.double()).abs()
                       / var_r.sqrt()).flatten())
        ratios.append((var_o / var_r).log().abs().flatten())
    if not shifts:
        return {"mean_shift": math.nan, "log_var_ratio": math.nan}
    return {"mean_shift": float(torch.cat(shifts).mean()),
            "log_var_ratio": float(torch.cat(ratios).mean())}


@torch.no_grad()
def population_statistics(module: nn.Module, batches: Sequence[Tensor]) -> Stats:
    """What BN's running statistics estimate, for the current weights: Ioffe & Szegedy's
    Algorithm 2, ``E[x] = E_B[mu_B]`` and ``Var[x] = m / (m - 1) E_B[sigma_B^2]`` over
    ``batches``, each BN layer's input computed as in training (earlier BN layers normalize
    with the batch's statistics). Done on a copy whose BN layers keep a cumulative average
    (momentum None) from reset buffers; dropout off. Returns float64 (mean, var) per layer.
    """
    twin = copy.deepcopy(module)
    recompute_cumulative(twin, ((x, None) for x in batches))
    return [(bn.running_mean.double(), bn.running_var.double()) for bn in bn_modules(twin)]


def statistics_error(estimate: Stats, population: Stats) -> tuple[float, float]:
    """How far running statistics are from the population's, averaged over channels and
    layers: the mean's error in units of the population standard deviation,
    ``|r_mean - mean| / sqrt(var)``, and the variance's relative error ``|r_var - var| / var``.
    """
    mean_errors, var_errors = [], []
    for (r_mean, r_var), (p_mean, p_var) in zip(estimate, population, strict=True):
        p_var = p_var.double().clamp_min(1e-12)
        mean_errors.append(((r_mean.double() - p_mean.double()).abs() / p_var.sqrt()).mean())
        var_errors.append(((r_var.double() - p_var).abs() / p_var).mean())
    return torch.stack(mean_errors).mean().item(), torch.stack(var_errors).mean().item()
