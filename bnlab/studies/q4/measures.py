"""Q4's measurements on one network: layer-input percentiles before and after BN, the
gradient's response to the earlier layers' step, and the smoothness of the loss along the
gradient. Pure functions of a module and a batch; none changes the module it measures.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from bnlab.bnstats import batch_mode
from bnlab.studies.q4.plan import LAYERS, PERCENTILE_SAMPLE, PERCENTILES, SMOOTH_DISTANCES

__all__ = [
    "channel_percentiles",
    "gradient_shift",
    "layer_percentiles",
    "percentile_drift",
    "relu_input_percentiles",
    "smoothness_along_gradient",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


def channel_percentiles(x: Tensor, q: Sequence[float] = PERCENTILES,
                        max_values: int | None = None) -> list[float]:
    """Percentiles ``q`` (0-100) of each channel of ``x`` (N, C, ...), averaged over channels.

    Per channel, over the N * H * W values, with linear interpolation between order
    statistics (``torch.quantile``'s default), computed by sorting so any size works. With
    ``max_values``, over that many of the N * H * W positions only, the same ones at every
    call for a given shape (a seeded choice): sorting all of them dominated the probe's cost.
    """
    channels = x.shape[1]
    values = x.detach().transpose(0, 1).reshape(channels, -1)
    if max_values is not None and values.shape[1] > max_values:
        g = torch.Generator().manual_seed(values.shape[1])
        keep = torch.randperm(values.shape[1], generator=g)[:max_values].to(values.device)
        values = values[:, keep]
    values = values.float().sort(dim=1).values
    n = values.shape[1]
    out = []
    for percent in q:
        position = percent / 100.0 * (n - 1)
        low = math.floor(position)
        frac = position - low
        high = min(low + 1, n - 1)
        per_channel = values[:, low] + (values[:, high] - values[:, low]) * frac
        out.append(per_channel.mean().item())
    return out


@torch.no_grad()
def layer_percentiles(module: nn.Module, images: Tensor, layers: Sequence[int] = LAYERS,
                      q: Sequence[float] = PERCENTILES,
                      max_values: int | None = PERCENTILE_SAMPLE) -> dict[str, dict[str, list]]:
    """Layer i's input distribution on ``images`` (N, 3, 32, 32), measured twice for each i
    in ``layers``: ``"pre_bn"``, the output of ``conv{i}`` (the input of BN where there is
    one), and ``"relu_input"``, the input of ``relu{i}`` (after BN where there is one; the
    same tensor as pre_bn without BN). Each as its channel-averaged percentiles ``q``
    (:func:`channel_percentiles` over at most ``max_values`` fixed positions per channel),
    keyed ``{"pre_bn": {str(i): [p...]}, "relu_input": {...}}``.

    Read by hooks (before the in-place ReLU overwrites its input), with BN in training mode
    (normalizing with the batch's own statistics, as in training) and its running buffers
    restored afterwards (:func:`bnlab.bnstats.batch_mode`).
    """
    found: dict[str, dict[str, list]] = {"pre_bn": {}, "relu_input": {}}

    def keep(where: str, key: str, x: Tensor) -> None:
        found[where][key] = channel_percentiles(x, q, max_values)

    handles = []
    for i in layers:
        key = str(i)
        handles.append(getattr(module, f"conv{i}").register_forward_hook(
            lambda _m, _args, out, key=key: keep("pre_bn", key, out)))
        handles.append(getattr(module, f"relu{i}").register_forward_pre_hook(
            lambda _m, args, key=key: keep("relu_input", key, args[0])))
    try:
        with batch_mode(module):
            module(images)
    finally:
        for handle in handles:
            handle.remove()
    return found


def relu_input_percentiles(module: nn.Module, images: Tensor, layers: Sequence[int] = LAYERS,
                           q: Sequence[float] = PERCENTILES,
                           max_values: int | None = PERCENTILE_SAMPLE) -> dict[str, list[float]]:
    """The ``"relu_input"`` part of :func:`layer_percentiles`: the input of ``relu{i}``."""
    return layer_percentiles(module, images, layers, q, max_values)["relu_input"]


def _layer_of(parameter_name: str) -> int | None:
    """``conv5.weight`` and ``bn5.bias`` belong to layer 5; None for names without a number."""
    match = re.match(r"^[A-Za-z_]+(\d+)\.", parameter_name)
    return int(match.group(1)) if match else None


def gradient_shift(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    layers: Sequence[int] = LAYERS,
    *,
    loss_fn: LossFn = TF.cross_entropy,
) -> dict[str, dict[str, float]]:
    """Santurkar et al.'s internal covariate shift of ``conv{i}.weight`` for i in ``layers``
    (Santurkar, Tsipras, Ilyas & Madry 2018, Definition 2.1).

    With W_1..W_k the layers' parameters at step t and (x, y) the batch::

        G  = grad_{W_i} L(W_1,      ..., W_{i-1},      W_i, ..., W_k; x, y)
        G' = grad_{W_i} L(W_1 + d_1, ..., W_{i-1} + d_{i-1}, W_i, ..., W_k; x, y)

    where d_j is the step ``optimizer`` takes for layer j from the gradient on (x, y) (its
    state -- momentum buffers, Adam's moments, the step count, the learning rate -- is
    copied, so d_j is the exact update). A parameter belongs to layer j when its name is
    ``<letters>j.`` (``conv3.weight``, ``bn3.bias``). BN is in training mode, dropout off.
    Returns ``{str(i): {"rel_diff": ||G - G'|| / ||G||, "cosine": cos(G, G')}}``;
    ``module`` and ``optimizer`` are left untouched (the work is done on deep copies).
    """
    twin, twin_optimizer = copy.deepcopy((module, optimizer))
    params = dict(twin.named_parameters())
    weights = {i: params[f"conv{i}.weight"] for i in layers}
    out: dict[str, dict[str, float]] = {}
    with batch_mode(twin):
        for p in params.values():
            p.grad = None
        loss_fn(twin(x), y).backward()
        before_grad = {i: w.grad.detach().clone() for i, w in weights.items()}
        before = {n: p.detach().clone() for n, p in params.items()}
        twin_optimizer.step()
        after = {n: p.detach().clone() for n, p in params.items()}
        for i in layers:
            with torch.no_grad():
                for n, p in params.items():
                    layer = _layer_of(n)
                    p.copy_(after[n] if layer is not None and layer < i else before[n])
            for p in params.values():
                p.grad = None
                p.requires_grad_(p is weights[i])  # autograd stops at layer i
            loss_fn(twin(x), y).backward()
            g, g2 = before_grad[i].double().flatten(), weights[i].grad.double().flatten()
            norm, norm2 = g.norm().item(), g2.norm().item()
            out[str(i)] = {
                "rel_diff": (g - g2).norm().item() / norm if norm > 0 else float("nan"),
                "cosine": (g @ g2).item() / (norm * norm2) if norm * norm2 > 0 else float("nan"),
            }
    return out


def smoothness_along_gradient(
    module: nn.Module,
    x: Tensor,
    y: Tensor,
    lr: float,
    distances: Sequence[float] = SMOOTH_DISTANCES,
    *,
    loss_fn: LossFn = TF.cross_entropy,
) -> dict[str, Any]:
    """How the loss and its gradient vary over a step along the gradient (Santurkar et al.
    2018, Sec. 3.1 and Fig. 4: "variation of the loss", "gradient predictiveness",
    "effective beta-smoothness").

    At the weights w (every trainable parameter), on the batch (x, y) with BN in training
    mode, g = grad L(w); for eta = k * ``lr``, k in ``distances`` (multiples of the
    learning rate: the step plain gradient descent would take, and shorter and longer ones)::

        loss_range = max_eta L(w - eta g) - min_eta L(w - eta g)    (eta = 0 included; nats)
        grad_change = max_eta ||grad L(w - eta g) - g||              (l2, loss units / weight)
        beta = max_eta ||grad L(w - eta g) - g|| / (eta ||g||)      (the gradient's Lipschitz
                                                                      constant along g)

    plus ``grad_change_rel`` = grad_change / ||g|| and ``grad_norm`` = ||g||; lower is
    smoother. ``module`` is left untouched (a deep copy is moved). Raises ValueError for a
    non-positive ``lr`` or distance.
    """
    if not lr > 0 or not distances or min(distances) <= 0:
        raise ValueError(f"lr and distances must be positive, got lr {lr}, distances "
                         f"{list(distances)}")
    twin = copy.deepcopy(module)
    params = [p for p in twin.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    with batch_mode(twin):
        loss = loss_fn(twin(x), y)
        grad = [g.detach() for g in torch.autograd.grad(loss, params)]
        grad_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grad))
        losses, changes, betas = [loss.item()], [], []
        for k in distances:
            eta = k * lr
            with torch.no_grad():
                for p, p0, g in zip(params, start, grad, strict=True):
                    p.copy_(p0 - eta * g)
            moved = loss_fn(twin(x), y)
            new_grad = torch.autograd.grad(moved, params)
            change = math.sqrt(sum(float((a - b).double().pow(2).sum())
                                   for a, b in zip(new_grad, grad, strict=True)))
            losses.append(moved.item())
            changes.append(change)
            betas.append(change / (eta * grad_norm) if grad_norm > 0 else float("nan"))
    finite = [v for v in losses if math.isfinite(v)]
    return {
        "loss_range": max(finite) - min(finite) if len(finite) == len(losses) else float("inf"),
        "grad_change": max(changes),
        "grad_change_rel": max(changes) / grad_norm if grad_norm > 0 else float("nan"),
        "beta": max(betas),
        "grad_norm": grad_norm,
    }


def percentile_drift(series: Sequence[Sequence[float]]) -> float:
    """How far the percentiles move: ``max_t max_j |p_j(t) - p_j(0)|`` over the mean spread
    ``p_last(t) - p_first(t)`` (the 15-85 range). 0 for a still distribution; 1 when it
    moves by its own width.

    >>> percentile_drift([[-1.0, 0.0, 1.0], [0.0, 1.0, 2.0]])
    0.5
    """
    p = torch.tensor(series, dtype=torch.float64)
    spread = (p[:, -1] - p[:, 0]).mean().item()
    move = (p - p[0]).abs().max().item()
    return move / spread if spread > 0 else float("nan")
