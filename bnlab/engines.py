"""The model of a run, whichever the engine: :class:`Model` builds the network a
:class:`~bnlab.config.TrainConfig` describes, on the autograd engine (an ``nn.Module`` of
:mod:`bnlab.models` or :mod:`bnlab.post.net`) or the manual one (:mod:`bnlab.manual`), with
its optimizer, precision and data-parallel wrapping, and trains and evaluates it one batch at a
time behind one interface. :func:`load_model` rebuilds it from a run folder's checkpoint.

    >>> from bnlab.config import TrainConfig
    >>> from bnlab.engines import Model
    >>> model = Model(TrainConfig(engine="manual", norm="bnlab", optimizer_impl="bnlab",
    ...                           width=0.125), torch.device("cpu"))    # doctest: +SKIP
    >>> loss, logits = model.step(images, labels)                       # doctest: +SKIP

Named for the engines it hides (not ``model.py``, which would read as a twin of
:mod:`bnlab.models`, the autograd All-CNN-C this module builds among others). The loop over
epochs and batches is :mod:`bnlab.train`'s.

Randomness. A run draws from generators seeded by (seed, purpose, epoch)
(:func:`run_generator`): the initial weights once (:data:`INIT_STREAM`), the dropout masks
per epoch (:data:`DROPOUT_STREAM`) and, in the trainer, the shuffle and augmentation
(:data:`SHUFFLE_STREAM`); nothing is drawn from the global RNG.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as TF

from bnlab import distributed as bdist
from bnlab import runs
from bnlab.config import ConfigError, TrainConfig, network_plan, norm_options, resolve_device
from bnlab.manual import all_cnn_c, set_compute_dtype, train_step
from bnlab.models import AllCNNC
from bnlab.plans import initial_parameters
from bnlab.precision import Precision, resolve_precision

__all__ = [
    "DROPOUT_STREAM",
    "INIT_STREAM",
    "SHUFFLE_STREAM",
    "Model",
    "load_model",
    "run_generator",
    "run_seed",
]


def run_seed(seed: int, *salt: int) -> int:
    """A seed derived from (seed, salt...): each purpose and epoch gets its own stream."""
    value = seed
    for s in salt:
        value = (value * 1_000_003 + s) % (2**63 - 1)
    return value


def run_generator(seed: int, *salt: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with :func:`run_seed` of (seed, salt...)."""
    return torch.Generator(device=device).manual_seed(run_seed(seed, *salt))


# the purposes a run draws for (the first salt of run_seed)
INIT_STREAM, SHUFFLE_STREAM, DROPOUT_STREAM = 1, 2, 3


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
        initial = initial_parameters(*network_plan(config), run_generator(config.seed, INIT_STREAM))
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
        self.dropout_generator.manual_seed(run_seed(self.config.seed, DROPOUT_STREAM, epoch))
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
