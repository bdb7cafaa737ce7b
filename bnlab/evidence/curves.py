"""The training-curves figure every report draws: the post's 2x2 layout, from run folders.

Train accuracy (top) and loss (bottom) on the left, test accuracy and loss on the right,
x = epoch; one colour per case (:func:`bnlab.evidence.figures.color`), a line for the mean
over finished seeds with a band over seeds, unfinished runs dotted, reference curves (the
post's logs) dashed. ``train`` draws one run's (``curves.png`` in its folder), ``report``
a comparison's, ``post.report`` bnlab's beside the post's logs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bnlab.evidence.figures import color, short_data
from bnlab.runs import Run

__all__ = ["PANELS", "curves_title", "plot_curves", "plot_run"]

PANELS = (  # (row, column, metric key, y label, panel title): the post's layout
    (0, 0, "train_acc", "accuracy (fraction)", "train accuracy"),
    (1, 0, "train_loss", "cross-entropy loss (nats)", "train loss"),
    (0, 1, "test_acc", "accuracy (fraction)", "test accuracy"),
    (1, 1, "test_loss", "cross-entropy loss (nats)", "test loss"),
)
LOSS_CLIP = 3 * math.log(10)  # 3x the loss of a uniform guess over 10 classes
_METRIC_ALIASES = {"train_cost": "train_loss", "test_cost": "test_loss"}  # the post's CSV names


def curves_title(
    compared: str, data: str, n_seeds: int | tuple[int, int], band: str | None = "minmax"
) -> str:
    """'<compared> on the CIFAR-10 embedded sample (5085/1017), 3 seeds: line = mean, band =
    min–max over seeds'. ``n_seeds`` may be a (fewest, most) pair when cases differ."""
    low, high = n_seeds if isinstance(n_seeds, tuple) else (n_seeds, n_seeds)
    seeds = (f"{low}" if low == high else f"{low}–{high}") + " seed" + ("" if high == 1 else "s")
    if low != high:
        seeds += " per case"
    band_text = {"minmax": "min–max", "std": "±1 std"}.get(band or "", "")
    if high > 1 and band_text:
        seeds += f": line = mean, band = {band_text} over seeds"
    return f"{compared} on the {short_data(data)}, {seeds}"


def _series(runs: Sequence[Run], key: str) -> tuple[list[int], list[Any]]:
    """Epochs and, per epoch, the array of values of the runs that reached it."""
    import numpy as np

    per_epoch: dict[int, list[float]] = {}
    for run in runs:
        for m in run.metrics:
            value = m.get(key)
            per_epoch.setdefault(int(m["epoch"]), []).append(
                float("nan") if value is None else float(value)
            )
    epochs = sorted(per_epoch)
    return epochs, [np.asarray(per_epoch[e]) for e in epochs]


def _finished(runs: Sequence[Run]) -> list[Run]:
    return [run for run in runs if run.status == "finished" and run.metrics]


# each case's line also differs in marker and dash pattern, so the curves can be told apart
# without colour (printed in grey, or by a colour-blind reader); "--" and ":" are kept for
# reference curves and unfinished runs
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINE_STYLES = ("-", "-.", (0, (6, 1, 1, 1, 1, 1)), (0, (8, 2)))


def _draw_mean(axes, runs: Sequence[Run], label: str, color, band: str | None,
               style: int = 0) -> None:
    """The mean over ``runs`` per epoch as a line, with a band when there are several;
    ``style`` picks the case's marker and dash pattern (:data:`MARKERS`, :data:`LINE_STYLES`)."""
    marker, dashes = MARKERS[style % len(MARKERS)], LINE_STYLES[style % len(LINE_STYLES)]
    for row, col, key, _, _ in PANELS:
        ax = axes[row][col]
        epochs, arrays = _series(runs, key)
        mean = [a.mean() for a in arrays]
        ax.plot(epochs, mean, color=color, lw=1.8, ls=dashes, marker=marker, ms=4, label=label)
        if len(runs) > 1 and band:
            if band == "std":
                std = [a.std(ddof=1) if len(a) > 1 else 0.0 for a in arrays]
                low = [m - s for m, s in zip(mean, std, strict=True)]
                high = [m + s for m, s in zip(mean, std, strict=True)]
            else:
                low, high = [a.min() for a in arrays], [a.max() for a in arrays]
            ax.fill_between(epochs, low, high, color=color, alpha=0.2, lw=0)


def _draw_unfinished(axes, run: Run, label: str, color) -> None:
    """A run in progress or diverged: a thin dotted line of its own, never averaged in."""
    for row, col, key, _, _ in PANELS:
        epochs, arrays = _series([run], key)
        axes[row][col].plot(
            epochs, [a[0] for a in arrays], color=color, lw=1, ls=":", marker=".", label=label
        )


def _draw_reference(axes, curves: Mapping[int, Mapping[str, float]], label: str, color) -> None:
    epochs = sorted(curves)
    for row, col, key, _, _ in PANELS:
        values = []
        for e in epochs:
            record = {_METRIC_ALIASES.get(k, k): v for k, v in curves[e].items()}
            values.append(record.get(key, float("nan")))
        axes[row][col].plot(epochs, values, color=color, lw=1.4, ls="--", label=label)


