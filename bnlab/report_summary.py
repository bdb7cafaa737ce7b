"""A comparison's summary.json, from its run folders alone (moved out of :mod:`bnlab.report`,
which re-exports the public names).

Per case and seed: final and best accuracies, the generalization gap, training time and
speed, the first epoch reaching each accuracy threshold; per case their mean ± std over the
finished seeds (unfinished runs are counted and listed, never averaged). Conventions as in
:mod:`bnlab.report`.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bnlab.evidence.stats import mean_std
from bnlab.report_differences import _precisions, paired_differences
from bnlab.runs import Run, atomic_write_json, load_compare

SCHEMA_VERSION = 1
THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)


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
