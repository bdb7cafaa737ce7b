"""Q5's Markdown section, drawn from its summary.json alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bnlab.evidence.stats import fmt_pct, fmt_pm, plural
from bnlab.studies.common import note_lines, read_summary
from bnlab.studies.q5.plan import (
    TITLE,
    VERDICT_TEXT,
)

LITERATURE = ("Wu & Johnson 2021 (\"Rethinking 'Batch' in BatchNorm\", Sec. 3-4) find the "
              "moving average an inaccurate estimate of the population statistics when the "
              "weights still change fast, early in training or with a small momentum's long "
              "memory, and recompute them after training (precise BN) to remove that error; "
              "with enough steps at a standard momentum the two agree closely.")


def _ci(diff: dict | None, digits: int = 3, scale: float = 1.0, unit: str = "") -> str:
    """``+0.012 (95% interval −0.004 to +0.028, 3 seeds)`` from a paired difference."""
    if not diff or diff.get("mean") is None:
        return "n/a (no paired seeds)"
    value = f"{diff['mean'] * scale:+.{digits}f}{unit}"
    if diff.get("low") is None:
        return f"{value} (one seed: no interval)"
    return (f"{value} (95% interval {diff['low'] * scale:+.{digits}f}{unit} to "
            f"{diff['high'] * scale:+.{digits}f}{unit}, {diff['n']} seeds)")


def _pts(diff: dict | None) -> str:
    return _ci(diff, 1, 100.0, " points")

# ---- the section -------------------------------------------------------------------------

def _steps(n: int | None) -> str:
    return "never (within the series)" if n is None else str(n)


def render(study_dir: Path) -> str:
    """The Markdown section, from summary.json alone: one function per subsection."""
    s = read_summary(study_dir)
    lines = [*_claim(s), *_averages(s), *_bn_first_steps(s), *_precise(s), *_momenta(s),
             *_answer(s), *note_lines(s.get("notes", []))]
    return "\n".join(lines) + "\n"


def _thresholds(e: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The start-up thresholds as summary.json's keys and as printed ("1/e" for 1/e)."""
    th = [f"{t:.6g}" for t in e["thresholds"]]
    th_names = ["1/e" if abs(t - 1 / math.e) < 1e-9 else f"{t:g}" for t in e["thresholds"]]
    return th, th_names


def _claim(s: dict[str, Any]) -> list[str]:
    """Title, the two conventions for the average's weight, the post's claim."""
    return [
        f"## {TITLE}",
        "",
        "**Conventions.** The post (after Andrew Ng) writes v_t = β v_(t−1) + (1 − β) x_t "
        "with β the weight of the *old* value; PyTorch's BN momentum is the weight of the "
        "*new* value, momentum = 1 − β. From v_0, the average still holds β^t of v_0 after "
        "t steps; bias correction divides it out: (v_t − β^t v_0) / (1 − β^t).",
        "",
        "**The post's claim.** At test time BN standardizes with averages of the means and "
        "variances seen in training (exponentially weighted), which stand in for the "
        "statistics of the data; whether those averages need bias correction it leaves to "
        "Ng's lecture, whose answer is that the correction matters only in the first steps.",
        "",
    ]


