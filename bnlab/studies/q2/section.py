"""Q2's section of the report, drawn from ``summary.json`` alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnlab.evidence.stats import fmt_pct, fmt_pm
from bnlab.studies.common import note_lines, read_summary
from bnlab.studies.q2.plan import NETWORKS, OPTIMIZER_LABELS, TITLE

__all__ = ["render"]

CLAIMS = {  # claim key: (what it says, the measure's unit)
    "faster_at_best": ("BN converges faster, each network at its own best rate", "loss"),
    "faster_at_common": ("BN converges faster, both at the common rate", "loss"),
    "higher_accuracy_at_best": ("BN ends with a higher test accuracy, each at its best rate",
                                "acc"),
    "higher_accuracy_at_common": ("BN ends with a higher test accuracy, at the common rate",
                                  "acc"),
    "wider_range": ("BN has a wider range of usable learning rates", "decades"),
}
LITERATURE = (
    "At full scale the literature reports: Ioffe & Szegedy (2015) — BN-Inception reached the "
    "accuracy of Inception on ImageNet with 14 times fewer training steps, and trained at "
    "initial learning rates 5 and 30 times Inception's (BN-x5, BN-x30); Bjorck et al. "
    "(\"Understanding Batch Normalization\", NeurIPS 2018) — on CIFAR-10 most of BN's gain "
    "in speed and accuracy comes from the larger learning rates it makes usable, and at a "
    "small rate the networks with and without BN train much alike; Santurkar et al. (2018) "
    "tie the larger usable rates to a smoother loss landscape.")


def _lr(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2g}"


def _interval(stat: dict[str, Any], unit: str) -> str:
    """``+0.031 [+0.010, +0.052]`` in the unit's digits; ``n/a`` without an interval."""
    if stat.get("mean") is None:
        return "n/a"
    scale, digits, suffix = {"acc": (100.0, 1, " points"), "loss": (1.0, 3, " nats"),
                             "decades": (1.0, 2, " decades")}[unit]
    text = f"{stat['mean'] * scale:+.{digits}f}"
    if stat.get("low") is not None:
        text += f" [{stat['low'] * scale:+.{digits}f}, {stat['high'] * scale:+.{digits}f}]"
    return text + suffix


def _range_cell(curve: dict[str, Any]) -> str:
    """The mean curve's usable range, and the width over seeds with its 95% interval."""
    r, widths = curve["range"], curve["decades"]
    if not r["usable"]:
        return f"none (best {r['best_acc'] or 0:.1%} at {_lr(r['best_lr'])}, not above chance)"
    bounds = ("≤ " if r["censored_low"] else "") + _lr(r["low"]) + " – " + \
        ("≥ " if r["censored_high"] else "") + _lr(r["high"])
    over_seeds = fmt_pm(widths, 2)
    if widths.get("interval"):
        low, high = widths["interval"]
        over_seeds += f" [{low:.2f}, {high:.2f}]"
    return (f"{bounds}: {r['decades']:.2f} decades (per seed {over_seeds})"
            + (", censored" if curve["censored"] else ""))


def _sweep_table(optimizer: str, result: dict[str, Any]) -> list[str]:
    none, bn = result["curves"]["none"], result["curves"]["torch"]
    lines = ["", f"| {OPTIMIZER_LABELS[optimizer]}: learning rate | no BN | BN |", "|---|---|---|"]
    for i, lr in enumerate(result["grid"]):
        cells = []
        for curve in (none, bn):
            point = curve["points"][i]
            mark = " ×" * bool(point["diverged"]) + " ◎" * (point["lr"] == curve["best_lr"])
            cells.append(fmt_pct(point["test_acc"]) + mark)
        common = " (common)" if lr == result["common_rate"] else ""
        lines.append(f"| {_lr(lr)}{common} | {cells[0]} | {cells[1]} |")
    lines.append(f"| usable range | {_range_cell(none)} | {_range_cell(bn)} |")
    return lines


def _loss_table(s: dict[str, Any]) -> list[str]:
    lines = ["", "| optimizer | rate | network | lr | seeds | mean training loss (nats) | "
             "final test accuracy |", "|---|---|---|---|---|---|---|"]
    for optimizer, result in s["optimizers"].items():
        for where in ("best", "common"):
            claims = result["claims"]
            loss, acc = claims[f"faster_at_{where}"], claims[f"higher_accuracy_at_{where}"]
            for norm, label in NETWORKS:
                curve = result["loss_curves"][where][norm]
                side = "bn" if norm == "torch" else "none"
                lines.append(f"| {OPTIMIZER_LABELS[optimizer]} | {where} | {label} | "
                             f"{_lr(curve['lr'])} | {len(curve['seed_list'])} | "
                             f"{fmt_pm(loss[side], 3)} | {fmt_pct(acc[side])} |")
    return lines


def _claims_table(s: dict[str, Any]) -> list[str]:
    lines = ["", "| claim | optimizer | BN − no BN, mean [95% interval] | minimum effect | "
             "pairs | verdict |", "|---|---|---|---|---|---|"]
    for optimizer, result in s["optimizers"].items():
        for key, (text, unit) in CLAIMS.items():
            claim = result["claims"][key]
            effect = claim["min_effect"] * (100 if unit == "acc" else 1)
            sign = "−" if claim["expected"] == "below" else "+"
            lines.append(f"| {text} | {OPTIMIZER_LABELS[optimizer]} | "
                         f"{_interval(claim['difference'], unit)} | {sign}{effect:g} | "
                         f"{claim['n_pairs']} | *{claim['verdict']}* |")
    return lines


