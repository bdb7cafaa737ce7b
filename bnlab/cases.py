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
| b-renorm | autograd | bnlab's Batch Renorm | Adam (torch.optim)               |
| b-ghost  | autograd | bnlab's ghost BN     | Adam (torch.optim)               |
| b-group  | autograd | bnlab's GroupNorm    | Adam (torch.optim)               |

``d`` separates the optimizer from the implementation in case c (c = d + manual engine);
``b-manual`` has the same math as ``b`` on the manual engine, so from the same seed (same
initial weights, same batches) it follows b's trajectory up to float rounding.
``b-renorm``, ``b-ghost`` and ``b-group`` are b with BN's drawbacks answered
(:mod:`bnlab.variants`; ``TrainConfig.norm_kind``): Batch Renorm (rmax 3, dmax 5), ghost BN
(virtual batches of 32) and GroupNorm (gcd(32, C) groups), each with the config's defaults,
which ``case_config`` overrides change. Any case with a normalization runs another kind by
overriding ``norm_kind`` (and ``norm`` 'bnlab' for renorm and ghost).

The ``post`` and ``post-quick`` presets run the post's network and recipe as its code ran
them (``../post/README.md``; :mod:`bnlab.post.manual_net`, :mod:`bnlab.post.recipe`). There
case ``c`` is the post's case c *as it ran*; the ladder from b to c, one difference per step
(b, b-manual, b-act, b-act-rule, c), is :data:`bnlab.post.ladder.LADDER` (its table is
there); ``c-fixed`` is c with true gradients and standard AMSGrad (per-activation BN kept).

    >>> cfg = case_config("b", "quick", seed=0)
    >>> cfg.engine, cfg.norm, cfg.optimizer
    ('autograd', 'torch', 'adam')
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from bnlab.config import ConfigError, TrainConfig
from bnlab.post.ladder import LADDER

__all__ = ["CASES", "LADDER", "POST_CASES", "PRESETS", "Case", "Preset", "case_config",
           "case_definition"]


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
    # b with the field's answers to BN's drawbacks (bnlab.variants), the same everything else
    "b-renorm": Case("b-renorm: b with Batch Renorm (bnlab), autograd, Adam",
                     {"engine": "autograd", "norm": "bnlab", "norm_kind": "renorm",
                      "optimizer": "adam"}),
    "b-ghost": Case("b-ghost: b with ghost BN (bnlab), autograd, Adam",
                    {"engine": "autograd", "norm": "bnlab", "norm_kind": "ghost",
                     "optimizer": "adam"}),
    "b-group": Case("b-group: b with GroupNorm (bnlab), autograd, Adam",
                    {"engine": "autograd", "norm": "bnlab", "norm_kind": "group",
                     "optimizer": "adam"}),
    # the ladder from b to c of the post presets (per-activation BN is the post net's)
    "b-act": Case("b-act: b-manual + per-activation BN (post net)",
                  {"engine": "manual", "norm": "bnlab", "optimizer": "adam",
                   "optimizer_impl": "bnlab", "arch": "post", "bn_kind": "activation"}),
    "b-act-rule": Case("b-act-rule: b-act + the post's AMSGrad rule (post net)",
                       {"engine": "manual", "norm": "bnlab", "optimizer": "amsgrad",
                        "optimizer_impl": "bnlab", "amsgrad_rule": "post", "arch": "post",
                        "bn_kind": "activation"}),
    "c-fixed": Case("c-fixed: per-activation BN, true gradients, standard AMSGrad (post net)",
                    {"engine": "manual", "norm": "bnlab", "optimizer": "amsgrad",
                     "optimizer_impl": "bnlab", "amsgrad_rule": "torch", "arch": "post",
                     "bn_kind": "activation"}),
}

# What a case means under the post presets, where it differs from the table above.
POST_CASES: dict[str, Case] = {
    "a": Case("a: no BN, autograd, Adam (the post's a)", CASES["a"].fields),
    "b": Case("b: per-channel scale-only BN, autograd, Adam (the post's b)", CASES["b"].fields),
    "c": Case("c: the post's case c as it ran (per-activation BN, its AMSGrad rule, "
              "its three gradient errors)",
              {**CASES["b-act-rule"].fields, "gradient_errors": ("elu", "pool", "loss")}),
}


@dataclass(frozen=True)
class Preset:
    """The scale of a comparison; ``fields`` go into every case's config."""

    description: str
    cases: tuple[str, ...]
    seeds: int
    fields: dict


# The post's recipe (../post/README.md, "What all three cases share"); the post net's BN
# flavours fix eps 1e-8 and the running averages' start (bnlab.post.manual_net).
POST_RECIPE = {"arch": "post", "recipe": "post", "batch_size": 50, "lr": 3e-4,
               "lr_schedule": "inverse", "betas": (0.9, 0.9), "bn_momentum": 0.1,
               "eval_batch_size": 50, "augment": False, "dropout": False}
