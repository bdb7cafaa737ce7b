"""Q3's figures, drawn from its summary alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnlab.evidence.figures import color, save_figure, short_data
from bnlab.studies.q3.plan import (
    CHANCE,
    NORMS,
    STAT_KINDS,
)

# ---- figures ------------------------------------------------------------------------------

def _setting_text(summary: dict[str, Any]) -> str:
    st = summary["settings"]
    return (f"All-CNN-C ×{st['width']:g}, {st['train_images']} train images of the "
            f"{short_data(summary['data'])}; mean ± std over {summary['n_seeds']} seed(s)")


def _colors() -> dict[str, Any]:
    return {norm: color(norm) for norm in ("torch", "none")}  # the one palette


def _plot_batch_size(summary: dict[str, Any], path: Path) -> None:
    """Final test accuracy vs batch size (log x): BN, no BN and the BN variants, ±1 std
    error bars; points with fewer than the study's minimum updates are drawn hollow and
    labelled with their updates."""
    import matplotlib.pyplot as plt

    points = summary["batch_size"]["points"]
    minimum = summary["settings"]["min_updates"]
    colors = _colors()
    variants = [k for p in points for k in p["variants"]]
    keys = [(norm, label) for norm, label in NORMS] + [
        (k, next(p[k]["label"] for p in points if k in p["variants"]))
        for k in dict.fromkeys(variants)]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), layout="constrained")
    for index, (key, label) in enumerate(keys):
        c = colors.get(key) or color(key, index)
        xs, means, stds = [], [], []
        for p in points:
            stat = p[key]["test_acc"] if key in p else None
            if not stat or stat["mean"] is None:
                continue
            xs.append(p["batch_size"])
            means.append(stat["mean"])
            stds.append(stat["std"])
        ax.errorbar(xs, means, yerr=stds, color=c, marker="o", ms=6, capsize=4,
                    lw=1.8 if key in ("torch", "none") else 1.2,
                    ls="-" if key in ("torch", "none") else "--", label=label)
        for p in points:
            stat = p[key]["test_acc"] if key in p else None
            if p["updates"] < minimum and stat and stat["mean"] is not None:
                ax.plot([p["batch_size"]], [stat["mean"]], "o", ms=9, mfc="white", mec=c,
                        mew=2)
                if key == "torch":
                    ax.annotate(f"{p['updates']} updates", (p["batch_size"], stat["mean"]),
                                textcoords="offset points", xytext=(8, -4), fontsize=8,
                                color=c)
    ax.axhline(CHANCE, color="0.5", lw=0.8, ls=":", label="chance (10 classes)")
    ax.set_xscale("log", base=2)
    ax.set_xticks([p["batch_size"] for p in points], [str(p["batch_size"]) for p in points])
    ax.set_xlabel("batch size (images per step, log scale)")
    ax.set_ylabel("final test accuracy (fraction)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"Test accuracy vs batch size (Adam, tuned lr ∝ √batch; hollow: fewer than "
                 f"{minimum} updates)\n{_setting_text(summary)}", fontsize=9)
    save_figure(fig, path)


def _plot_discrepancy(summary: dict[str, Any], path: Path) -> None:
    """Grouped bars: per trained BN network, test accuracy under the four statistics."""
    import matplotlib.pyplot as plt
    from matplotlib import colormaps

    groups = summary["discrepancy"]["groups"]
    fig, ax = plt.subplots(figsize=(max(7.5, 1.6 * len(groups) + 2), 4.8),
                           layout="constrained")
    width = 0.8 / len(STAT_KINDS)
    palette = colormaps["Set2"]
    for k, (key, label) in enumerate(STAT_KINDS):
        xs = [i + (k - (len(STAT_KINDS) - 1) / 2) * width for i in range(len(groups))]
        means = [g[key]["mean"] if g[key]["mean"] is not None else 0.0 for g in groups]
        stds = [g[key]["std"] or 0.0 for g in groups]
        ax.bar(xs, means, width, yerr=stds, capsize=3, color=palette(k), label=label)
    ax.axhline(CHANCE, color="0.5", lw=0.8, ls=":", label="chance")
    ax.set_xticks(range(len(groups)), [g["label"].replace(", ", ",\n") for g in groups])
    ax.set_xlabel("trained BN network (its training batch size and batch order)")
    ax.set_ylabel("test accuracy (fraction)")
    ax.set_ylim(0, 1)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=2, loc="upper left")
    ax.set_title(f"Train/test discrepancy: the statistics BN normalizes with at test time\n"
                 f"{_setting_text(summary)}", fontsize=9)
    save_figure(fig, path)


def _plot_class_sorted(summary: dict[str, Any], path: Path) -> None:
    """Train (training mode) and test accuracy per epoch: BN / no BN x shuffled / sorted."""
    import matplotlib.pyplot as plt

    block = summary["class_sorted"]
    colors = _colors()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained", sharey=True)
    for config in block["configs"].values():
        curves = config["curves"]
        if not curves["epoch"]:
            continue
        style = "-" if config["order"] == "shuffled" else "--"
        for ax, key in zip(axes, ("train_acc", "test_acc"), strict=True):
            mean, std = curves[key]["mean"], curves[key]["std"]
            ax.plot(curves["epoch"], mean, style, color=colors[config["norm"]], marker="o",
                    ms=3, lw=1.8, label=config["label"])
            ax.fill_between(curves["epoch"], [m - s for m, s in zip(mean, std, strict=True)],
                            [m + s for m, s in zip(mean, std, strict=True)],
                            color=colors[config["norm"]], alpha=0.15, lw=0)
    titles = ("train accuracy (training mode, augmented, during the epoch)",
              "test accuracy (eval mode)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].set_ylabel("accuracy (fraction)")
    axes[1].legend(fontsize=8, handlelength=3.5)
    fig.suptitle(f"Batches that do not represent the data: class-sorted vs shuffled, batch "
                 f"{block['batch_size']}\n{_setting_text(summary)}", fontsize=9)
    save_figure(fig, path)


def _plot_time(summary: dict[str, Any], path: Path) -> None:
    """Bars of training seconds per epoch (± std over later epochs and seeds)."""
    import matplotlib.pyplot as plt

    configs = summary["time"]["configs"]
    colors = _colors()
    fig, ax = plt.subplots(figsize=(7.5, 4.4), layout="constrained")
    keys = list(configs)
    means = [configs[k]["epoch_time_s"]["mean"] or 0.0 for k in keys]
    stds = [configs[k]["epoch_time_s"]["std"] or 0.0 for k in keys]
    bar_colors = [colors["none"] if k.endswith("none") else colors["torch"] for k in keys]
    ax.bar(range(len(keys)), means, yerr=stds, capsize=4, color=bar_colors)
    for i, k in enumerate(keys):
        overhead = configs[k].get("overhead")
        if overhead is not None:
            ax.annotate(f"{overhead * 100:+.0f} %", (i, means[i] + stds[i]),
                        textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    ax.bar([0], [0], color=colors["none"], label="no BN")
    ax.bar([0], [0], color=colors["torch"], label="with BN (label: time vs no BN, same engine)")
    ax.set_xticks(range(len(keys)), [configs[k]["label"].replace(", ", ",\n") for k in keys],
                  fontsize=8)
    ax.set_ylabel("training time per epoch (s)")
    ax.set_xlabel("engine and normalization")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    st = summary["settings"]
    which = "epochs after the first" if \
        configs["autograd_none"]["epoch_time_s"].get("skipped_first", True) else "all epochs"
    ax.set_title(f"Cost of BN per epoch: {st['train_images']} images, batch {st['batch_size']}, "
                 f"evaluation excluded; {which}, {summary['n_seeds']} seed(s)", fontsize=9)
    save_figure(fig, path)
