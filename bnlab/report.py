"""Plots, summaries and reports, drawn from run folders alone (no training, no torch needed).

A *run folder* (one case, one seed) holds ``config.json``, ``metrics.jsonl`` (one JSON
object per finished epoch) and, once the run ended, ``result.json``. A *comparison folder*
holds ``compare.json`` and one run folder per case and seed at ``<case>/seed<k>/``.
Everything here reads those files, so a report can be redrawn at any time, also while the
runs are still going (unfinished runs are reported as such and never averaged).

    >>> from bnlab.report import load_run, plot_run, summarize, write_report
    >>> run = load_run("runs/compare-quick/a/seed0")           # doctest: +SKIP
    >>> run.status, run.final["test_acc"]                      # doctest: +SKIP
    ('finished', 0.61)
    >>> plot_run(run, "runs/compare-quick/a/seed0/curves.png")  # doctest: +SKIP
    >>> summary = summarize("runs/compare-quick")              # doctest: +SKIP
    >>> summary["cases"]["b"]["final_test_acc"]["mean"]        # doctest: +SKIP
    0.64
    >>> write_report("runs/compare-quick")                     # doctest: +SKIP
    {'summary': ..., 'curves': ..., 'markdown': ..., 'html': ...}

Conventions: accuracies are fractions in [0, 1]; losses are the mean softmax
cross-entropy in nats; ``std`` is the sample standard deviation over seeds (ddof = 1),
0 for a single seed; "epoch" is 1-based, as in ``metrics.jsonl``.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bnlab.evidence.curves import curves_title, plot_curves, plot_run
from bnlab.evidence.page import markdown_to_html
from bnlab.evidence.stats import interval_verdict, mean_std, paired_difference
from bnlab.runs import (
    CURVES,
    MissingFileError,
    ReportError,
    Run,
    atomic_write_json,
    atomic_write_text,
    load_compare,
    load_run,
    read_json,
)

__all__ = [
    "THRESHOLDS",
    "MissingFileError",
    "ReportError",
    "Run",
    "answer",
    "chosen_thresholds",
    "data_is_full_cifar10",
    "load_compare",
    "load_run",
    "paired_differences",
    "reading",
    "render_markdown",
    "summarize",
    "summarize_runs",
    "summary_lines",
    "table_rows",
    "write_report",
]

SCHEMA_VERSION = 1
THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
# The smallest difference in final test accuracy (a fraction: 0.01 = 1 point) that counts as
# separating two cases, stated before any run (SPEC.md, "Evidence"): a pair is *supported*
# as different only when the whole 95% interval of its paired difference lies above it.
MIN_EFFECT = 0.01


# ---------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------


def data_is_full_cifar10(description: str) -> bool:
    """True only for bnlab's description of the full 50,000 / 10,000 CIFAR-10 split."""
    text = description.lower()
    return (
        "full: 50000 train / 10000 test" in text
        and "not the full" not in text
        and "subset" not in text
    )


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    """{mean, std (sample, 0 for one value), values}; None entries are not averaged."""
    stat = mean_std(values)
    return {"mean": stat["mean"], "std": stat["std"], "values": list(values)}


def _first_epoch_reaching(metrics: Sequence[Mapping[str, Any]], threshold: float) -> int | None:
    for record in metrics:
        if record["test_acc"] is not None and record["test_acc"] >= threshold:
            return int(record["epoch"])
    return None


def _epochs_to_acc(runs: Sequence[Run], thresholds: Sequence[float]) -> dict[str, Any]:
    table = {}
    for threshold in thresholds:
        epochs = [_first_epoch_reaching(run.metrics, threshold) for run in runs]
        reached = [e for e in epochs if e is not None]
        table[f"{threshold:g}"] = {
            "mean_epoch": statistics.fmean(reached) if reached else None,
            "reached": len(reached),
            "of": len(runs),
            "epochs": epochs,
        }
    return table


def _run_entry(run: Run, root: Path | None) -> dict[str, Any]:
    path = run.path.relative_to(root) if root and run.path.is_relative_to(root) else run.path
    return {
        "seed": run.seed,
        "status": run.status,
        "epochs_done": len(run.metrics),
        "epochs_planned": run.config.get("epochs"),
        "message": (run.result or {}).get("message", ""),
        "wall_time_s": (run.result or {}).get("wall_time_s"),
        "path": str(path),
    }


