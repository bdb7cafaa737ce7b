"""The post presets' part of a comparison report: bnlab beside the post's own logs.

For a comparison run with ``--preset post`` or ``post-quick`` this adds, from the run
folders and the post's logged metrics (``bnlab/assets/post_logged_metrics.csv``) alone:

- ``post_curves.png``: bnlab's curves (mean, band over seeds) with the post's logged curves
  dashed, in the post's layout (train left, test right; accuracy top, cost bottom);
- ``post_cost_scaled.png``: the costs min-max scaled to [0, 1] per curve, as the post
  plotted them;
- ``summary["post"]``: per case the logged final test accuracy, bnlab's mean ± std and
  range, and whether the logged value lies within bnlab's seed range; the post's b-vs-a
  claim against the seed-to-seed spread; and the ladder b → c, each step's cost as the
  mean ± std over seeds of the paired (same seed) difference in final test accuracy;
- a Markdown section whose every number is read from that summary.

    >>> from bnlab.post.report import post_summary          # doctest: +SKIP
    >>> post_summary(runs_by_case)["cases"]["b"]["logged_final"]
    0.8939
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bnlab.evidence.figures import color
from bnlab.evidence.stats import mean_std, paired_difference
from bnlab.post.ladder import LADDER

__all__ = ["plot_scaled_cost", "post_section", "post_summary", "write_post_figures"]


def _final(run) -> float | None:
    return run.metrics[-1]["test_acc"] if run.status == "finished" and run.metrics else None


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    """:func:`~bnlab.evidence.stats.mean_std` and the values averaged."""
    return {**mean_std(values), "values": [v for v in values if v is not None]}


def _paired(upper: Sequence, lower: Sequence) -> dict[str, Any]:
    """final(upper) − final(lower) per seed both finished: mean ± std and the 95% t
    interval over those seeds (:func:`~bnlab.evidence.stats.paired_difference`)."""
    return paired_difference({run.seed: _final(run) for run in upper},
                             {run.seed: _final(run) for run in lower})


def post_summary(runs_by_case: Mapping[str, Sequence], full_cifar10: bool = False) -> dict:
    """The numbers of the post section (see the module docstring)."""
    from bnlab.post.log import LOGGED_FINAL

    cases = {}
    for case, runs in runs_by_case.items():
        stat = _stats([_final(run) for run in runs])
        logged = LOGGED_FINAL.get(case)
        within = None
        if logged is not None and stat["n"] >= 2:
            within = stat["min"] <= logged <= stat["max"]
        cases[case] = {"bnlab": stat, "logged_final": logged, "logged_within_range": within}
    claim = None
    if "a" in runs_by_case and "b" in runs_by_case:
        diff = _paired(runs_by_case["b"], runs_by_case["a"])
        spread = max((cases[c]["bnlab"]["std"] or 0.0) for c in ("a", "b"))
        claim = {
            "logged_b_minus_a": LOGGED_FINAL["b"] - LOGGED_FINAL["a"],
            "bnlab_b_minus_a": diff,
            "seed_std_max": spread,
            "n_seeds": min(cases["a"]["bnlab"]["n"], cases["b"]["bnlab"]["n"]),
        }
    ladder = []
    present = [step for step in LADDER if step in runs_by_case]
    for lower, upper in itertools.pairwise(present):
        between = LADDER[LADDER.index(lower) + 1:LADDER.index(upper) + 1]
        ladder.append({"step": upper, "from": lower, "adds": list(between),
                       "change": _paired(runs_by_case[upper], runs_by_case[lower])})
    fixed = None
    if "c-fixed" in runs_by_case and "c" in runs_by_case:
        fixed = {"c_fixed_minus_c": _paired(runs_by_case["c-fixed"], runs_by_case["c"])}
    return {"cases": cases, "b_vs_a": claim, "ladder": ladder, "c_fixed": fixed,
            "full_cifar10": full_cifar10}


def _logged_curves() -> dict[str, dict[int, dict[str, float]]]:
    """case → {epoch (1-based, as bnlab's) → metrics} from the post's logs."""
    from bnlab.post.log import load_logged_metrics

    return {case: {int(row["epoch"]) + 1: row for row in rows}
            for case, rows in load_logged_metrics().items()}


def plot_scaled_cost(runs_by_case: Mapping[str, Sequence], path: Path, title: str) -> Path:
    """Train (left) and test (right) cost, each curve min-max scaled to [0, 1] (the post's
    plots): bnlab's mean over finished seeds solid, the post's logs dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    logged = _logged_curves()
    colors = {case: color(case, index) for index, case in enumerate(runs_by_case)}
    for col, key, logged_key in ((0, "train_loss", "train_cost"), (1, "test_loss", "test_cost")):
        ax = axes[col]
        for case, runs in runs_by_case.items():
            done = [r for r in runs if r.status == "finished" and r.metrics]
            if not done:
                continue
            n = min(len(r.metrics) for r in done)
            mean = [statistics.fmean(r.metrics[e][key] for r in done) for e in range(n)]
            ax.plot(range(1, n + 1), _minmax(mean), color=colors[case], label=f"{case}: bnlab")
            if case in logged:
                epochs = sorted(logged[case])
                values = [logged[case][e][logged_key] for e in epochs]
                ax.plot(epochs, _minmax(values), color=colors[case], linestyle="--",
                        label=f"{case}: the post's log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("cost, min-max scaled per curve (0 = lowest, 1 = highest)")
        ax.set_title("train loss" if col == 0 else "test loss")
        ax.grid(alpha=0.3)
    handles, names = axes[1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="outside lower center", ncols=min(len(names), 4),
                   fontsize=9)
    fig.suptitle(title, fontsize=11, wrap=True)
    fig.savefig(path, dpi=110, format="png")
    return Path(path)


def _minmax(values: Sequence[float]) -> list[float]:
    lo, hi = min(values), max(values)
    return [(v - lo) / (hi - lo) if hi > lo else 0.0 for v in values]


def write_post_figures(folder: Path, runs_by_case: Mapping[str, Sequence], data: str,
                       labels: Mapping[str, str]) -> dict[str, Path]:
    from bnlab.evidence.curves import plot_curves

    logged = _logged_curves()
    reference = {f"{case}: the post's log (full CIFAR-10)": curves
                 for case, curves in logged.items() if case in runs_by_case}
    curves = plot_curves(
        runs_by_case, folder / "post_curves.png",
        f"bnlab ({data}) beside the post's logged curves (dashed; full CIFAR-10, one run each)",
        labels=labels, reference=reference)
    scaled = plot_scaled_cost(runs_by_case, folder / "post_cost_scaled.png",
                              "Cost min-max scaled to [0, 1] per curve, as the post plotted it")
    return {"curves": curves, "scaled": scaled}


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value * 100:+.2f}" if signed else f"{value * 100:.2f}"


def _pm(stat: Mapping[str, Any], signed: bool = False) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    return f"{_pct(stat['mean'], signed)} ± {stat['std'] * 100:.2f}"


def post_section(post: Mapping[str, Any], data: str) -> str:
    """The Markdown section, from ``summary["post"]`` alone (accuracies in percent)."""
    lines = ["## Against the post's own logs", ""]
    full = post.get("full_cifar10")
    lines.append(
        f"The post's logs are one run each on full CIFAR-10 (seed 678); these runs are on "
        f"**{data}**. " + ("Same data: the values are comparable." if full else
                           "Different data and scale: compare the shapes of the curves and the "
                           "order of the cases, not the accuracies themselves."))
    lines += ["", "| case | the post's logged final test acc (%) | bnlab mean ± std (%) | "
              "bnlab range (%) | seeds | logged value within bnlab's range? |",
              "|---|---|---|---|---|---|"]
    for case, entry in post["cases"].items():
        stat = entry["bnlab"]
        rng = "n/a" if stat["min"] is None else f"{_pct(stat['min'])} – {_pct(stat['max'])}"
        within = entry["logged_within_range"]
        verdict = ("no logged value" if entry["logged_final"] is None else
                   "cannot tell (fewer than 2 seeds)" if within is None else
                   "yes" if within else "no")
        lines.append(f"| {case} | {_pct(entry['logged_final'])} | {_pm(stat)} | {rng} | "
                     f"{stat['n']} | {verdict} |")
    claim = post.get("b_vs_a")
    if claim:
        diff = claim["bnlab_b_minus_a"]
        lines += ["", "**Does b beat a?** The post's logs put b "
                  f"{_pct(claim['logged_b_minus_a'], True)} points above a, one run each. "]
        if diff["n"] >= 2:
            beyond = abs(diff["mean"]) > 2 * diff["std"] / diff["n"] ** 0.5
            lines[-1] += (
                f"Over {diff['n']} paired seeds bnlab measures b − a = {_pm(diff, True)} points "
                f"(the seed-to-seed std of a single case is up to "
                f"{claim['seed_std_max'] * 100:.2f} points). "
                + ("The difference exceeds two standard errors: the data support a real gap."
                   if beyond else "The difference is within two standard errors of zero: a "
                   "single run each cannot separate b from a, and the post's 0.56-point lead "
                   "is not supported by the spread."))
        else:
            lines[-1] += (f"bnlab measures b − a = {_pct(diff['mean'], True)} points with one "
                          "seed: no spread, so no verdict (run more seeds).")
    if post.get("ladder"):
        lines += ["", "**The ladder from b to c** (final test accuracy; each step's change is the "
                  "mean ± std over seeds of the paired same-seed difference, in points):", "",
                  "| step | = previous + | change vs previous (points) |", "|---|---|---|"]
        what = {"b-manual": "manual engine + bnlab's BN", "b-act": "per-activation BN",
                "b-act-rule": "the post's AMSGrad rule", "c": "the three gradient errors"}
        for step in post["ladder"]:
            adds = step.get("adds") or [step["step"]]
            change = " + ".join(what.get(a, a) for a in adds)
            if len(adds) > 1:  # steps in between were not run: this row lumps them together
                change = f"{change} (from {step['from']}: {len(adds)} steps at once)"
            lines.append(f"| {step['step']} | {change} | {_pm(step['change'], True)} |")
    if post.get("c_fixed"):
        lines += ["", f"c-fixed − c (true gradients and standard AMSGrad, same per-activation BN):"
                  f" {_pm(post['c_fixed']['c_fixed_minus_c'], True)} points."]
    lines += ["", "![bnlab's curves beside the post's logged curves (dashed): train left, test "
              "right, accuracy top, cross-entropy cost bottom, x = epoch](post_curves.png)", "",
              "![cost per epoch min-max scaled to [0, 1] per curve, as in the post's plots: "
              "train left, test right; bnlab solid, the post's logs dashed](post_cost_scaled.png)"]
    return "\n".join(lines) + "\n"
