"""Q5: exponentially weighted averages, on their own and as BN's running statistics.

Conventions. The post (after Andrew Ng's lectures) writes the average as
``v_t = beta * v_{t-1} + (1 - beta) * x_t`` with ``beta`` the weight of the *old* value
(0.9); PyTorch's BN ``momentum`` is the weight of the *new* value, ``momentum = 1 - beta``
(0.1). Started from ``v_0``, the average still holds ``beta^t`` of ``v_0`` after t steps;
*bias correction* divides that weight out, ``v_hat_t = (v_t - beta^t v_0) / (1 - beta^t)``
(:func:`bnlab.functional.bias_corrected_running_stats` for BN, where ``v_0`` is 0 for the
mean and 1 for the variance).

Four measurements:

1. **The averages themselves** (no training): many seeded realizations of a constant plus
   noise, averaged with several betas, raw and bias-corrected (:func:`ewa_experiment`).
   How long each needs to forget its start: computed (the first t with ``beta^t`` below
   1/e and below 0.01, :func:`steps_to_forget`) and measured (the step after which the
   error of the average over realizations stays below the same fractions of the true
   mean, :func:`settle_step`); and how much noise each leaves.
2. **BN's running statistics against the population statistics** over the first steps of
   a training run (PyTorch's convention, momentum 0.1): at probe steps, the running mean
   and variance of every BN layer, raw and bias-corrected, against the statistics they
   estimate, computed exactly for the current weights: Ioffe & Szegedy's Algorithm 2
   (the mean of the batch means and of the unbiased batch variances) over a fixed set of
   training images, not augmented, in batches of the training batch size
   (:func:`population_statistics`).
3. **Test accuracy in eval mode** at the same steps, with the raw running statistics, the
   bias-corrected ones and the population statistics.
4. **Final accuracy across momentum values** (0.01, 0.1, 0.5 and the cumulative average),
   raw and bias-corrected. In training mode BN normalizes with batch statistics, so the
   momentum changes only the running buffers, never the weights: one run per seed gives
   every momentum. Each step's batch statistics are read back from the run's own buffers
   (``s_t = (r_t - (1 - m) r_{t-1}) / m``) and replayed into a running average per
   momentum (:class:`RunningReplay`); the tests check a replay against a run trained with
   that momentum.

Training runs go through :meth:`StudyContext.train_run`; the measurements are taken by its
``on_step`` hook and kept in each run folder (``probes.jsonl``, ``replay-epoch<e>.pt`` at
the end of every epoch, ``final.json``), so finished runs are reused and interrupted ones
resume.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bnlab import data as bdata
from bnlab.bnstats import Stats, bn_modules, population_statistics, statistics_error
from bnlab.evidence.figures import mean_band, new_figure, save_figure
from bnlab.evidence.stats import fmt_pm, mean_std, plural, relation
from bnlab.functional import bias_corrected_running_stats
from bnlab.runs import atomic_torch_save, atomic_write_json
from bnlab.studies.common import ProbeLog, StudyContext, read_summary, write_summary
from bnlab.train import Model, TrainConfig, prepare_dataset, resolve_device

NAME = "q5"
TITLE = "Q5 — What are exponentially weighted averages, and does BN need bias correction?"

BETAS: tuple[float, ...] = (0.5, 0.9, 0.98, 0.999)   # weight of the old value (the post's)
THRESHOLDS: tuple[float, ...] = (1 / math.e, 0.01)   # start weight beta^t below these
SERIES_MEAN, SERIES_NOISE = 1.0, 0.2                 # x_t = mean + noise * N(0, 1)
REPLICATES = 4000                                    # realizations of the series
BN_MOMENTUM = 0.1                                    # PyTorch's default, the run's
MOMENTA: tuple[float | None, ...] = (0.01, 0.1, 0.5, None)  # None: cumulative average
WINDOW = 100                    # the first steps in which the running statistics are probed
EARLY = 10                      # "the very first steps": probed at every step up to this
PROBE_EVERY = 5                 # then every this many steps up to WINDOW
POPULATION_IMAGES = 512         # training images behind the population statistics
TEST_IMAGES = 500               # test images of the accuracy probes
_SERIES_SEED, _POPULATION_SEED = 5, 2024

__all__ = [
    "BETAS",
    "MOMENTA",
    "NAME",
    "TITLE",
    "RunningReplay",
    "ewa",
    "ewa_experiment",
    "render",
    "run",
    "settle_step",
    "steps_to_forget",
]


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


class _Probe:
    """The ``on_step`` hook of one run: the replay at every step, the probes of the first
    ``window`` steps, the replay's state at the end of every epoch, and the final
    evaluation of every momentum after the last step."""

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
        images = bdata.normalize(dataset.train_images[index],
                                 channels_last=config.channels_last)
        size = min(config.batch_size, n)
        self.population_batches = [images[i:i + size] for i in range(0, n - size + 1, size)]
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


# ---- the study ---------------------------------------------------------------------------

def run(ctx: StudyContext) -> dict:
    """The averages on their own, then one BN run per seed with the probes; the figures
    and summary.json; returns the summary."""
    dataset = ctx.load_data()
    n_train = ctx.train_images()
    notes: list[str] = []
    batch_size = ctx.batch_size(notes)
    steps_per_epoch = n_train // batch_size
    total = ctx.scale.epochs * steps_per_epoch
    window = min(WINDOW, total)

    probes: list[dict[int, dict[str, Any]]] = []
    finals: list[dict[str, Any]] = []
    for seed in ctx.seed_list():
        name = f"bn-seed{seed}"
        config = ctx.config(norm="bnlab", bn_momentum=BN_MOMENTUM, seed=seed, case="q5-bn",
                            batch_size=batch_size)
        run_dir = ctx.out / "runs" / name
        data = prepare_dataset(config, resolve_device(config.device), dataset)
        probe = _Probe(config, data, run_dir, steps_per_epoch, window)
        ctx.train_run(name, config, on_step=probe)
        records = probe.log.read()
        missing = [s for s in probe.probe_steps if s not in records]
        final_path = run_dir / "final.json"
        if missing or not final_path.exists():
            raise RuntimeError(f"{run_dir} finished without the Q5 probes (steps {missing[:5]}"
                               f" missing, or no final.json): delete it and run the study "
                               "again")
        probes.append({s: records[s] for s in probe.probe_steps})
        finals.append(json.loads(final_path.read_text()))

    series = ewa_experiment()
    summary: dict[str, Any] = {
        "data": dataset.source, "preset": ctx.scale.name, "seeds": ctx.seeds,
        "width": ctx.scale.width, "epochs": ctx.scale.epochs, "train_images": n_train,
        "batch_size": batch_size, "lr": ctx.scale.lr, "steps_per_epoch": steps_per_epoch,
        "total_steps": total, "bn_momentum": BN_MOMENTUM, "window": window,
        "early_steps": min(EARLY, window), "probe_steps": probe_steps(window),
        "population_images": min(POPULATION_IMAGES, n_train),
        "test_images": min(TEST_IMAGES, dataset.num_test), "all_test_images": dataset.num_test,
        "notes": notes, "ewa": series,
    }
    summary.update(_bn_summary(probes, finals, summary))
    summary["verdicts"] = _verdicts(summary)
    _plot_series(summary, ctx.out / "q5_ewa_series.png")
    _plot_startup(summary, ctx.out / "q5_ewa_startup.png")
    _plot_running_error(summary, ctx.out / "q5_bn_running_error.png")
    _plot_early_accuracy(summary, ctx.out / "q5_bn_early_accuracy.png")
    _plot_momentum(summary, ctx.out / "q5_momentum_accuracy.png")
    write_summary(ctx.out, summary)
    return summary


_CURVES = ("mean_error_raw", "mean_error_corrected", "var_error_raw", "var_error_corrected",
           "acc_raw", "acc_corrected", "acc_population")


def _bn_summary(probes: list[dict[int, dict[str, Any]]], finals: list[dict[str, Any]],
                summary: dict[str, Any]) -> dict[str, Any]:
    """Curves per seed; means over the first steps, at the window's end and after training,
    as mean ± std over seeds."""
    steps = summary["probe_steps"]
    early = [s for s in steps if s <= summary["early_steps"]]
    curves = {key: [[p[s][key] for s in steps] for p in probes] for key in _CURVES}
    early_stats = {key: mean_std([sum(p[s][key] for s in early) / len(early) for p in probes])
                   for key in _CURVES}
    first = {key: mean_std([p[steps[0]][key] for p in probes]) for key in _CURVES}
    end = {key: mean_std([p[steps[-1]][key] for p in probes]) for key in _CURVES}
    momenta = {}
    for momentum in MOMENTA:
        key = _momentum_key(momentum)
        entries = [f["momenta"][key] for f in finals]
        momenta[key] = {k: mean_std([e[k] for e in entries]) for k in entries[0]}
        momenta[key]["momentum"] = momentum
        momenta[key]["start_weight"] = (None if momentum is None
                                        else (1 - momentum) ** summary["total_steps"])
    return {
        "bn_curves": curves, "early": early_stats, "first_step": first, "window_end": end,
        "momenta": momenta,
        "final_acc_population": mean_std([f["acc_population"] for f in finals]),
    }


_VERDICT_TEXT = {
    "support": "The data support it",
    "contradict": "The data contradict it",
    "inconclusive": "Inconclusive at this scale",
}


def _verdicts(s: dict[str, Any]) -> dict[str, str]:
    """Each claim against the numbers: "support", "contradict" or "inconclusive"."""
    betas = s["ewa"]["betas"].values()
    tightest = f"{min(s['ewa']['thresholds']):.6g}"
    faster = [b["measured"]["corrected"][tightest] is not None and (
        b["measured"]["raw"][tightest] is None
        or b["measured"]["corrected"][tightest] < b["measured"]["raw"][tightest])
        for b in betas]
    early = s["early"]
    early_error = relation(_early_error(s, "corrected"), _early_error(s, "raw"))
    early_acc = relation(early["acc_corrected"], early["acc_raw"])
    own = s["momenta"][_momentum_key(s["bn_momentum"])]
    stand_in = relation(own["acc_raw"], s["final_acc_population"])
    return {
        "ewa_startup": "support" if all(faster) else "contradict",
        "early_error_comparison": early_error,
        "early_acc_comparison": early_acc,
        "stand_in_comparison": stand_in,
        "bias_correction": {"lower": "support", "higher": "contradict"}.get(
            early_error, "inconclusive"),
        "running_stand_in": {"within": "support", "higher": "support",
                             "lower": "contradict"}.get(stand_in, "inconclusive"),
    }


def _early_error(s: dict[str, Any], kind: str) -> dict[str, Any]:
    """Per seed, the mean of the mean's and the variance's error over the first steps."""
    steps = s["probe_steps"]
    count = len([t for t in steps if t <= s["early_steps"]])
    per_seed = [(sum(m[:count]) / count + sum(v[:count]) / count) / 2 for m, v in zip(
        s["bn_curves"][f"mean_error_{kind}"], s["bn_curves"][f"var_error_{kind}"],
        strict=True)]
    return mean_std(per_seed)


# ---- figures -----------------------------------------------------------------------------

def _plot_series(s: dict[str, Any], path: Path) -> None:
    e = s["ewa"]
    fig, axes = new_figure(1, 1, (11.0, 5.0))
    ax = axes[0][0]
    ax.plot(e["curve_steps"], e["one_series"], ".", color="0.6", ms=3,
            label=f"series x_t = {e['mean']:g} + {e['noise']:g} N(0, 1)")
    for k, (key, b) in enumerate(e["betas"].items()):
        ax.plot(e["curve_steps"], b["one_raw"], "-", color=f"C{k}", lw=1.4,
                label=f"β = {key}, raw")
        ax.plot(e["curve_steps"], b["one_corrected"], "--", color=f"C{k}", lw=1.2,
                label=f"β = {key}, bias-corrected")
    ax.axhline(e["mean"], color="black", lw=0.8, ls=":", label="true mean")
    ax.set_xscale("log")
    ax.set_xlabel("step t (log scale)")
    ax.set_ylabel("value (a.u.)")
    ax.set_title("Q5: one noisy series and its exponentially weighted averages v_t "
                 "(from v_0 = 0), raw vs bias-corrected")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, path)


def _plot_startup(s: dict[str, Any], path: Path) -> None:
    e = s["ewa"]
    fig, axes = new_figure(1, 1, (11.0, 5.0))
    ax = axes[0][0]
    for k, (key, b) in enumerate(e["betas"].items()):
        ax.plot(e["curve_steps"], b["error"]["raw"], "-", color=f"C{k}", lw=1.4,
                label=f"β = {key}, raw")
        ax.plot(e["curve_steps"], b["error"]["corrected"], "--", color=f"C{k}", lw=1.2,
                label=f"β = {key}, bias-corrected")
        for threshold, t in b["computed"].items():
            ax.plot([t], [float(threshold)], "o", color=f"C{k}", ms=5, mfc="none")
    for threshold in e["thresholds"]:
        ax.axhline(threshold, color="black", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step t (log scale)")
    ax.set_ylabel("|mean of v_t - true mean| / true mean (fraction, log scale)")
    ax.set_title(f"Q5: start-up error of the averages over {e['replicates']} realizations; "
                 "dotted: 1/e and 0.01, circles: computed steps with β^t below them")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, path)


def _epoch_lines(ax, s: dict[str, Any]) -> None:
    for t in range(s["steps_per_epoch"], s["window"] + 1, s["steps_per_epoch"]):
        ax.axvline(t, color="0.5", lw=0.8, ls=":")


def _plot_running_error(s: dict[str, Any], path: Path) -> None:
    c, steps = s["bn_curves"], s["probe_steps"]
    fig, axes = new_figure(1, 2, (11.0, 4.6))
    for ax, what, ylabel in (
            (axes[0][0], "mean", "|running mean - population mean| / population std"),
            (axes[0][1], "var", "|running var - population var| / population var")):
        mean_band(ax, steps, c[f"{what}_error_raw"], "C0", "PyTorch's convention (raw)",
              marker="o")
        mean_band(ax, steps, c[f"{what}_error_corrected"], "C1", "bias-corrected", marker="o")
        _epoch_lines(ax, s)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{ylabel} (log scale)")
        ax.set_title(f"running {'mean' if what == 'mean' else 'variance'}, averaged over "
                     "channels and BN layers")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Q5: BN's running statistics (momentum {s['bn_momentum']:g}) vs the "
                 f"population statistics of {s['population_images']} training images, first "
                 f"{s['window']} steps (mean ± std over {s['seeds']} seeds; dotted: epoch ends)",
                 fontsize=10)
    save_figure(fig, path)


def _plot_early_accuracy(s: dict[str, Any], path: Path) -> None:
    c, steps = s["bn_curves"], s["probe_steps"]
    fig, axes = new_figure(1, 1, (9.0, 4.8))
    ax = axes[0][0]
    mean_band(ax, steps, c["acc_raw"], "C0", "running statistics, PyTorch's convention (raw)",
          marker="o")
    mean_band(ax, steps, c["acc_corrected"], "C1", "running statistics, bias-corrected",
          marker="o")
    mean_band(ax, steps, c["acc_population"], "black", "population statistics (reference)", "--")
    _epoch_lines(ax, s)
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy in eval mode (fraction)")
    ax.set_title(f"Q5: test accuracy ({s['test_images']} test images) in the first "
                 f"{s['window']} steps, by the statistics BN normalizes with "
                 f"(mean ± std over {s['seeds']} seeds; dotted: epoch ends)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _plot_momentum(s: dict[str, Any], path: Path) -> None:
    fig, axes = new_figure(1, 1, (8.0, 4.8))
    ax = axes[0][0]
    keys = list(s["momenta"])
    x = list(range(len(keys)))
    for k, (kind, label) in enumerate((("raw", "PyTorch's convention (raw)"),
                                       ("corrected", "bias-corrected"))):
        stats = [s["momenta"][key][f"acc_{kind}"] for key in keys]
        ax.errorbar([i + (k - 0.5) * 0.15 for i in x], [st["mean"] for st in stats],
                    yerr=[st["std"] for st in stats], fmt="o", capsize=4, color=f"C{k}",
                    label=label)
    pop = s["final_acc_population"]
    ax.axhline(pop["mean"], color="black", ls="--", lw=1, label="population statistics")
    ax.axhspan(pop["mean"] - pop["std"], pop["mean"] + pop["std"], color="black", alpha=0.1)
    ax.set_xticks(x, [f"momentum {key}" if key != "cumulative" else "cumulative (None)"
                      for key in keys])
    ax.set_xlabel("BN momentum (PyTorch's convention: weight of the new batch)")
    ax.set_ylabel("final test accuracy in eval mode (fraction)")
    ax.set_title(f"Q5: final test accuracy after {s['total_steps']} steps by BN momentum "
                 f"(mean ± std over {s['seeds']} seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


# ---- the section -------------------------------------------------------------------------

def _steps(n: int | None) -> str:
    return "never (within the series)" if n is None else str(n)


_COMPARISON = {
    "lower": "lower with bias correction, by more than the seed spread",
    "higher": "higher with bias correction, by more than the seed spread",
    "within": "the difference is within the seed spread",
    "undetermined": "one seed gives no spread to judge the difference by",
}


def render(study_dir: Path) -> str:
    """The Markdown section, from summary.json alone."""
    s = read_summary(study_dir)
    e, v = s["ewa"], s["verdicts"]
    th = [f"{t:.6g}" for t in e["thresholds"]]
    th_names = ["1/e" if abs(t - 1 / math.e) < 1e-9 else f"{t:g}" for t in e["thresholds"]]
    lines = [
        f"## {TITLE}",
        "",
        "**Conventions.** The post (after Andrew Ng) writes v_t = β v_(t−1) + (1 − β) x_t "
        "with β the weight of the *old* value; PyTorch's BN momentum is the weight of the "
        "*new* value, momentum = 1 − β. From v_0, the average still holds β^t of v_0 after "
        "t steps; bias correction divides it out: (v_t − β^t v_0) / (1 − β^t).",
        "",
        "**The post's claim.** At test time BN standardizes with averages of the means and "
        "variances seen in training (exponentially weighted), which stand in for the "
        "statistics of the data; whether those averages need bias correction it leaves to "
        "Ng's lecture, whose answer is that the correction matters only in the first steps.",
        "",
        "### The averages themselves",
        "",
        f"{e['replicates']} seeded series x_t = {e['mean']:g} + {e['noise']:g}·N(0, 1), "
        f"{e['steps']} steps each, averaged from v_0 = 0. *Computed*: the first t with β^t "
        f"below {th_names[0]} and below {th_names[1]}. *Measured*: the step from which the "
        "error of the average over the realizations, |mean v_t − true mean| / true mean, "
        "stays below the same fraction. *Noise*: the standard deviation of v_t over the "
        "realizations at the last step, beside σ·√((1 − β)/(1 + β)).",
        "",
        f"| β | momentum | computed, {th_names[0]} | measured raw | measured corrected | "
        f"computed, {th_names[1]} | measured raw | measured corrected | noise | formula |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, b in e["betas"].items():
        lines.append(
            f"| {key} | {b['momentum']:.3g} | {b['computed'][th[0]]} | "
            f"{_steps(b['measured']['raw'][th[0]])} | "
            f"{_steps(b['measured']['corrected'][th[0]])} | {b['computed'][th[1]]} | "
            f"{_steps(b['measured']['raw'][th[1]])} | "
            f"{_steps(b['measured']['corrected'][th[1]])} | {b['noise_measured']:.4f} | "
            f"{b['noise_formula']:.4f} |")
    lines += [
        "",
        "A raw average needs about as many steps as computed to forget its start (β^t is "
        "its start value's weight); the bias-corrected one is unbiased from the first step. "
        "A larger β leaves less noise and forgets its start more slowly. Bias correction "
        "shortens the start-up for every β: "
        f"{_VERDICT_TEXT[v['ewa_startup']]}.",
        "",
        "![One realization of the noisy series (grey dots) and its exponentially weighted "
        "averages for each β, raw (solid) and bias-corrected (dashed); x: step t (log "
        "scale), y: value (arbitrary units)](q5_ewa_series.png)",
        "",
        f"![Start-up error of the averages over {e['replicates']} realizations, "
        "|mean v_t − true mean| / true mean (fraction, log scale) vs step t (log scale), "
        "raw (solid) and bias-corrected (dashed), with the thresholds (dotted) and the "
        "computed steps (circles)](q5_ewa_startup.png)",
        "",
        "### BN's running statistics in the first steps",
        "",
        f"All-CNN-C at width {s['width']:g} with bnlab's BN (momentum {s['bn_momentum']:g}, "
        f"PyTorch's convention), {s['train_images']} training images of {s['data']}, "
        f"{plural(s['epochs'], 'epoch')} of {plural(s['steps_per_epoch'], 'step')} (batch "
        f"{s['batch_size']}, Adam, peak lr {s['lr']:g}, cosine schedule), "
        f"{plural(s['seeds'], 'seed')}; numbers are mean ± std over seeds. At steps "
        f"{', '.join(map(str, s['probe_steps']))} the running statistics of every BN layer "
        "are compared with the *population statistics* they estimate, computed for the "
        "current weights by Ioffe & Szegedy's Algorithm 2 (the mean of the batch means and "
        f"of the unbiased batch variances) over {s['population_images']} training images, "
        f"not augmented, in batches of {s['batch_size']}. Errors: the mean's in units of the "
        "population standard deviation, the variance's relative; averaged over channels and "
        "layers.",
        "",
        "| statistic | raw, step " + str(s["probe_steps"][0]) + " | corrected, step "
        + str(s["probe_steps"][0]) + f" | raw, steps ≤ {s['early_steps']} | corrected, "
        f"steps ≤ {s['early_steps']} | raw, step {s['window']} | corrected, step "
        f"{s['window']} |",
        "|---|---|---|---|---|---|---|",
    ]
    f, early, end = s["first_step"], s["early"], s["window_end"]
    rows = (("error of the running mean", "mean_error", 3),
            ("error of the running variance", "var_error", 3),
            ("test accuracy", "acc", 3))
    for label, key, digits in rows:
        lines.append(
            f"| {label} | {fmt_pm(f[f'{key}_raw'], digits)} | "
            f"{fmt_pm(f[f'{key}_corrected'], digits)} | {fmt_pm(early[f'{key}_raw'], digits)} | "
            f"{fmt_pm(early[f'{key}_corrected'], digits)} | {fmt_pm(end[f'{key}_raw'], digits)} | "
            f"{fmt_pm(end[f'{key}_corrected'], digits)} |")
    lines += [
        "",
        f"Test accuracy with the population statistics: {fmt_pm(f['acc_population'], 3)} at "
        f"step {s['probe_steps'][0]}, {fmt_pm(early['acc_population'], 3)} over steps ≤ "
        f"{s['early_steps']}, {fmt_pm(end['acc_population'], 3)} at step {s['window']} "
        f"({s['test_images']} test images).",
        "",
        f"Bias-corrected against raw, over the first {s['early_steps']} steps: the error of "
        f"the running statistics (mean of the two errors) — "
        f"{_COMPARISON[v['early_error_comparison']]}; the test accuracy — "
        f"{_COMPARISON[v['early_acc_comparison']]}.",
        "",
        "![Error of BN's running mean (left, in population standard deviations) and running "
        "variance (right, relative) against the population statistics vs training step, "
        "PyTorch's raw convention vs bias-corrected, averaged over layers; log y; bands: ± "
        "std over seeds](q5_bn_running_error.png)",
        "",
        "![Test accuracy in eval mode (fraction) vs training step, BN normalizing with the "
        "raw running statistics, the bias-corrected ones, or the population statistics; "
        "bands: ± std over seeds](q5_bn_early_accuracy.png)",
        "",
        "### Final accuracy across momentum values",
        "",
        f"After all {s['total_steps']} steps, on all {s['all_test_images']} test images. "
        "Momentum changes only the running buffers (training mode normalizes with batch "
        "statistics), so every momentum comes from the same runs: each step's batch "
        "statistics are recovered from the run's own buffers and replayed into a running "
        "average per momentum (the tests check a replay against a run trained with that "
        "momentum). *Start weight*: the weight (1 − momentum)^steps the initial buffers "
        "still hold.",
        "",
        "| momentum | start weight | accuracy, raw | accuracy, corrected | mean error, raw | "
        "variance error, raw |",
        "|---|---|---|---|---|---|",
    ]
    for key, m in s["momenta"].items():
        weight = "none (cumulative)" if m["start_weight"] is None else f"{m['start_weight']:.2g}"
        lines.append(f"| {key} | {weight} | {fmt_pm(m['acc_raw'], 3)} | "
                     f"{fmt_pm(m['acc_corrected'], 3)} | {fmt_pm(m['mean_error_raw'], 3)} | "
                     f"{fmt_pm(m['var_error_raw'], 3)} |")
    own = s["momenta"][f"{s['bn_momentum']:g}"]
    beta_key = f"{1 - s['bn_momentum']:g}"
    beta_key = beta_key if beta_key in e["betas"] else next(iter(e["betas"]))
    lines += [
        "",
        f"With the population statistics: {fmt_pm(s['final_acc_population'], 3)}.",
        "",
        "![Final test accuracy in eval mode (fraction) vs BN momentum (PyTorch's convention), "
        "raw and bias-corrected running statistics, with the population statistics' "
        "accuracy (dashed, band ± std); error bars: ± std over seeds]"
        "(q5_momentum_accuracy.png)",
        "",
        f"**Answer.** An exponentially weighted average with weight β on the old value "
        f"remembers about the last 1/(1 − β) values and starts biased toward its initial "
        f"value, whose weight β^t needs {e['betas'][beta_key]['computed'][th[1]]} steps at "
        f"β = {beta_key} to fall below {th_names[1]}; bias correction removes that start. "
        "In BN, "
        f"over the first {s['early_steps']} steps the raw running statistics are off by "
        f"{fmt_pm(early['mean_error_raw'], 3)} (mean) and "
        f"{fmt_pm(early['var_error_raw'], 3)} (variance), the bias-corrected ones by "
        f"{fmt_pm(early['mean_error_corrected'], 3)} and "
        f"{fmt_pm(early['var_error_corrected'], 3)}; test accuracy "
        f"{fmt_pm(early['acc_raw'], 3)} vs {fmt_pm(early['acc_corrected'], 3)}. After "
        f"training, the running statistics of momentum {s['bn_momentum']:g} give "
        f"{fmt_pm(own['acc_raw'], 3)} against {fmt_pm(s['final_acc_population'], 3)} with "
        "the population statistics.",
        "",
        f"Against the post's claim that the running averages stand in for the data's "
        f"statistics at test time: {_VERDICT_TEXT[v['running_stand_in']]}. Against the "
        f"answer it points to, that bias correction reduces the running statistics' error "
        f"in the first steps (here the first {s['early_steps']}): "
        f"{_VERDICT_TEXT[v['bias_correction']]}.",
    ]
    for note in s.get("notes", []):
        lines += ["", f"Note: {note}."]
    return "\n".join(lines) + "\n"
