"""Q2 — What does BN buy? Speed of convergence, and tolerance to the learning rate.

The post: with BN (its case b) the model "was able to achieve higher accuracy", and "batch
normalization really does help with generalization as well as faster convergence". The
original paper adds that BN allows much higher learning rates. Two experiments:

Experiment 1, convergence. All-CNN-C with and without BN, the same config (Adam at the
scale's lr, cosine schedule, the scale's epochs), ``ctx.seeds`` seeds each. From the test
accuracy after every epoch: the first epoch, and the training seconds (cumulative
``epoch_time_s``, evaluation excluded) at which the run reaches given accuracies. The
thresholds come from the run without BN, so they mean something at every scale:

    threshold_f = chance + f * (A_none - chance),   f in FRACTIONS,  chance = 0.1

where A_none is the mean final test accuracy without BN (f = 1: "reach what no-BN reaches
at the end"). A seed that never reaches a threshold is reported as not reached, never
averaged in.

Experiment 2, tolerance to the learning rate. Final test accuracy across a log-spaced
sweep, three decades for each optimizer (Adam 1e-4..1e-1; SGD with momentum 0.9,
1e-3..1), with and without BN. A run whose loss stops being finite raises
:class:`~bnlab.train.DivergenceError`: it is counted as diverged with chance accuracy (0.1)
and marked. To fit the budget the sweep trains ``max(1, epochs // 2)`` epochs with
``max(1, seeds - 1)`` seed(s) per point (the section says so); the headline (with vs
without BN at the default lr) is experiment 1, at full length with every seed. Per curve:
the width, in decades of lr, of the contiguous range around the best lr whose accuracy is
within ``TOLERANCE`` of the best.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bnlab.evidence.figures import color, save_figure
from bnlab.evidence.stats import compare_means, fmt_pct, fmt_pm, mean_std, verdict, verdict_phrase
from bnlab.studies.common import StudyContext, note_lines, read_summary, write_summary
from bnlab.train import DivergenceError, RunResult, TrainConfig

__all__ = [
    "NAME",
    "TITLE",
    "compare_ranges",
    "first_reaching",
    "lr_range_width",
    "render",
    "run",
    "sweep_point",
    "thresholds_from",
]

NAME = "q2"
TITLE = "Q2 — What does BN buy?"

CHANCE = 0.1                    # accuracy of a guess among 10 classes
FRACTIONS = (0.5, 0.8, 1.0)     # thresholds: chance + f (A_none - chance)
VERDICT_FRACTION = 0.8          # the threshold the convergence verdict is decided on
NORMS = (("none", "no BN"), ("torch", "BN"))
SWEEPS: dict[str, tuple[float, ...]] = {  # five points, 3/4 decade apart, over three decades
    "adam": tuple(10 ** (-4 + 0.75 * k) for k in range(5)),   # 1e-4 .. 1e-1
    "sgd": tuple(10 ** (-3 + 0.75 * k) for k in range(5)),    # 1e-3 .. 1
}
OPTIMIZER_LABELS = {"adam": "Adam", "sgd": "SGD (momentum 0.9)"}
TOLERANCE = 0.05                # "within 5 points of the best accuracy"
POST_CLAIM = ("with BN the model reached a higher test accuracy, and BN \"really does help "
              "with generalization as well as faster convergence\".")


# ---- measurements -------------------------------------------------------------------------

def thresholds_from(reference_acc: float | None, fractions: Sequence[float] = FRACTIONS,
                    chance: float = CHANCE) -> list[float]:
    """``chance + f * (reference - chance)`` for each f, rounded to 3 decimals; [] when the
    reference is missing or not above chance (nothing to measure the way to).

    >>> thresholds_from(0.5)
    [0.3, 0.42, 0.5]
    """
    if reference_acc is None or reference_acc <= chance:
        return []
    return [round(chance + f * (reference_acc - chance), 3) for f in fractions]


def first_reaching(metrics: Sequence[dict[str, Any]], threshold: float) -> dict[str, Any] | None:
    """The first epoch whose test accuracy is at least ``threshold``, and the training
    seconds spent until then (the sum of ``epoch_time_s`` up to and including it); None
    when no epoch reaches it.

    >>> first_reaching([{"epoch": 1, "test_acc": 0.2, "epoch_time_s": 2.0},
    ...                 {"epoch": 2, "test_acc": 0.4, "epoch_time_s": 3.0}], 0.3)
    {'epoch': 2, 'seconds': 5.0}
    """
    seconds = 0.0
    for m in metrics:
        seconds += float(m["epoch_time_s"])
        if m["test_acc"] >= threshold:
            return {"epoch": int(m["epoch"]), "seconds": seconds}
    return None


def lr_range_width(lrs: Sequence[float], accs: Sequence[float | None],
                   tolerance: float = TOLERANCE, chance: float = CHANCE) -> dict[str, Any]:
    """The usable learning rates of one curve: the contiguous run of grid points around the
    best accuracy whose accuracy is at least ``max(best - tolerance, chance + tolerance)``
    -- close to the best, and clearly above a guess. Returns the best point, the lowest and
    highest lr of the run and its width in decades, log10(high / low) (0 when only the
    best point qualifies); ``usable`` is False, and the run and width None, when even the
    best is not ``tolerance`` above chance (a curve that never learned has no usable lr).
    ``lrs`` ascending; a missing accuracy breaks the run.

    >>> lr_range_width([1e-3, 1e-2, 1e-1, 1.0], [0.5, 0.58, 0.6, 0.2])["decades"]
    1.0
    >>> lr_range_width([1e-3, 1e-2], [0.1, 0.12])["usable"]
    False
    """
    empty = {"best_lr": None, "best_acc": None, "low": None, "high": None, "decades": None,
             "usable": False}
    if not accs or all(a is None for a in accs):
        return empty
    best = max(range(len(accs)), key=lambda i: -math.inf if accs[i] is None else accs[i])
    if accs[best] < chance + tolerance:
        return {**empty, "best_lr": lrs[best], "best_acc": accs[best]}
    floor = max(accs[best] - tolerance, chance + tolerance)

    def ok(i: int) -> bool:
        return accs[i] is not None and accs[i] >= floor

    low = high = best
    while low > 0 and ok(low - 1):
        low -= 1
    while high < len(accs) - 1 and ok(high + 1):
        high += 1
    return {"best_lr": lrs[best], "best_acc": accs[best], "low": lrs[low], "high": lrs[high],
            "decades": math.log10(lrs[high] / lrs[low]), "usable": True}


def compare_ranges(bn: dict[str, Any], none: dict[str, Any]) -> str:
    """``wider`` / ``narrower`` / ``equal`` usable range with BN than without, or
    ``neither usable``; a curve with no usable lr has the narrower range.

    >>> compare_ranges({"decades": 1.5, "usable": True}, {"decades": None, "usable": False})
    'wider'
    """
    if not bn.get("usable") and not none.get("usable"):
        return "neither usable"
    if not none.get("usable"):
        return "wider"
    if not bn.get("usable"):
        return "narrower"
    difference = bn["decades"] - none["decades"]
    return "wider" if difference > 1e-9 else "narrower" if difference < -1e-9 else "equal"


def sweep_point(ctx: StudyContext, name: str, config: TrainConfig) -> dict[str, Any]:
    """Train (or reuse) one sweep run; a diverged run counts as chance accuracy, marked.

    Returns ``{"status", "test_acc", "diverged", "message"}``; ``test_acc`` is the final test
    accuracy, or ``CHANCE`` when the run diverged (``DivergenceError`` now, or a run folder
    whose ``result.json`` says so when resumed).
    """
    try:
        result: RunResult = ctx.train_run(name, config)
    except DivergenceError as error:
        return {"status": "diverged", "test_acc": CHANCE, "diverged": True,
                "message": str(error)}
    if result.status == "diverged":
        return {"status": "diverged", "test_acc": CHANCE, "diverged": True,
                "message": result.message}
    return {"status": result.status, "test_acc": result.final_test_acc, "diverged": False,
            "message": result.message}


# ---- the study ----------------------------------------------------------------------------

def _speed_runs(ctx: StudyContext) -> dict[str, Any]:
    """Experiment 1's runs: with and without BN at the scale's defaults, every seed."""
    runs: dict[str, Any] = {}
    for norm, label in NORMS:
        per_seed = []
        for seed in ctx.seed_list():
            name = f"speed/{'bn' if norm == 'torch' else 'none'}/seed{seed}"
            try:
                result = ctx.train_run(name, ctx.config(norm=norm, seed=seed))
                status, metrics, message = result.status, result.metrics, result.message
            except DivergenceError as error:
                status, metrics, message = "diverged", [], str(error)
            per_seed.append({"seed": seed, "status": status, "message": message,
                             "test_acc": [m["test_acc"] for m in metrics],
                             "epoch_time_s": [m["epoch_time_s"] for m in metrics],
                             "metrics": metrics})
        runs[norm] = {"label": label, "runs": per_seed}
    return runs


def _convergence(ctx: StudyContext, speed: dict[str, Any]) -> dict[str, Any]:
    """Thresholds, epochs and seconds to reach them, final accuracies, over seeds."""
    finished = {norm: [r for r in speed[norm]["runs"]
                       if r["status"] == "finished" and r["metrics"]] for norm, _ in NORMS}
    final = {norm: mean_std([r["test_acc"][-1] for r in finished[norm]]) for norm, _ in NORMS}
    reference, reference_name, notes = final["none"]["mean"], "none", []
    if reference is None or reference <= CHANCE:
        reference_name = "best"
        reference = max((f["mean"] for f in final.values() if f["mean"] is not None),
                        default=None)
        notes.append("the run without BN ended at chance, so the thresholds are fractions "
                     "of the better configuration's final accuracy")
    thresholds = thresholds_from(reference)
    table = []
    for fraction, threshold in zip(FRACTIONS, thresholds, strict=False):
        row: dict[str, Any] = {"fraction": fraction, "threshold": threshold}
        for norm, _ in NORMS:
            hits = [first_reaching(r["metrics"], threshold) for r in finished[norm]]
            reached = [h for h in hits if h is not None]
            row[norm] = {"reached": len(reached), "runs": len(hits),
                         "epochs": mean_std([h["epoch"] for h in reached]),
                         "seconds": mean_std([h["seconds"] for h in reached]),
                         "per_seed": hits}
        table.append(row)
    epochs = len(finished["none"][0]["metrics"]) if finished["none"] else None
    curves = {}
    for norm, _ in NORMS:
        rows = [r["test_acc"] for r in finished[norm]]
        cumulative = [[sum(r["epoch_time_s"][:i + 1]) for i in range(len(r["epoch_time_s"]))]
                      for r in finished[norm]]
        curves[norm] = {
            "test_acc": [mean_std(col) for col in zip(*rows, strict=True)] if rows else [],
            "seconds": [mean_std(col) for col in zip(*cumulative, strict=True)]
            if cumulative else [],
            "epoch_time_s": mean_std([t for r in finished[norm] for t in r["epoch_time_s"]]),
        }
    return {"final_test_acc": final, "reference": reference_name, "reference_acc": reference,
            "thresholds": table, "curves": curves, "epochs": epochs, "notes": notes,
            "runs": {norm: [{k: v for k, v in r.items() if k != "metrics"}
                            for r in speed[norm]["runs"]] for norm, _ in NORMS}}


def _lr_sweep(ctx: StudyContext) -> dict[str, Any]:
    """Experiment 2: final test accuracy over the lr grids, with and without BN."""
    epochs = max(1, ctx.scale.epochs // 2)
    seeds = list(range(max(1, ctx.seeds - 1)))
    curves: dict[str, Any] = {}
    for optimizer, lrs in SWEEPS.items():
        for norm, label in NORMS:
            points = []
            for lr in lrs:
                runs = []
                for seed in seeds:
                    name = (f"sweep/{optimizer}/{'bn' if norm == 'torch' else 'none'}/"
                            f"lr{lr:.2g}/seed{seed}")
                    config = ctx.config(norm=norm, optimizer=optimizer, lr=lr, epochs=epochs,
                                        seed=seed)
                    runs.append({"seed": seed, **sweep_point(ctx, name, config)})
                points.append({"lr": lr, "test_acc": mean_std([r["test_acc"] for r in runs]),
                               "diverged": sum(r["diverged"] for r in runs), "runs": runs})
            means = [p["test_acc"]["mean"] for p in points]
            curves[f"{optimizer}/{norm}"] = {
                "optimizer": optimizer, "norm": norm,
                "label": f"{OPTIMIZER_LABELS[optimizer]}, {label}",
                "points": points, "range": lr_range_width(list(lrs), means),
            }
    steps = {math.log10(lrs[1] / lrs[0]) for lrs in SWEEPS.values() if len(lrs) > 1}
    return {"epochs": epochs, "seeds": seeds, "tolerance": TOLERANCE, "chance": CHANCE,
            "grids": {k: list(v) for k, v in SWEEPS.items()},
            "step_decades": min(steps) if steps else None, "curves": curves}


def _reach_verdict(row: dict[str, Any] | None) -> tuple[str, dict[str, Any] | None]:
    """BN converges faster at this threshold: fewer epochs (beyond the spread), or BN
    reaches it in every seed where no-BN does not (and the reverse contradicts)."""
    if row is None:
        return "inconclusive", None
    bn, none = row["torch"], row["none"]
    if bn["reached"] == bn["runs"] > 0 and none["reached"] < none["runs"]:
        return "supported", None
    if none["reached"] == none["runs"] > 0 and bn["reached"] < bn["runs"]:
        return "contradicted", None
    comparison = compare_means(bn["epochs"], none["epochs"])
    return verdict(comparison["direction"], "below"), comparison


def run(ctx: StudyContext) -> dict:
    """Both experiments; figures and summary.json into ``ctx.out``; returns the summary."""
    dataset = ctx.load_data()
    base = ctx.config()
    speed = _speed_runs(ctx)
    convergence = _convergence(ctx, speed)
    sweep = _lr_sweep(ctx)

    final = convergence["final_test_acc"]
    accuracy_cmp = compare_means(final["torch"], final["none"])
    verdict_row = next((r for r in convergence["thresholds"]
                        if r["fraction"] == VERDICT_FRACTION), None)
    speed_verdict, speed_cmp = _reach_verdict(verdict_row)
    widths = {optimizer: compare_ranges(sweep["curves"][f"{optimizer}/torch"]["range"],
                                        sweep["curves"][f"{optimizer}/none"]["range"])
              for optimizer in SWEEPS}
    n_train = ctx.train_images()
    summary = {
        "study": NAME, "title": TITLE,
        "data": dataset.source, "preset": ctx.scale.name, "seeds": ctx.seeds,
        "seed_list": ctx.seed_list(),
        "settings": {"width": base.width, "epochs": base.epochs, "subset": base.subset,
                     "train_images": n_train, "batch_size": base.batch_size, "lr": base.lr,
                     "optimizer": base.optimizer, "lr_schedule": base.lr_schedule,
                     "chance": CHANCE, "fractions": list(FRACTIONS),
                     "verdict_fraction": VERDICT_FRACTION},
        "convergence": convergence,
        "lr_sweep": sweep,
        "post_claim": POST_CLAIM,
        "comparisons": {"final_test_acc_bn_vs_none": accuracy_cmp,
                        "epochs_to_verdict_threshold_bn_vs_none": speed_cmp},
        "verdicts": {
            "higher_accuracy": verdict(accuracy_cmp["direction"], "above"),
            "faster_convergence": speed_verdict,
            "lr_range_bn_vs_none": widths,
        },
        "figures": {"convergence": "q2_convergence.png", "lr_sweep": "q2_lr_sweep.png"},
    }
    _plot_convergence(summary, ctx.out / "q2_convergence.png")
    _plot_sweep(summary, ctx.out / "q2_lr_sweep.png")
    write_summary(ctx.out, summary)
    return summary


# ---- figures ------------------------------------------------------------------------------

_COLORS = {norm: color(norm) for norm in ("none", "torch")}  # the one palette


def _plot_convergence(summary: dict[str, Any], path: Path) -> None:
    """Test accuracy vs epoch and vs training seconds, bands over seeds, thresholds dotted."""
    import matplotlib.pyplot as plt

    conv = summary["convergence"]
    fig, (ax_epoch, ax_time) = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    for norm, label in NORMS:
        curve = conv["curves"][norm]
        acc = curve["test_acc"]
        if not acc:
            continue
        mean = [a["mean"] for a in acc]
        std = [a["std"] for a in acc]
        epochs = list(range(1, len(acc) + 1))
        seconds = [s["mean"] for s in curve["seconds"]]
        for ax, x in ((ax_epoch, epochs), (ax_time, seconds)):
            ax.plot(x, mean, color=_COLORS[norm], marker="o", ms=3, lw=1.8, label=label)
            ax.fill_between(x, [m - s for m, s in zip(mean, std, strict=True)],
                            [m + s for m, s in zip(mean, std, strict=True)],
                            color=_COLORS[norm], alpha=0.2, lw=0)
    for row in conv["thresholds"]:
        for ax in (ax_epoch, ax_time):
            ax.axhline(row["threshold"], color="0.4", ls=":", lw=1)
        ax_epoch.annotate(f"threshold {row['threshold']:.3f}", (0.01, row["threshold"]),
                          xycoords=("axes fraction", "data"), fontsize=7, va="bottom")
    for ax in (ax_epoch, ax_time):
        ax.axhline(summary["settings"]["chance"], color="0.7", lw=0.8)
        ax.set_ylabel("test accuracy (fraction)")
        ax.grid(True, alpha=0.3)
    ax_epoch.set_xlabel("epoch")
    ax_epoch.xaxis.get_major_locator().set_params(integer=True)
    ax_time.set_xlabel("training time (s, cumulative, evaluation excluded)")
    ax_epoch.set_title("test accuracy vs epoch")
    ax_time.set_title("test accuracy vs training seconds")
    ax_epoch.legend(fontsize=9)
    st = summary["settings"]
    fig.suptitle(f"Convergence with and without BN: All-CNN-C, {st['optimizer']} lr "
                 f"{st['lr']:g}, {st['train_images']} training images; mean ± std over "
                 f"{summary['seeds']} seed(s)", fontsize=10)
    save_figure(fig, path)


def _plot_sweep(summary: dict[str, Any], path: Path) -> None:
    """Final test accuracy vs learning rate (log x), four curves, diverged points as x."""
    import matplotlib.pyplot as plt

    sweep = summary["lr_sweep"]
    fig, ax = plt.subplots(figsize=(10.5, 5), layout="constrained")
    styles = {"adam": "-", "sgd": "--"}
    for curve in sweep["curves"].values():
        lrs = [p["lr"] for p in curve["points"]]
        mean = [p["test_acc"]["mean"] for p in curve["points"]]
        std = [p["test_acc"]["std"] for p in curve["points"]]
        color = _COLORS[curve["norm"]]
        ax.errorbar(lrs, mean, yerr=std, color=color, ls=styles[curve["optimizer"]],
                    marker="o", ms=4, capsize=3, label=curve["label"])
        bad = [p for p in curve["points"] if p["diverged"]]
        if bad:
            ax.plot([p["lr"] for p in bad], [p["test_acc"]["mean"] for p in bad], "x",
                    color=color, ms=10, mew=2)
    ax.plot([], [], "kx", ms=8, mew=2, ls="none", label="diverged (counted as chance)")
    ax.axhline(sweep["chance"], color="0.6", lw=0.8, ls=":", label="chance")
    ax.axvline(summary["settings"]["lr"], color="0.5", lw=0.8, ls="-.",
               label="the studies' default Adam lr")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate (log scale)")
    ax.set_ylabel("final test accuracy (fraction)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    n = len(sweep["seeds"])
    ax.set_title(f"Tolerance to the learning rate: {sweep['epochs']} epoch(s), {n} seed(s) per "
                 f"point{' (mean ± std)' if n > 1 else ''}", fontsize=10)
    save_figure(fig, path)


# ---- the section --------------------------------------------------------------------------


def _reach_cell(entry: dict[str, Any], key: str, digits: int) -> str:
    if entry["reached"] == 0:
        return f"not reached (0 of {entry['runs']})"
    text = fmt_pm(entry[key], digits)
    if entry["reached"] < entry["runs"]:
        text += f" ({entry['reached']} of {entry['runs']} reached)"
    return text


def _lr(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2g}"


def _range_cell(r: dict[str, Any]) -> str:
    """``0.00056 – 0.0032 (0.75 decades; best 34.9 % at 0.0032)`` or why there is none."""
    if r["best_acc"] is None:
        return "no finished run"
    best = f"best {r['best_acc'] * 100:.1f} % at {_lr(r['best_lr'])}"
    if not r["usable"]:
        return f"none ({best}, not clearly above chance)"
    return f"{_lr(r['low'])} – {_lr(r['high'])} ({r['decades']:.2f} decades; {best})"


def render(study_dir: Path) -> str:
    """The Q2 section, drawn from ``summary.json`` alone."""
    s = read_summary(study_dir)
    st, conv, sweep, verdicts = s["settings"], s["convergence"], s["lr_sweep"], s["verdicts"]
    final = conv["final_test_acc"]
    n = s["seeds"]
    lines = [
        f"## {TITLE}",
        "",
        f"Data: **{s['data']}**; preset `{s['preset']}`. All-CNN-C at width {st['width']}, "
        f"{st['train_images']} training images, batch {st['batch_size']}.",
        "",
        "**Answer.** " + _answer(s),
        "",
        "### Experiment 1: speed of convergence",
        "",
        f"With and without BN, the same config: {st['optimizer']} at lr {st['lr']:g} "
        f"({st['lr_schedule']}), {st['epochs']} epochs, {n} seed(s). Final test accuracy: "
        f"{fmt_pct(final['torch'])} with BN, {fmt_pct(final['none'])} without. Thresholds are "
        f"chance + f × (the final accuracy {'without BN' if conv['reference'] == 'none' else 'of the better configuration'}"  # noqa: E501
        f" − chance), chance = {st['chance']}; seconds are cumulative training time "
        "(evaluation excluded), wall clock on the machine as it ran, so a machine shared with "
        "other jobs inflates and scatters them.",
        "",
        "| f | test accuracy | epochs, no BN | epochs, BN | seconds, no BN | seconds, BN |",
        "|---|---|---|---|---|---|",
    ]
    for row in conv["thresholds"]:
        lines.append(f"| {row['fraction']} | {row['threshold']:.3f} | "
                     f"{_reach_cell(row['none'], 'epochs', 1)} | "
                     f"{_reach_cell(row['torch'], 'epochs', 1)} | "
                     f"{_reach_cell(row['none'], 'seconds', 1)} | "
                     f"{_reach_cell(row['torch'], 'seconds', 1)} |")
    if not conv["thresholds"]:
        lines.append("| – | no run got above chance: no thresholds | | | | |")
    lines += note_lines(conv["notes"])
    per_epoch = conv["curves"]
    lines += [
        "",
        f"One epoch of training takes {fmt_pm(per_epoch['torch']['epoch_time_s'], 2)} s with "
        f"BN and {fmt_pm(per_epoch['none']['epoch_time_s'], 2)} s without (mean ± std over "
        "epochs and seeds), so fewer epochs are not fewer seconds one for one.",
        "",
        f"![Test accuracy (fraction) of All-CNN-C with and without BN: left against the epoch, "
        f"right against cumulative training seconds; mean ± std bands over {n} seed(s); dotted "
        f"lines are the thresholds of the table]({s['figures']['convergence']})",
        "",
        "### Experiment 2: tolerance to the learning rate",
        "",
        f"Final test accuracy at {len(sweep['grids']['adam'])} learning rates "
        f"{sweep['step_decades']:.2f} decade apart for each optimizer, with and without BN, "
        f"{sweep['epochs']} epoch(s) per run and {len(sweep['seeds'])} seed(s) per point — "
        "fewer than experiment 1, to fit the budget. A run whose loss stopped being finite "
        f"counts as diverged at chance accuracy ({sweep['chance']}), marked ×. A learning "
        f"rate is *usable* when its accuracy is within {sweep['tolerance'] * 100:.0f} points "
        f"of the curve's best and at least {sweep['tolerance'] * 100:.0f} points above "
        "chance; the range is the contiguous run of usable grid points around the best.",
    ]
    seeds_per_point = len(sweep["seeds"])
    for optimizer, grid in sweep["grids"].items():
        none, bn = sweep["curves"][f"{optimizer}/none"], sweep["curves"][f"{optimizer}/torch"]
        lines += ["", f"| {OPTIMIZER_LABELS[optimizer]}: learning rate | no BN | BN |",
                  "|---|---|---|"]
        for i, lr in enumerate(grid):
            cells = []
            for curve in (none, bn):
                point = curve["points"][i]
                cell = fmt_pct(point["test_acc"]) if seeds_per_point > 1 else \
                    f"{point['test_acc']['mean'] * 100:.1f} %"
                cells.append(cell + (" ×" if point["diverged"] else ""))
            lines.append(f"| {_lr(lr)} | {cells[0]} | {cells[1]} |")
        lines.append("| usable range | " + " | ".join(_range_cell(c["range"])
                                                      for c in (none, bn)) + " |")
    lines += [
        "",
        f"![Final test accuracy (fraction) against the peak learning rate (log x) for Adam "
        f"(solid) and SGD with momentum (dashed), with BN (orange) and without (blue); "
        f"{len(sweep['seeds'])} seed(s) per point, {sweep['epochs']} epoch(s) per run; × marks "
        f"diverged runs, counted at chance]({s['figures']['lr_sweep']})",
        "",
        "### The post's claim and the data",
        "",
        f"The post: {s['post_claim']}",
        "",
        f"- Higher accuracy with BN (final test accuracy, default lr, {n} seed(s)): "
        f"{fmt_pct(final['torch'])} vs {fmt_pct(final['none'])}. "
        + verdict_phrase(verdicts["higher_accuracy"]),
    ]
    row = next((r for r in conv["thresholds"] if r["fraction"] == st["verdict_fraction"]), None)
    if row is not None:
        lines.append(
            f"- Faster convergence with BN (epochs to test accuracy {row['threshold']:.3f}, "
            f"f = {row['fraction']}): {_reach_cell(row['torch'], 'epochs', 1)} with BN vs "
            f"{_reach_cell(row['none'], 'epochs', 1)} without. "
            + verdict_phrase(verdicts["faster_convergence"]))
    else:
        lines.append("- Faster convergence with BN: no threshold to measure it by. "
                     + verdict_phrase("inconclusive"))
    width_text = "; ".join(f"{OPTIMIZER_LABELS[o]}: {w}"
                           for o, w in verdicts["lr_range_bn_vs_none"].items())
    lines.append("- Not claimed by the post, but by the BN paper: a wider range of usable "
                 f"learning rates with BN. Usable range with BN compared with without — "
                 f"{width_text} ({len(sweep['seeds'])} seed(s) per point, grid points "
                 f"{sweep['step_decades']:.2f} decade apart, so this is a coarse reading).")
    return "\n".join(lines) + "\n"


def _answer(s: dict[str, Any]) -> str:
    """The answer paragraph, chosen by the verdicts."""
    verdicts, conv = s["verdicts"], s["convergence"]
    final = conv["final_test_acc"]
    speed = {"supported": "BN reaches a given test accuracy in fewer epochs",
             "contradicted": "BN needs more epochs to reach a given test accuracy",
             "inconclusive": "BN does not measurably change the epochs needed to reach a given "
                             "test accuracy"}[verdicts["faster_convergence"]]
    accuracy = {"supported": "ends higher",
                "contradicted": "ends lower",
                "inconclusive": "ends within the seed spread of the run without it"}[
        verdicts["higher_accuracy"]]
    sweep = s["lr_sweep"]["curves"]
    ranges = "; ".join(
        f"{OPTIMIZER_LABELS[o]}: {_decades(sweep[f'{o}/torch']['range'])} with BN, "
        f"{_decades(sweep[f'{o}/none']['range'])} without" for o in SWEEPS)
    return (f"At this scale {speed}, and at the default learning rate it {accuracy} "
            f"({fmt_pct(final['torch'])} with BN, {fmt_pct(final['none'])} without). "
            f"Usable learning rates (near the best and clearly above chance) span — {ranges}.")


def _decades(r: dict[str, Any]) -> str:
    return f"{r['decades']:.2f} decades" if r["usable"] else "none"
