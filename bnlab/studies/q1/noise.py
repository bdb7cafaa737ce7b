"""Q1's noise measurement: how much one image's outputs move with its batch mates (BN) and
with random masks (dropout), in a fixed network in training mode.

BN normalizes with the statistics of whatever batch an image sits in, so one image's logits
depend on its batch mates. Each draw permutes a pool of training images and cuts it into
batches of B, exactly as an epoch does; every image in the pool gets one sample per draw.
With the centred logits ``c = z - mean_k z`` (softmax ignores a shift) of N images, K
classes and D draws:

    noise^2  = mean_{i,k} var_d c[d,i,k]            (unbiased variance over draws)
    signal^2 = mean_{d,i,k} c[d,i,k]^2 - noise^2    (the mean logit's power, unbiased)
    relative std = noise / signal

and the *disagreement*, the chance that two draws give an image different predicted
classes. One forward runs many batches at once: :func:`grouped_train_forward` normalizes
each consecutive group of B images with that group's own statistics (exactly what B
separate forwards do; tested) and never calls the BN modules, so the running statistics
stay untouched. Theory: the batch mean and variance of B values scatter with a standard
deviation ~ 1/sqrt(B), so BN's noise should fall like B^(-1/2) (slope -0.5 on log-log axes).

BN's and dropout's noise on the *same* network (one trained with both): BN's alone (random
batch compositions, dropout off), dropout's alone (one fixed composition, random masks),
and both together, at the training batch size (:func:`noise_sources`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bnlab.models import Dropout
from bnlab.studies.q1.plan import CHUNK_IMAGES

__all__ = ["fit_slope", "grouped_train_forward", "logit_spread", "noise_samples",
           "noise_sources", "noise_sweep"]


def _is_batch_norm(layer: nn.Module) -> bool:
    return isinstance(layer, nn.modules.batchnorm._NormBase)


def _group_batch_norm(x: Tensor, layer: nn.Module, group_size: int) -> Tensor:
    """Training-mode BN of ``x`` (G*B, C, H, W) where each consecutive group of
    B = group_size images is its own batch: per group and channel, over the m = B*H*W
    values,

        mu = mean(x),  var = mean((x - mu)^2)  (biased, as BN normalizes),
        y  = gamma * (x - mu) / sqrt(var + eps) + beta  =  x * scale + shift.

    The values of a group are read as a (G, B*H*W, C) view, which costs no copy when ``x``
    is channels_last (the training layout). The layer's parameters are read; its running
    statistics are neither used nor updated.
    """
    n, channels = x.shape[0], x.shape[1]
    if n % group_size:
        raise ValueError(f"{n} images do not split into groups of {group_size}")
    spatial = x.shape[2:]
    h = x.movedim(1, -1).reshape(n // group_size, -1, channels)    # (G, m, C)
    var, mu = torch.var_mean(h, dim=1, correction=0, keepdim=True)  # (G, 1, C) each
    scale = torch.rsqrt(var + layer.eps)
    if layer.weight is not None:
        scale = scale * layer.weight
    shift = -mu * scale
    if layer.bias is not None:
        shift = shift + layer.bias
    y = torch.addcmul(shift, h, scale)                              # (G, m, C)
    return y.reshape(n, *spatial, channels).movedim(-1, 1)          # (G*B, C, H, W)


def grouped_train_forward(module: nn.Sequential, x: Tensor, group_size: int,
                          dropout: bool = True) -> Tensor:
    """``module`` in training mode on ``x`` (G*B, ...), each consecutive group of
    B = group_size images one BN batch: the outputs G separate forwards of B images would
    give, in one call. BN layers (any ``_NormBase``, ghost BN included) are applied by
    :func:`_group_batch_norm` (their running statistics untouched); every other layer is
    called as it is, in training mode, so dropout draws masks from its generator, unless
    ``dropout`` is False (dropout layers are then skipped: inverted dropout is the
    identity at evaluation). Raises ValueError when B does not divide G*B."""
    module.train()
    h = x
    for layer in module:
        if _is_batch_norm(layer):
            h = _group_batch_norm(h, layer, group_size)
        elif dropout or not isinstance(layer, (Dropout, nn.Dropout)):
            h = layer(h)
    return h


@torch.no_grad()
def noise_samples(module: nn.Sequential, images: Tensor, batch_size: int, draws: int,
                  generator: torch.Generator, chunk: int = CHUNK_IMAGES, *,
                  dropout: bool = True, fixed_batches: bool = False) -> Tensor:
    """Outputs (draws, N, K) of ``module`` in training mode for each of the N ``images``
    (N, C, H, W), each draw in a fresh random batch composition.

    A draw permutes the N images and cuts them into batches of ``batch_size`` (the tail is
    filled up with the permutation's first images, whose second outputs are dropped), as an
    epoch does, so each image's batch mates are a uniform random set of the others. The
    permutations draw from ``generator``; dropout layers draw their masks from their own.
    ``fixed_batches``: one permutation for every draw (only dropout then varies);
    ``dropout=False`` skips the dropout layers (only the batch composition varies).
    Raises ValueError for a batch size outside 1..N.
    """
    n = images.shape[0]
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch size {batch_size} needs 1..{n} images in the pool")
    per_call = max(1, chunk // batch_size) * batch_size
    outputs = []
    fixed = torch.randperm(n, generator=generator).to(images.device) if fixed_batches else None
    for _ in range(draws):
        perm = fixed if fixed is not None else \
            torch.randperm(n, generator=generator).to(images.device)
        padded = torch.cat([perm, perm[: (-n) % batch_size]])
        logits = torch.cat([grouped_train_forward(module, images[padded[i:i + per_call]],
                                                  batch_size, dropout)
                            for i in range(0, len(padded), per_call)])
        draw = torch.empty_like(logits[:n])
        draw[perm] = logits[:n]
        outputs.append(draw)
    return torch.stack(outputs)


def logit_spread(samples: Tensor, center: bool = True) -> dict[str, float]:
    """How much an image's outputs move across draws; ``samples`` is (D draws, N, K).

    ``relative_std`` = noise / signal with ``noise^2`` the mean over images and classes of
    the unbiased variance over draws and ``signal^2`` = mean square - noise^2 (the power
    of the mean output); ``center`` first subtracts each output's mean over the K classes
    (logits are defined up to a shift). ``disagreement`` is the fraction of pairs of draws
    in which an image's argmax differs.
    """
    if samples.ndim != 3 or samples.shape[0] < 2:
        raise ValueError(f"expected (draws >= 2, N, K) samples, got {tuple(samples.shape)}")
    s = samples.double()
    if center:
        s = s - s.mean(dim=-1, keepdim=True)
    noise_power = s.var(dim=0, correction=1).mean()
    signal_power = (s.pow(2).mean() - noise_power).clamp_min(1e-300)
    predicted = samples.argmax(dim=-1)  # (D, N)
    d = samples.shape[0]
    pairs = [(predicted[i] != predicted[j]).double().mean() for i in range(d)
             for j in range(i + 1, d)]
    return {"relative_std": math.sqrt(noise_power / signal_power),
            "noise_std": math.sqrt(noise_power), "signal_rms": math.sqrt(signal_power),
            "disagreement": float(torch.stack(pairs).mean())}


def fit_slope(batch_sizes: Sequence[float], values: Sequence[float]) -> float | None:
    """Least-squares slope of log(value) against log(batch size) (None under 2 points).

    >>> round(fit_slope([4, 16, 64], [1.0, 0.5, 0.25]), 6)
    -0.5
    """
    pairs = [(math.log(b), math.log(v)) for b, v in zip(batch_sizes, values, strict=True)
             if v is not None and v > 0]
    if len(pairs) < 2:
        return None
    mx = sum(x for x, _ in pairs) / len(pairs)
    my = sum(y for _, y in pairs) / len(pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    return sum((x - mx) * (y - my) for x, y in pairs) / sxx if sxx > 0 else None


def noise_sweep(module: nn.Sequential, images: Tensor, batch_sizes: Sequence[int],
                draws: int, seed: int, dropout: bool = True) -> dict[str, list[float]]:
    """Relative std and disagreement (:func:`logit_spread`) of ``module``'s logits across
    random batch compositions at each batch size; the compositions are drawn from a
    generator seeded by ``seed`` and the batch size."""
    out: dict[str, list[float]] = {"relative_std": [], "disagreement": []}
    for b in batch_sizes:
        generator = torch.Generator().manual_seed(seed * 1009 + b)
        spread = logit_spread(noise_samples(module, images, b, draws, generator,
                                            dropout=dropout))
        out["relative_std"].append(spread["relative_std"])
        out["disagreement"].append(spread["disagreement"])
    return out


def noise_sources(module: nn.Sequential, images: Tensor, batch_size: int, draws: int,
                  seed: int, dropout_generator: torch.Generator) -> dict[str, dict[str, float]]:
    """BN's and dropout's noise in one network that has both, at ``batch_size``:
    :func:`logit_spread` of its logits across draws that vary only the batch composition
    (``"bn"``: dropout off), only the dropout masks (``"dropout"``: one fixed composition)
    or both (``"both"``). ``dropout_generator`` is the one the network's dropout layers draw
    from; it is reseeded from ``seed`` first, so the measurement repeats."""
    out = {}
    for source, dropout, fixed in (("bn", False, False), ("dropout", True, True),
                                   ("both", True, False)):
        dropout_generator.manual_seed(10_007 + seed)
        generator = torch.Generator().manual_seed(seed * 1009 + batch_size)
        samples = noise_samples(module, images, batch_size, draws, generator,
                                dropout=dropout, fixed_batches=fixed)
        out[source] = logit_spread(samples)
    return out