def _finish_axes(axes, loss_limits: Mapping[tuple[int, int], tuple[float, float]]) -> None:
    """Labels, grid, integer epochs; accuracy within [0, 1]; a loss axis keeps the range of
    the averaged and reference curves (``loss_limits``) when an unfinished run would blow it
    up, else is cut at ``LOSS_CLIP``; a note says when values are not shown."""
    limits = [axes[row][col].get_xlim() for row, col, _, _, _ in PANELS]
    x_range = (min(low for low, _ in limits), max(high for _, high in limits))
    for row, col, key, ylabel, title in PANELS:
        ax = axes[row][col]
        ax.set_xlim(*x_range)  # one epoch range on all four panels
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        low, high = ax.get_ylim()
        if key.endswith("_acc"):
            ax.set_ylim(max(low, 0.0), min(high, 1.0))
            continue
        kept = loss_limits.get((row, col))
        top = (
            kept[1] if kept and high > 1.5 * kept[1] else (LOSS_CLIP if high > LOSS_CLIP else None)
        )
        if top is not None:
            ax.set_ylim(max(low, 0.0), top)
            ax.annotate(
                f"values above {top:.2f} not shown",
                (0.98, 0.95),
                xycoords="axes fraction",
                ha="right",
                va="top",
                fontsize=8,
            )


def plot_curves(
    runs_by_case: Mapping[str, Sequence[Run]],
    path: str | os.PathLike[str],
    title: str,
    *,
    labels: Mapping[str, str] | None = None,
    band: str | None = "minmax",
    reference: Mapping[str, Mapping[int, Mapping[str, float]]] | None = None,
    dpi: int = 110,
) -> Path:
    """Draw the post's 2x2 figure and save it as PNG: train accuracy (top) and loss (bottom)
    on the left, test accuracy and loss on the right, x = epoch.

    Args:
        runs_by_case: case → its runs (one per seed). Finished runs are averaged per epoch
            (line) with a band over seeds; runs in progress or diverged are drawn one by
            one as thin dotted lines, so they are visible but not averaged in (and do not
            set the range of a loss axis: their values far above it are cut, with a note).
        path: the PNG to write.
        title: the figure title; say what is compared and name the data
            (:func:`curves_title` builds one).
        labels: case → legend label (default: the case name).
        band: ``"minmax"`` (min–max over seeds), ``"std"`` (mean ± 1 sample std) or None.
        reference: extra curves drawn dashed, legend label → {epoch: {metric: value}}, with
            metric names ``train_acc``, ``train_loss``, ``test_acc``, ``test_loss`` (the
            post's ``train_cost`` / ``test_cost`` are accepted). A label equal to a case, or
            starting with ``"<case>:"`` or ``"<case> "``, takes that case's colour.

        >>> plot_curves({"a": runs_a, "b": runs_b}, "curves.png",        # doctest: +SKIP
        ...             "Cases a and b on the CIFAR-10 embedded sample (5085/1017), 3 seeds",
        ...             reference={"a: post's log": {1: {"test_acc": 0.61}}})
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8.5), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend, without touching pyplot's global state
    grid = fig.subplots(2, 2)
    axes = [[grid[0, 0], grid[0, 1]], [grid[1, 0], grid[1, 1]]]
    labels = labels or {}
    colors = {case: color(case, index) for index, case in enumerate(runs_by_case)}
    for index, (case, runs) in enumerate(runs_by_case.items()):
        if _finished(runs):
            _draw_mean(axes, _finished(runs), labels.get(case, case), colors[case], band,
                       style=index)
    for index, (label, curves) in enumerate((reference or {}).items(), len(colors)):
        case = next((c for c in colors if label == c or label.startswith((f"{c}:", f"{c} "))), None)
        _draw_reference(axes, curves, label, colors.get(case, color(label, index)))
    loss_limits = {}
    for row, col, key, _, _ in PANELS:
        if key.endswith("_loss") and axes[row][col].lines:
            loss_limits[(row, col)] = axes[row][col].get_ylim()
    for case, runs in runs_by_case.items():
        for run in runs:
            if run not in _finished(runs) and run.metrics:
                _draw_unfinished(axes, run, f"{case} seed {run.seed} ({run.status})", colors[case])
    _finish_axes(axes, loss_limits)
    handles, names = axes[0][1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="outside lower center", ncols=min(len(names), 3), fontsize=9)
    fig.suptitle(title, fontsize=11, wrap=True)
    out = Path(path)
    fig.savefig(out, dpi=dpi, format="png")
    return out


def plot_run(run: Run, path: str | os.PathLike[str], title: str | None = None) -> Path:
    """One run's own curves (the layout of :func:`plot_curves`), whatever its status.

    >>> plot_run(load_run("runs/x/a/seed0"), "runs/x/a/seed0/curves.png")  # doctest: +SKIP
    """
    label = f"{run.case} seed {run.seed}" + ("" if run.status == "finished" else f" ({run.status})")
    if title is None:
        data = str(run.config.get("data") or "unknown data")
        title = f"Run {label}: train and test curves on the {short_data(data)}"
    as_finished = Run(run.path, run.config, run.metrics, {"status": "finished"}, run.notes)
    return plot_curves({run.case: [as_finished]}, path, title, labels={run.case: label}, band=None)
