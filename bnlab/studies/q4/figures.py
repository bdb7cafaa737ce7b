"""Q4's figures, drawn from the summary alone: the noisy-BN accuracies, the percentiles of
the layer inputs before and after BN, the gradient shift, and the smoothness along the
gradient.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnlab.evidence.figures import color, mean_band, new_figure, save_figure
from bnlab.evidence.stats import t_interval
from bnlab.studies.q4.plan import NOISY

__all__ = ["plot_noisy", "plot_percentiles", "plot_shift", "plot_smoothness"]

_NETWORKS = (("none", "no BN"), ("torch", "BN"), (NOISY, "BN + noise"))


def plot_noisy(summary: dict[str, Any], path: Path) -> Path:
    """Final test accuracy of no BN, BN and BN + noise: one dot per seed, the mean with its
    95% t interval."""
    noisy = summary["noisy"]
    fig, axes = new_figure(1, 1, (6.4, 4.2))
    ax = axes[0][0]
    for x, (key, _label) in enumerate(_NETWORKS):
        values = [v for v in noisy["test_acc"][key].values() if v is not None]
        c = color(key, x) if key != NOISY else "tab:purple"
        ax.scatter([x] * len(values), [100 * v for v in values], color=c, alpha=0.6, s=18)
        stat = noisy["final_test_acc"][key]
        interval = t_interval(stat)
        if interval is not None:
            ax.errorbar([x + 0.15], [100 * stat["mean"]],
                        yerr=[[100 * (stat["mean"] - interval[0])],
                              [100 * (interval[1] - stat["mean"])]],
                        fmt="o", color=c, capsize=4)
    ax.set_xticks(range(len(_NETWORKS)),
                  [f"{label}\n(lr {noisy['lr'][key]:.3g})" for key, label in _NETWORKS])
    ax.set_ylabel("final test accuracy (%)")
    ax.set_xlim(-0.5, len(_NETWORKS) - 0.5)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"Q4: BN followed by non-stationary noise (Santurkar et al. 2018), Adam at "
                 f"each network's tuned rate; dots: {len(noisy['seed_list'])} seeds, bars: mean "
                 "with 95% t interval", fontsize=9, wrap=True)
    return save_figure(fig, path)


def plot_percentiles(summary: dict[str, Any], path: Path) -> Path:
    """Rows: no BN (its conv output is its ReLU input), BN before BN, BN after BN; columns:
    the probed layers; the percentiles over training steps (mean ± std over seeds)."""
    layers, q = summary["layers"], summary["percentiles"]
    rows = (("none", "relu_input", "no BN: conv output = ReLU input"),
            ("torch", "pre_bn", "BN: before BN (conv output)"),
            ("torch", "relu_input", "BN: after BN (ReLU input)"))
    fig, axes = new_figure(len(rows), len(layers), (4.2 * len(layers), 9.0))
    colors = {0: "tab:blue", 1: "black", 2: "tab:red"}
    for row, (norm, where, label) in enumerate(rows):
        c = summary["curves"][norm]
        for col, i in enumerate(layers):
            ax = axes[row][col]
            runs = c[where].get(str(i), [])  # seed -> step -> [p15, p50, p85]
            for j, percent in enumerate(q):
                if runs:
                    mean_band(ax, c[f"{where}_steps"], [[p[j] for p in r] for r in runs],
                              colors.get(j, f"C{j}"), f"{percent:g}th percentile",
                              "-" if j == len(q) // 2 else "--")
            ax.set_title(f"{label}, layer {i}", fontsize=9)
            ax.set_xlabel("SGD step")
            ax.set_ylabel("value (a.u.)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"Q4: distribution of layer inputs during SGD training (percentiles over a "
                 f"fixed batch of {summary['probe_images']} training images; mean ± std over "
                 "seeds)", fontsize=10)
    return save_figure(fig, path)


def plot_shift(summary: dict[str, Any], path: Path) -> Path:
    """Santurkar et al.'s internal covariate shift per probed layer over SGD steps."""
    layers = summary["layers"]
    fig, axes = new_figure(2, len(layers), (4.2 * len(layers), 6.4))
    for col, i in enumerate(layers):
        for k, (norm, label) in enumerate(summary["norms"].items()):
            c = summary["curves"][norm]
            if not c["seed_list"]:
                continue
            mean_band(axes[0][col], c["rel_diff_steps"], c["rel_diff"][str(i)], f"C{k}", label,
                      band="range")
            mean_band(axes[1][col], c["cosine_steps"], c["cosine"][str(i)], f"C{k}", label)
        axes[0][col].set_yscale("log")
        axes[0][col].set_ylabel("||G - G'|| / ||G|| (ratio, log scale)")
        axes[1][col].set_ylabel("cos(G, G') (cosine)")
        axes[0][col].set_title(f"conv{i}.weight: relative gradient change")
        axes[1][col].set_title(f"conv{i}.weight: cosine of G and G'")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xlabel("SGD step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("Q4: Santurkar et al.'s internal covariate shift, no BN vs BN: the change of "
                 "a layer's weight gradient when the layers before it take their SGD step "
                 "(mean over seeds; band: range over seeds (top), ± std (bottom))", fontsize=10)
    return save_figure(fig, path)


def plot_smoothness(summary: dict[str, Any], path: Path) -> Path:
    """Santurkar et al.'s Fig. 4 measures over SGD steps, no BN vs BN (log scale)."""
    panels = (("loss_range", "loss range along the gradient (nats)"),
              ("grad_change", "max ||grad L(w - eta g) - g|| (l2)"),
              ("beta", "effective beta-smoothness (l2 / l2)"))
    fig, axes = new_figure(1, len(panels), (4.4 * len(panels), 4.0))
    for col, (measure, label) in enumerate(panels):
        ax = axes[0][col]
        for k, (norm, name) in enumerate(summary["norms"].items()):
            c = summary["curves"][norm]
            if c["seed_list"] and measure in c["smooth"]:
                mean_band(ax, c["smooth_steps"], c["smooth"][measure], f"C{k}", name,
                          band="range", marker="o")
        ax.set_yscale("log")
        ax.set_xlabel("SGD step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    distances = ", ".join(f"{d:g}" for d in summary["smooth_distances"])
    fig.suptitle("Q4: smoothness of the loss along the gradient (Santurkar et al. 2018, "
                 f"Fig. 4): steps of ({distances}) x lr from the current weights; mean over "
                 "seeds, band: range", fontsize=10)
    return save_figure(fig, path)
