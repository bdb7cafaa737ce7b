"""Q2's figures, drawn from its summary alone: accuracy against the learning rate, and the
training loss against steps at each network's best rate and at the common rate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnlab.evidence.figures import color, save_figure
from bnlab.studies.q2.plan import NETWORKS, OPTIMIZER_LABELS

__all__ = ["plot_loss_curves", "plot_sweep"]


def _error(point: dict[str, Any]) -> tuple[float, float]:
    """Distances from the mean down and up to the 95% t interval (0 without one)."""
    stat = point["test_acc"]
    if not stat.get("interval"):
        return 0.0, 0.0
    low, high = stat["interval"]
    return stat["mean"] - low, high - stat["mean"]


def plot_sweep(summary: dict[str, Any], path: Path) -> None:
    """Final test accuracy against the learning rate (log x), one panel per optimizer, both
    networks: mean and 95% t interval over seeds, the usable range shaded, the best rate
    ringed, diverged runs (counted at chance) marked ×."""
    import matplotlib.pyplot as plt

    optimizers = summary["optimizers"]
    fig, axes = plt.subplots(1, len(optimizers), figsize=(6 * len(optimizers), 4.6),
                             layout="constrained", squeeze=False)
    for ax, (optimizer, result) in zip(axes[0], optimizers.items(), strict=True):
        for norm, label in NETWORKS:
            curve, c = result["curves"][norm], color(norm)
            lrs = [p["lr"] for p in curve["points"]]
            means = [p["test_acc"]["mean"] for p in curve["points"]]
            errors = list(zip(*[_error(p) for p in curve["points"]], strict=True))
            ax.errorbar(lrs, means, yerr=errors, color=c, marker="o", ms=4, capsize=3,
                        label=f"{label}: mean, 95% interval")
            rng = curve["range"]
            if rng["usable"]:
                ax.axvspan(rng["low"], rng["high"], color=c, alpha=0.12, lw=0)
                ax.axhline(rng["floor"], color=c, lw=0.8, ls=":")
            best = next(p for p in curve["points"] if p["lr"] == curve["best_lr"])
            ax.plot([best["lr"]], [best["test_acc"]["mean"]], "o", mfc="none", mec=c, ms=12)
            bad = [p for p in curve["points"] if p["diverged"]]
            if bad:
                ax.plot([p["lr"] for p in bad], [p["test_acc"]["mean"] for p in bad], "x",
                        color=c, ms=10, mew=2)
        ax.axvline(result["common_rate"], color="0.5", lw=0.8, ls="-.", label="common rate")
        ax.axhline(summary["settings"]["chance"], color="0.7", lw=0.8, label="chance")
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate (log scale)")
        ax.set_ylabel("final test accuracy (fraction)")
        ax.set_title(OPTIMIZER_LABELS[optimizer], fontsize=10)
        ax.grid(True, alpha=0.3, which="both")
    axes[0][0].plot([], [], "kx", ms=8, mew=2, ls="none", label="diverged (at chance)")
    axes[0][0].plot([], [], "ko", mfc="none", ms=10, ls="none", label="best rate (train loss)")
    axes[0][0].legend(fontsize=7)
    st = summary["settings"]
    fig.suptitle(f"Final test accuracy against the learning rate: All-CNN-C width "
                 f"{st['width']}, {st['train_images']} images, {st['epochs']} epochs, "
                 f"{len(summary['seed_list'])} seeds per point; shaded: usable range (dotted: "
                 f"{st['keep']:.0%} of the best's gain over chance)", fontsize=9)
    save_figure(fig, path)


def plot_loss_curves(summary: dict[str, Any], path: Path) -> None:
    """Training loss against optimizer steps, one panel per optimizer: each network at its
    best rate (solid) and at the common rate (dashed), mean ± std bands over seeds."""
    import matplotlib.pyplot as plt

    optimizers = summary["optimizers"]
    fig, axes = plt.subplots(1, len(optimizers), figsize=(6 * len(optimizers), 4.6),
                             layout="constrained", squeeze=False)
    for ax, (optimizer, result) in zip(axes[0], optimizers.items(), strict=True):
        for where, style in (("best", "-"), ("common", "--")):
            for norm, label in NETWORKS:
                curve = result["loss_curves"][where][norm]
                pairs = [(s, m) for s, m in zip(curve["steps"], curve["train_loss"], strict=True)
                         if m["mean"] is not None]
                if not pairs:
                    continue
                steps = [s for s, _ in pairs]
                mean = [m["mean"] for _, m in pairs]
                std = [m["std"] for _, m in pairs]
                ax.plot(steps, mean, color=color(norm), ls=style, marker="o", ms=3,
                        label=f"{label}, {where} rate {curve['lr']:.2g}")
                ax.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)],
                                [m + s for m, s in zip(mean, std, strict=True)],
                                color=color(norm), alpha=0.15, lw=0)
        ax.set_xlabel("optimizer steps (each epoch's mean loss at its last step)")
        ax.set_ylabel("training loss (nats)")
        ax.set_title(OPTIMIZER_LABELS[optimizer], fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Training loss against steps: each network at its own best rate (solid, "
                 f"{len(summary['headline_seeds'])} seeds) and at the common rate (dashed, "
                 f"{len(summary['seed_list'])} seeds); mean ± std", fontsize=9)
    save_figure(fig, path)
