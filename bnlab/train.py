"""One training run: a frozen config in, one run folder out (both engines, one loop).

    >>> from bnlab.train import TrainConfig, train
    >>> config = TrainConfig(case="b", norm="torch", epochs=2)
    >>> result = train(config, "runs/b-seed0")                   # doctest: +SKIP

The run folder (SPEC.md, "Run folders") holds ``config.json`` (everything needed to rerun),
``metrics.jsonl`` (one JSON object per epoch, appended as the epoch ends),
``checkpoint.pt`` (written atomically at the end of every epoch), ``result.json`` (once the
run has ended) and ``curves.png``.

Reproducibility. All randomness comes from generators seeded by (seed, epoch, purpose):
the initial weights, the shuffle, the augmentation and the dropout masks. Nothing is drawn
from the global RNG, so a run resumed from the checkpoint of epoch e replays epoch e + 1
exactly as an uninterrupted run would (on CPU, where kernels are deterministic).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as TF

from bnlab import __version__, runs
from bnlab import data as bdata
from bnlab import distributed as bdist
from bnlab.evidence.curves import plot_run
from bnlab.initializers import INIT_SCHEMES
from bnlab.manual import all_cnn_c, set_compute_dtype, train_step
from bnlab.models import AllCNNC
from bnlab.plans import (
    NORM_KINDS,
    LayerSpec,
    all_cnn_c_plan,
    initial_parameters,
    post_net_plan,
)
from bnlab.precision import PRECISIONS, Precision, resolve_precision
from bnlab.progress import (
    EPOCH_HEADER,
    JobProgress,
    Progress,
    cpu_allocator_tuned,
    format_epoch_row,
)
from bnlab.runs import RUN_INFO_KEYS

__all__ = [
    "ConfigError",
    "DivergenceError",
    "Model",
    "RunResult",
    "TrainConfig",
    "load_model",
    "train",
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


class DivergenceError(RuntimeError):
    """The loss became NaN or infinite; the run folder keeps the last good epoch."""


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


@dataclass
class RunResult:
    """What :func:`train` returns: the metrics per epoch and how the run ended."""

    run_dir: Path
    metrics: list[dict] = field(default_factory=list)
    status: str = "finished"
    message: str = ""

    @property
    def final_test_acc(self) -> float:
        return self.metrics[-1]["test_acc"] if self.metrics else float("nan")


# ---- the pieces ------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    """"auto" → CUDA when present, else CPU; otherwise the named device (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here")
    return device


def _seed(seed: int, *salt: int) -> int:
    """A seed derived from (seed, salt...): each purpose and epoch gets its own stream."""
    value = seed
    for s in salt:
        value = (value * 1_000_003 + s) % (2**63 - 1)
    return value


def _generator(seed: int, *salt: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_seed(seed, *salt))


_INIT, _SHUFFLE, _DROPOUT = 1, 2, 3


class Model:
    """The model of a run behind one interface, whichever the engine.

    ``step(x, y)`` trains on one batch and returns (loss, logits) as tensors (no sync);
    ``evaluate(x, y)`` returns (summed loss, correct count). ``state_dict`` has the same
    keys for both engines, so a checkpoint of one loads into the other.

    ``precision`` is the config's precision resolved on ``device``
    (:func:`bnlab.precision.resolve_precision`; ``"auto"`` becomes bf16 or fp32, with the
    reason). In bf16 the autograd engine trains and evaluates under ``torch.autocast``; the
    manual engine does the same by hand: its convolutions compute on bfloat16 copies
    (:func:`bnlab.manual.set_compute_dtype`), while parameters, gradients and optimizer
    state stay float32 and BN and the loss compute in float32.
    """

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        self.config = config
        self.dropout_generator = torch.Generator(device=device)
        memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        # "auto" → bf16 autocast where the device does it fast, else fp32 (bnlab.precision)
        self.precision: Precision = resolve_precision(config.precision, device)
        self.dtype = self.precision.param_dtype  # parameters, gradients, optimizer state
        # one plan, one draw of the initial weights from the run's generator, either engine
        initial = initial_parameters(*network_plan(config), _generator(config.seed, _INIT))
        self.mean_gradient = True
        if config.engine == "autograd":
            module = _autograd_model(config, self.dropout_generator)
            _load_initial(module.state_dict(), initial, module.load_state_dict)
            self.module = module.to(self.dtype).to(device=device, memory_format=memory_format)
            self.forward = torch.compile(self.module) if config.compile else self.module
            params = list(self.module.parameters())
        else:
            self.network = _manual_network(config, self.dropout_generator)
            _load_initial(self.network.state_dict(), initial, self.network.load_state_dict)
            self.network.to(device=device, dtype=self.dtype, memory_format=memory_format)
            if self.precision.autocast_enabled:  # autocast by hand: bf16 convolutions
                set_compute_dtype(self.network, self.precision.autocast_dtype)
            self.mean_gradient = getattr(self.network, "mean_gradient", True)
            params = self.network.parameters()
        if config.bn_bias_correction:
            for layer in self.bn_layers():
                layer.bias_correction = True
        self.rank, self.world_size = bdist.world()
        self.global_batch_size = 0
        if self.world_size > 1:
            self._data_parallel()
        self.params = params
        self.optimizer = _build_optimizer(config, params)
        # torch.autocast for the autograd engine; the manual engine casts by hand (above)
        self.autocast = self.precision.autocast_enabled and config.engine == "autograd"
        self.device = device

    def _data_parallel(self) -> None:
        """Join the process group's data-parallel training (torchrun, ``--nproc``).

        Autograd: BN becomes :class:`bnlab.sync_batchnorm.SyncBatchNorm` and the module is
        wrapped in ``DistributedDataParallel`` (:func:`bnlab.distributed.ddp`); manual: its
        BN layers synchronized and rank 0's weights broadcast
        (:mod:`bnlab.manual.distributed`). Parameters keep their identity, so checkpoints
        load into a one-process model and back.
        """
        if self.config.batch_size < self.world_size:
            raise ConfigError(f"batch size {self.config.batch_size} is smaller than the "
                              f"{self.world_size} processes: each needs at least one example")
        if self.config.engine == "autograd":
            from bnlab.nn import BatchNorm2d
            from bnlab.sync_batchnorm import SyncBatchNorm
            wrapper = bdist.ddp(self.module)
            self.module = wrapper.module
            self.forward = torch.compile(wrapper) if self.config.compile else wrapper
            synced = (torch.nn.BatchNorm2d, BatchNorm2d, SyncBatchNorm)
            unsynced = {type(m).__name__ for m in self.bn_layers() if type(m) not in synced}
        else:
            from bnlab.manual.distributed import (
                SyncBatchNorm2d,
                SyncPerActivationBatchNorm,
                broadcast_parameters,
                convert_sync_batchnorm,
            )
            convert_sync_batchnorm(self.network)
            broadcast_parameters(self.network)
            synced = (SyncBatchNorm2d, SyncPerActivationBatchNorm)
            unsynced = {type(m).__name__ for m in self.bn_layers() if type(m) not in synced}
        if unsynced:  # each rank would normalize its own part: not the one-process run
            raise ConfigError(f"data-parallel training synchronizes BatchNorm2d (and the "
                              f"manual per-activation BN) only; this model has "
                              f"{', '.join(sorted(unsynced))}")

    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's contiguous part of a batch (:func:`bnlab.distributed.shard_bounds`);
        the whole batch on one process. Remembers the batch's size for :meth:`step`."""
        self.global_batch_size = y.shape[0]
        if self.world_size == 1:
            return x, y
        lo, hi = bdist.shard_bounds(y.shape[0], self.world_size, self.rank)
        return x[lo:hi], y[lo:hi]

    def reduce_sums(self, *values: torch.Tensor | float) -> list[float]:
        """Per-rank sums (loss times examples, correct, examples) summed over ranks."""
        if self.world_size == 1:
            return [float(v) for v in values]
        total = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device)
                             for v in values])
        torch.distributed.all_reduce(total)
        return total.tolist()

    def bn_layers(self) -> list:
        """The BN layers in order (``nn.Module`` or manual layers), for probes and options."""
        if self.config.engine == "autograd":
            return [m for m in self.module.modules() if hasattr(m, "running_mean")]
        return [layer for _, layer in self.network if "running_mean" in layer.buffers]

    def set_epoch(self, epoch: int, lr: float) -> None:
        self.dropout_generator.manual_seed(_seed(self.config.seed, _DROPOUT, epoch))
        if isinstance(self.optimizer, torch.optim.Optimizer):
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        else:
            self.optimizer.lr = lr

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        smoothing = self.config.label_smoothing
        if self.config.engine == "manual":
            if self.world_size > 1:  # the loss returned is the global batch's mean
                from bnlab.manual.distributed import data_parallel_train_step
                return data_parallel_train_step(
                    self.network, self.optimizer, x, y, self.global_batch_size, smoothing,
                    mean_gradient=self.mean_gradient)
            return train_step(self.network, self.optimizer, x, y, smoothing,
                              mean_gradient=self.mean_gradient)
        self.module.train()
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            logits = _at_least_float32(self.forward(x))
            loss = TF.cross_entropy(logits, y, label_smoothing=smoothing)
        for p in self.params:
            p.grad = None
        if self.world_size > 1:  # DDP averages over ranks: make that the global mean's
            n, big_n = y.shape[0], self.global_batch_size
            (loss * bdist.local_loss_scale(n, big_n, self.world_size)).backward()
            self.optimizer.step()
            total = (loss.detach().double() * (n / big_n)).reshape(1)
            torch.distributed.all_reduce(total)  # the global batch's mean loss, every rank
            return total[0].to(loss.dtype), logits.detach()
        loss.backward()
        self.optimizer.step()
        return loss.detach(), logits.detach()

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed cross-entropy, correct count) of a test batch in eval mode, in the run's
        precision; with ``test_flip`` of the mean logits of each image and its mirror."""
        if x.shape[0] == 0:  # an empty shard (a short last test batch over many ranks)
            zero = torch.zeros((), device=x.device)
            return zero, zero.long()
        if self.config.engine == "manual":
            def forward(images: torch.Tensor) -> torch.Tensor:
                out = _at_least_float32(self.network.forward(images, training=False))
                self.network.clear()
                return out
        else:
            self.module.eval()
            module = self.module if self.world_size > 1 else self.forward  # local in eval

            def forward(images: torch.Tensor) -> torch.Tensor:
                with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                    return _at_least_float32(module(images))
        logits = forward(x)
        if self.config.test_flip:  # the test image and its mirror (flip along the width)
            logits = 0.5 * (logits + forward(x.flip(3)))
        loss = TF.cross_entropy(logits, y, reduction="sum")
        return loss, (logits.argmax(1) == y).sum()

    def state_dict(self) -> dict:
        model = self.module.state_dict() if self.config.engine == "autograd" \
            else self.network.state_dict()
        return {"model": model, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.config.engine == "autograd":
            self.module.load_state_dict(state["model"])
        else:
            self.network.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def load_model(run_dir: str | Path, device: torch.device | str | None = None) -> Model:
    """The network and optimizer state of a run folder's last checkpoint.

    ``device`` defaults to the one the run's config names ("auto" → CUDA when present).

    >>> model = load_model("runs/compare/b/seed0")          # doctest: +SKIP
    >>> model.module.eval()(images)                         # doctest: +SKIP
    """
    state = runs.load_checkpoint(run_dir)
    config = TrainConfig.from_json(state["config"])
    model = Model(config, resolve_device(str(device) if device is not None else config.device))
    model.load_state_dict(state)
    return model


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


def _load_initial(state: dict, initial: dict, load: Callable) -> None:
    """Load the initial weights into a freshly built network (its other entries as built)."""
    missing = sorted(set(initial) - set(state))
    if missing:
        raise RuntimeError(f"the plan's parameters {missing} are not in the network")
    load({**state, **initial})


def _autograd_model(config: TrainConfig, dropout_generator: torch.Generator) -> torch.nn.Module:
    """The run's ``nn.Module``, its conv weights undrawn (the caller loads them)."""
    if config.arch == "post":
        from bnlab.post.net import PostNet
        return PostNet(norm=config.norm, bn_kind=config.bn_kind, width=config.width,
                       momentum=config.bn_momentum, eps=config.bn_eps, init=False)
    return AllCNNC(norm=config.norm, dropout=config.dropout, width=config.width,
                   momentum=config.bn_momentum, eps=config.bn_eps, init=False,
                   final_relu=config.final_relu, dropout_generator=dropout_generator,
                   norm_kind=config.norm_kind, norm_options=norm_options(config))


