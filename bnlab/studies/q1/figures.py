"""Q1's figures, drawn from summary.json alone: the gap and fit of every arm, and the noise.

Colours follow the one palette (:func:`bnlab.evidence.figures.color`): an arm has its
normalization's colour (no BN orange, PyTorch's BN blue, bnlab's ghost BN green); what
differs within a normalization is told by line style: dashed for dropout, dotted for the
common learning rate. Dropout's own noise (not a normalization) is grey.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bnlab.evidence.figures import color, save_figure

__all__ = ["plot_gap", "plot_noise"]

_DROPOUT = "0.35"  # dropout's noise: a grey, not a normalization's colour


def _style(arm: dict[str, Any]) -> tuple[str, str]:
    """(colour, line style) of an arm."""
    fields = arm["fields"]
    style = "--" if fields.get("dropout") else ":" if arm["rate"] == "common" else "-"
    return color(fields["norm"]), style


def plot_gap(summary: dict[str, Any], path: Path) -> None:
    """Left: the accuracy gap (training mode) against the epoch per arm, mean ± std band,
    with the final eval-mode gap as a star. Right: each run's test accuracy against its
    eval-mode train accuracy (its fit); the diagonal is "no gap", so generalization at equal
    fit reads off vertically."""
    import matplotlib.pyplot as plt

    fig, (ax_gap, ax_fit) = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    for arm in summary["arms"].values():
        col, style = _style(arm)
        epochs, curve = arm["curves"]["epoch"], arm["curves"]["acc_gap"]
        if epochs:
            ax_gap.plot(epochs, curve["mean"], style, color=col, marker="o", ms=3, lw=1.6,
                        label=arm["label"])
            ax_gap.fill_between(epochs, [m - s for m, s in zip(curve["mean"], curve["std"],
                                                                 strict=True)],
                                [m + s for m, s in zip(curve["mean"], curve["std"], strict=True)],
                                color=col, alpha=0.12, lw=0)
            final = arm["final"]["acc_gap_eval"]
            if final["mean"] is not None:
                ax_gap.errorbar([epochs[-1] + 0.15], [final["mean"]], yerr=[final["std"]],
                                color=col, marker="*", ms=10, capsize=3, ls="none")
        runs = [r for r in arm["runs"] if "train_acc_eval" in r]
        ax_fit.plot([r["train_acc_eval"] for r in runs], [r["test_acc"] for r in runs],
                    ls="none", marker="o" if style == "-" else "^" if style == ":" else "s",
                    mfc="none" if style != "-" else col, color=col, label=arm["label"])
    ax_gap.plot([], [], "k*", ls="none", ms=9, label="final gap, train acc in eval mode")
    ax_gap.set_title("accuracy gap: train acc (training mode, augmented) − test acc")
    ax_gap.set_xlabel("epoch")
    ax_gap.set_ylabel("accuracy gap (fraction)")
    ax_gap.axhline(0.0, color="0.5", lw=0.8)
    ax_gap.xaxis.get_major_locator().set_params(integer=True)
    low = min([*ax_fit.get_xlim(), *ax_fit.get_ylim()])
    high = max([*ax_fit.get_xlim(), *ax_fit.get_ylim()])
    ax_fit.plot([low, high], [low, high], color="0.5", lw=0.8, label="no gap")
    ax_fit.set_title("generalization at equal fit: one point per run")
    ax_fit.set_xlabel("train accuracy, eval mode, un-augmented (fraction)")
    ax_fit.set_ylabel("test accuracy (fraction)")
    for ax in (ax_gap, ax_fit):
        ax.grid(True, alpha=0.3)
    ax_gap.legend(fontsize=7)
    fig.suptitle(f"Generalization gap and fit: All-CNN-C on "
                 f"{summary['settings']['train_images']} training images, seeds "
                 f"{summary['seed_list']} (tuned-rate arms: {summary['headline_seeds']})",
                 fontsize=10)
    save_figure(fig, path)


def plot_noise(summary: dict[str, Any], path: Path) -> None:
    """Left: BN's relative logit noise against the batch size (log-log), trained and
    untrained, with the 1/√B line of theory and dropout's noise on the BN + dropout network
    as a band. Right: BN's, dropout's and both noises on that same network."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    noise = summary["noise"]
    sizes, trained = noise["batch_sizes"], noise["bn_trained"]["relative_std"]
    fig, (ax_rel, ax_src) = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    if trained and trained[0]["mean"] is not None:
        ax_rel.errorbar(sizes, [s["mean"] for s in trained], yerr=[s["std"] for s in trained],
                        color=color("torch"), marker="o", capsize=3,
                        label="BN net, trained (training mode)")
        ax_rel.plot(sizes, [trained[0]["mean"] * math.sqrt(sizes[0] / b) for b in sizes],
                    color="0.3", lw=1, ls="-.", label="∝ 1/√B (theory)")
    ax_rel.plot(sizes, noise["bn_untrained"]["relative_std"], color=color("torch"), ls="--",
                marker="s", ms=4, alpha=0.7, label="BN net, untrained")
    same = noise["same_network"]
    drop = same["dropout"]["relative_std"]
    if drop["mean"] is not None:
        ax_rel.axhline(drop["mean"], color=_DROPOUT, lw=1.6,
                       label="dropout's noise, BN + dropout net (fixed batches)")
        ax_rel.axhspan(drop["mean"] - drop["std"], drop["mean"] + drop["std"],
                       color=_DROPOUT, alpha=0.15, lw=0)
    ax_rel.axvline(noise["training_batch_size"], color="0.5", ls=":", lw=1,
                   label="training batch size")
    ax_rel.set_xscale("log", base=2)
    ax_rel.set_xticks(sizes, [str(b) for b in sizes])
    ax_rel.set_yscale("log")
    ax_rel.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
    ax_rel.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
    ax_rel.set_xlabel("batch size B (images, log scale)")
    ax_rel.set_ylabel("relative std of the logits across draws (noise / signal)")
    ax_rel.set_title("how much one image's logits move with its batch mates")
    ax_rel.legend(fontsize=7)
    sources = ("bn", "dropout", "both")
    means = [same[s]["relative_std"]["mean"] or 0.0 for s in sources]
    stds = [same[s]["relative_std"]["std"] or 0.0 for s in sources]
    ax_src.bar(["BN alone\n(batch mates vary)", "dropout alone\n(masks vary)", "both"], means,
               yerr=stds, capsize=4, color=[color("torch"), _DROPOUT, "0.7"])
    ax_src.set_ylabel("relative std of the logits across draws")
    ax_src.set_title(f"the same trained BN + dropout network at batch "
                     f"{noise['training_batch_size']}")
    for ax in (ax_rel, ax_src):
        ax.grid(True, alpha=0.3, which="both")
    fig.suptitle(f"The noise BN injects, beside dropout's: {noise['pool_images']} training "
                 f"images, {noise['draws']} draws each; mean ± std over seeds", fontsize=10)
    save_figure(fig, path)