def _default_label(case: str, runs: Sequence[Run]) -> str:
    if not runs:
        return case
    c = runs[0].config
    return f"{case}: norm {c.get('norm', '?')}, {c.get('engine', '?')}, {c.get('optimizer', '?')}"


def _case_summary(
    case: str,
    label: str,
    runs: Sequence[Run],
    missing: Sequence[int],
    root: Path | None,
    thresholds: Sequence[float],
) -> dict[str, Any]:
    """Statistics over the *finished* runs of one case; the others are listed, not averaged."""
    done = [run for run in runs if run.status == "finished" and run.metrics]

    def final(key: str) -> list[float | None]:
        return [run.final.get(key) for run in done]

    def mean_over_epochs(run: Run, key: str) -> float | None:
        values = [m[key] for m in run.metrics if m.get(key) is not None]
        return statistics.fmean(values) if values else None

    def total_over_epochs(run: Run, key: str) -> float | None:
        values = [m.get(key) for m in run.metrics]
        return None if any(v is None for v in values) else float(sum(values))

    gaps = [
        None if tr is None or te is None else tr - te
        for tr, te in zip(final("train_acc"), final("test_acc"), strict=True)
    ]
    statuses = [run.status for run in runs]
    return {
        "label": label,
        "seeds": [run.seed for run in runs] + list(missing),
        "averaged_seeds": [run.seed for run in done],
        "n_runs": len(runs) + len(missing),
        "n_finished": len(done),
        "n_diverged": statuses.count("diverged"),
        "n_in_progress": statuses.count("in progress"),
        "n_not_started": len(missing),
        "runs": [_run_entry(run, root) for run in runs]
        + [{"seed": s, "status": "not started"} for s in missing],
        "final_test_acc": _stats(final("test_acc")),
        "best_test_acc": _stats([max(m["test_acc"] for m in run.metrics) for run in done]),
        "final_train_acc": _stats(final("train_acc")),
        "final_test_loss": _stats(final("test_loss")),
        "generalization_gap": _stats(gaps),
        "epochs_to_acc": _epochs_to_acc(done, thresholds),
        "train_time_s": _stats([total_over_epochs(run, "epoch_time_s") for run in done]),
        "images_per_s": _stats([mean_over_epochs(run, "images_per_s") for run in done]),
    }