def _averages(s: dict[str, Any]) -> list[str]:
    """Exponentially weighted averages of noisy series: start-up, bias correction, noise."""
    e, v = s["ewa"], {k: c["verdict"] for k, c in s["claims"].items()}
    th, th_names = _thresholds(e)
    lines = [
        "### The averages themselves",
        "",
        f"{e['replicates']} seeded series x_t = {e['mean']:g} + {e['noise']:g}·N(0, 1), "
        f"{e['steps']} steps each, averaged from v_0 = 0. *Computed*: the first t with β^t "
        f"below {th_names[0]} and below {th_names[1]}. *Measured*: the step from which the "
        "error of the average over the realizations, |mean v_t − true mean| / true mean, "
        "stays below the same fraction. *Noise*: the standard deviation of v_t over the "
        "realizations at the last step, beside σ·√((1 − β)/(1 + β)).",
        "",
        f"| β | momentum | computed, {th_names[0]} | measured raw | measured corrected | "
        f"computed, {th_names[1]} | measured raw | measured corrected | noise | formula |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, b in e["betas"].items():
        lines.append(
            f"| {key} | {b['momentum']:.3g} | {b['computed'][th[0]]} | "
            f"{_steps(b['measured']['raw'][th[0]])} | "
            f"{_steps(b['measured']['corrected'][th[0]])} | {b['computed'][th[1]]} | "
            f"{_steps(b['measured']['raw'][th[1]])} | "
            f"{_steps(b['measured']['corrected'][th[1]])} | {b['noise_measured']:.4f} | "
            f"{b['noise_formula']:.4f} |")
    lines += [
        "",
        "A raw average needs about as many steps as computed to forget its start (β^t is "
        "its start value's weight); the bias-corrected one is unbiased from the first step. "
        "A larger β leaves less noise and forgets its start more slowly. Bias correction "
        "shortens the start-up for every β: "
        f"{VERDICT_TEXT[v['ewa_startup']]}.",
        "",
        "![One realization of the noisy series (grey dots) and its exponentially weighted "
        "averages for each β, raw (solid) and bias-corrected (dashed); x: step t (log "
        "scale), y: value (arbitrary units)](q5_ewa_series.png)",
        "",
        f"![Start-up error of the averages over {e['replicates']} realizations, "
        "|mean v_t − true mean| / true mean (fraction, log scale) vs step t (log scale), "
        "raw (solid) and bias-corrected (dashed), with the thresholds (dotted) and the "
        "computed steps (circles)](q5_ewa_startup.png)",
        "",
    ]
    return lines


def _bn_first_steps(s: dict[str, Any]) -> list[str]:
    """BN's running statistics against the population statistics in the first steps."""
    claims = s["claims"]
    lines = [
        "### BN's running statistics in the first steps",
        "",
        f"All-CNN-C at width {s['width']:g} with bnlab's BN (momentum {s['bn_momentum']:g}, "
        f"PyTorch's convention), {s['train_images']} training images of {s['data']}, "
        f"{plural(s['epochs'], 'epoch')} of {plural(s['steps_per_epoch'], 'step')} (batch "
        f"{s['batch_size']}, Adam, peak lr {s['lr']:g}, cosine schedule), "
        f"{plural(s['n_seeds'], 'seed')}; numbers are mean ± std over seeds. At steps "
        f"{', '.join(map(str, s['probe_steps']))} the running statistics of every BN layer "
        "are compared with the *population statistics* they estimate, computed for the "
        "current weights by Ioffe & Szegedy's Algorithm 2 (the mean of the batch means and "
        f"of the unbiased batch variances) over {s['population_images']} training images, "
        f"randomly cropped and flipped as in training (the batches the running averages "
        f"see), in batches of {s['batch_size']}. Errors: the mean's in units of the "
        "population standard deviation, the variance's relative; averaged over channels and "
        "layers.",
        "",
        "| statistic | raw, step " + str(s["probe_steps"][0]) + " | corrected, step "
        + str(s["probe_steps"][0]) + f" | raw, steps ≤ {s['early_steps']} | corrected, "
        f"steps ≤ {s['early_steps']} | raw, step {s['window']} | corrected, step "
        f"{s['window']} |",
        "|---|---|---|---|---|---|---|",
    ]
    f, early, end = s["first_step"], s["early"], s["window_end"]
    rows = (("error of the running mean", "mean_error", 3),
            ("error of the running variance", "var_error", 3),
            ("test accuracy", "acc", 3))
    for label, key, digits in rows:
        lines.append(
            f"| {label} | {fmt_pm(f[f'{key}_raw'], digits)} | "
            f"{fmt_pm(f[f'{key}_corrected'], digits)} | {fmt_pm(early[f'{key}_raw'], digits)} | "
            f"{fmt_pm(early[f'{key}_corrected'], digits)} | {fmt_pm(end[f'{key}_raw'], digits)} | "
            f"{fmt_pm(end[f'{key}_corrected'], digits)} |")
    lines += [
        "",
        f"Test accuracy with the population statistics: {fmt_pm(f['acc_population'], 3)} at "
        f"step {s['probe_steps'][0]}, {fmt_pm(early['acc_population'], 3)} over steps ≤ "
        f"{s['early_steps']}, {fmt_pm(end['acc_population'], 3)} at step {s['window']} "
        f"({s['test_images']} test images).",
        "",
        f"Bias-corrected minus raw, over the first {s['early_steps']} steps, paired by seed: "
        f"the error of the running statistics (mean of the two errors) "
        f"{_ci(claims['bias_correction']['difference'])}; the test accuracy "
        f"{_pts(claims['bias_correction']['accuracy_difference'])}.",
        "",
        "![Error of BN's running mean (left, in population standard deviations) and running "
        "variance (right, relative) against the population statistics vs training step, "
        "PyTorch's raw convention vs bias-corrected, averaged over layers; log y; bands: ± "
        "std over seeds](q5_bn_running_error.png)",
        "",
        "![Test accuracy in eval mode (fraction) vs training step, BN normalizing with the "
        "raw running statistics, the bias-corrected ones, or the population statistics; "
        "bands: ± std over seeds](q5_bn_early_accuracy.png)",
        "",
    ]
    return lines


def _precise(s: dict[str, Any]) -> list[str]:
    """Precise BN statistics against the moving average, with the stand-in verdict."""
    lines = [
        "### Precise population statistics against the moving average",
        "",
        f"At the end of epoch(s) {', '.join(str(p['epoch']) for p in s['precise'])}, each "
        "run's BN layers were also given *precise* statistics (Wu & Johnson 2021; "
        "`bnlab.variants.precise_bn`): the exact pooled mean and variance of one pass over "
        f"all {s['train_images']} training images, in training-mode forwards of batches of "
        f"{s['batch_size']}, augmented as in training and, beside it, not augmented. Test "
        f"accuracy on all {s['all_test_images']} test images; differences paired by seed.",
        "",
        "| epoch | step | moving average | precise, augmented | precise, plain | precise "
        "(augmented) − moving | plain − augmented | moving vs precise: mean error | "
        "variance error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in s["precise"]:
        lines.append(f"| {p['epoch']} | {p['step']} | {fmt_pct(p['acc_running'])} | "
                     f"{fmt_pct(p['acc_precise_augmented'])} | "
                     f"{fmt_pct(p['acc_precise_plain'])} | {_pts(p['precise_vs_running'])} | "
                     f"{_pts(p['plain_vs_augmented'])} | {fmt_pm(p['mean_error_running'], 3)} "
                     f"| {fmt_pm(p['var_error_running'], 3)} |")
    c = s["claims"]["running_stand_in"]
    lines += [
        "",
        f"The post's claim that the moving averages stand in for the data's statistics, "
        f"judged at epoch {c['epoch']} as a non-inferiority claim (supported when the whole "
        f"interval of precise − moving lies below {c['min_effect'] * 100:g} point(s)): "
        f"**{VERDICT_TEXT[c['verdict']]}**. At full scale: {LITERATURE}",
        "",
        f"![Test accuracy in eval mode (fraction) at the end of epochs "
        f"{', '.join(str(p['epoch']) for p in s['precise'])}: BN normalizing with the moving "
        "average, or with precise population statistics of the augmented or the plain "
        "training images; error bars ± std over seeds](q5_precise_bn.png)",
        "",
    ]
    return lines


def _momenta(s: dict[str, Any]) -> list[str]:
    """Final accuracy across momentum values, replayed from the same runs."""
    lines = [
        "### Final accuracy across momentum values",
        "",
        f"After all {s['total_steps']} steps, on all {s['all_test_images']} test images. "
        "Momentum changes only the running buffers (training mode normalizes with batch "
        "statistics), so every momentum comes from the same runs: each step's batch "
        "statistics are recovered from the run's own buffers and replayed into a running "
        "average per momentum (the tests check a replay against a run trained with that "
        "momentum). *Start weight*: the weight (1 − momentum)^steps the initial buffers "
        "still hold.",
        "",
        "| momentum | start weight | accuracy, raw | accuracy, corrected | mean error, raw | "
        "variance error, raw |",
        "|---|---|---|---|---|---|",
    ]
    for key, m in s["momenta"].items():
        weight = "none (cumulative)" if m["start_weight"] is None else f"{m['start_weight']:.2g}"
        lines.append(f"| {key} | {weight} | {fmt_pm(m['acc_raw'], 3)} | "
                     f"{fmt_pm(m['acc_corrected'], 3)} | {fmt_pm(m['mean_error_raw'], 3)} | "
                     f"{fmt_pm(m['var_error_raw'], 3)} |")
    dm = s["claims"]["default_momentum"]
    if s["long_enough"]:
        lines += ["", f"The runs had {s['total_steps']} steps (at least {s['min_steps']}), so "
                  "every momentum but the smallest forgot its start; see the start weights."]
    else:
        lines += ["", f"**Short.** The runs had {s['total_steps']} steps, fewer than the "
                  f"{s['min_steps']} a momentum sweep needs: momentum " + ", ".join(
                      f"{k} still holds {m['start_weight']:.2g}" for k, m in
                      s["momenta"].items() if m["start_weight"] is not None)
                  + " of its start ((1 − momentum)^steps), so this sweep compares averages "
                  "that are partly their initial values: inconclusive at this scale."]
    lines += ["", "Each momentum's accuracy minus PyTorch's 0.1 (raw), paired by seed: "
              + "; ".join(f"{k}: {_pts(d)}" for k, d in dm["differences"].items())
              + f". PyTorch's 0.1 loses nothing that matters (each interval below "
              f"{dm['min_effect'] * 100:g} point(s)): **{VERDICT_TEXT[dm['verdict']]}**."]
    return [*lines, "", f"With the population statistics: {fmt_pm(s['final_acc_population'], 3)}.",
            "",
            "![Final test accuracy in eval mode (fraction) vs BN momentum (PyTorch's convention), "
            "raw and bias-corrected running statistics, with the population statistics' "
            "accuracy (dashed, band ± std); error bars: ± std over seeds]"
            "(q5_momentum_accuracy.png)",
            ""]


def _answer(s: dict[str, Any]) -> list[str]:
    """The answer, the scale it holds at, and the verdicts on the post's claims."""
    e, claims, early = s["ewa"], s["claims"], s["early"]
    v = {k: c["verdict"] for k, c in claims.items()}
    th, th_names = _thresholds(e)
    own = s["momenta"][f"{s['bn_momentum']:g}"]
    beta_key = f"{1 - s['bn_momentum']:g}"
    beta_key = beta_key if beta_key in e["betas"] else next(iter(e["betas"]))
    return [
        f"**Answer.** An exponentially weighted average with weight β on the old value "
        f"remembers about the last 1/(1 − β) values and starts biased toward its initial "
        f"value, whose weight β^t needs {e['betas'][beta_key]['computed'][th[1]]} steps at "
        f"β = {beta_key} to fall below {th_names[1]}; bias correction removes that start. "
        "In BN, "
        f"over the first {s['early_steps']} steps the raw running statistics are off by "
        f"{fmt_pm(early['mean_error_raw'], 3)} (mean) and "
        f"{fmt_pm(early['var_error_raw'], 3)} (variance), the bias-corrected ones by "
        f"{fmt_pm(early['mean_error_corrected'], 3)} and "
        f"{fmt_pm(early['var_error_corrected'], 3)}; test accuracy "
        f"{fmt_pm(early['acc_raw'], 3)} vs {fmt_pm(early['acc_corrected'], 3)}. After "
        f"training, the running statistics of momentum {s['bn_momentum']:g} give "
        f"{fmt_pm(own['acc_raw'], 3)} against {fmt_pm(s['final_acc_population'], 3)} with "
        "the population statistics.",
        "",
        f"**Scale.** These answers were obtained at preset `{s['preset']}` (All-CNN-C at "
        f"width {s['width']:g}, {s['train_images']} training images, {s['total_steps']} "
        f"steps per run, {plural(s['n_seeds'], 'seed')}), not on full CIFAR-10 or ImageNet"
        + ("." if s["long_enough"] else f"; the runs are shorter than the {s['min_steps']} "
           "steps a momentum sweep needs.") + " What the literature reports at full scale is "
        "in the precise-BN subsection.",
        "",
        f"Against the post's claim that the running averages stand in for the data's "
        f"statistics at test time: **{VERDICT_TEXT[v['running_stand_in']]}**. Against the "
        f"answer it points to, that bias correction reduces the running statistics' error "
        f"in the first steps (here the first {s['early_steps']}) by at least "
        f"{claims['bias_correction']['min_effect']:g}: "
        f"**{VERDICT_TEXT[v['bias_correction']]}**.",
    ]
