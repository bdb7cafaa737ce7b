"""Q1's experiment: tune, train the arms, measure gaps and noise, judge, write summary.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bnlab import data as bdata
from bnlab.config import resolve_device
from bnlab.engines import Model, load_model
from bnlab.evidence.stats import mean_std
from bnlab.studies.common import StudyContext, write_summary
from bnlab.studies.q1.claims import judge, noise_ratio
from bnlab.studies.q1.figures import plot_gap, plot_noise
from bnlab.studies.q1.gap import FINAL_KEYS, run_entry
from bnlab.studies.q1.noise import fit_slope, noise_sources, noise_sweep
from bnlab.studies.q1.plan import (
    BATCH_SIZES,
    FIT_TOLERANCE,
    GHOST_SKIPPED_AT,
    LITERATURE,
    MIN_ACC_EFFECT,
    MIN_GAP_EFFECT,
    NAME,
    NOISE_DRAWS,
    NOISE_POOL_CAP,
    POST_CLAIM,
    SLOPE_TOLERANCE,
    THEORY_SLOPE,
    TITLE,
    Arm,
    plan_arms,
)
from bnlab.studies.tuning import tune_lr
from bnlab.train import DivergenceError, RunResult, prepare_dataset

__all__ = ["headline_seeds", "run"]

NETWORKS = (("none", "none"), ("bn", "torch"))  # (key in summary.json, TrainConfig.norm)


def headline_seeds(ctx: StudyContext) -> list[int]:
    """Seeds of the headline claim (both networks at their tuned rates): the scale's
    ``headline_seeds`` (5 at standard), unless ``--seeds`` asked for another number."""
    if ctx.seeds != ctx.scale.seeds:
        return ctx.seed_list()
    return list(range(max(ctx.seeds, ctx.scale.headline_seeds)))


def _train(ctx: StudyContext, name: str, config: Any) -> RunResult:
    """One run through ``ctx.train_run``; a divergence is recorded, not raised."""
    try:
        return ctx.train_run(name, config)
    except DivergenceError as error:
        return RunResult(ctx.out / "runs" / name, [], "diverged", str(error))


def _per_epoch_stats(rows: list[list[float]]) -> dict[str, list[float | None]]:
    """Mean and std per epoch over runs (lists of equal length)."""
    stats = [mean_std(column) for column in zip(*rows, strict=True)] if rows else []
    return {"mean": [s["mean"] for s in stats], "std": [s["std"] for s in stats]}


def train_arm(ctx: StudyContext, arm: Arm, train_set: bdata.CIFAR10) -> dict[str, Any]:
    """Train ``arm`` on its seeds and return its summary entry: label, rate, lr, config
    fields, one row per run (:func:`~bnlab.studies.q1.gap.run_entry`, plus ``run``: its
    folder under ``runs/``), mean ± std of the final numbers, per-epoch gap curves."""
    rows = []
    for seed in arm.seeds:
        name = arm.run_name(seed)
        result = _train(ctx, name, ctx.config(**arm.fields, lr=arm.lr, seed=seed))
        rows.append({**run_entry(seed, result, train_set), "run": name})
    done = [r for r in rows if r["status"] == "finished" and "test_acc" in r]
    curves = [r["curves"] for r in done]
    return {
        "key": arm.key, "label": arm.label, "rate": arm.rate, "lr": arm.lr,
        "fields": arm.fields, "runs": rows,
        "final": {k: mean_std([r[k] for r in done]) for k in FINAL_KEYS},
        "curves": {"epoch": curves[0]["epoch"] if curves else [],
                   "acc_gap": _per_epoch_stats([c["acc_gap"] for c in curves]),
                   "loss_gap": _per_epoch_stats([c["loss_gap"] for c in curves])},
    }


def _finished(arm: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in arm["runs"] if r["status"] == "finished" and "test_acc" in r]


def measure_noise(ctx: StudyContext, train_set: bdata.CIFAR10, arms: dict[str, dict],
                  device: torch.device) -> dict[str, Any]:
    """BN's noise against the batch size (the trained BN networks at their tuned rate, one
    per seed of ``ctx``, and an untrained one), and BN's beside dropout's on the same
    networks (BN + dropout, trained) at the training batch size."""
    pool = min(train_set.num_train, NOISE_POOL_CAP)
    images = bdata.normalize(train_set.train_images[:pool], channels_last=True)
    sizes = sorted({*BATCH_SIZES, ctx.scale.batch_size})
    batch_sizes = [b for b in sizes if b <= pool]
    skipped = [b for b in sizes if b > pool]
    notes = [f"batch size {b} skipped: larger than the {pool} images of the pool"
             for b in skipped]
    ctx.log(f"[{ctx.out.name}] noise: batch sizes {batch_sizes} on {pool} images, "
            f"{NOISE_DRAWS} draws")
    out = ctx.out / "runs"
    trained, measured = [], []
    for row in _finished(arms["bn@tuned"]):
        if row["seed"] in ctx.seed_list():
            module = load_model(out / row["run"], device).module
            trained.append(noise_sweep(module, images, batch_sizes, NOISE_DRAWS, row["seed"]))
            measured.append(row["seed"])
    first = ctx.seed_list()[0]
    untrained = noise_sweep(Model(ctx.config(norm="torch", seed=first), device).module,
                            images, batch_sizes, NOISE_DRAWS, first)
    batch = min(ctx.scale.batch_size, pool)
    same = []
    for row in _finished(arms["bn_dropout"]):
        model = load_model(out / row["run"], device)
        same.append({"seed": row["seed"], **noise_sources(
            model.module, images, batch, NOISE_DRAWS, row["seed"], model.dropout_generator)})

    def over_seeds(key: str) -> list[dict[str, Any]]:
        return [mean_std([s[key][i] for s in trained]) for i in range(len(batch_sizes))]

    slopes = [fit_slope(batch_sizes, s["relative_std"]) for s in trained]
    return {
        "batch_sizes": batch_sizes, "skipped_batch_sizes": skipped, "notes": notes,
        "pool_images": pool, "draws": NOISE_DRAWS, "training_batch_size": batch,
        "theory_slope": THEORY_SLOPE, "slope_tolerance": SLOPE_TOLERANCE,
        "bn_trained": {"relative_std": over_seeds("relative_std"),
                       "disagreement": over_seeds("disagreement"), "per_seed": trained,
                       "seeds_measured": measured,
                       "slope": mean_std([s for s in slopes if s is not None]),
                       "slope_per_seed": slopes},
        "bn_untrained": {"relative_std": untrained["relative_std"],
                         "disagreement": untrained["disagreement"],
                         "slope": fit_slope(batch_sizes, untrained["relative_std"]),
                         "seed": first},
        "same_network": {
            "per_seed": same,
            **{source: {key: mean_std([row[source][key] for row in same])
                        for key in ("relative_std", "disagreement")}
               for source in ("bn", "dropout", "both")},
            "bn_over_dropout": noise_ratio(same)},
    }


def _settings(ctx: StudyContext, train_set: bdata.CIFAR10, tuned: dict) -> dict[str, Any]:
    base = ctx.config()
    return {"width": base.width, "epochs": base.epochs, "subset": base.subset,
            "train_images": train_set.num_train, "test_images": train_set.num_test,
            "batch_size": base.batch_size, "common_lr": base.lr, "optimizer": base.optimizer,
            "lr_schedule": base.lr_schedule, "augment": base.augment,
            "tuned_lr": {net: t.best for net, t in tuned.items()},
            "ghost": ctx.scale.name not in GHOST_SKIPPED_AT,
            "min_gap_effect": MIN_GAP_EFFECT, "min_acc_effect": MIN_ACC_EFFECT,
            "fit_tolerance": FIT_TOLERANCE}


def run(ctx: StudyContext) -> dict:
    """Tune both networks' learning rates (the shared sweep), train every arm of
    :func:`~bnlab.studies.q1.plan.plan_arms`, measure gaps and noise, judge the claims,
    draw the figures and write summary.json; return the summary."""
    dataset = ctx.load_data()
    base = ctx.config()
    device = resolve_device(base.device)
    train_set = prepare_dataset(base, device, dataset)  # the subset every run trains on
    if ctx.finished_runs is None:  # on its own, Q1 still copies its sweep's runs to its arms
        ctx.finished_runs = {}
    tuned = {net: tune_lr(ctx, norm=norm) for net, norm in NETWORKS}
    rates = {net: {"tuned": t.best, "common": ctx.scale.lr} for net, t in tuned.items()}
    seeds, headline = ctx.seed_list(), headline_seeds(ctx)
    arms = {arm.key: train_arm(ctx, arm, train_set)
            for arm in plan_arms(rates, base.batch_size, seeds, headline,
                                 ghost=ctx.scale.name not in GHOST_SKIPPED_AT)}
    noise = measure_noise(ctx, train_set, arms, device)
    claims = judge(arms, noise, base.batch_size)
    summary = {
        "study": NAME, "title": TITLE, "data": dataset.source, "preset": ctx.scale.name,
        "seeds": len(seeds), "seed_list": seeds, "n_seeds": len(seeds),
        "headline_seeds": headline,
        "settings": _settings(ctx, train_set, tuned),
        "tuning": {net: t.to_json() for net, t in tuned.items()},
        "arms": arms, "noise": noise, "claims": claims,
        "verdicts": {name: c["verdict"] for name, c in claims.items()},
        "slope_within_theory": bool(noise["bn_trained"]["slope"]["mean"] is not None and abs(
            noise["bn_trained"]["slope"]["mean"] - THEORY_SLOPE) <= SLOPE_TOLERANCE),
        "post_claim": POST_CLAIM, "literature": LITERATURE,
        "figures": {"gap": "q1_gap.png", "noise": "q1_noise.png"},
    }
    plot_gap(summary, Path(ctx.out) / "q1_gap.png")
    plot_noise(summary, Path(ctx.out) / "q1_noise.png")
    write_summary(ctx.out, summary)
    return summary