def _clean_json(value: Any) -> Any:
    """NaN and infinities become null: summary.json stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean_json(v) for v in value]
    return value


def _version() -> str:
    from bnlab import __version__

    return f"bnlab {__version__}"


def summarize_runs(
    runs_by_case: Mapping[str, Sequence[Run]],
    compare: Mapping[str, Any] | None = None,
    *,
    missing: Sequence[str] = (),
    root: Path | None = None,
    thresholds: Sequence[float] = THRESHOLDS,
) -> dict[str, Any]:
    """The summary dict of :func:`summarize`, from runs already loaded (writes nothing).

    Studies that lay out their folders differently load their runs and call this.
    """
    compare = dict(compare or {})
    all_runs = [run for runs in runs_by_case.values() for run in runs]
    run_data = sorted({str(r.config["data"]) for r in all_runs if r.config.get("data")})
    data = compare.get("data") or (run_data[0] if run_data else None)
    notes = [note for run in all_runs for note in run.notes]
    if data is None:
        data = "unknown: neither compare.json nor any config.json names the data"
        notes.append(data)
    elif any(d != data for d in run_data):
        notes.append(f"runs name other data than the comparison: {run_data}")
    labels = compare.get("case_labels") or {}
    missing_by_case: dict[str, list[int]] = {}
    for entry in missing:
        case, seed = entry.rsplit("/seed", 1)
        missing_by_case.setdefault(case, []).append(int(seed))
    planned = [run.config["epochs"] for run in all_runs if "epochs" in run.config]
    cases = {
        case: _case_summary(
            case,
            labels.get(case) or _default_label(case, runs),
            runs,
            missing_by_case.get(case, []),
            root,
            thresholds,
        )
        for case, runs in runs_by_case.items()
    }
    return _clean_json(
        {
            "schema": SCHEMA_VERSION,
            "generated_by": _version(),
            "data": data,
            "full_cifar10": data_is_full_cifar10(data),
            "preset": compare.get("preset"),
            "command": compare.get("command"),
            "epochs": max(planned) if planned else None,
            "seeds": list(compare.get("seeds") or sorted({r.seed for r in all_runs}, key=str)),
            "thresholds": list(thresholds),
            "cases": cases,
            "paired_differences": paired_differences(cases),
            "precision": _precisions(all_runs),
            "notes": notes,
        }
    )


def paired_differences(cases: Mapping[str, Mapping[str, Any]],
                       min_effect: float = MIN_EFFECT) -> list[dict[str, Any]]:
    """Every pair of cases with finished runs, by final test accuracy paired by seed.

    ``cases``: summary.json's ``cases``. Per pair (in the cases' order): ``higher`` and
    ``lower`` (by mean), the :func:`bnlab.evidence.stats.paired_difference` of
    ``higher - lower`` over the seeds both finished (``mean``, ``std``, ``n``, ``low``,
    ``high`` of the 95% Student-t interval, ``values``), ``min_effect``, and ``verdict``
    on the claim "``higher`` beats ``lower`` by more than ``min_effect``"
    (:func:`~bnlab.evidence.stats.interval_verdict`): *supported* when the whole interval
    lies above ``min_effect``, else *inconclusive* (also with fewer than two paired seeds).
    A seed pairs runs that share their data order and augmentation (the same generator
    streams), so the pairing removes the part of the seed noise the cases share.
    """
    names = [n for n in cases if cases[n]["final_test_acc"]["mean"] is not None]
    pairs = []
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            higher, lower = sorted((first, second),
                                   key=lambda n: -cases[n]["final_test_acc"]["mean"])
            d = paired_difference(_per_seed(cases[higher]), _per_seed(cases[lower]))
            pairs.append({"higher": higher, "lower": lower, "metric": "final_test_acc",
                          **{k: d[k] for k in ("mean", "std", "n", "low", "high",
                                               "confidence", "values")},
                          "min_effect": min_effect,
                          "verdict": interval_verdict(d, "above", min_effect)})
    return pairs


def _precisions(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """The precisions the runs trained in and why (config.json's ``precision_resolved``;
    a run from before bnlab recorded it: its requested precision), with their run counts."""
    seen: dict[tuple[str, str], int] = {}
    for run in runs:
        resolved = run.config.get("precision_resolved")
        if resolved:
            key = (str(resolved["name"]), str(resolved["reason"]))
        else:
            key = (str(run.config.get("precision", "fp32")),
                   "as requested (a run from before bnlab recorded the resolved precision)")
        seen[key] = seen.get(key, 0) + 1
    return [{"name": name, "reason": reason, "runs": n} for (name, reason), n in seen.items()]


def precision_sentence(summary: Mapping[str, Any]) -> str:
    """"Precision: bf16 (auto: bfloat16 autocast (CPU has AMX-BF16)), 9 runs." """
    parts = [f"{p['name']} ({p['reason']}), {p['runs']} run{'s' if p['runs'] != 1 else ''}"
             for p in summary.get("precision") or []]
    return "Precision: " + ("; ".join(parts) if parts else "unknown") + "."


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.2f}"


def differences_table(summary: Mapping[str, Any]) -> str:
    """The Markdown section of summary.json's ``paired_differences`` ("" without pairs)."""
    pairs = summary.get("paired_differences") or []
    if not pairs:
        return ""
    lines = ["| cases | difference (points) | 95% interval (points) | paired seeds | verdict |",
             "|---|---|---|---|---|"]
    for p in pairs:
        interval = ("n/a (one seed)" if p["low"] is None
                    else f"[{_points(p['low'])}, {_points(p['high'])}]")
        lines.append(f"| {p['higher']} − {p['lower']} | {_points(p['mean'])} | {interval} | "
                     f"{p['n']} | {p['verdict']} |")
    effect = 100 * pairs[0]["min_effect"]
    return "\n".join([
        "## Paired differences",
        "Final test accuracy of the higher case minus the lower, paired by seed (runs of "
        "one seed share their data order and augmentation), with the 95% Student-t "
        "interval of the mean difference. Verdict on the claim that the higher case is "
        f"better by more than {effect:g} point(s) (the minimum effect, stated in advance): "
        "*supported* when the whole interval lies above it, else *inconclusive*; with one "
        "seed there is no interval.",
        "",
        *lines,
    ])


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """What ``bnlab compare`` prints when it ends: the precision, each case's final test
    accuracy (mean ± std over seeds) and the paired differences with their verdicts."""
    lines = [precision_sentence(summary)]
    for name, case in summary["cases"].items():
        stat = case["final_test_acc"]
        lines.append(f"  {name}: final test acc {_mean_std(stat)} "
                     f"({case['n_finished']} seed{'s' if case['n_finished'] != 1 else ''})")
    for p in summary.get("paired_differences") or []:
        interval = ("no interval with one seed" if p["low"] is None
                    else f"95% interval [{_points(p['low'])}, {_points(p['high'])}]")
        lines.append(f"  {p['higher']} − {p['lower']}: {_points(p['mean'])} points, "
                     f"{interval}: {p['verdict']}")
    return lines


