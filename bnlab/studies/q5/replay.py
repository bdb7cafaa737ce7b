"""Q5's measurements in a training run: running averages replayed for other momenta, probes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bnlab import data as bdata
from bnlab.bnstats import Stats, bn_modules, population_statistics, statistics_error
from bnlab.config import TrainConfig
from bnlab.engines import Model
from bnlab.functional import bias_corrected_running_stats
from bnlab.runs import atomic_torch_save, atomic_write_json
from bnlab.studies.common import ProbeLog
from bnlab.studies.q5.plan import (
    _AUGMENT_SEED,
    _POPULATION_SEED,
    EARLY,
    MOMENTA,
    POPULATION_IMAGES,
    PROBE_EVERY,
    TEST_IMAGES,
    precise_epochs,
)
from bnlab.variants.precise import precise_bn

# ---- BN statistics -----------------------------------------------------------------------



def corrected(stats: Stats, steps: int, momentum: float | None) -> Stats:
    """:func:`bias_corrected_running_stats` of every layer (PyTorch's initial values 0, 1)."""
    return [bias_corrected_running_stats(m, v, steps, momentum) for m, v in stats]


@torch.no_grad()
def accuracy_with(module: nn.Module, stats: Stats, images: Tensor, labels: Tensor,
                  batch_size: int = 500) -> float:
    """Test accuracy in eval mode of a copy of ``module`` whose BN layers normalize with
    ``stats`` (no bias correction applied on top)."""
    twin = copy.deepcopy(module)
    for bn, (mean, var) in zip(bn_modules(twin), stats, strict=True):
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        if hasattr(bn, "bias_correction"):
            bn.bias_correction = False
    twin.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = twin(images[start:start + batch_size])
        correct += (logits.argmax(1) == labels[start:start + batch_size]).sum().item()
    return correct / len(labels)


def _momentum_key(momentum: float | None) -> str:
    return "cumulative" if momentum is None else f"{momentum:g}"


class RunningReplay:
    """BN's running averages for other momenta, replayed from one run's own buffers.

    After each training step, ``update(buffers)`` takes the run's running (mean, var) per
    layer, recovers the step's batch statistics
    ``s_t = (r_t - (1 - m) r_{t-1}) / m`` (m the run's momentum; the variance is the
    unbiased batch variance, as BN averages it) and updates a running average per momentum
    in ``momenta`` (None: the cumulative average ``r_t = r_{t-1} + (s_t - r_{t-1}) / t``),
    in float64 on ``device`` (the buffers' device: no host synchronisation per step).
    Starts from PyTorch's initial buffers (mean 0, var 1).
    """

    def __init__(self, num_features: Sequence[int], run_momentum: float,
                 momenta: Sequence[float | None] = MOMENTA,
                 device: torch.device | str = "cpu") -> None:
        if not 0 < run_momentum <= 1:
            raise ValueError(f"the run's momentum must be in (0, 1], got {run_momentum}")
        self.run_momentum = run_momentum
        self.momenta = list(momenta)
        self.steps = 0
        start = [(torch.zeros(c, dtype=torch.float64, device=device),
                  torch.ones(c, dtype=torch.float64, device=device)) for c in num_features]
        self.previous: Stats = [(m.clone(), v.clone()) for m, v in start]
        self.averages: dict[str, Stats] = {
            _momentum_key(m): [(a.clone(), b.clone()) for a, b in start] for m in self.momenta}

    def update(self, buffers: Stats) -> None:
        m = self.run_momentum
        self.steps += 1
        now = [(mean.detach().double(), var.detach().double()) for mean, var in buffers]
        batch = [((r_m - (1 - m) * p_m) / m, (r_v - (1 - m) * p_v) / m)
                 for (r_m, r_v), (p_m, p_v) in zip(now, self.previous, strict=True)]
        for momentum in self.momenta:
            factor = 1.0 / self.steps if momentum is None else momentum
            averages = self.averages[_momentum_key(momentum)]
            for (a_m, a_v), (s_m, s_v) in zip(averages, batch, strict=True):
                a_m.mul_(1 - factor).add_(s_m, alpha=factor)
                a_v.mul_(1 - factor).add_(s_v, alpha=factor)
        self.previous = now

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "previous": self.previous, "averages": self.averages,
                "run_momentum": self.run_momentum, "momenta": self.momenta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.previous = [(m.clone(), v.clone()) for m, v in state["previous"]]
        self.averages = {k: [(m.clone(), v.clone()) for m, v in layers]
                         for k, layers in state["averages"].items()}

# ---- measurements in a training run -------------------------------------------------------

def _buffers(model: Model) -> Stats:
    return [(bn.running_mean, bn.running_var) for bn in model.bn_layers()]


def _on_device(stats: Stats, device: torch.device) -> Stats:
    return [(m.to(device), v.to(device)) for m, v in stats]


def augmented(images: Tensor, seed: int) -> Tensor:
    """``images`` (N, 3, H, W) uint8, randomly cropped and flipped as training augments them
    (:func:`bnlab.data.random_crop_flip`), the same for the same ``seed``; uint8."""
    generator = torch.Generator(device=images.device).manual_seed(seed)
    return bdata.random_crop_flip(images, generator)


def bn_stats(module: nn.Module) -> Stats:
    """The running (mean, var) of every BN layer of ``module``, float64 copies."""
    return [(bn.running_mean.double().clone(), bn.running_var.double().clone())
            for bn in bn_modules(module)]


class _Probe:
    """The ``on_step`` hook of one run: the replay at every step, the probes of the first
    ``window`` steps, the replay's state at the end of every epoch, precise BN against the
    moving average at the end of the :func:`precise_epochs`, and the final evaluation of
    every momentum after the last step."""

    def __init__(self, config: TrainConfig, dataset: bdata.CIFAR10, run_dir: Path,
                 steps_per_epoch: int, window: int) -> None:
        self.config, self.dataset, self.run_dir = config, dataset, run_dir
        self.log = ProbeLog(run_dir / "probes.jsonl")
        self.steps_per_epoch, self.window = steps_per_epoch, window
        self.total = config.epochs * steps_per_epoch
        self.probe_steps = probe_steps(window)
        self.replay: RunningReplay | None = None
        g = torch.Generator().manual_seed(_POPULATION_SEED)
        n = min(POPULATION_IMAGES, dataset.num_train)
        index = torch.randperm(dataset.num_train, generator=g)[:n].to(dataset.device)
        # the population the running averages estimate: batches augmented as in training
        images = bdata.normalize(augmented(dataset.train_images[index], _POPULATION_SEED),
                                 channels_last=config.channels_last)
        size = min(config.batch_size, n)
        self.population_batches = [images[i:i + size] for i in range(0, n - size + 1, size)]
        self.precise_log = ProbeLog(run_dir / "precise.jsonl")
        self.precise_steps = [e * steps_per_epoch for e in precise_epochs(config.epochs)]
        m = min(TEST_IMAGES, dataset.num_test)
        self.test_images = bdata.normalize(dataset.test_images[:m],
                                           channels_last=config.channels_last)
        self.test_labels = dataset.test_labels[:m]
        self.all_test_images = bdata.normalize(dataset.test_images,
                                               channels_last=config.channels_last)

    def _state_path(self, epoch: int) -> Path:
        return self.run_dir / f"replay-epoch{epoch}.pt"

    def __call__(self, model: Model, epoch: int, step: int) -> None:
        global_step = (epoch - 1) * self.steps_per_epoch + step
        if self.replay is None:
            self.replay = RunningReplay([bn.num_features for bn in model.bn_layers()],
                                        self.config.bn_momentum, device=model.device)
            if global_step > 1:  # resumed after epoch - 1
                path = self._state_path(epoch - 1)
                if not path.exists():
                    raise RuntimeError(f"{path} is missing: the run resumed without the Q5 "
                                       f"replay; delete {self.run_dir} and run the study again")
                self.replay.load_state_dict(torch.load(path, map_location=model.device,
                                                       weights_only=True))
        self.replay.update(_buffers(model))
        if global_step in self.probe_steps:
            self.log.append(self.measure(model, global_step))
        if global_step in self.precise_steps:
            self.precise_log.append(self.precise(model, global_step, epoch))
        if step == self.steps_per_epoch:
            atomic_torch_save(self._state_path(epoch), self.replay.state_dict())
        if global_step == self.total:
            final = self.final(model)
            atomic_write_json(self.run_dir / "final.json", final)

    def measure(self, model: Model, step: int) -> dict[str, Any]:
        """Running statistics raw and corrected vs the population's; accuracy with each."""
        module = model.module
        population = population_statistics(module, self.population_batches)
        raw = [(m.double(), v.double()) for m, v in _buffers(model)]
        fixed = corrected(raw, step, self.config.bn_momentum)
        record: dict[str, Any] = {"step": step}
        for kind, stats in (("raw", raw), ("corrected", fixed)):
            mean_error, var_error = statistics_error(stats, population)
            record[f"mean_error_{kind}"], record[f"var_error_{kind}"] = mean_error, var_error
        device = model.device
        for kind, stats in (("raw", raw), ("corrected", fixed), ("population", population)):
            record[f"acc_{kind}"] = accuracy_with(module, _on_device(stats, device),
                                                  self.test_images, self.test_labels)
        return record

    def _training_batches(self, augment: bool) -> list[Tensor]:
        """Every training image once, in batches of the run's size (the last smaller),
        augmented as in training (fixed crops) or not."""
        images = self.dataset.train_images
        if augment:
            images = augmented(images, _AUGMENT_SEED)
        images = bdata.normalize(images, channels_last=self.config.channels_last)
        size = self.config.batch_size
        return [images[i:i + size] for i in range(0, len(images), size)]

    def precise(self, model: Model, step: int, epoch: int) -> dict[str, Any]:
        """Precise BN (Wu & Johnson 2021; :func:`bnlab.variants.precise_bn`) against the
        moving average at this step: test accuracy on every test image with the run's
        running statistics, with the exact pooled statistics of one pass over the
        augmented training images, and of the plain ones; and how far the running
        statistics are from the augmented precise ones."""
        module, device = model.module, model.device
        labels = self.dataset.test_labels
        record: dict[str, Any] = {"step": step, "epoch": epoch}
        running = bn_stats(module)
        record["acc_running"] = accuracy_with(module, _on_device(running, device),
                                              self.all_test_images, labels)
        for key, augment in (("augmented", True), ("plain", False)):
            twin = copy.deepcopy(module)
            precise_bn(twin, self._training_batches(augment))
            stats = bn_stats(twin)
            record[f"acc_precise_{key}"] = accuracy_with(module, _on_device(stats, device),
                                                         self.all_test_images, labels)
            if augment:
                record["mean_error_running"], record["var_error_running"] = \
                    statistics_error(running, stats)
        return record

    def final(self, model: Model) -> dict[str, Any]:
        """After the last step: accuracy on the whole test set and the statistics' errors for
        every replayed momentum, raw and corrected; and the population statistics'
        accuracy."""
        module, device, steps = model.module, model.device, self.total
        population = population_statistics(module, self.population_batches)
        labels = self.dataset.test_labels
        out: dict[str, Any] = {"steps": steps, "momenta": {}}
        out["acc_population"] = accuracy_with(module, _on_device(population, device),
                                              self.all_test_images, labels)
        for momentum in MOMENTA:
            raw = self.replay.averages[_momentum_key(momentum)]
            entry: dict[str, Any] = {}
            for kind, stats in (("raw", raw), ("corrected", corrected(raw, steps, momentum))):
                entry[f"acc_{kind}"] = accuracy_with(module, _on_device(stats, device),
                                                     self.all_test_images, labels)
                entry[f"mean_error_{kind}"], entry[f"var_error_{kind}"] = statistics_error(
                    stats, population)
            out["momenta"][_momentum_key(momentum)] = entry
        return out


def probe_steps(window: int, early: int = EARLY, every: int = PROBE_EVERY) -> list[int]:
    """Every step up to ``early``, then every ``every`` steps, and the window's last step.

    >>> probe_steps(22)
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20, 22]
    """
    steps = set(range(1, min(early, window) + 1)) | set(range(every, window + 1, every))
    return sorted(steps | {window})
