"""Q5's figures, drawn from its summary alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnlab.evidence.figures import mean_band, new_figure, save_figure

# ---- figures -----------------------------------------------------------------------------

def _plot_series(s: dict[str, Any], path: Path) -> None:
    e = s["ewa"]
    fig, axes = new_figure(1, 1, (11.0, 5.0))
    ax = axes[0][0]
    ax.plot(e["curve_steps"], e["one_series"], ".", color="0.6", ms=3,
            label=f"series x_t = {e['mean']:g} + {e['noise']:g} N(0, 1)")
    for k, (key, b) in enumerate(e["betas"].items()):
        ax.plot(e["curve_steps"], b["one_raw"], "-", color=f"C{k}", lw=1.4,
                label=f"β = {key}, raw")
        ax.plot(e["curve_steps"], b["one_corrected"], "--", color=f"C{k}", lw=1.2,
                label=f"β = {key}, bias-corrected")
    ax.axhline(e["mean"], color="black", lw=0.8, ls=":", label="true mean")
    ax.set_xscale("log")
    ax.set_xlabel("step t (log scale)")
    ax.set_ylabel("value (a.u.)")
    ax.set_title("Q5: one noisy series and its exponentially weighted averages v_t "
                 "(from v_0 = 0), raw vs bias-corrected")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, path)


def _plot_startup(s: dict[str, Any], path: Path) -> None:
    e = s["ewa"]
    fig, axes = new_figure(1, 1, (11.0, 5.0))
    ax = axes[0][0]
    for k, (key, b) in enumerate(e["betas"].items()):
        ax.plot(e["curve_steps"], b["error"]["raw"], "-", color=f"C{k}", lw=1.4,
                label=f"β = {key}, raw")
        ax.plot(e["curve_steps"], b["error"]["corrected"], "--", color=f"C{k}", lw=1.2,
                label=f"β = {key}, bias-corrected")
        for threshold, t in b["computed"].items():
            ax.plot([t], [float(threshold)], "o", color=f"C{k}", ms=5, mfc="none")
    for threshold in e["thresholds"]:
        ax.axhline(threshold, color="black", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step t (log scale)")
    ax.set_ylabel("|mean of v_t - true mean| / true mean (fraction, log scale)")
    ax.set_title(f"Q5: start-up error of the averages over {e['replicates']} realizations; "
                 "dotted: 1/e and 0.01, circles: computed steps with β^t below them")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, path)


def _epoch_lines(ax, s: dict[str, Any]) -> None:
    for t in range(s["steps_per_epoch"], s["window"] + 1, s["steps_per_epoch"]):
        ax.axvline(t, color="0.5", lw=0.8, ls=":")


def _plot_running_error(s: dict[str, Any], path: Path) -> None:
    c, steps = s["bn_curves"], s["probe_steps"]
    fig, axes = new_figure(1, 2, (11.0, 4.6))
    for ax, what, ylabel in (
            (axes[0][0], "mean", "|running mean - population mean| / population std"),
            (axes[0][1], "var", "|running var - population var| / population var")):
        mean_band(ax, steps, c[f"{what}_error_raw"], "C0", "PyTorch's convention (raw)",
              marker="o")
        mean_band(ax, steps, c[f"{what}_error_corrected"], "C1", "bias-corrected", marker="o")
        _epoch_lines(ax, s)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{ylabel} (log scale)")
        ax.set_title(f"running {'mean' if what == 'mean' else 'variance'}, averaged over "
                     "channels and BN layers")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Q5: BN's running statistics (momentum {s['bn_momentum']:g}) vs the "
                 f"population statistics of {s['population_images']} training images, first "
                 f"{s['window']} steps (mean ± std over {s['n_seeds']} seeds; dotted: epoch ends)",
                 fontsize=10)
    save_figure(fig, path)


def _plot_early_accuracy(s: dict[str, Any], path: Path) -> None:
    c, steps = s["bn_curves"], s["probe_steps"]
    fig, axes = new_figure(1, 1, (9.0, 4.8))
    ax = axes[0][0]
    mean_band(ax, steps, c["acc_raw"], "C0", "running statistics, PyTorch's convention (raw)",
          marker="o")
    mean_band(ax, steps, c["acc_corrected"], "C1", "running statistics, bias-corrected",
          marker="o")
    mean_band(ax, steps, c["acc_population"], "black", "population statistics (reference)", "--")
    _epoch_lines(ax, s)
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy in eval mode (fraction)")
    ax.set_title(f"Q5: test accuracy ({s['test_images']} test images) in the first "
                 f"{s['window']} steps, by the statistics BN normalizes with "
                 f"(mean ± std over {s['n_seeds']} seeds; dotted: epoch ends)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _plot_momentum(s: dict[str, Any], path: Path) -> None:
    fig, axes = new_figure(1, 1, (8.0, 4.8))
    ax = axes[0][0]
    keys = list(s["momenta"])
    x = list(range(len(keys)))
    for k, (kind, label) in enumerate((("raw", "PyTorch's convention (raw)"),
                                       ("corrected", "bias-corrected"))):
        stats = [s["momenta"][key][f"acc_{kind}"] for key in keys]
        ax.errorbar([i + (k - 0.5) * 0.15 for i in x], [st["mean"] for st in stats],
                    yerr=[st["std"] for st in stats], fmt="o", capsize=4, color=f"C{k}",
                    label=label)
    pop = s["final_acc_population"]
    ax.axhline(pop["mean"], color="black", ls="--", lw=1, label="population statistics")
    ax.axhspan(pop["mean"] - pop["std"], pop["mean"] + pop["std"], color="black", alpha=0.1)
    ax.set_xticks(x, [f"momentum {key}" if key != "cumulative" else "cumulative (None)"
                      for key in keys])
    ax.set_xlabel("BN momentum (PyTorch's convention: weight of the new batch)")
    ax.set_ylabel("final test accuracy in eval mode (fraction)")
    ax.set_title(f"Q5: final test accuracy after {s['total_steps']} steps by BN momentum "
                 f"(mean ± std over {s['n_seeds']} seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _plot_precise(s: dict[str, Any], path: Path) -> None:
    """Test accuracy at each precise-BN point: the moving average against precise
    statistics of augmented and of plain training images, ± std over seeds."""
    fig, axes = new_figure(1, 1, (8.0, 4.8))
    ax = axes[0][0]
    points = s["precise"]
    epochs = [p["epoch"] for p in points]
    for k, (key, label) in enumerate((
            ("acc_running", "moving average (momentum 0.1)"),
            ("acc_precise_augmented", "precise BN, augmented images"),
            ("acc_precise_plain", "precise BN, plain images"))):
        stats = [p[key] for p in points]
        ax.errorbar([e + (k - 1) * 0.08 for e in epochs], [st["mean"] for st in stats],
                    yerr=[st["std"] for st in stats], fmt="o-", capsize=4, color=f"C{k}",
                    label=label)
    ax.set_xticks(epochs, [str(e) for e in epochs])
    ax.set_xlabel("epoch (end of)")
    ax.set_ylabel("test accuracy in eval mode (fraction)")
    ax.set_title(f"Q5: moving average vs precise population statistics during training "
                 f"(mean ± std over {s['n_seeds']} seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