def summarize(compare_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Summarize a comparison folder and write ``<compare_dir>/summary.json``.

    Per case (finished runs only are averaged; the others are counted and listed):
    ``label``, ``seeds``, ``n_finished`` / ``n_diverged`` / ``n_in_progress`` /
    ``n_not_started``, ``runs`` (status per seed), ``final_test_acc``, ``best_test_acc``,
    ``final_train_acc``, ``final_test_loss``, ``generalization_gap`` (final train − test
    accuracy), ``train_time_s`` (sum of ``epoch_time_s``), ``images_per_s`` (mean over
    epochs), each as ``{mean, std, values}``; ``epochs_to_acc[threshold]`` =
    ``{mean_epoch, reached, of, epochs}`` (mean over the seeds that reached it).
    Top level: ``data`` (always), ``full_cifar10``, ``preset``, ``command``, ``epochs``,
    ``seeds``, ``generated_by``, ``notes``.

        >>> s = summarize("runs/compare-quick")                  # doctest: +SKIP
        >>> s["cases"]["a"]["epochs_to_acc"]["0.7"]              # doctest: +SKIP
        {'mean_epoch': 4.0, 'reached': 1, 'of': 1, 'epochs': [4]}
    """
    return _summarize_folder(Path(compare_dir))[0]


def _summarize_folder(folder: Path) -> tuple[dict[str, Any], dict[str, list[Run]]]:
    compare, runs_by_case, missing = load_compare(folder)
    summary = summarize_runs(runs_by_case, compare, missing=missing, root=folder)
    atomic_write_json(folder / "summary.json", summary, ensure_ascii=False)
    return summary, runs_by_case


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# The report: table, reading, Markdown, HTML
# ---------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _mean_std(stat: Mapping[str, Any], digits: int = 4) -> str:
    if stat["mean"] is None:
        return "—"
    if len([v for v in stat["values"] if v is not None]) < 2:
        return _fmt(stat["mean"], digits)
    return f"{_fmt(stat['mean'], digits)} ± {_fmt(stat['std'], digits)}"


def _epochs_cell(entry: Mapping[str, Any] | None) -> str:
    if entry is None or entry["of"] == 0:
        return "—"
    mean = "never" if entry["mean_epoch"] is None else f"{entry['mean_epoch']:.1f}"
    return f"{mean} ({entry['reached']}/{entry['of']})"


def _status_cell(case: Mapping[str, Any]) -> str:
    parts = [f"{case['n_finished']}/{case['n_runs']} finished"]
    for key, word in (
        ("n_diverged", "diverged"),
        ("n_in_progress", "in progress"),
        ("n_not_started", "not started"),
    ):
        if case[key]:
            parts.append(f"{case[key]} {word}")
    return ", ".join(parts)


TABLE_HEADER = (
    "case",
    "final test acc (mean ± std)",
    "best test acc",
    "final train acc",
    "gap (train − test)",
    "epochs to 70%",
    "epochs to 80%",
    "train time (s)",
    "images/s",
    "seeds",
)


def table_rows(summary: Mapping[str, Any]) -> list[list[str]]:
    """The per-case table as text cells, header first (shared by Markdown and HTML); the
    "epochs to X%" columns are :func:`chosen_thresholds` (from the data)."""
    chosen = chosen_thresholds(summary)
    header = list(TABLE_HEADER)
    at = header.index("epochs to 70%")
    header[at:at + 2] = [f"epochs to {100 * float(k):g}%" for k in chosen]
    rows = [header]
    for case in summary["cases"].values():
        to_acc = case["epochs_to_acc"]
        rows.append(
            [
                case["label"],
                _mean_std(case["final_test_acc"]),
                _mean_std(case["best_test_acc"]),
                _mean_std(case["final_train_acc"]),
                _mean_std(case["generalization_gap"]),
                *[_epochs_cell(to_acc.get(k)) for k in chosen],
                _mean_std(case["train_time_s"], 1),
                _fmt(case["images_per_s"]["mean"], 0),
                _status_cell(case),
            ]
        )
    return rows


def _data_sentence(summary: Mapping[str, Any]) -> str:
    if summary["full_cifar10"]:
        return "These are CIFAR-10 test accuracies (the full 10,000-image test set)."
    return (
        "This is not the full CIFAR-10 (50,000 train / 10,000 test images): these numbers "
        "are not CIFAR-10 accuracies and cannot be compared with published ones."
    )


def _bare_label(name: str, case: Mapping[str, Any]) -> str:
    """'a: no BN, autograd, Adam' → 'no BN, autograd, Adam' (the case name is said already)."""
    label = str(case["label"])
    return label[len(name) + 1 :].strip() if label.startswith(f"{name}:") else label


def _separation(name: str, best: Mapping, name2: str, second: Mapping) -> str:
    diff = best["final_test_acc"]["mean"] - second["final_test_acc"]["mean"]
    n1, n2 = best["n_finished"], second["n_finished"]
    if min(n1, n2) < 2:
        few = (
            "one finished seed per case"
            if max(n1, n2) < 2
            else (f"one finished seed for case {name if n1 < n2 else name2}")
        )
        return (
            f"With {few}, the seed-to-seed spread is unknown: "
            f"one seed cannot separate cases {name} and {name2}."
        )
    s1, s2 = best["final_test_acc"]["std"], second["final_test_acc"]["std"]
    verdict = "exceeds" if diff > s1 + s2 else "does not exceed"
    tail = "" if diff > s1 + s2 else ": these seeds do not separate them"
    return (
        f"The difference {diff:.4f} {verdict} the sum of their seed standard deviations "
        f"({s1:.4f} + {s2:.4f}, {n1} and {n2} seeds){tail}. "
        "This is a rule of thumb, not a significance test."
    )


def reading(summary: Mapping[str, Any]) -> list[str]:
    """A short reading of the results, every number taken from ``summary`` (as written to
    summary.json): best case and margin, whether seeds separate the top two, largest
    generalization gap, fastest training, and runs left out of the averages."""
    cases = summary["cases"]
    ranked = sorted(
        (name for name in cases if cases[name]["final_test_acc"]["mean"] is not None),
        key=lambda name: cases[name]["final_test_acc"]["mean"],
        reverse=True,
    )
    lines = []
    if not ranked:
        lines.append("No run has finished yet, so there is nothing to compare.")
    elif len(ranked) == 1:
        acc = cases[ranked[0]]["final_test_acc"]["mean"]
        lines.append(
            f"Only case {ranked[0]} has finished runs; mean final test accuracy {acc:.4f}."
        )
    else:
        best, second = cases[ranked[0]], cases[ranked[1]]
        b, s = best["final_test_acc"]["mean"], second["final_test_acc"]["mean"]
        lines.append(
            f"Case {ranked[0]} ({_bare_label(ranked[0], best)}) has the best mean final test "
            f"accuracy, {b:.4f}, {b - s:.4f} above case {ranked[1]} ({s:.4f})."
        )
        lines.append(_separation(ranked[0], best, ranked[1], second))
        gaps = {n: cases[n]["generalization_gap"]["mean"] for n in ranked}
        widest = max(gaps, key=lambda n: gaps[n])
        lines.append(
            f"Case {widest} has the largest generalization gap (final train − test "
            f"accuracy): {gaps[widest]:.4f}."
        )
        times = {
            n: cases[n]["train_time_s"]["mean"]
            for n in ranked
            if cases[n]["train_time_s"]["mean"] is not None
        }
        if len(times) > 1:
            fast, slow = min(times, key=times.get), max(times, key=times.get)
            lines.append(
                f"Case {fast} trains fastest ({times[fast]:.1f} s of training in total), "
                f"case {slow} slowest ({times[slow]:.1f} s)."
            )
    for name, case in cases.items():
        left_out = [
            f"seed {r['seed']} {r['status']}" for r in case["runs"] if r["status"] != "finished"
        ]
        if left_out:
            lines.append(f"Case {name}: {', '.join(left_out)} — not included in the averages.")
    lines.append(_data_sentence(summary))
    return lines


def _caption(summary: Mapping[str, Any]) -> str:
    return (
        "Train (left) and test (right) accuracy (top) and cross-entropy loss (bottom) per "
        "epoch, one colour, marker and line style per case. Line: mean over the finished "
        "seeds; band: min–max over seeds (when there are several); dotted: runs in progress "
        "or diverged. "
        f"Data: {summary['data']}."
    )


def _report_title(summary: Mapping[str, Any]) -> str:
    names = ", ".join(summary["cases"])
    preset = f" (preset {summary['preset']})" if summary.get("preset") else ""
    return f"bnlab comparison of cases {names}{preset}"


def _per_seed(case: Mapping[str, Any]) -> dict[Any, float | None]:
    """The final test accuracy of each finished seed of a case (summary.json's values)."""
    return dict(zip(case["averaged_seeds"], case["final_test_acc"]["values"], strict=False))


def answer(summary: Mapping[str, Any]) -> list[str]:
    """The report's first lines: which case is best, by how much, and whether that is
    beyond seed noise: the paired per-seed difference to the runner-up with its 95%
    t-interval (:func:`bnlab.evidence.stats.paired_difference`), "beyond seed noise" when
    the whole interval lies above zero, and "supported" (:func:`~bnlab.evidence.stats.
    interval_verdict`) only when it lies above :data:`MIN_EFFECT`. With one paired seed it
    says that it cannot tell."""
    cases = summary["cases"]
    ranked = sorted((n for n in cases if cases[n]["final_test_acc"]["mean"] is not None),
                    key=lambda n: cases[n]["final_test_acc"]["mean"], reverse=True)
    if len(ranked) < 2:
        return ["**Answer:** fewer than two cases have finished runs, so no case can be "
                "called best yet."]
    best, second = ranked[0], ranked[1]
    difference = paired_difference(_per_seed(cases[best]), _per_seed(cases[second]))
    acc = cases[best]["final_test_acc"]["mean"]
    head = (f"**Answer: case {best} ({_bare_label(best, cases[best])}) is best**, final "
            f"test accuracy {100 * acc:.2f}%, {100 * (difference['mean'] or 0.0):.2f} points "
            f"above case {second} ({_bare_label(second, cases[second])}), paired by seed "
            f"over {difference['n']} seed(s).")
    if difference["low"] is None:
        tail = ("With one paired seed the seed-to-seed noise is unknown: this cannot tell "
                "whether the difference is real. Run more seeds (--seeds 3 or more).")
    else:
        verdict = interval_verdict(difference, "above", MIN_EFFECT)
        if verdict == "supported":
            beyond = f"beyond seed noise and the {100 * MIN_EFFECT:g}-point minimum effect"
        elif difference["low"] > 0:
            beyond = (f"beyond seed noise but not surely above the {100 * MIN_EFFECT:g}-point "
                      "minimum effect: inconclusive")
        else:
            beyond = "not beyond seed noise: these seeds cannot separate them"
        tail = (f"95% interval of the paired difference: [{100 * difference['low']:.2f}, "
                f"{100 * difference['high']:.2f}] points: {beyond}.")
    return [head, tail]


def chosen_thresholds(summary: Mapping[str, Any]) -> list[str]:
    """The "epochs to X" columns, chosen from the data: the highest threshold every case
    with finished runs reached on every seed, and the highest any case reached (keys of
    ``epochs_to_acc``, e.g. ``"0.7"``); [] when no case reached the lowest."""
    cases = [c for c in summary["cases"].values() if c["n_finished"]]
    keys = [f"{t:g}" for t in summary.get("thresholds", THRESHOLDS)]

    def reached(case: Mapping[str, Any], key: str, everywhere: bool) -> bool:
        entry = case["epochs_to_acc"].get(key) or {}
        need = entry.get("of", 0) if everywhere else 1
        return entry.get("reached", 0) >= max(need, 1)

    by_all = [k for k in keys if cases and all(reached(c, k, True) for c in cases)]
    by_any = [k for k in keys if any(reached(c, k, False) for c in cases)]
    return sorted({*by_all[-1:], *by_any[-1:]}, key=float)


def _run_links(summary: Mapping[str, Any]) -> str:
    parts = []
    for name, case in summary["cases"].items():
        links = [f"[seed {r['seed']}]({r['path']}/)" for r in case["runs"] if r.get("path")]
        if links:
            parts.append(f"{name}: " + ", ".join(links))
    return "Run folders: " + "; ".join(parts) + "." if parts else ""


def _environment(runs_by_case: Mapping[str, Sequence[Run]]) -> dict[str, Any]:
    """What the runs ran with, from their config.json: settings shared by every run, and
    the device, torch and bnlab versions; the git commit of bnlab's source when it is a
    git checkout (at the time the report is drawn)."""
    import subprocess

    configs = [run.config for runs in runs_by_case.values() for run in runs]
    shared: dict[str, Any] = {}
    for key in ("width", "epochs", "batch_size", "lr", "lr_schedule", "augment", "subset",
                "precision", "device", "torch_version", "bnlab_version"):
        values = sorted({str(c.get(key)) for c in configs if c.get(key) is not None})
        if values:
            shared[key] = ", ".join(values)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5, check=True).stdout
        shared["git_commit"] = commit.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return shared


def _recipe_line(summary: Mapping[str, Any], environment: Mapping[str, Any] | None) -> str:
    if summary.get("preset") == "smoke":
        items = ["preset smoke (a pipeline check in seconds: its numbers mean nothing)"]
    else:
        items = [f"preset {summary.get('preset') or 'unknown'}"]
    items += [f"{key.replace('_', ' ')} {value}" for key, value in (environment or {}).items()
              if value is not None]
    return "Recipe and environment: " + "; ".join(items) + "."


def _post_reference_row(summary: Mapping[str, Any], width: int) -> list[str] | None:
    """The post's logged final test accuracies (one run each, full CIFAR-10, the post's
    network and recipe) as a reference row, marked as a different scale."""
    if not any(name in ("a", "b", "c") for name in summary["cases"]):
        return None
    from bnlab.post.log import load_logged_metrics

    finals = {case: rows[-1]["test_acc"] for case, rows in load_logged_metrics().items()}
    cells = ", ".join(f"{case} {100 * acc:.2f}%" for case, acc in sorted(finals.items()))
    same = summary.get("full_cifar10") and str(summary.get("preset") or "") == "post"
    mark = ("the post's own runs" if same else "a different network, data set and scale: "
            "not comparable with the rows above")
    return [f"reference: the post's logged finals ({mark})", cells, *["—"] * (width - 3),
            "1 run each"]


CONFOUND_NOTE = (
    "Case c differs from case b in two ways at once: its gradients come from the manual "
    "engine (hand-derived backward, bnlab's BN) and its optimizer is AMSGrad instead of "
    "Adam. A difference between b and c cannot say which of the two made it. Case d (manual "
    "engine with Adam) separates them: b → d changes only the engine, d → c only the "
    "optimizer.")


def render_markdown(summary: Mapping[str, Any], figure: str = "curves.png",
                    environment: Mapping[str, Any] | None = None) -> str:
    """report.md: title, the answer (best case, margin, beyond seed noise?), the recipe and
    environment, data, command, table (with the post's reference row), run folder links,
    figure (a relative link) and the reading."""
    rows = [[cell.replace("|", "\\|") for cell in row] for row in table_rows(summary)]
    reference = _post_reference_row(summary, len(rows[0]))
    if reference is not None:
        rows.append(reference)
    table = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    table += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    notes = [f"- {note}" for note in summary.get("notes", [])]
    parts = [
        f"# {_report_title(summary)}",
        "\n".join(answer(summary)),
        _recipe_line(summary, environment),
        precision_sentence(summary),
        f"**Data: {summary['data']}.** {_data_sentence(summary)}",
        f"Command: `{summary.get('command') or 'unknown'}`  \n"
        f"Epochs: {summary.get('epochs')}, seeds: {summary.get('seeds')}, "
        f"generated by {summary['generated_by']} from summary.json.",
        "## Results per case",
        "\n".join(table),
        "Accuracies are fractions; ± is the sample standard deviation over seeds; "
        "'epochs to X%' is the mean first epoch with test accuracy ≥ X over the seeds "
        "that reached it (reached/finished); the thresholds are chosen from the data (the "
        "highest every case reached, and the highest any case reached).",
        differences_table(summary),
        _run_links(summary),
        "## Curves",
        f"![curves]({figure})\n\n*{_caption(summary)}*",
        "## Reading",
        "\n".join(f"- {line}" for line in reading(summary)),
    ]
    if {"b", "c"} <= set(summary["cases"]):
        present = "d" in summary["cases"]
        parts += ["## Why c differs from b", CONFOUND_NOTE + (
            "" if present else " This comparison has no case d: add it with --cases a,b,c,d.")]
    if notes:
        parts += ["## Notes", "\n".join(notes)]
    return "\n\n".join(p for p in parts if p) + "\n"


def init_health_section(folder: Path) -> str:
    """The report's small table of ``init_health.json`` (written by ``bnlab compare``, see
    :mod:`bnlab.init_health`), or "" when the folder has none."""
    path = folder / "init_health.json"
    if not path.is_file():
        return ""
    health = read_json(path, "init_health.json is written by bnlab compare")
    rows = health["rows"]
    layers = rows[0]["layers"]
    head = ["BN", "init", "final ReLU", "dead logits", *layers, f"{layers[-1]}/{layers[0]}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = ["none" if row["norm"] == "none" else "yes", row["init"],
                 "yes" if row["final_relu"] else "no", f"{row['dead_logit_fraction']:.0%}",
                 *(f"{s:.3g}" for s in row["scales"]), f"{row['scale_ratio']:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([
        "", "## Initialization health", "",
        f"The networks at initialization (width {health['width']}, seed {health['seed']}) on "
        f"{health['images']} real images ({health['data']}): per layer, the root mean square "
        f"of its output as the next layer sees it (after BN and ReLU; {layers[-1]}: the "
        "class-score map); dead logits: classes whose logit is 0 for every image, so they "
        "get no gradient. bnlab's default is He's init without a final ReLU; PyTorch's "
        "init with the paper's final ReLU was the default before (old run folders).", "",
        *lines, "",
    ])