def _manual_network(config: TrainConfig, dropout_generator: torch.Generator):
    """The run's :class:`bnlab.manual.Sequential`, its conv weights undrawn."""
    bn = config.norm != "none"
    if config.arch == "post":
        from bnlab.post.manual_net import post_net
        return post_net(bn=config.bn_kind if bn else "none", width=config.width,
                        gradient_errors=config.gradient_errors, momentum=config.bn_momentum,
                        eps=config.bn_eps, init=False)
    return all_cnn_c(bn=bn, dropout=config.dropout, width=config.width,
                     momentum=config.bn_momentum, eps=config.bn_eps, final_relu=config.final_relu,
                     dropout_generator=dropout_generator, init=False,
                     norm=config.norm_kind, norm_options=norm_options(config))


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Logits from bfloat16 autocast go into the loss in float32; float64 stays float64."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _build_optimizer(config: TrainConfig, params: list[torch.Tensor]):
    """torch.optim or bnlab.optim, as the config says; both step the same rules."""
    c = config
    if c.optimizer_impl == "torch":
        if c.optimizer == "sgd":
            return torch.optim.SGD(params, lr=c.lr, momentum=c.sgd_momentum,
                                   weight_decay=c.weight_decay)
        return torch.optim.Adam(params, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay,
                                amsgrad=c.optimizer == "amsgrad")
    from bnlab import optim
    if c.optimizer == "sgd":
        return optim.SGD(params, lr=c.lr, momentum=c.sgd_momentum, weight_decay=c.weight_decay)
    if c.optimizer == "amsgrad":
        return optim.AMSGrad(params, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay,
                             rule=c.amsgrad_rule)
    return optim.Adam(params, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay)


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (1-based): constant, cosine to 0, or inverse.

    >>> learning_rate(TrainConfig(lr=3e-4, lr_schedule="inverse"), 2)   # 3e-4 / 1.001
    0.0002997002997002997
    """
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / config.epochs))
    if config.lr_schedule == "inverse":  # the post's lr / (1 + 0.001 epoch), epoch from 0
        return config.lr / (1.0 + 0.001 * (epoch - 1))
    return config.lr


# ---- the run --------------------------------------------------------------------------------

def prepare_dataset(
    config: TrainConfig, device: torch.device, dataset: bdata.CIFAR10 | None = None
) -> bdata.CIFAR10:
    """The run's data on ``device``: ``dataset`` (or the one bnlab.data finds), subset.

    A subset is drawn with seed 0 whatever the run's seed, so every case and seed of a
    comparison trains on the same images and differs only in what the seed controls.
    """
    if dataset is None:
        dataset = bdata.load_cifar10(config.data_dir)
    if config.subset is not None and config.subset < dataset.num_train:
        dataset = dataset.subset(config.subset, seed=0)
    if config.batch_size > dataset.num_train:
        raise ConfigError(f"batch size {config.batch_size} is larger than the training set "
                          f"({dataset.num_train} images of {dataset.source})")
    return dataset.to(device)


def train(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    dataset: bdata.CIFAR10 | None = None,
    resume: bool = False,
    progress: bool | JobProgress = True,
    log: Callable[[str], None] = print,
    on_step: Callable[[Model, int, int], None] | None = None,
    on_epoch: Callable[[Model, dict], None] | None = None,
) -> RunResult:
    """Train one run into ``run_dir`` (created; it must not exist unless ``resume``).

    ``dataset`` may be passed in to share one loaded data set among runs (its subset is
    taken here when the config asks for one). With ``resume=True`` an existing folder is
    continued from its checkpoint; a finished run is returned as it is. ``on_step(model,
    epoch, step)`` is called after every training step (probes for the studies: the
    :class:`Model` gives the module or network, its BN layers and the optimizer);
    ``on_epoch(model, row)`` after every epoch's checkpoint (e.g. a TensorBoard writer).
    ``progress`` may be a :class:`~bnlab.progress.JobProgress` (the bar then says which run
    of the job this is and how long the job has left).

    Raises :class:`ConfigError` before any file is made, :class:`DivergenceError` when the
    loss is no longer finite (after writing ``result.json`` with the details).
    """
    config.validate()
    run_dir = Path(run_dir)
    device = resolve_device(config.device)
    lead = bdist.is_lead()  # data-parallel: every rank trains, rank 0 alone writes
    if not lead:
        log = _silent
        progress = False
    if bdist.agree(run_dir.exists()) and not resume:
        raise FileExistsError(f"{run_dir} exists: bnlab never overwrites a run "
                              f"(choose another folder, or resume it)")
    dataset = prepare_dataset(config, device, dataset)

    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
    result = runs.read_result(run_dir) if resume else None
    if result is not None:
        if result.get("status") == "finished" and not (run_dir / runs.CURVES).exists():
            _plot_run(run_dir)  # killed between result.json and its plot
        return RunResult(run_dir, runs.read_metrics(run_dir / runs.METRICS),
                         result.get("status", "finished"), result.get("message", ""))

    model = Model(config, device)
    config_json = {**config.to_json(), "data": dataset.source, "bnlab_version": __version__,
                   "torch_version": torch.__version__, "device": str(device),
                   "precision_resolved": model.precision.as_dict()}
    metrics: list[dict] = []
    if resume and (run_dir / runs.CHECKPOINT).exists():
        state = runs.load_checkpoint(run_dir, map_location=device)
        model.load_state_dict(state)
        metrics = list(state["metrics"])
        log(f"resuming {config.case} seed {config.seed} after epoch {len(metrics)}")
    elif lead:
        runs.atomic_write_json(run_dir / runs.CONFIG, config_json)
    # metrics.jsonl mirrors the checkpoint: a row appended after a checkpoint that a kill
    # prevented is dropped, so the file always matches the state we continue from.
    if lead:
        runs.write_metrics(run_dir, metrics)

    dtype = model.dtype
    started = time.perf_counter()
    first_epoch = len(metrics) + 1
    with cpu_allocator_tuned(device.type == "cpu"):
        for epoch in range(first_epoch, config.epochs + 1):
            try:
                row = _run_epoch(config, model, dataset, epoch, dtype, progress, on_step)
            except DivergenceError as error:  # on every rank alike: a global loss
                if lead:
                    runs.write_result(run_dir, "diverged", str(error),
                                      time.perf_counter() - started)
                raise
            metrics.append(row)
            if lead:
                runs.save_checkpoint(run_dir, {**model.state_dict(), "metrics": metrics,
                                               "config": config.to_json()})
                runs.append_metrics(run_dir, row)
            if on_epoch is not None:
                on_epoch(model, row)
            if epoch == first_epoch:  # the table's header, also when resuming
                log(EPOCH_HEADER)
            log(format_epoch_row(row))

    if lead:
        runs.write_result(run_dir, "finished", "", time.perf_counter() - started)
        _plot_run(run_dir)
    bdist.barrier()  # no rank goes on (to the next run, or out) before the files are written
    return RunResult(run_dir, metrics)


def _silent(text: str) -> None:
    """The log of ranks other than 0."""


def epoch_batches(config: TrainConfig, dataset: bdata.CIFAR10, generator: torch.Generator,
                  dtype: torch.dtype = torch.float32) -> tuple[Iterator, int]:
    """One epoch of training batches as the config's recipe makes them, and their number."""
    if config.recipe == "post":
        from bnlab.post import recipe as post_recipe
        batches = post_recipe.post_train_batches(
            dataset, config.batch_size, generator=generator,
            channels_last=config.channels_last, dtype=dtype)
        return batches, post_recipe.post_steps_per_epoch(dataset.num_train, config.batch_size)
    batches = bdata.train_batches(dataset, config.batch_size, generator=generator,
                                  augment=config.augment, channels_last=config.channels_last,
                                  dtype=dtype, order=config.batch_order)
    return batches, dataset.num_train // config.batch_size


