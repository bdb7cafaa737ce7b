"""The post presets' part of a comparison report: bnlab beside the post's own logs.

For a comparison run with ``--preset post`` or ``post-quick`` this adds, from the run
folders and the post's logged metrics (``bnlab/assets/post_logged_metrics.csv``) alone:

- ``post_curves.png``: bnlab's curves (mean, band over seeds) with the post's logged curves
  dashed, in the post's layout (train left, test right; accuracy top, cost bottom);
- ``post_cost_scaled.png``: the costs min-max scaled to [0, 1] per curve, as the post
  plotted them;
- ``summary["post"]``: per case the logged final test accuracy, bnlab's mean ± std, and
  whether the logged value lies in the 95% *prediction interval for one new run* of bnlab's
  seeds, ``mean ± t_{0.975,n-1} · s · sqrt(1 + 1/n)``
  (:func:`~bnlab.evidence.stats.prediction_interval`; the post's log is one run, so the
  question is whether one more bnlab run could land there, not whether it lies between the
  extremes of n seeds, which a new run of the same code misses half the time at n = 3);
  the post's b-vs-a claim judged by the 95% t interval of the paired (same seed) difference
  b − a (:func:`~bnlab.evidence.stats.interval_verdict`: supported, contradicted or
  inconclusive), with the post's logged b − a against the prediction interval of one new
  pair; and the ladder b → c, each step's cost as the mean ± std over seeds of the paired
  difference in final test accuracy;
- the two ambiguities of the post's code (:data:`AMBIGUITIES`), said in the section;
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
from bnlab.evidence.stats import (
    interval_verdict,
    mean_std,
    paired_difference,
    prediction_interval,
)
from bnlab.post.ladder import LADDER

__all__ = ["AMBIGUITIES", "B_OVER_A_MIN_EFFECT", "plot_scaled_cost", "post_section",
           "post_summary", "write_post_figures"]

B_OVER_A_MIN_EFFECT = 0.0  # the post claims only that b ends above a: any gain counts
CONFIDENCE = 0.95

# What the post's code leaves open (bnlab/post/README.md in the design notes): said in the
# section beside the numbers, since either reading changes what case b and c computed.
AMBIGUITIES = (
    "**Case b's epsilon.** The post asks `tf.layers.batch_normalization` for epsilon 1e-8. "
    "With `fused=None` (the default) TensorFlow 1 takes its fused kernel for 4-D inputs, and "
    "`tf.nn.fused_batch_norm` raises "
    "any epsilon below 1.001e-5 to 1.001e-5 (cuDNN refuses one below its "
    "`CUDNN_BN_MIN_EPSILON`, 1e-5), so the logged case b would have normalized with "
    "1.001e-5, not 1e-8. bnlab's `post` presets use the 1e-8 the code asks for (recorded as "
    "`bn_eps` in each run's config.json); a run with `bn_eps` 1.001e-5 is the other reading.",
    "**Case c's moments.** Case c's graph reads the running mean and variance while the "
    "assignments that update them run in the same step, with no control dependency between "
    "the two; which value a step reads, m_t or m_{t-1}, depends on TensorFlow's scheduling, "
    "so the logged run does not pin it down. bnlab's manual engine updates them after the "
    "forward pass, so it reads m_{t-1}.",
)


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


def _interval(stat: Mapping[str, Any]) -> dict[str, Any] | None:
    """The 95% prediction interval for one new run, as a dict (None below two values)."""
    interval = prediction_interval(stat, CONFIDENCE)
    return None if interval is None else {"low": interval[0], "high": interval[1],
                                          "confidence": CONFIDENCE}


def _inside(value: float | None, interval: Mapping[str, Any] | None) -> bool | None:
    if value is None or interval is None:
        return None
    return interval["low"] <= value <= interval["high"]


def post_summary(runs_by_case: Mapping[str, Sequence], full_cifar10: bool = False) -> dict:
    """The numbers of the post section (see the module docstring)."""
    from bnlab.post.log import LOGGED_FINAL

    cases = {}
    for case, runs in runs_by_case.items():
        stat = _stats([_final(run) for run in runs])
        logged = LOGGED_FINAL.get(case)
        interval = _interval(stat)
        cases[case] = {"bnlab": stat, "logged_final": logged, "prediction_interval": interval,
                       "logged_within_prediction": _inside(logged, interval)}
    claim = None
    if "a" in runs_by_case and "b" in runs_by_case:
        diff = _paired(runs_by_case["b"], runs_by_case["a"])
        logged = LOGGED_FINAL["b"] - LOGGED_FINAL["a"]
        interval = _interval(diff)
        claim = {
            "logged_b_minus_a": logged,
            "bnlab_b_minus_a": diff,
            "min_effect": B_OVER_A_MIN_EFFECT,
            "verdict": interval_verdict(diff, "above", B_OVER_A_MIN_EFFECT),
            "prediction_interval": interval,
            "logged_within_prediction": _inside(logged, interval),
            "n_seeds": diff["n"],
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
            "full_cifar10": full_cifar10, "ambiguities": list(AMBIGUITIES)}


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


def _span(interval: Mapping[str, Any] | None, signed: bool = False) -> str:
    if not interval:
        return "n/a (fewer than 2 seeds)"
    return f"{_pct(interval['low'], signed)} to {_pct(interval['high'], signed)}"


def _inside_words(logged: float | None, inside: bool | None) -> str:
    if logged is None:
        return "no logged value"
    if inside is None:
        return "cannot tell (fewer than 2 seeds)"
    return "yes" if inside else "no"


def _b_vs_a_words(claim: Mapping[str, Any]) -> str:
    """The paragraph on the post's b-vs-a claim, from ``summary["post"]["b_vs_a"]``."""
    diff = claim["bnlab_b_minus_a"]
    text = (f"**Does b beat a?** The post's logs put b {_pct(claim['logged_b_minus_a'], True)} "
            "points above a, one run each. ")
    if diff["n"] < 2 or diff.get("low") is None:
        return text + (f"bnlab measures b − a = {_pct(diff['mean'], True)} points with "
                       f"{diff['n']} paired seed(s): no interval, so the verdict is "
                       "inconclusive (run more seeds).")
    text += (f"Over {diff['n']} paired seeds (b and a from the same seed) bnlab measures b − a "
             f"= {_pm(diff, True)} points, 95% t interval {_pct(diff['low'], True)} to "
             f"{_pct(diff['high'], True)}; the claim is that b ends above a by more than "
             f"{claim['min_effect'] * 100:.2f} points. Verdict: **{claim['verdict']}**. ")
    text += {"supported": "The whole interval lies above it: b beats a.",
             "contradicted": "The whole interval lies below zero: a beats b.",
             }.get(claim["verdict"], "The interval holds zero: these seeds cannot separate b "
                   "from a, and a single run each (the post's) cannot either.")
    inside = claim.get("logged_within_prediction")
    if inside is not None:
        text += (f" The post's logged difference lies {'inside' if inside else 'outside'} the "
                 f"95% prediction interval for one new pair of runs, "
                 f"{_span(claim['prediction_interval'], True)} points.")
    return text