def _add_post_section(folder: Path, summary: dict[str, Any], runs_by_case, labels,
                      markdown: str) -> str:
    """The post presets' section (bnlab.post.report), in summary.json and the report."""
    from bnlab.post.report import post_section, post_summary, write_post_figures

    summary["post"] = _clean_json(post_summary(runs_by_case, summary["full_cifar10"]))
    atomic_write_json(folder / "summary.json", summary, ensure_ascii=False)
    write_post_figures(folder, runs_by_case, summary["data"], labels)
    return markdown + "\n" + post_section(summary["post"], summary["data"])


def write_report(compare_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``summary.json``, ``curves.png``, ``report.md`` and ``report.html`` into a
    comparison folder, from its run folders alone; returns their paths.

        >>> paths = write_report("runs/compare-quick")   # doctest: +SKIP
        >>> paths["html"]                                # doctest: +SKIP
        PosixPath('runs/compare-quick/report.html')
    """
    folder = Path(compare_dir)
    summary, runs_by_case = _summarize_folder(folder)
    for run in (run for runs in runs_by_case.values() for run in runs):
        if run.status == "finished" and not (run.path / CURVES).exists():
            plot_run(run, run.path / CURVES)  # a run killed between result.json and its plot
    finished = [case["n_finished"] for case in summary["cases"].values()]
    n_seeds = (min(finished), max(finished)) if max(finished) else len(summary["seeds"])
    compared = "Train and test curves of cases " + ", ".join(summary["cases"])
    labels = {name: case["label"] for name, case in summary["cases"].items()}
    curves = plot_curves(
        runs_by_case,
        folder / "curves.png",
        curves_title(compared, summary["data"], n_seeds),
        labels=labels,
    )
    markdown_text = (render_markdown(summary, curves.name, _environment(runs_by_case))
                     + init_health_section(folder))
    if str(summary.get("preset") or "").startswith("post"):
        markdown_text = _add_post_section(folder, summary, runs_by_case, labels, markdown_text)
    page_text = markdown_to_html(markdown_text, folder, _report_title(summary))
    markdown = folder / "report.md"
    atomic_write_text(markdown, markdown_text)
    page = folder / "report.html"
    atomic_write_text(page, page_text)
    return {
        "summary": folder / "summary.json",
        "curves": curves,
        "markdown": markdown,
        "html": page,
    }