def test_set_batches(config: TrainConfig, dataset: bdata.CIFAR10,
                     dtype: torch.dtype = torch.float32) -> Iterator:
    """The test set in batches of ``eval_batch_size``, prepared as the config's recipe says."""
    if config.recipe == "post":
        from bnlab.post import recipe as post_recipe
        return post_recipe.post_test_batches(dataset, config.eval_batch_size,
                                             channels_last=config.channels_last, dtype=dtype)
    return bdata.test_batches(dataset, config.eval_batch_size,
                              channels_last=config.channels_last, dtype=dtype)


def _run_epoch(config: TrainConfig, model: Model, dataset: bdata.CIFAR10, epoch: int,
               dtype: torch.dtype, progress: bool | JobProgress,
               on_step: Callable[[Model, int, int], None] | None = None) -> dict:
    device = model.device
    lr = learning_rate(config, epoch)
    model.set_epoch(epoch, lr)
    gen = _generator(config.seed, _SHUFFLE, epoch, device=device)
    batches, steps = epoch_batches(config, dataset, gen, dtype)
    bar = Progress(progress, f"{config.case} seed {config.seed} epoch {epoch}/{config.epochs}",
                   epoch=epoch, epochs=config.epochs,
                   job=progress if isinstance(progress, JobProgress) else None)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    check_every = 1 if device.type == "cpu" else 25
    start = time.perf_counter()
    for step, (x, y) in enumerate(batches, 1):
        x, y = model.shard(x, y)  # data-parallel: this rank's part; else the whole batch
        loss, logits = model.step(x, y)
        loss_sum += loss.double() * y.shape[0]
        correct += (logits.argmax(1) == y).sum()
        seen += y.shape[0]
        if on_step is not None:
            on_step(model, epoch, step)
        if step % check_every == 0 or step == steps:
            if not math.isfinite(loss.item()):
                raise DivergenceError(
                    f"case {config.case}, seed {config.seed}: the loss is {loss.item()} at "
                    f"epoch {epoch}, step {step} of {steps} (lr {lr:g}); the run folder keeps "
                    f"the last good epoch ({epoch - 1})")
            if bar.wants_update():
                elapsed = time.perf_counter() - start
                bar.update(step, steps, loss_sum.item() / seen, correct.item() / seen,
                           seen / elapsed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_time = time.perf_counter() - start
    bar.close()
    loss_sum, correct, seen = model.reduce_sums(loss_sum, correct, seen)

    eval_start = time.perf_counter()
    test_loss = torch.zeros((), dtype=torch.float64, device=device)
    test_correct = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in test_set_batches(config, dataset, dtype):
        loss, right = model.evaluate(*model.shard(x, y))
        test_loss += loss.double()
        test_correct += right
    test_loss, test_correct = model.reduce_sums(test_loss, test_correct)
    n_test = dataset.num_test
    row = {
        "epoch": epoch,
        "train_loss": loss_sum / seen,
        "train_acc": correct / seen,
        "test_loss": test_loss / n_test,
        "test_acc": test_correct / n_test,
        "epoch_time_s": train_time,
        "eval_time_s": time.perf_counter() - eval_start,
        "images_per_s": seen / train_time,
        "lr": lr,
    }
    return row


def _plot_run(run_dir: Path) -> None:
    """Draw the run's own curves.png from its folder."""
    plot_run(runs.load_run(run_dir), run_dir / runs.CURVES)
