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

This module draws the report (table, answer, reading, Markdown, HTML) and re-exports the
names of the two it builds on: :mod:`bnlab.report_summary` (summary.json) and
:mod:`bnlab.report_differences` (paired differences and precisions).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bnlab.evidence.curves import curves_title, plot_curves, plot_run
from bnlab.evidence.page import markdown_to_html
from bnlab.evidence.stats import interval_verdict, paired_difference
from bnlab.report_differences import (
    MIN_EFFECT,
    _fmt,
    _mean_std,
    _per_seed,
    differences_table,
    paired_differences,
    precision_sentence,
    summary_lines,
)
from bnlab.report_summary import (
    SCHEMA_VERSION,
    THRESHOLDS,
    _clean_json,
    _summarize_folder,
    data_is_full_cifar10,
    summarize,
    summarize_runs,
)
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
    "MIN_EFFECT",
    "SCHEMA_VERSION",
    "THRESHOLDS",
    "MissingFileError",
    "ReportError",
    "Run",
    "answer",
    "chosen_thresholds",
    "data_is_full_cifar10",
    "differences_table",
    "init_health_section",
    "load_compare",
    "load_run",
    "paired_differences",
    "precision_sentence",
    "reading",
    "render_markdown",
    "summarize",
    "summarize_runs",
    "summary_lines",
    "table_rows",
    "write_report",
]

# ---- the report: table, reading, Markdown, HTML --------------------------------------------


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
    unranked = [n for n in cases if n not in ranked]
    missing = ([f"Not ranked: case{'s' if len(unranked) > 1 else ''} {', '.join(unranked)} "
                f"{'have' if len(unranked) > 1 else 'has'} no finished run yet (resume the "
                "comparison to finish them)."] if unranked else [])
    if len(ranked) < 2:
        return ["**Answer:** fewer than two cases have finished runs, so no case can be "
                "called best yet.", *missing]
    best, second = ranked[0], ranked[1]
    difference = paired_difference(_per_seed(cases[best]), _per_seed(cases[second]))
    acc = cases[best]["final_test_acc"]["mean"]
    if (difference["mean"] or 0.0) == 0.0:  # the same final accuracy on every paired seed
        head = (f"**Answer: cases {best} ({_bare_label(best, cases[best])}) and {second} "
                f"({_bare_label(second, cases[second])}) tie**, final test accuracy "
                f"{100 * acc:.2f}%, paired by seed over {difference['n']} seed(s).")
    else:
        head = (f"**Answer: case {best} ({_bare_label(best, cases[best])}) is best**, final "
                f"test accuracy {100 * acc:.2f}%, {100 * difference['mean']:.2f} points "
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
    return [head, tail, *missing]


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
    "Adam. A difference between b and c cannot say which of the two made it. Case d "
    "(autograd and PyTorch's BN, with AMSGrad) separates them: b → d changes only the "
    "optimizer, d → c only the engine and its BN. Case b-manual (the manual engine with "
    "Adam) splits them the other way round: b → b-manual changes only the engine, "
    "b-manual → c only the optimizer.")


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
