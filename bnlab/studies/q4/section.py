"""Q4's Markdown section, drawn from summary.json alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bnlab.evidence.stats import fmt_pct, fmt_pm, plural
from bnlab.studies.common import note_lines, read_summary
from bnlab.studies.q4.plan import NOISY, TITLE, WHERE

__all__ = ["render"]

LITERATURE = (
    "**What the literature reports at full scale.** Ioffe & Szegedy (2015, Fig. 1) show the "
    "15th, 50th and 85th percentiles of one sigmoid input of an MNIST network over training: "
    "steadier with BN. Santurkar, Tsipras, Ilyas & Madry (2018, \"How Does Batch "
    "Normalization Help Optimization?\", NeurIPS) train VGG networks on full CIFAR-10 and "
    "report that (Sec. 2.1) BN followed by injected non-stationary noise trains about as "
    "well as standard BN and better than no BN, although its layer inputs are unstable; "
    "(Sec. 2.2) BN does not reduce internal covariate shift in their optimization sense "
    "(Definition 2.1), their BN networks often showing more; (Sec. 3.1, Fig. 4) with BN the "
    "loss varies less, and its gradient changes less, over a step along the gradient. They "
    "show these as figures: no number of theirs is quoted here."
)


def _diff(d: Mapping[str, Any], digits: int = 3, scale: float = 1.0, unit: str = "") -> str:
    """``+0.012 [−0.004, +0.028]`` (mean and 95% interval of a paired difference)."""
    if not d or d.get("mean") is None:
        return "n/a"
    if d.get("low") is None:
        return f"{d['mean'] * scale:+.{digits}f}{unit} (one seed: no interval)"
    return (f"{d['mean'] * scale:+.{digits}f}{unit} [{d['low'] * scale:+.{digits}f}, "
            f"{d['high'] * scale:+.{digits}f}]")


def _verdict_line(v: Mapping[str, Any], digits: int = 3, scale: float = 1.0,
                  unit: str = "") -> str:
    # "not below -m" is supported when the whole interval lies above -m
    expected = {"above": "above +", "below": "below −", "within": "within ±",
                "not below": "above −"}[v["expected"]]
    return (f"*Claim ({v['source']}):* {v['claim']} *Measure:* {v['measure']}, paired by "
            f"seed: {_diff(v['difference'], digits, scale, unit)} (mean [95% t interval]; "
            f"{v['difference'].get('n', 0)} pairs); for support the whole interval must lie "
            f"{expected}"
            f"{v['min_effect'] * scale:.{digits}g}{unit}. **Verdict: {v['verdict']}.**")


def _intro(s: Mapping[str, Any]) -> list[str]:
    plan = s["drift_plan"]
    return [
        f"## {TITLE}",
        "",
        "Internal covariate shift is the change in the distribution of a layer's inputs "
        "while the layers before it are trained (Ioffe & Szegedy 2015). The post says BN "
        "\"limits the internal co-variate shift by normalizing the data over and over "
        "again\". Three experiments test this and Santurkar et al.'s (2018) answer to it, on "
        f"All-CNN-C, {s['train_images']} training images of {s['data']} (preset "
        f"`{s['preset']}`):",
        "",
        f"- **Noisy BN**: no BN, BN, and BN followed by random per-channel scale and shift "
        f"redrawn at every step, Adam, width {s['width']:g}, "
        f"{plural(s['epochs'], 'epoch')}, batch {s['batch_size']}, each network at its own "
        f"tuned rate (the shared sweep, chosen on final training loss; BN + noise at BN's), "
        f"{plural(len(s['noisy']['seed_list']), 'seed')}.",
        f"- **Drift, gradient shift and smoothness**: no BN and BN trained with SGD "
        f"(momentum 0.9, cosine schedule) at one common peak rate {plan['lr']:g} (the same "
        f"step for both networks), width {plan['width']:g}, batch {plan['batch_size']}, "
        f"{plural(plan['total_steps'], 'step')}, {plural(len(s['seed_list']), 'seed')} each; "
        f"probes measure layers {', '.join(map(str, s['layers']))} during training.",
        "",
        "Numbers are mean ± std over seeds; a difference is BN − no BN (or as named) paired "
        "by seed, with its 95% t interval in brackets, judged against a minimum effect "
        "fixed before the data.",
        "",
    ]


def _noisy(s: Mapping[str, Any]) -> list[str]:
    n, v = s["noisy"], s["verdicts"]
    labels = {"none": "no BN", "torch": "BN", NOISY: "BN + noise"}
    noise = n["noise"]
    lines = [
        "### Does BN work by stabilizing the layer inputs? BN with injected noise",
        "",
        f"After every BN layer, in training only: y = s·BN(x) + b per channel, s ~ "
        f"U({1 - noise['scale_spread']:g}, {1 + noise['scale_spread']:g}), b ~ "
        f"U(−{noise['shift_spread']:g}, {noise['shift_spread']:g}), redrawn at every step, "
        "so each channel's mean and scale jump at every step (E[s] = 1, E[b] = 0: the test "
        "network has no noise).",
        "",
        "| network | Adam lr | final test accuracy | final training loss |",
        "|---|---|---|---|",
    ]
    for key, label in labels.items():
        lines.append(f"| {label} | {n['lr'][key]:.3g} | {fmt_pct(n['final_test_acc'][key])} | "
                     f"{fmt_pm(n['final_train_loss'][key], 3)} |")
    d = n["differences"]
    lines += [
        "",
        f"BN − no BN: {_diff(d['bn_minus_none'], 1, 100, ' pts')}; BN + noise − no BN: "
        f"{_diff(d['noisy_minus_none'], 1, 100, ' pts')}; BN − (BN + noise): "
        f"{_diff(d['bn_minus_noisy'], 1, 100, ' pts')}.",
        "",
        _verdict_line(v["santurkar_noise"], 1, 100, " pts"),
        "",
        _verdict_line(v["santurkar_noise_vs_bn"], 1, 100, " pts"),
        "",
        "![Final test accuracy of no BN, BN and BN followed by non-stationary noise, Adam at "
        "each network's tuned rate; y: accuracy (%); dots: seeds, bars: mean with 95% t "
        "interval](q4_noisy_bn.png)",
        "",
    ]
    return lines


def _drift(s: Mapping[str, Any]) -> list[str]:
    q = ", ".join(f"{p:g}th" for p in s["percentiles"])
    lines = [
        "### The distribution of the layer inputs, before and after BN (Ioffe & Szegedy's "
        "Fig. 1)",
        "",
        f"A fixed batch of {s['probe_images']} training images (not augmented) goes through "
        f"the network every {plural(s['every']['percentile'], 'step')}; the {q} percentiles "
        f"of each channel (over at most {s['percentile_sample']} fixed positions) are "
        "averaged over channels, before BN (the conv output) and after it (the ReLU input); "
        "BN normalizes with the probe batch's statistics, its running buffers restored. "
        "*Drift* is the largest move of a percentile from its value at step 0, in units of "
        "the mean 15–85 spread. Without BN, before and after are the same tensor.",
        "",
        "| layer | drift, no BN | drift before BN, BN | drift after BN, BN |",
        "|---|---|---|---|",
    ]
    d = s["drift"]
    for i in [*map(str, s["layers"]), "all"]:
        name = f"layer {i}" if i != "all" else "mean over layers"
        lines.append(f"| {name} | {fmt_pm(d['relu_input']['none'].get(i), 2)} | "
                     f"{fmt_pm(d['pre_bn']['torch'].get(i), 2)} | "
                     f"{fmt_pm(d['relu_input']['torch'].get(i), 2)} |")
    lines.append("")
    for where in WHERE:
        lines += [_verdict_line(s["verdicts"][f"post_distribution_{where}"], 2), ""]
    lines += [
        f"![Percentiles ({q}) of the inputs of layers {', '.join(map(str, s['layers']))} on a "
        "fixed batch of training images vs SGD step; rows: no BN, BN before BN, BN after BN; "
        "y: value (arbitrary units); bands: ± std over seeds](q4_percentiles.png)",
        "",
    ]
    return lines


def _shift(s: Mapping[str, Any]) -> list[str]:
    sh = s["shift"]
    lines = [
        "### How much the earlier layers' step changes a layer's gradient (Santurkar et al. "
        "2018, Definition 2.1)",
        "",
        f"Every {plural(s['every']['shift'], 'step')}, on a seeded batch of training images: "
        "G is the gradient of conv*i*'s weights; the optimizer's own SGD step (from a deep "
        "copy of its state, momentum included) is applied to layers 1..*i*−1 only; G' is "
        "the same gradient after that step. Each run is summarized by the median over its "
        "measurements.",
        "",
        "| layer | ‖G−G'‖/‖G‖, no BN | ‖G−G'‖/‖G‖, BN | cos(G, G'), no BN | cos(G, G'), BN |",
        "|---|---|---|---|---|",
    ]
    for i in [*map(str, s["layers"]), "all"]:
        name = f"conv{i}" if i != "all" else "mean over layers"
        lines.append(
            f"| {name} | {fmt_pm(sh['none']['rel_diff'].get(i), 4)} | "
            f"{fmt_pm(sh['torch']['rel_diff'].get(i), 4)} | "
            f"{fmt_pm(sh['none']['cosine'].get(i), 4)} | "
            f"{fmt_pm(sh['torch']['cosine'].get(i), 4)} |")
    lines += [
        "",
        _verdict_line(s["verdicts"]["santurkar_ics"], 2),
        "",
        "![Santurkar et al.'s internal covariate shift of conv2, conv5, conv8 vs SGD step, "
        "without and with BN; top: relative change of the weight gradient ‖G−G'‖/‖G‖ (ratio, "
        "log scale; band: range over seeds), bottom: cosine of G and G' (band: ± std over "
        "seeds)](q4_gradient_shift.png)",
        "",
    ]
    return lines


def _smoothness(s: Mapping[str, Any]) -> list[str]:
    sm = s["smoothness"]
    distances = ", ".join(f"{d:g}" for d in s["smooth_distances"])
    lines = [
        "### The loss along the gradient (Santurkar et al. 2018, Fig. 4)",
        "",
        f"Every {plural(s['every']['smooth'], 'step')}, on a seeded batch: g is the gradient "
        f"of the loss at the current weights w; the loss and its gradient are evaluated at "
        f"w − η·g for η = ({distances}) × the peak rate. *Loss range*: the largest minus the "
        "smallest loss over those points and w (nats); *gradient change*: the largest "
        "‖∇L(w − ηg) − g‖; *effective β-smoothness*: the largest ‖∇L(w − ηg) − g‖ / (η‖g‖). "
        "Lower is smoother; each run is summarized by the median over its measurements.",
        "",
        "| measure | no BN | BN |",
        "|---|---|---|",
    ]
    for measure, label in (("loss_range", "loss range (nats)"),
                           ("grad_change", "gradient change (l2)"),
                           ("beta", "effective β-smoothness")):
        lines.append(f"| {label} | {fmt_pm(sm['none'][measure], 4)} | "
                     f"{fmt_pm(sm['torch'][measure], 4)} |")
    lines += ["", _verdict_line(s["verdicts"]["santurkar_smoothness_loss_range"], 2), "",
              _verdict_line(s["verdicts"]["santurkar_smoothness_beta"], 2), "",
              "![Loss range, gradient change and effective β-smoothness along the gradient "
              "vs SGD step, no BN and BN (log scale; band: range over seeds)]"
              "(q4_smoothness.png)", ""]
    return lines


def _answer(s: Mapping[str, Any]) -> list[str]:
    v = s["verdicts"]
    return [
        f"**Answer** (preset `{s['preset']}`, {s['data']}). Internal covariate shift is the "
        "change of a layer's input distribution as the earlier layers learn. That BN reduces "
        f"it, after BN: {v['post_distribution_relu_input']['verdict']}; before BN: "
        f"{v['post_distribution_pre_bn']['verdict']}. That BN + noise still beats no BN: "
        f"{v['santurkar_noise']['verdict']}; that it matches BN: "
        f"{v['santurkar_noise_vs_bn']['verdict']}. That BN does not reduce the gradient-sense "
        f"shift: {v['santurkar_ics']['verdict']}. That BN smooths the loss along the gradient: "
        f"{v['santurkar_smoothness_loss_range']['verdict']} (loss range), "
        f"{v['santurkar_smoothness_beta']['verdict']} (β-smoothness). An *inconclusive* "
        "verdict means these seeds and steps cannot tell, not that there is no effect.",
        "",
        LITERATURE,
    ]


def render(study_dir: Path) -> str:
    """The Markdown section, from ``study_dir/summary.json`` alone."""
    s = read_summary(study_dir)
    lines = [*_intro(s), *_noisy(s), *_drift(s), *_shift(s), *_smoothness(s), *_answer(s)]
    lines += note_lines(s.get("notes", []))
    return "\n".join(lines) + "\n"
