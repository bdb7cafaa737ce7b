"""Q2's runs and measurements: the sweep, the curves, the paired claims; ``summary.json``."""

from __future__ import annotations

import dataclasses
from typing import Any

from bnlab.evidence.stats import interval_verdict, mean_std, paired_difference, t_interval
from bnlab.studies.common import StudyContext, write_summary
from bnlab.studies.q2 import figures
from bnlab.studies.q2.measure import (
    mean_train_loss,
    range_verdict,
    steps_to_loss,
    usable_range,
)
from bnlab.studies.q2.plan import (
    CHANCE,
    KEEP,
    MIN_EFFECT,
    NAME,
    NETWORKS,
    OPTIMIZERS,
    POST_CLAIM,
    TITLE,
    SweepPlan,
    sweep_plan,
)
from bnlab.studies.tuning import TunedLR, tune_lr

__all__ = ["headline_seeds", "run"]


def headline_seeds(ctx: StudyContext) -> list[int]:
    """The seeds of the comparisons at each network's best rate: the study's seeds plus the
    scale's extra headline seeds (``headline_seeds - seeds``: 5 in all at standard scale)."""
    extra = max(0, ctx.scale.headline_seeds - ctx.scale.seeds)
    return list(range(ctx.seeds + extra))


def _with_stat(values: dict[int, float | None]) -> dict[str, Any]:
    """Values by seed, their mean_std and 95% t interval."""
    stat = mean_std(list(values.values()))
    interval = t_interval(stat)
    return {**stat, "interval": list(interval) if interval else None,
            "by_seed": {str(k): v for k, v in values.items()}}


def _accuracy(tuned: TunedLR, lr: float, seed: int) -> float:
    """Final test accuracy of one sweep run; chance for a diverged (or unfinished) run."""
    value = tuned.test_acc[lr].get(seed)
    return CHANCE if value is None else value


def _curve(tuned: TunedLR, seeds: list[int]) -> dict[str, Any]:
    """Accuracy against rate for one network and optimizer: points, the usable range of the
    mean curve and of each seed's curve, and the widths over seeds."""
    grid = tuned.grid
    points = [{"lr": lr, "test_acc": _with_stat({s: _accuracy(tuned, lr, s) for s in seeds}),
               "diverged": len(tuned.diverged.get(lr, []))} for lr in grid]
    per_seed = {s: usable_range(grid, [_accuracy(tuned, lr, s) for lr in grid]) for s in seeds}
    return {"best_lr": tuned.best, "edge": tuned.edge, "points": points,
            "range": usable_range(grid, [p["test_acc"]["mean"] for p in points]),
            "seed_ranges": {str(s): r for s, r in per_seed.items()},
            "decades": _with_stat({s: r["decades"] for s, r in per_seed.items()}),
            "censored": any(r["censored_low"] or r["censored_high"]
                            for r in per_seed.values())}


def _loss_curve(tuned: TunedLR, lr: float, seeds: list[int], steps_per_epoch: int,
                epochs: int) -> dict[str, Any]:
    """Training loss against steps (mean ± std over the seeds that finished) at one rate, and
    per seed the mean loss over the run and the final test accuracy."""
    rows = {s: tuned.metrics(lr, s) for s in seeds}
    finished = [r for r in rows.values() if len(r) >= epochs]
    return {"lr": lr, "seed_list": seeds, "n_seeds": len(seeds),
            "diverged": len(tuned.diverged.get(lr, [])),
            "steps": [(e + 1) * steps_per_epoch for e in range(epochs)],
            "train_loss": [mean_std([r[e]["train_loss"] for r in finished])
                           for e in range(epochs)],
            "mean_train_loss": {s: mean_train_loss(r, epochs) for s, r in rows.items()},
            "test_acc": {s: _accuracy(tuned, lr, s) for s in seeds},
            "metrics": rows}


def _claim(bn: dict[int, float | None], none: dict[int, float | None], measure: str,
           expected: str) -> dict[str, Any]:
    """One paired claim, BN - no BN by seed, judged against ``MIN_EFFECT[measure]``."""
    difference = paired_difference(bn, none)
    seeds = sorted(set(bn) & set(none))
    return {"measure": measure, "expected": expected, "min_effect": MIN_EFFECT[measure],
            "bn": _with_stat(bn), "none": _with_stat(none), "difference": difference,
            "seed_list": seeds, "n_seeds": len(seeds), "n_pairs": difference["n"],
            "verdict": interval_verdict(difference, expected, MIN_EFFECT[measure])}