def _speedup_lines(s: dict[str, Any]) -> list[str]:
    lines = []
    for optimizer, result in s["optimizers"].items():
        sp = result["speedup"]
        if sp["level"] is None:
            continue
        ratio = (f": {sp['ratio']:.2f} times fewer steps" if sp["ratio"]
                 else ": BN did not reach it")
        lines.append(f"- {OPTIMIZER_LABELS[optimizer]}: no-BN ends its {sp['total_steps']} "
                     f"steps at its best rate with a training loss of {sp['level']:.3f}; BN, at "
                     f"its best rate, reaches it after {fmt_pm(sp['bn_steps'], 0)} steps "
                     f"({sp['reached']} of {sp['runs']} seeds){ratio} (descriptive, no "
                     "verdict).")
    return lines


def _answer(s: dict[str, Any]) -> str:
    parts = []
    for optimizer, result in s["optimizers"].items():
        c = result["claims"]
        parts.append(
            f"{OPTIMIZER_LABELS[optimizer]}: faster convergence at each network's best rate "
            f"*{c['faster_at_best']['verdict']}* (at the common rate "
            f"*{c['faster_at_common']['verdict']}*), higher final accuracy "
            f"*{c['higher_accuracy_at_best']['verdict']}* (common rate "
            f"*{c['higher_accuracy_at_common']['verdict']}*), a wider usable range "
            f"*{c['wider_range']['verdict']}* "
            f"({c['wider_range']['bn']['mean']:.2f} vs {c['wider_range']['none']['mean']:.2f} "
            "decades, mean over seeds)")
    return (f"At preset `{s['preset']}` (the scale of the run below): " + "; ".join(parts)
            + ". Each verdict is on the paired difference by seed, 95% interval, against a "
            "minimum effect stated in advance; no significant difference is inconclusive.")


def render(study_dir: Path) -> str:
    """The Q2 section, drawn from ``summary.json`` alone."""
    s = read_summary(study_dir)
    st = s["settings"]
    n, n_head = len(s["seed_list"]), len(s["headline_seeds"])
    lines = [
        f"## {TITLE}", "",
        f"Data: **{s['data']}**; preset `{s['preset']}`. All-CNN-C at width {st['width']}, "
        f"{st['train_images']} training images, batch {st['batch_size']}, {st['epochs']} "
        f"epochs ({st['total_steps']} steps), cosine schedule, augmentation; the sweep's runs "
        f"are this size at every rate (the scale's other studies train width "
        f"{st['scale_width']} on {st['scale_subset'] or 'all'} images).", "",
        "**Answer.** " + _answer(s), "",
        "### The sweep", "",
        f"Each optimizer, with and without BN, at {st['points']} learning rates "
        f"{1 / st['per_decade']:.2f} decade apart, every rate at full length and {n} seeds; "
        "each network's best rate is the one with the lowest mean final *training* loss (the "
        f"rule every study shares: `bnlab.studies.tuning`) and gets {n_head} seeds. A run whose "
        "loss stopped being finite counts at chance accuracy (×). A rate is *usable* when its "
        f"mean final test accuracy keeps at least {st['keep']:.0%} of the best's gain over "
        f"chance ({st['chance']}); the range is interpolated linearly in log10(lr) between "
        "grid points, measured on each seed's curve (width: mean ± std, [95% t interval]) and "
        "on the mean curve; a range that reaches an end of the grid is censored (≤ / ≥: the "
        "width is a lower bound). ◎: the best rate. Accuracies: mean ± std over seeds.",
    ]
    for optimizer, result in s["optimizers"].items():
        lines += _sweep_table(optimizer, result)
    lines += ["", f"![Final test accuracy (fraction) against the peak learning rate (log x), "
              f"Adam and SGD, with BN (blue) and without (orange): mean and 95% t interval "
              f"over {n} seeds, usable ranges shaded, diverged runs ×]"
              f"({s['figures']['lr_sweep']})", "",
              "### Training loss against steps", "",
              "Each network at its own best rate and at the common rate (the middle of the "
              "grid; for Adam the rate the other studies use). The mean training loss over "
              "the run is the area under the curve per step: lower means the loss fell "
              "sooner."]
    lines += [*_loss_table(s), "", *_speedup_lines(s)]
    lines += ["", f"![Training loss (nats) against optimizer steps, each epoch's mean at its "
              f"last step: each network at its best rate (solid, {n_head} seeds) and at the "
              f"common rate (dashed, {n} seeds), mean ± std bands]"
              f"({s['figures']['loss_curves']})", "",
              "### Claims and verdicts"]
    lines += _claims_table(s)
    lines += note_lines(s["notes"])
    lines += ["", "### The post's claim, the scale and the literature", "",
              f"The post: {s['post_claim']} Its one run per case, at one shared rate, cannot "
              "separate \"BN helps\" from \"this rate suits BN\"; the table above makes each "
              "claim at each network's own best rate and at a common one.", "",
              f"Scale: these answers hold for preset `{s['preset']}` on {s['data']}; a small "
              "network trained for few steps, where the intervals are wide and "
              "*inconclusive* is often the honest answer. " + LITERATURE, ""]
    return "\n".join(lines) + "\n"
