"""The configuration of one training run: :class:`TrainConfig`, frozen, serialised to a run
folder's ``config.json`` and rebuilt from it (SPEC.md, "Run folders").

    >>> from bnlab.config import TrainConfig
    >>> TrainConfig(case="b", arch="post").bn_eps     # the arch's BN epsilon, recorded
    1e-08

Also here: the choices each field takes, what a field means when an older ``config.json``
lacks it (:data:`LEGACY_FIELDS`), the network plan a config asks for (:func:`network_plan`,
which both engines build from) and the device it names (:func:`resolve_device`). Everything
that can be refused is refused here, as a :class:`ConfigError`, before any work or file is
made. Nothing here trains: :mod:`bnlab.engines` builds the model, :mod:`bnlab.train` runs it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from bnlab.initializers import INIT_SCHEMES
from bnlab.plans import NORM_KINDS, LayerSpec, all_cnn_c_plan, post_net_plan
from bnlab.precision import PRECISIONS
from bnlab.runs import RUN_INFO_KEYS

__all__ = [
    "ARCHS",
    "BATCH_ORDERS",
    "BN_EPS",
    "ENGINES",
    "INIT",
    "LEGACY_FIELDS",
    "NORMS",
    "OPTIMIZERS",
    "RECIPES",
    "SCHEDULES",
    "ConfigError",
    "TrainConfig",
    "network_plan",
    "norm_options",
    "resolve_device",
]

ENGINES = ("autograd", "manual")
NORMS = ("none", "torch", "bnlab")
OPTIMIZERS = ("adam", "amsgrad", "sgd")
SCHEDULES = ("constant", "cosine", "inverse")
ARCHS = ("allcnn", "post")
RECIPES = ("standard", "post")
BATCH_ORDERS = ("shuffled", "class_sorted")
# BN's epsilon by architecture: PyTorch's default for All-CNN-C, the post's 1e-8 for its net
BN_EPS = {"allcnn": 1e-5, "post": 1e-8}
# The conv init by architecture: He's for All-CNN-C (a healthy no-BN baseline), the post's
# N(0, 0.05²) for its net. See bnlab.initializers.
INIT = {"allcnn": "kaiming", "post": "post"}
# Fields added after config.json files existed, with what a config.json without them meant
# (the runs it describes were trained that way): before the init fix All-CNN-C had
# PyTorch's default init and a ReLU on its class scores.
LEGACY_FIELDS = {"init": {"allcnn": "torch", "post": "post"},
                 "final_relu": {"allcnn": True, "post": False}}


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any work or file is made."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one training run. Serialised to ``config.json``."""

    # --- what is trained ----------------------------------------------------------------
    case: str = "custom"              # the case's name, for tables and folder names
    engine: str = "autograd"          # "autograd" (nn.Module) | "manual" (bnlab.manual)
    norm: str = "torch"               # "none" | "torch" | "bnlab" (manual engine: none | bnlab)
    norm_kind: str = "bn"             # what `norm` computes (All-CNN-C): "bn" | "renorm" (Batch
                                      # Renorm) | "ghost" (ghost BN) | "group" (GroupNorm);
                                      # renorm and ghost need norm "bnlab" (torch has none)
    num_groups: int | None = None     # group: groups per layer; None: gcd(32, channels)
    virtual_batch_size: int = 32      # ghost: images per ghost batch (Keras's name)
    renorm_rmax: float = 3.0          # renorm: r clipped to [1/rmax, rmax] (Ioffe 2017)
    renorm_dmax: float = 5.0          # renorm: d clipped to [-dmax, dmax]
    renorm_warmup_steps: int = 0      # renorm: steps to ramp rmax from 1, dmax from 0; 0: none
    width: float = 1.0                # All-CNN-C channel multiplier (96, 192 → ×width)
    dropout: bool = False             # the paper's dropout: 20% input, 50% after stride-2 convs
    bn_momentum: float | None = 0.1   # PyTorch's convention: weight of the *new* batch
    bn_eps: float | None = None       # BN's epsilon; None: the arch's (see BN_EPS), recorded
    bn_bias_correction: bool = False  # bnlab BN only: bias-corrected running stats (Q5)
    arch: str = "allcnn"              # "allcnn" (Springenberg's C) | "post" (the post's net)
    bn_kind: str = "channel"          # post net: "channel" (case b) | "activation" (case c)
    init: str | None = None           # conv init: "kaiming" | "torch" (PyTorch's default) |
                                      # "post" (N(0, 0.05²)); None: the arch's (INIT), recorded
    final_relu: bool = False          # All-CNN-C: a ReLU on the class scores (paper's table)
    gradient_errors: tuple[str, ...] = ()  # post net, manual engine: "elu", "pool", "loss"
    # --- optimizer ----------------------------------------------------------------------
    optimizer: str = "adam"           # "adam" | "amsgrad" | "sgd"
    optimizer_impl: str = "torch"     # "torch" (torch.optim) | "bnlab" (bnlab.optim)
    amsgrad_rule: str = "torch"       # bnlab AMSGrad: "torch" | "reddi" | "post"
    lr: float = 1e-3                  # peak learning rate
    lr_schedule: str = "constant"     # "constant" | "cosine" (to 0) | "inverse" (the post's)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's β1, β2
    sgd_momentum: float = 0.9         # SGD only
    weight_decay: float = 0.0         # coupled (L2 in the gradient), as torch.optim.Adam
    label_smoothing: float = 0.0
    # --- data ---------------------------------------------------------------------------
    epochs: int = 10
    batch_size: int = 128             # images per step
    augment: bool = True              # random crop (4-pixel padding) + horizontal flip
    recipe: str = "standard"          # "standard" | "post" (25 + 25 augmented copies, per-
                                      # batch standardisation: bnlab.post.recipe)
    batch_order: str = "shuffled"     # "shuffled" | "class_sorted" (batches mostly one class)
    subset: int | None = None         # train on N images (seeded choice), None = all
    data_dir: str | None = None       # None: cache, download, else the embedded sample
    # --- run ----------------------------------------------------------------------------
    seed: int = 0
    device: str = "auto"              # "auto" (CUDA when present) | "cpu" | "cuda" | "cuda:1"
    precision: str = "auto"           # "auto" (bf16 where the device has it fast, else fp32)
                                      # | "fp32" | "bf16" (autocast; CPU or CUDA) | "fp64"
                                      # (for checks); see bnlab.precision
    channels_last: bool = True        # memory format of activations (faster convs)
    compile: bool = False             # torch.compile the autograd model (GPU)
    eval_batch_size: int = 500
    test_flip: bool = False           # evaluate on the mean of the logits of each test image
                                      # and its mirror image (test-time flip augmentation)

    def __post_init__(self) -> None:
        if self.bn_eps is None and self.arch in BN_EPS:  # config.json records the value
            object.__setattr__(self, "bn_eps", BN_EPS[self.arch])
        if self.init is None and self.arch in INIT:
            object.__setattr__(self, "init", INIT[self.arch])

    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` naming the bad field and value; return self."""
        choices = {"engine": ENGINES, "norm": NORMS, "optimizer": OPTIMIZERS,
                   "optimizer_impl": ("torch", "bnlab"), "lr_schedule": SCHEDULES,
                   "precision": PRECISIONS, "amsgrad_rule": ("torch", "reddi", "post"),
                   "arch": ARCHS, "recipe": RECIPES, "batch_order": BATCH_ORDERS,
                   "bn_kind": ("channel", "activation"), "init": INIT_SCHEMES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; "
                                  f"got {getattr(self, name)!r}")
        positive = {"lr": self.lr, "epochs": self.epochs, "batch_size": self.batch_size,
                    "width": self.width, "eval_batch_size": self.eval_batch_size}
        for name, value in positive.items():
            if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
                raise ConfigError(f"{name} must be positive, got {value!r}")
        if self.subset is not None and self.subset < 1:
            raise ConfigError(f"subset must be at least 1 image, got {self.subset}")
        if self.engine == "manual" and self.norm == "torch":
            raise ConfigError("the manual engine has its own BN: use norm 'bnlab' or 'none'")
        if self.engine == "manual" and self.optimizer_impl != "bnlab":
            raise ConfigError("the manual engine steps bnlab.optim: set optimizer_impl 'bnlab'")
        if self.optimizer_impl == "torch" and self.amsgrad_rule != "torch":
            raise ConfigError("AMSGrad rules other than 'torch' need optimizer_impl 'bnlab'")
        if self.bn_eps is None or not self.bn_eps > 0 or not math.isfinite(self.bn_eps):
            raise ConfigError(f"bn_eps must be positive, got {self.bn_eps!r}")
        if self.bn_momentum is not None and not 0.0 <= self.bn_momentum <= 1.0:
            raise ConfigError(f"bn_momentum must be in [0, 1] or None, got {self.bn_momentum}")
        self._validate_norm_kind()
        if self.arch == "allcnn" and self.bn_kind != "channel":
            raise ConfigError("per-activation BN (bn_kind 'activation') is the post net's: "
                              "set arch 'post'")
        if self.gradient_errors:
            valid = ("elu", "pool", "loss")
            bad = [e for e in self.gradient_errors if e not in valid]
            if bad:
                raise ConfigError(f"gradient_errors must be among {', '.join(valid)}; got {bad}")
            if self.engine != "manual" or self.arch != "post":
                raise ConfigError("gradient_errors are switches of the manual engine's post "
                                  "net: set engine 'manual' and arch 'post'")
        if self.arch == "post" and self.dropout:
            raise ConfigError("the post net has no dropout")
        if self.arch == "post" and self.final_relu:
            raise ConfigError("final_relu is All-CNN-C's (the post net ends in an ELU): "
                              "set arch 'allcnn'")
        if self.recipe == "post" and self.batch_size % 2:
            raise ConfigError(f"the post recipe's batch is half images, half their augmented "
                              f"copies: batch_size must be even, got {self.batch_size}")
        if self.recipe == "post" and self.batch_order != "shuffled":
            raise ConfigError("the post recipe shuffles its batches: batch_order 'shuffled'")
        if self.bn_bias_correction and self.norm != "bnlab":
            raise ConfigError("bn_bias_correction is an option of bnlab's BN: set norm 'bnlab'")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        return self

    def _validate_norm_kind(self) -> None:
        """The normalization kind and its options (see :data:`bnlab.plans.NORM_KINDS`)."""
        kinds = tuple(k for k in NORM_KINDS if k != "none")
        if self.norm_kind not in kinds:
            raise ConfigError(f"norm_kind must be one of {', '.join(kinds)} (no normalization "
                              f"is norm 'none'); got {self.norm_kind!r}")
        if self.num_groups is not None and (isinstance(self.num_groups, bool)
                                            or not isinstance(self.num_groups, int)
                                            or self.num_groups < 1):
            raise ConfigError(f"num_groups must be a positive integer or None, "
                              f"got {self.num_groups!r}")
        if isinstance(self.virtual_batch_size, bool) or not isinstance(
                self.virtual_batch_size, int) or self.virtual_batch_size < 1:
            raise ConfigError(f"virtual_batch_size must be a positive integer, "
                              f"got {self.virtual_batch_size!r}")
        if not self.renorm_rmax >= 1.0 or not math.isfinite(self.renorm_rmax):
            raise ConfigError(f"renorm_rmax must be >= 1 (r is clipped to [1/rmax, rmax]), "
                              f"got {self.renorm_rmax!r}")
        if not self.renorm_dmax >= 0.0 or not math.isfinite(self.renorm_dmax):
            raise ConfigError(f"renorm_dmax must be >= 0 (d is clipped to [-dmax, dmax]), "
                              f"got {self.renorm_dmax!r}")
        if isinstance(self.renorm_warmup_steps, bool) or not isinstance(
                self.renorm_warmup_steps, int) or self.renorm_warmup_steps < 0:
            raise ConfigError(f"renorm_warmup_steps must be a non-negative integer, "
                              f"got {self.renorm_warmup_steps!r}")
        if self.norm_kind == "bn":
            return
        if self.norm == "none":
            raise ConfigError(f"norm_kind {self.norm_kind!r} needs a normalization layer: "
                              f"set norm 'bnlab' (or 'torch' for group), got norm 'none'")
        if self.arch != "allcnn":
            raise ConfigError(f"norm_kind {self.norm_kind!r} is All-CNN-C's: set arch "
                              f"'allcnn', got {self.arch!r}")
        if self.norm == "torch" and self.norm_kind in ("renorm", "ghost"):
            raise ConfigError(f"torch has no layer for norm_kind {self.norm_kind!r}: set norm "
                              f"'bnlab', got norm 'torch'")
        if self.bn_bias_correction:
            raise ConfigError(f"bn_bias_correction is an option of bnlab's BN: set norm_kind "
                              f"'bn', got {self.norm_kind!r}")
        try:
            network_plan(self)
        except ValueError as error:  # a group count that does not divide a layer's channels
            raise ConfigError(str(error)) from None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict) -> TrainConfig:
        """The config of :meth:`to_json`, or of a run folder's ``config.json`` (whose
        provenance keys, :data:`RUN_INFO_KEYS`, are ignored); unknown keys are an error.

        A saved config without a field of :data:`LEGACY_FIELDS` was written before the field
        existed and means what that bnlab did: All-CNN-C with PyTorch's init and the final
        ReLU. (A config built in code gets the current defaults: He's init, no final ReLU.)

        >>> TrainConfig.from_json({"epochs": 3, "device": "cpu"}).epochs
        3
        >>> TrainConfig.from_json({"epochs": 3}).init, TrainConfig(epochs=3).init
        ('torch', 'kaiming')
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known - set(RUN_INFO_KEYS))
        if unknown:
            raise ConfigError(f"unknown config fields {unknown} (from a newer bnlab?)")
        values = {k: v for k, v in values.items() if k in known}
        arch = values.get("arch", "allcnn")
        for name, meant in LEGACY_FIELDS.items():
            if name not in values and arch in meant:
                values[name] = meant[arch]
        for name in ("betas", "gradient_errors"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)


def resolve_device(name: str) -> torch.device:
    """"auto" → CUDA when present, else CPU; otherwise the named device (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here")
    return device


def network_plan(config: TrainConfig) -> tuple[list[LayerSpec], str]:
    """The run's network plan and its initialization scheme (see :mod:`bnlab.plans`)."""
    bn = config.norm != "none"
    scheme = config.init or INIT[config.arch]
    if config.arch == "post":
        return post_net_plan(config.bn_kind if bn else "none", config.width), scheme
    return all_cnn_c_plan(bn, config.dropout, config.width, final_relu=config.final_relu,
                          norm=config.norm_kind, norm_options=norm_options(config)), scheme


def norm_options(config: TrainConfig) -> dict:
    """The options of the config's normalization kind, as :func:`bnlab.plans.all_cnn_c_plan`
    takes them (every kind's; the plan keeps those of ``config.norm_kind``)."""
    return {"rmax": config.renorm_rmax, "dmax": config.renorm_dmax,
            "warmup_steps": config.renorm_warmup_steps,
            "virtual_batch_size": config.virtual_batch_size, "num_groups": config.num_groups}
