"""What every figure shares: one palette, figures without pyplot state, mean ± spread lines.

One palette: a normalization has one colour in every figure of every report, and a case has
its normalization's colour (case a is no BN, b PyTorch's BN, c bnlab's BN), so "BN" looks
the same in the comparison's curves and in Q1-Q5. What differs *within* a normalization (a
dropout variant, an optimizer, the post's log beside bnlab's run) is told by line style or
marker, never by a new colour.

    >>> color("torch") == color("b") == color("bn")
    True
    >>> color("none") == color("a")
    True
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

__all__ = ["CASE_NORM", "NORM_COLORS", "color", "mean_band", "new_figure", "save_figure",
           "short_data"]

# matplotlib's tab10, by name (so no import of matplotlib is needed to pick a colour)
_TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf")

NORM_COLORS: dict[str, str] = {
    "torch": _TAB10[0],   # PyTorch's BN: blue
    "none": _TAB10[1],    # no BN: orange
    "bnlab": _TAB10[2],   # bnlab's BN: green
}
_ALIASES = {"bn": "torch", "no_bn": "none"}

# the post's cases and the ladder: the normalization (or the step) that names their colour
CASE_NORM: dict[str, str] = {"a": "none", "b": "torch", "c": "bnlab"}
_CASE_COLORS: dict[str, str] = {
    "d": _TAB10[4],          # b with AMSGrad: purple
    "b-manual": _TAB10[9],   # b's math on the manual engine: cyan
    "b-act": _TAB10[6],      # per-activation BN: pink
    "b-act-rule": _TAB10[5],  # and the post's optimizer rule: brown
    "c-fixed": _TAB10[8],    # c with true gradients: olive
}


def color(key: str, index: int = 0) -> str:
    """The colour of a normalization (``none``, ``torch``, ``bnlab``, ``bn``) or a case
    (``a``, ``b``, ``c``, ``d``, the ladder's steps); any other key gets tab10's
    ``index``-th colour after the named ones (a matplotlib colour string)."""
    key = _ALIASES.get(key, key)
    if key in NORM_COLORS:
        return NORM_COLORS[key]
    if key in CASE_NORM:
        return NORM_COLORS[CASE_NORM[key]]
    if key in _CASE_COLORS:
        return _CASE_COLORS[key]
    free = [c for c in _TAB10 if c not in NORM_COLORS.values() and c not in _CASE_COLORS.values()]
    return free[index % len(free)]


def short_data(description: str) -> str:
    """'CIFAR-10 embedded sample (5085 train / 1017 test) — not the full data set' →
    'CIFAR-10 embedded sample (5085/1017)', for titles."""
    text = re.sub(r"\s*—\s*not the full data set", "", description)
    text = re.sub(r" from \S+", "", text)
    return re.sub(r"\((?:full: )?(\d+) train / (\d+) test\)", r"(\1/\2)", text).strip()


def new_figure(rows: int, cols: int, size: tuple[float, float]):
    """A matplotlib ``Figure`` (no pyplot state) and its ``rows x cols`` axes array."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG and release it; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def mean_band(ax, steps: Sequence[int], runs: Sequence[Sequence[float]], color, label: str,
              style: str = "-", band: str = "std", marker: str | None = None) -> None:
    """Mean over seeds (``runs``: one row per seed) as a line; a band of mean ± std
    (``band="std"``) or of the range over seeds (``"range"``, for log axes); no band for
    one seed."""
    import torch

    t = torch.tensor(runs, dtype=torch.float64)
    mean = t.mean(0)
    ax.plot(steps, mean.tolist(), style, color=color, lw=1.5, label=label, marker=marker,
            ms=3)
    if t.shape[0] > 1:
        low, high = ((t.min(0).values, t.max(0).values) if band == "range"
                     else (mean - t.std(0), mean + t.std(0)))
        ax.fill_between(steps, low.tolist(), high.tolist(), color=color, alpha=0.2, lw=0)