# post-quick: what fits 15 minutes of a 2-core CPU for a, b and c (measured; see README)
POST_QUICK_SCALE = {"width": 0.25, "epochs": 6}
POST_QUICK_NOTE = "width 0.25 and 6 epochs instead of width 1.0 and 21 epochs"

# quick's time plan (9 runs <= 12 min on a 2-core CPU with bfloat16). Issue 15 measured one
# autocast All-CNN-C step at width 0.5, batch 32, on such a CPU at ~625 img/s (2.3x float32):
# ~8 s per epoch of the 5085-image sample, ~9 s with the flipped test pass (2 x 1017
# images). Case a (no BN) ~0.85x of b, case c (manual engine, bnlab BN) ~1.3x (a guess: its
# element-wise work does not speed up with bfloat16) => ~28 s per epoch for a + b + c,
# x 8 epochs x 3 seeds ~ 11 min, plus ~20 s of setup and report. Estimated, not measured:
# the machine it was written on has no bfloat16 units (in float32 it takes ~3x longer).
# Batch 32 seems to cost about what 64 does per image there (the plain batch-64
# loop: ~8 s per epoch) and gives twice the steps, which a short schedule needs.
PRESETS: dict[str, Preset] = {
    "quick": Preset(
        "a 2-core CPU with bfloat16 (precision auto) in about 11 minutes for a, b, c with 3 "
        "seeds each, so the report separates the cases by paired differences: width 0.5, "
        "8 epochs, batch 32, Adam lr 1e-3 (AMSGrad for c) with a cosine schedule, label "
        "smoothing 0.1, crop+flip augmentation, test-time flip, on whatever data is found "
        "(the embedded 5085/1017 sample offline). It trades epochs for seeds: 8 epochs "
        "instead of 15 leave every case short of its accuracy at convergence, which label "
        "smoothing and the test-time flip partly make up; in float32 (no bfloat16 units) "
        "it takes about 3x longer",
        ("a", "b", "c"), 3,
        {"width": 0.5, "epochs": 8, "batch_size": 32, "lr": 1e-3, "lr_schedule": "cosine",
         "label_smoothing": 0.1, "augment": True, "test_flip": True},
    ),
    "smoke": Preset(
        "seconds, to try the pipeline end to end; its numbers mean nothing (width 0.125, "
        "1 epoch on 256 training images, batch 32, one seed)",
        ("a", "b", "c"), 1,
        {"width": 0.125, "epochs": 1, "subset": 256, "batch_size": 32, "lr": 1e-3,
         "lr_schedule": "constant", "augment": False},
    ),
    "post": Preset(
        "a GPU: the post as its code ran (its network, 25+25 augmented batches, per-batch "
        "standardisation, Adam β2 0.9, lr 3e-4/(1+0.001 epoch)), full width, full CIFAR-10, "
        "21 epochs, 3 seeds, the ladder b → c and c-fixed",
        ("a", "b", "c", "c-fixed", "b-manual", "b-act", "b-act-rule"), 3,
        {**POST_RECIPE, "width": 1.0, "epochs": 21},
    ),
    "post-quick": Preset(
        "a 2-core CPU in under 15 minutes: the post's recipe for a, b, c on the CIFAR-10 "
        f"sample, at reduced scale: {POST_QUICK_NOTE}",
        ("a", "b", "c"), 1, {**POST_RECIPE, **POST_QUICK_SCALE},
    ),
    "paper": Preset(
        "a GPU: full width, full CIFAR-10, 30 epochs, batch 128, Adam lr 1e-3 with a cosine "
        "schedule, crop+flip augmentation, 3 seeds",
        ("a", "b", "c", "d"), 3,
        {"width": 1.0, "epochs": 30, "batch_size": 128, "lr": 1e-3, "lr_schedule": "cosine",
         "augment": True},
    ),
}


def is_post_preset(preset: str) -> bool:
    return preset.startswith("post")


def case_definition(case: str, preset: str) -> Case:
    """The case's label and fields under ``preset`` (the post presets redefine a, b, c)."""
    if case not in CASES:
        raise ConfigError(f"unknown case {case!r}: choose from {', '.join(CASES)}")
    if is_post_preset(preset):
        return POST_CASES.get(case, CASES[case])
    if CASES[case].fields.get("arch") == "post":
        raise ConfigError(f"case {case!r} is a step of the post's ladder: use --preset post "
                          f"or post-quick")
    return CASES[case]


def case_config(case: str, preset: str = "quick", seed: int = 0, **overrides) -> TrainConfig:
    """The validated config of ``case`` at ``preset`` scale; ``overrides`` win over both."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    definition = case_definition(case, preset)
    fields = {**PRESETS[preset].fields, **definition.fields,
              **{k: v for k, v in overrides.items() if v is not None}}
    unknown = set(fields) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ConfigError(f"unknown config fields {sorted(unknown)}")
    return TrainConfig(case=case, seed=seed, **fields).validate()
