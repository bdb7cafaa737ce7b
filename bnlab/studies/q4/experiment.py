"""Q4's experiments: the noisy-BN runs and the SGD drift runs with their probes.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bnlab import data as bdata
from bnlab.config import TrainConfig, resolve_device
from bnlab.engines import Model
from bnlab.studies.common import ProbeLog, StudyContext, write_summary
from bnlab.studies.q4.analysis import drift_statistics, noisy_statistics, verdicts
from bnlab.studies.q4.figures import plot_noisy, plot_percentiles, plot_shift, plot_smoothness
from bnlab.studies.q4.measures import gradient_shift, layer_percentiles, smoothness_along_gradient
from bnlab.studies.q4.noise import NoiseSpec, injected_bn_noise
from bnlab.studies.q4.plan import (
    LAYERS,
    NOISY,
    NORMS,
    PERCENTILE_SAMPLE,
    PERCENTILES,
    PROBE_IMAGES,
    SGD_MOMENTUM,
    SMOOTH_DISTANCES,
    DriftPlan,
    drift_plan,
    noisy_seeds,
    probe_every,
)
from bnlab.studies.tuning import tune_lr
from bnlab.train import DivergenceError, RunResult, prepare_dataset

NOISE = NoiseSpec()
_PROBE_SEED, _SHIFT_SEED, _NOISE_SEED = 4242, 7919, 1_000_033


def run(ctx: StudyContext) -> dict:
    """The noisy-BN experiment (Adam, each network at its tuned rate) and the drift
    experiment (SGD at one common rate, with the probes); writes the figures and
    summary.json; returns the summary."""
    dataset = ctx.load_data()
    notes: list[str] = []
    batch_size = ctx.batch_size(notes)
    noisy = noisy_experiment(ctx, notes)
    plan = drift_plan(ctx.scale, ctx.train_images(), batch_size)
    drift = drift_experiment(ctx, plan, notes)
    summary: dict[str, Any] = {
        "data": dataset.source, "preset": ctx.scale.name, "seed_list": ctx.seed_list(),
        "n_seeds": ctx.seeds, "width": ctx.scale.width, "epochs": ctx.scale.epochs,
        "train_images": ctx.train_images(), "batch_size": batch_size, "lr": ctx.scale.lr,
        "layers": list(LAYERS), "percentiles": list(PERCENTILES), "norms": NORMS,
        "probe_images": min(PROBE_IMAGES, ctx.train_images()),
        "percentile_sample": PERCENTILE_SAMPLE, "smooth_distances": list(SMOOTH_DISTANCES),
        "noisy": noisy, "drift_plan": plan.to_json(), **drift, "notes": notes,
    }
    summary.update(drift_statistics(summary["curves"]))
    summary["verdicts"] = verdicts(summary)
    plot_noisy(summary, ctx.out / "q4_noisy_bn.png")
    plot_percentiles(summary, ctx.out / "q4_percentiles.png")
    plot_shift(summary, ctx.out / "q4_gradient_shift.png")
    plot_smoothness(summary, ctx.out / "q4_smoothness.png")
    write_summary(ctx.out, summary)
    return summary


def _train(ctx: StudyContext, name: str, config: TrainConfig, **kwargs: Any) -> RunResult:
    """``ctx.train_run``, where a diverged run is returned (status "diverged"), not raised."""
    try:
        return ctx.train_run(name, config, **kwargs)
    except DivergenceError as error:
        ctx.log(f"[{ctx.out.name}] {name} diverged: {error}")
        return ctx.train_run(name, config, **kwargs)  # the stored result.json of the run


def _final(result: RunResult, key: str) -> float | None:
    if result.status != "finished" or not result.metrics:
        return None
    return float(result.metrics[-1][key])


# ---- the noisy-BN experiment ------------------------------------------------------------

def noisy_experiment(ctx: StudyContext, notes: list[str]) -> dict[str, Any]:
    """No BN, BN and BN + noise (:mod:`bnlab.studies.q4.noise`) at the scale's config with
    Adam, on :func:`noisy_seeds`: no BN at its own tuned rate, BN and BN + noise at BN's
    (the noise is the only change). The BN and no-BN runs have no probe and no case name,
    so ``study all`` shares them with the other studies and the tuning sweep."""
    tuned = {norm: tune_lr(ctx, norm=norm) for norm in NORMS}
    for norm, t in tuned.items():
        if t.edge:
            notes.append(f"the tuned Adam rate of the {NORMS[norm]} network ({t.best:.3g}) is "
                         "at an end of the sweep: its best rate may lie beyond")
    seeds = noisy_seeds(ctx.scale, ctx.seeds)
    acc: dict[str, dict[int, float | None]] = {k: {} for k in (*NORMS, NOISY)}
    loss: dict[str, dict[int, float | None]] = {k: {} for k in (*NORMS, NOISY)}
    for seed in seeds:
        for norm in NORMS:
            config = ctx.config(norm=norm, lr=tuned[norm].best, seed=seed)
            result = _train(ctx, f"{norm}-adam-lr{tuned[norm].best:.3g}-s{seed}", config)
            acc[norm][seed], loss[norm][seed] = (_final(result, "test_acc"),
                                                 _final(result, "train_loss"))
        config = ctx.config(norm="torch", lr=tuned["torch"].best, seed=seed, case="q4-bn-noise")
        name = f"noisy-adam-lr{tuned['torch'].best:.3g}-s{seed}"
        with injected_bn_noise(NOISE, _NOISE_SEED + seed, ctx.out / "runs" / name):
            result = _train(ctx, name, config)
        acc[NOISY][seed], loss[NOISY][seed] = (_final(result, "test_acc"),
                                               _final(result, "train_loss"))
    return {"seed_list": seeds, "n_seeds": len(seeds), "noise": asdict(NOISE), "optimizer": "adam",
            "lr": {"none": tuned["none"].best, "torch": tuned["torch"].best,
                   NOISY: tuned["torch"].best},
            "tuning": {norm: t.to_json() for norm, t in tuned.items()},
            "test_acc": acc, "train_loss": loss, **noisy_statistics(acc, loss)}


# ---- the drift experiment ---------------------------------------------------------------

def drift_experiment(ctx: StudyContext, plan: DriftPlan, notes: list[str]) -> dict[str, Any]:
    """No BN and BN with SGD at ``plan``'s common rate, ``ctx.seeds`` seeds each, with the
    probes (:class:`_Probe`); returns ``curves`` (per norm: the measurements by seed and
    step) and the probe cadence. A diverged run is said in ``notes`` and left out."""
    if plan.min_steps == 0:
        notes.append(f"the drift runs take {plan.total_steps} SGD steps, as many as this "
                     "scale's budget allows; the standard preset takes at least 2,000")
    every = probe_every(plan.total_steps)
    curves: dict[str, dict[str, Any]] = {}
    for norm in NORMS:
        curves[norm] = {"seed_list": [], "pre_bn": {}, "relu_input": {}, "rel_diff": {},
                        "cosine": {}, "smooth": {}}
        for seed in ctx.seed_list():
            config = ctx.config(norm=norm, seed=seed, case=f"q4-drift-{norm}", optimizer="sgd",
                                sgd_momentum=SGD_MOMENTUM, lr=plan.lr, width=plan.width,
                                batch_size=plan.batch_size, epochs=plan.epochs)
            records = _drift_run(ctx, f"drift-{norm}-sgd-s{seed}", config, plan, every)
            if records is None:
                notes.append(f"the {NORMS[norm]} drift run of seed {seed} diverged (SGD, lr "
                             f"{plan.lr:g}); it is left out")
                continue
            curves[norm]["seed_list"].append(seed)
            for key, by_step in records.items():
                _add_run(curves[norm], key, by_step)
    return {"curves": curves, "every": every}


def _add_run(curve: dict[str, Any], key: str, by_step: dict[str, Any]) -> None:
    """Append one run's measurements ``by_step`` ({"steps": [...], "values": {...}}) to the
    curve ``key`` of ``curve``: values by name, one list per seed."""
    curve[f"{key}_steps"] = by_step["steps"]
    for name, series in by_step["values"].items():
        curve[key].setdefault(name, []).append(series)


def _drift_run(ctx: StudyContext, name: str, config: TrainConfig, plan: DriftPlan,
               every: dict[str, int]) -> dict[str, Any] | None:
    """Train (or reuse) one drift run with the probes; its measurements by kind, or None
    for a run that diverged."""
    dataset = ctx.load_data()
    log = ProbeLog(ctx.out / "runs" / name / "probes.jsonl")
    data = prepare_dataset(config, resolve_device(config.device), dataset)
    probe = _Probe(config, data, log, plan.steps_per_epoch, every)
    result = _train(ctx, name, config, on_step=probe)
    if result.status != "finished":
        return None
    records = log.read()
    pct_steps, pct = _collect(records, "percentiles", every["percentile"], plan.total_steps,
                              log.path)
    shift_steps, shift = _collect(records, "shift", every["shift"], plan.total_steps, log.path)
    smooth_steps, smooth = _collect(records, "smooth", every["smooth"], plan.total_steps,
                                    log.path)
    layers = [str(i) for i in LAYERS]
    return {
        "pre_bn": {"steps": pct_steps, "values": {i: [p["pre_bn"][i] for p in pct]
                                                  for i in layers}},
        "relu_input": {"steps": pct_steps, "values": {i: [p["relu_input"][i] for p in pct]
                                                      for i in layers}},
        "rel_diff": {"steps": shift_steps, "values": {i: [s[i]["rel_diff"] for s in shift]
                                                      for i in layers}},
        "cosine": {"steps": shift_steps, "values": {i: [s[i]["cosine"] for s in shift]
                                                    for i in layers}},
        "smooth": {"steps": smooth_steps, "values": {m: [s[m] for s in smooth]
                                                     for m in smooth[0]}},
    }


def _train_images(dataset: bdata.CIFAR10, index: Tensor, config: TrainConfig) -> Tensor:
    return bdata.normalize(dataset.train_images[index], channels_last=config.channels_last)


class _Probe:
    """The ``on_step`` hook of one drift run: percentiles, gradient shift and smoothness,
    each every ``every[kind]`` steps (global step = (epoch - 1) * steps_per_epoch + step),
    and all three for the initial weights (step 0) before the first."""

    def __init__(self, config: TrainConfig, dataset: bdata.CIFAR10, log: ProbeLog,
                 steps_per_epoch: int, every: dict[str, int]) -> None:
        self.config, self.dataset, self.log = config, dataset, log
        self.steps_per_epoch, self.every = steps_per_epoch, every
        g = torch.Generator().manual_seed(_PROBE_SEED)
        index = torch.randperm(dataset.num_train, generator=g)[:PROBE_IMAGES]
        self.probe = _train_images(dataset, index.to(dataset.device), config)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The batch of the gradient measurements at ``step``: a seeded draw of training
        images (not augmented)."""
        g = torch.Generator().manual_seed(_SHIFT_SEED * 1_000_003 + self.config.seed * 65_537
                                          + step)
        index = torch.randperm(self.dataset.num_train, generator=g)[:self.config.batch_size]
        index = index.to(self.dataset.device)
        return _train_images(self.dataset, index, self.config), self.dataset.train_labels[index]

    def measure(self, model: Model, step: int) -> None:
        record: dict[str, Any] = {"step": step}
        if step % self.every["percentile"] == 0:
            record["percentiles"] = layer_percentiles(model.module, self.probe)
        if step % self.every["shift"] == 0:
            x, y = self.batch(step)
            record["shift"] = gradient_shift(model.module, model.optimizer, x, y)
        if step % self.every["smooth"] == 0:
            x, y = self.batch(step)
            record["smooth"] = smoothness_along_gradient(model.module, x, y, self.config.lr)
        if len(record) > 1:
            self.log.append(record)

    def __call__(self, model: Model, epoch: int, step: int) -> None:
        global_step = (epoch - 1) * self.steps_per_epoch + step
        if global_step == 1:
            self.measure(Model(self.config, model.device), 0)
        self.measure(model, global_step)


def _collect(records: dict[int, dict[str, Any]], key: str, every: int, total: int,
             where: Path) -> tuple[list[int], list[dict[str, Any]]]:
    steps = list(range(0, total + 1, every))
    missing = [s for s in steps if key not in records.get(s, {})]
    if missing:
        raise RuntimeError(f"{where} lacks the '{key}' measurements of steps {missing[:5]}"
                           f"{'...' if len(missing) > 5 else ''}: the run was trained without "
                           f"the Q4 probes; delete that run folder and run the study again")
    return steps, [records[s][key] for s in steps]