def post_section(post: Mapping[str, Any], data: str) -> str:
    """The Markdown section, from ``summary["post"]`` alone (accuracies in percent)."""
    lines = ["## Against the post's own logs", ""]
    full = post.get("full_cifar10")
    lines.append(
        f"The post's logs are one run each on full CIFAR-10 (seed 678); these runs are on "
        f"**{data}**. " + ("Same data: the values are comparable." if full else
                           "Different data and scale: compare the shapes of the curves and the "
                           "order of the cases, not the accuracies themselves."))
    lines += ["", "Is the post's logged value one that bnlab's runs could produce? Each case's "
              "seeds give a 95% prediction interval for one new run, mean ± t(0.975, n−1) · "
              "s · √(1 + 1/n): a single new run of the same setup lands inside it 95% of the "
              "time (the range of 3 seeds would hold it only half the time).", "",
              "| case | the post's logged final test acc (%) | bnlab mean ± std (%) | seeds | "
              "95% prediction interval, one new run (%) | logged value inside it? |",
              "|---|---|---|---|---|---|"]
    for case, entry in post["cases"].items():
        stat = entry["bnlab"]
        lines.append(f"| {case} | {_pct(entry['logged_final'])} | {_pm(stat)} | {stat['n']} | "
                     f"{_span(entry['prediction_interval'])} | "
                     f"{_inside_words(entry['logged_final'], entry['logged_within_prediction'])} |")
    claim = post.get("b_vs_a")
    if claim:
        lines += ["", _b_vs_a_words(claim)]
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
    lines += ["", "**Two things the post's code leaves open** (they change what cases b and c "
              "computed, so either reading is the post's):", ""]
    lines += [f"- {text}" for text in post.get("ambiguities", AMBIGUITIES)]
    lines += ["", "![bnlab's curves beside the post's logged curves (dashed): train left, test "
              "right, accuracy top, cross-entropy cost bottom, x = epoch](post_curves.png)", "",
              "![cost per epoch min-max scaled to [0, 1] per curve, as in the post's plots: "
              "train left, test right; bnlab solid, the post's logs dashed](post_cost_scaled.png)"]
    return "\n".join(lines) + "\n"
