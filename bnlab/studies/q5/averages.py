"""Q5's exponentially weighted averages: the series, the forgetting, the experiment.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from bnlab.studies.q5.plan import (
    _SERIES_SEED,
    BETAS,
    REPLICATES,
    SERIES_MEAN,
    SERIES_NOISE,
    THRESHOLDS,
)

# ---- the averages themselves -------------------------------------------------------------

def ewa(series: Tensor, beta: float, *, bias_correction: bool = False,
        initial: float = 0.0) -> Tensor:
    """The exponentially weighted average of ``series`` (..., T) along its last axis.

    ``v_t = beta v_{t-1} + (1 - beta) x_t`` from ``v_0 = initial``; with
    ``bias_correction``, ``(v_t - beta^t v_0) / (1 - beta^t)``. Returns v_1..v_T.

    >>> ewa(torch.tensor([1.0, 1.0]), 0.5).tolist()
    [0.5, 0.75]
    >>> ewa(torch.tensor([1.0, 1.0]), 0.5, bias_correction=True).tolist()
    [1.0, 1.0]
    """
    out = torch.empty_like(series)
    v = torch.full_like(series[..., 0], initial)
    for t in range(series.shape[-1]):
        v = beta * v + (1 - beta) * series[..., t]
        out[..., t] = v
    if bias_correction:
        weight = beta ** torch.arange(1, series.shape[-1] + 1, dtype=series.dtype)
        out = (out - weight * initial) / (1 - weight)
    return out


def steps_to_forget(beta: float, threshold: float) -> int:
    """The first t with ``beta^t < threshold``: when the start value's weight falls below it.

    >>> steps_to_forget(0.9, 1 / math.e), steps_to_forget(0.9, 0.01)
    (10, 44)
    """
    if not 0 < beta < 1 or not 0 < threshold < 1:
        raise ValueError(f"need 0 < beta < 1 and 0 < threshold < 1, got {beta}, {threshold}")
    t = max(0, math.ceil(math.log(threshold) / math.log(beta)))
    while beta**t >= threshold:
        t += 1
    while t > 0 and beta ** (t - 1) < threshold:
        t -= 1
    return t


def settle_step(error: Sequence[float] | Tensor, tolerance: float) -> int | None:
    """The first step (1-based) from which ``error`` stays below ``tolerance``; None when its
    last value is not below it.

    >>> settle_step([0.5, 0.05, 0.2, 0.05, 0.01], 0.1)
    4
    """
    values = torch.as_tensor(error, dtype=torch.float64)
    above = (values >= tolerance).nonzero()
    if len(above) == 0:
        return 1
    last = int(above[-1])
    return None if last == len(values) - 1 else last + 2


def ewa_experiment(
    betas: Sequence[float] = BETAS,
    *,
    mean: float = SERIES_MEAN,
    noise: float = SERIES_NOISE,
    replicates: int = REPLICATES,
    steps: int | None = None,
    thresholds: Sequence[float] = THRESHOLDS,
    seed: int = _SERIES_SEED,
) -> dict[str, Any]:
    """Average ``replicates`` seeded series ``x_t = mean + noise * N(0, 1)`` with each beta,
    from ``v_0 = 0``, raw and bias-corrected.

    The start-up error is ``|mean over realizations of v_t - mean| / |mean|`` (the average's
    bias, with the noise averaged away); its settle steps for each threshold are measured
    beside the computed :func:`steps_to_forget`. The leftover noise is the standard
    deviation of v_T over realizations, beside ``noise * sqrt((1 - beta) / (1 + beta))``.
    ``steps`` defaults to 1.5 times the slowest beta's steps to forget 1%. Curves are kept
    at about 200 log-spaced steps; the first realization is kept for the figure.
    """
    if steps is None:
        steps = math.ceil(1.5 * max(steps_to_forget(b, min(thresholds)) for b in betas))
    g = torch.Generator().manual_seed(seed)
    b = torch.tensor(betas, dtype=torch.float64)[:, None]
    v = torch.zeros(len(betas), replicates, dtype=torch.float64)
    ensemble = torch.empty(len(betas), steps, dtype=torch.float64)
    one_raw = torch.empty(len(betas), steps, dtype=torch.float64)
    one_x = torch.empty(steps, dtype=torch.float64)
    chunk = 256  # noise drawn for this many steps at once
    for start in range(0, steps, chunk):
        xs = torch.randn(min(chunk, steps - start), replicates, generator=g  # float32: 4x
                         ).double().mul_(noise).add_(mean)                      # faster
        one_x[start:start + len(xs)] = xs[:, 0]
        for t, x in enumerate(xs, start):
            v.mul_(b).add_(x * (1 - b))
            ensemble[:, t] = v.mean(1)
            one_raw[:, t] = v[:, 0]
    weight = b ** torch.arange(1, steps + 1, dtype=torch.float64)
    unbiased, one_corrected = ensemble / (1 - weight), one_raw / (1 - weight)
    error = {"raw": (ensemble - mean).abs() / abs(mean),
             "corrected": (unbiased - mean).abs() / abs(mean)}
    keep = sorted({min(steps, max(1, round(s)))
                   for s in torch.logspace(0, math.log10(steps), 200).tolist()})
    index = torch.tensor(keep) - 1
    per_beta = {}
    for k, beta in enumerate(betas):
        per_beta[f"{beta:g}"] = {
            "beta": beta,
            "momentum": 1 - beta,
            "computed": {f"{th:.6g}": steps_to_forget(beta, th) for th in thresholds},
            "measured": {kind: {f"{th:.6g}": settle_step(error[kind][k], th)
                                for th in thresholds} for kind in error},
            "noise_measured": v[k].std().item(),
            "noise_formula": noise * math.sqrt((1 - beta) / (1 + beta)),
            "error": {kind: error[kind][k, index].tolist() for kind in error},
            "one_raw": one_raw[k, index].tolist(),
            "one_corrected": one_corrected[k, index].tolist(),
        }
    return {"mean": mean, "noise": noise, "replicates": replicates, "steps": steps,
            "thresholds": list(thresholds), "curve_steps": keep,
            "one_series": one_x[index].tolist(), "betas": per_beta}
