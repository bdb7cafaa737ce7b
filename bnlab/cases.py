"""The post's cases and their ablations, as presets of the one trainer.

A *case* says what is compared (engine, normalization, optimizer); a *preset* says at
what scale (epochs, width, data, learning rate). ``case_config(case, preset, seed)``
combines them into a :class:`~bnlab.train.TrainConfig`.

| case     | engine   | normalization        | optimizer                        |
|----------|----------|----------------------|----------------------------------|
| a        | autograd | none                 | Adam (torch.optim)               |
| b        | autograd | PyTorch's BN layer   | Adam (torch.optim)               |
| c        | manual   | bnlab's hand-written | AMSGrad (bnlab.optim)            |
| d        | autograd | PyTorch's BN layer   | AMSGrad (torch.optim)            |
| b-manual | manual   | bnlab's hand-written | Adam (bnlab.optim)               |

``d`` separates the optimizer from the implementation in case c (c = d + manual engine);
``b-manual`` has the same math as ``b`` on the manual engine, so from the same seed (same
initial weights, same batches) it follows b's trajectory up to float rounding.

    >>> cfg = case_config("b", "quick", seed=0)
    >>> cfg.engine, cfg.norm, cfg.optimizer
    ('autograd', 'torch', 'adam')
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from bnlab.train import ConfigError, TrainConfig

__all__ = ["CASES", "PRESETS", "Case", "Preset", "case_config"]


@dataclass(frozen=True)
class Case:
    """What one case changes in the trainer's config, and how it is labelled."""

    label: str
    fields: dict


CASES: dict[str, Case] = {
    "a": Case("a: no BN, autograd, Adam",
              {"engine": "autograd", "norm": "none", "optimizer": "adam"}),
    "b": Case("b: PyTorch BN, autograd, Adam",
              {"engine": "autograd", "norm": "torch", "optimizer": "adam"}),
    "c": Case("c: bnlab BN, manual backprop, AMSGrad",
              {"engine": "manual", "norm": "bnlab", "optimizer": "amsgrad",
               "optimizer_impl": "bnlab"}),
    "d": Case("d: PyTorch BN, autograd, AMSGrad (ablation)",
              {"engine": "autograd", "norm": "torch", "optimizer": "amsgrad"}),
    "b-manual": Case("b-manual: bnlab BN, manual backprop, Adam (b's math)",
                     {"engine": "manual", "norm": "bnlab", "optimizer": "adam",
                      "optimizer_impl": "bnlab"}),
}


@dataclass(frozen=True)
class Preset:
    """The scale of a comparison; ``fields`` go into every case's config."""

    description: str
    cases: tuple[str, ...]
    seeds: int
    fields: dict


PRESETS: dict[str, Preset] = {
    "quick": Preset(
        "a 2-core CPU in about 10 minutes for a, b, c: width 0.5, 15 epochs, batch 32, Adam "
        "lr 1e-3 with a cosine schedule, crop+flip augmentation, on whatever data is found "
        "(the embedded 5085/1017 sample offline)",
        ("a", "b", "c"), 1,
        {"width": 0.5, "epochs": 15, "batch_size": 32, "lr": 1e-3, "lr_schedule": "cosine",
         "augment": True},
    ),
    "paper": Preset(
        "a GPU: full width, full CIFAR-10, 30 epochs, batch 128, Adam lr 1e-3 with a cosine "
        "schedule, crop+flip augmentation, 3 seeds",
        ("a", "b", "c", "d"), 3,
        {"width": 1.0, "epochs": 30, "batch_size": 128, "lr": 1e-3, "lr_schedule": "cosine",
         "augment": True},
    ),
}


def case_config(case: str, preset: str = "quick", seed: int = 0, **overrides) -> TrainConfig:
    """The validated config of ``case`` at ``preset`` scale; ``overrides`` win over both."""
    if case not in CASES:
        raise ConfigError(f"unknown case {case!r}: choose from {', '.join(CASES)}")
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    fields = {**PRESETS[preset].fields, **CASES[case].fields,
              **{k: v for k, v in overrides.items() if v is not None}}
    unknown = set(fields) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ConfigError(f"unknown config fields {sorted(unknown)}")
    return TrainConfig(case=case, seed=seed, **fields).validate()