def _speedup(at_best: dict[str, dict[str, Any]], steps_per_epoch: int,
             total_steps: int) -> dict[str, Any]:
    """The steps BN needs, at its best rate, to reach no-BN's final training loss at no-BN's
    best rate (mean over seeds), against the whole run no-BN needed for it: descriptive,
    after Ioffe & Szegedy's "14 times fewer training steps" (their Sec. 4.2)."""
    finals = [r[-1]["train_loss"] for r in at_best["none"]["metrics"].values() if r]
    level = mean_std(finals)["mean"]
    bn = mean_std([] if level is None else
                  [steps_to_loss(r, steps_per_epoch, level)
                   for r in at_best["torch"]["metrics"].values()])
    return {"level": level, "bn_steps": bn, "reached": bn["n"],
            "runs": len(at_best["torch"]["metrics"]), "total_steps": total_steps,
            "ratio": total_steps / bn["mean"] if bn["mean"] else None}


def _optimizer(ctx: StudyContext, plan: SweepPlan, optimizer: str,
               steps_per_epoch: int) -> dict[str, Any]:
    """The sweep of one optimizer for both networks, its curves and its claims."""
    seeds, headline = ctx.seed_list(), headline_seeds(ctx)
    common = plan.common_rate(optimizer)
    curves, at_best, at_common = {}, {}, {}
    for norm, label in NETWORKS:
        tuned = tune_lr(ctx, norm=norm, optimizer=optimizer, grid=plan.grid(optimizer),
                        seeds=ctx.seeds, **plan.fields())
        best = tuned.best
        if len(headline) > len(seeds):  # extra seeds at the chosen rate only (same run names)
            extra = tune_lr(ctx, norm=norm, optimizer=optimizer, grid=[best],
                            seeds=len(headline), **plan.fields())
            tuned.test_acc[best], tuned.run_dirs[best] = extra.test_acc[best], extra.run_dirs[best]
            tuned.diverged[best] = extra.diverged[best]
        curves[norm] = {"label": label, **_curve(tuned, seeds)}
        at_best[norm] = _loss_curve(tuned, best, headline, steps_per_epoch, plan.epochs)
        at_common[norm] = _loss_curve(tuned, common, seeds, steps_per_epoch, plan.epochs)
    claims = {}
    for where, runs in (("best", at_best), ("common", at_common)):
        claims[f"faster_at_{where}"] = _claim(runs["torch"]["mean_train_loss"],
                                              runs["none"]["mean_train_loss"],
                                              "mean_train_loss", "below")
        claims[f"higher_accuracy_at_{where}"] = _claim(runs["torch"]["test_acc"],
                                                       runs["none"]["test_acc"],
                                                       "test_acc", "above")
    widths = {norm: {int(s): r["decades"] for s, r in curves[norm]["seed_ranges"].items()}
              for norm in curves}
    wider = _claim(widths["torch"], widths["none"], "decades", "above")
    wider["verdict"] = range_verdict(wider["difference"], curves["torch"]["censored"],
                                     curves["none"]["censored"], MIN_EFFECT["decades"])
    claims["wider_range"] = wider
    speedup = _speedup(at_best, steps_per_epoch, steps_per_epoch * plan.epochs)
    for runs in (*at_best.values(), *at_common.values()):
        runs.pop("metrics")
    return {"grid": plan.grid(optimizer), "common_rate": common, "curves": curves,
            "loss_curves": {"best": at_best, "common": at_common}, "claims": claims,
            "speedup": speedup}


def run(ctx: StudyContext) -> dict:
    """Train the sweep (or reuse its runs), measure, draw; ``summary.json``; the summary."""
    dataset = ctx.load_data()
    plan, notes = sweep_plan(ctx.scale), []
    n_train = min(plan.subset or dataset.num_train, dataset.num_train)
    if plan.batch_size > n_train:
        notes.append(f"batch size {plan.batch_size} exceeds the {n_train} training images: "
                     f"{n_train} used")
        plan = dataclasses.replace(plan, batch_size=n_train)
    steps_per_epoch = plan.steps_per_epoch(dataset.num_train)
    optimizers = {o: _optimizer(ctx, plan, o, steps_per_epoch) for o in OPTIMIZERS}
    summary = {
        "study": NAME, "title": TITLE, "data": dataset.source, "preset": ctx.scale.name,
        "seeds": ctx.seeds, "seed_list": ctx.seed_list(),
        "headline_seeds": headline_seeds(ctx),
        "settings": {**plan.fields(), "train_images": n_train,
                     "steps_per_epoch": steps_per_epoch,
                     "total_steps": steps_per_epoch * plan.epochs, "points": plan.points,
                     "per_decade": plan.per_decade, "lr_schedule": "cosine", "chance": CHANCE,
                     "keep": KEEP, "min_effect": MIN_EFFECT, "scale_width": ctx.scale.width,
                     "scale_subset": ctx.scale.subset},
        "optimizers": optimizers,
        "post_claim": POST_CLAIM,
        "notes": notes,
        "figures": {"lr_sweep": "q2_lr_sweep.png", "loss_curves": "q2_loss_curves.png"},
    }
    figures.plot_sweep(summary, ctx.out / summary["figures"]["lr_sweep"])
    figures.plot_loss_curves(summary, ctx.out / summary["figures"]["loss_curves"])
    write_summary(ctx.out, summary)
    return summary
