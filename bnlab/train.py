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

This module is the loop: epochs, batches, the learning-rate schedule, the run folder. What a
run is lives in :mod:`bnlab.config` (:class:`TrainConfig`), the model it trains, on either
engine, in :mod:`bnlab.engines` (:class:`Model`); both are importable from here as well.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bnlab import __version__, runs
from bnlab import data as bdata
from bnlab import distributed as bdist
from bnlab.config import (  # noqa: F401 (re-exported: they lived here before bnlab.config)
    ARCHS,
    BATCH_ORDERS,
    BN_EPS,
    ENGINES,
    INIT,
    LEGACY_FIELDS,
    NORMS,
    OPTIMIZERS,
    RECIPES,
    SCHEDULES,
    ConfigError,
    TrainConfig,
    network_plan,
    norm_options,
    resolve_device,
)
from bnlab.engines import SHUFFLE_STREAM, Model, load_model, run_generator
from bnlab.evidence.curves import plot_run
from bnlab.progress import (
    EPOCH_HEADER,
    JobProgress,
    Progress,
    cpu_allocator_tuned,
    format_epoch_row,
)

__all__ = [
    "ConfigError",
    "DivergenceError",
    "Model",
    "RunResult",
    "TrainConfig",
    "load_model",
    "train",
]


class DivergenceError(RuntimeError):
    """The loss became NaN or infinite; the run folder keeps the last good epoch."""


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
    plot: bool = True,
) -> RunResult:
    """Train one run into ``run_dir`` (created; it must not exist unless ``resume``).

    ``dataset`` may be passed in to share one loaded data set among runs (its subset is
    taken here when the config asks for one). With ``resume=True`` an existing folder is
    continued from its checkpoint; a finished run is returned as it is. ``on_step(model,
    epoch, step)`` is called after every training step (probes for the studies: the
    :class:`Model` gives the module or network, its BN layers and the optimizer);
    ``on_epoch(model, row)`` after every epoch's checkpoint (e.g. a TensorBoard writer).
    ``progress`` may be a :class:`~bnlab.progress.JobProgress` (the bar then says which run
    of the job this is and how long the job has left). ``plot=False`` skips the run's own
    ``curves.png`` (about a second of matplotlib per run: the studies, with hundreds of runs,
    draw their own figures instead).

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
        if plot and result.get("status") == "finished" and not (run_dir / runs.CURVES).exists():
            _plot_run(run_dir)  # killed between result.json and its plot
        return RunResult(run_dir, runs.read_metrics(run_dir / runs.METRICS),
                         result.get("status", "finished"), result.get("message", ""))

    model = Model(config, device)
    metrics = _start_or_resume(config, model, run_dir, dataset, resume, lead, log)

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
        if plot:
            _plot_run(run_dir)
    bdist.barrier()  # no rank goes on (to the next run, or out) before the files are written
    return RunResult(run_dir, metrics)


def _start_or_resume(config: TrainConfig, model: Model, run_dir: Path,
                     dataset: bdata.CIFAR10, resume: bool, lead: bool,
                     log: Callable[[str], None]) -> list[dict]:
    """The metrics of the epochs already done: those of the checkpoint when resuming (its
    state loaded into ``model``), else none (``config.json`` written). ``metrics.jsonl`` is
    rewritten to match them (the lead rank alone writes)."""
    device = model.device
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
    return metrics


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
    gen = run_generator(config.seed, SHUFFLE_STREAM, epoch, device=device)
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
