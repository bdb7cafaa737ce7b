"""Santurkar et al.'s noisy BN: BN followed by injected non-stationary noise.

Santurkar, Tsipras, Ilyas & Madry 2018 ("How Does Batch Normalization Help Optimization?",
NeurIPS, Sec. 2.1) add random noise after each BN layer, with a mean and a variance that
change at every training step, so that each layer's input distribution is made *unstable*
on purpose -- and the network still trains about as well as with plain BN. Here, after
every BN layer, in training mode, per channel c and drawn afresh at every forward pass (one
per training step)::

    y_c = s_c * BN(x)_c + b_c,    s_c ~ U(1 - scale_spread, 1 + scale_spread),
                                  b_c ~ U(-shift_spread, shift_spread)

so each channel's mean moves by up to ``shift_spread`` standard deviations and its scale by
up to ``scale_spread`` of itself from one step to the next. E[s] = 1 and E[b] = 0, and the
noise is off in evaluation mode (like dropout): the test network is the noise's mean.

The noise is injected by a module forward hook that holds only while a run trains
(:func:`injected_bn_noise`), so no trainer code changes; the run's folder gets a
``noise.json`` saying what was injected (its ``config.json`` alone would read as plain BN).
A run resumed from a checkpoint draws its later noise from a fresh generator.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["NoiseSpec", "injected_bn_noise", "noisy_output"]


@dataclass(frozen=True)
class NoiseSpec:
    """The injected noise: half-widths of the uniform per-channel scale and shift."""

    scale_spread: float = 0.5   # s in [0.5, 1.5]
    shift_spread: float = 1.0   # b in [-1, 1] (BN's output has unit variance per channel)

    def __post_init__(self) -> None:
        if not 0.0 <= self.scale_spread < 1.0 or not self.shift_spread >= 0.0:
            raise ValueError(f"scale_spread must be in [0, 1) and shift_spread >= 0, got "
                             f"{self.scale_spread}, {self.shift_spread}")


def noisy_output(out: Tensor, spec: NoiseSpec, generator: torch.Generator) -> Tensor:
    """``s * out + b`` with s, b of shape (1, C, 1, ...) drawn from ``generator`` (CPU) as
    :class:`NoiseSpec` says; ``out`` (N, C, ...)."""
    shape = (1, out.shape[1]) + (1,) * (out.dim() - 2)
    u = torch.rand((2, *shape), generator=generator, dtype=torch.float32)
    s = 1.0 + spec.scale_spread * (2.0 * u[0] - 1.0)
    b = spec.shift_spread * (2.0 * u[1] - 1.0)
    return out * s.to(out.device, out.dtype) + b.to(out.device, out.dtype)


@contextlib.contextmanager
def injected_bn_noise(spec: NoiseSpec, seed: int, run_dir: Path | None = None
                      ) -> Iterator[torch.Generator]:
    """While the block runs, the output of every BN layer (a ``_BatchNorm``: torch's and
    bnlab's) in training mode gets :func:`noisy_output`, drawn from a generator seeded
    with ``seed``; writes ``run_dir/noise.json`` when given. Yields the generator."""
    generator = torch.Generator().manual_seed(seed)

    def hook(module: nn.Module, _args: tuple, out: Tensor) -> Tensor | None:
        if module.training and isinstance(module, nn.modules.batchnorm._BatchNorm):
            return noisy_output(out, spec, generator)
        return None

    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "noise.json").write_text(json.dumps(
            {"what": "after every BN layer in training mode: y = s * BN(x) + b per channel, "
                     "drawn every step (bnlab.studies.q4.noise)", "seed": seed,
             **asdict(spec)}, indent=2) + "\n")
    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        yield generator
    finally:
        handle.remove()

