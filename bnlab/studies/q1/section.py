"""Q1's section of the report, drawn from summary.json alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnlab.evidence.stats import fmt_pct, fmt_pm
from bnlab.studies.common import note_lines, read_summary
from bnlab.studies.q1.plan import TITLE

__all__ = ["render"]

VERDICT_TEXT = {"supported": "The data support it.",
                "contradicted": "The data contradict it.",
                "inconclusive": "Inconclusive at this scale."}


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def interval_text(d: dict[str, Any], scale: float = 100.0, unit: str = " points",
                  digits: int = 1) -> str:
    """``+3.1 [+0.4, +5.8] points``: a paired difference's mean and 95% interval."""
    if d.get("mean") is None:
        return "n/a (no finished pairs)"
    if d.get("low") is None:
        return f"{d['mean'] * scale:+.{digits}f}{unit} (one pair: no interval)"
    return (f"{d['mean'] * scale:+.{digits}f} [{d['low'] * scale:+.{digits}f}, "
            f"{d['high'] * scale:+.{digits}f}]{unit}")


def _claim_row(c: dict[str, Any]) -> str:
    slope = c["metric"] == "slope"
    diff = interval_text(c, 1.0, "", 3) if slope else interval_text(c)
    points = c["min_effect"] * 100
    effect = f"{c['min_effect']:g}" if slope else \
        f"{points:g} {'point' if points == 1 else 'points'}"
    fit = "—"
    if "fit" in c:
        fit = (f"{interval_text(c['fit'])}: "
               f"{'equal' if c['fit']['equal'] else 'not equal'} within "
               f"±{c['fit']['tolerance'] * 100:g}")
        if not c["fit"]["equal"]:
            fit += f" (ungated: {c['ungated_verdict']})"
    return f"| {c['claim']} | {diff} | {c['expected']} by ≥ {effect} | {fit} | **{c['verdict']}** |"


def _header(s: dict[str, Any]) -> list[str]:
    st = s["settings"]
    subset = f"{st['train_images']} training images" if st["subset"] else "all training images"
    tuned = s["tuning"]
    rate_text = "; ".join(
        f"{'BN' if net == 'bn' else 'no BN'} {t['best']:.3g}"
        + (" (at the edge of the grid: the best rate may lie beyond it)" if t["edge"] else "")
        for net, t in tuned.items())
    return [
        f"## {TITLE}",
        "",
        f"Data: **{s['data']}**; preset `{s['preset']}`. All-CNN-C at width {st['width']}, "
        f"{subset}, {st['test_images']} test images, {st['epochs']} epochs, batch "
        f"{st['batch_size']}, {st['optimizer']} ({st['lr_schedule']}), augmentation "
        f"{'on' if st['augment'] else 'off'}. Seeds {s['seed_list']}; the headline arms (both "
        f"networks at their own tuned rate) seeds {s['headline_seeds']}. Tuned learning "
        f"rates (lowest final training loss of the shared sweep, "
        f"`bnlab.studies.tuning`): {rate_text}; common rate {st['common_lr']:g}.",
        "",
        f"Stated before the runs: a generalization-gap difference counts from "
        f"{st['min_gap_effect'] * 100:g} accuracy points, a test-accuracy difference from "
        f"{st['min_acc_effect'] * 100:g}; differences are paired by seed with a 95% t "
        "interval; *supported* when the interval lies beyond the minimum effect, "
        "*contradicted* when it lies short of it, else *inconclusive*. Two gaps are compared "
        "only at equal fit: the interval of the paired difference in eval-mode train "
        f"accuracy must lie inside ±{st['fit_tolerance'] * 100:g} points, else the gap "
        "verdict is *inconclusive* (the ungated one is shown beside it).",
        "",
    ]


def _arms_table(s: dict[str, Any]) -> list[str]:
    lines = ["| arm | lr | test acc | train acc (eval mode) | gap, eval mode "
             "| gap, training mode | loss gap, eval mode (nats) |",
             "|---|---|---|---|---|---|---|"]
    for arm in s["arms"].values():
        f = arm["final"]
        lines.append(f"| {arm['label']} | {arm['lr']:.3g} | {fmt_pct(f['test_acc'])} | "
                     f"{fmt_pct(f['train_acc_eval'])} | {fmt_pct(f['acc_gap_eval'])} | "
                     f"{fmt_pct(f['acc_gap_train_mode'])} | {fmt_pm(f['loss_gap_eval'], 3)} |")
    unfinished = [f"{arm['label']} seed {r['seed']}" for arm in s["arms"].values()
                  for r in arm["runs"] if r["status"] != "finished"]
    if unfinished:
        lines += ["", f"Not finished (left out of the means): {', '.join(unfinished)}."]
    return lines


def _claims_table(s: dict[str, Any], names: list[str]) -> list[str]:
    return ["| claim | difference, mean [95% interval] | expected | fit gate "
            "(difference in eval-mode train acc) | verdict |", "|---|---|---|---|---|",
            *[_claim_row(s["claims"][n]) for n in names]]


def _noise_lines(s: dict[str, Any]) -> list[str]:
    noise = s["noise"]
    trained = noise["bn_trained"]
    lines = ["| batch size B | BN, trained: relative std | BN, trained: disagreement "
             "| BN, untrained: relative std |", "|---|---|---|---|"]
    for i, b in enumerate(noise["batch_sizes"]):
        lines.append(f"| {b} | {fmt_pm(trained['relative_std'][i], 3)} | "
                     f"{fmt_pct(trained['disagreement'][i])} | "
                     f"{_num(noise['bn_untrained']['relative_std'][i])} |")
    lines += note_lines(noise["notes"])
    same, ratio = noise["same_network"], noise["same_network"]["bn_over_dropout"]
    ratio_text = "n/a" if ratio["ratio"] is None else f"{ratio['ratio']:.2f}" + (
        f" [{ratio['low']:.2f}, {ratio['high']:.2f}]" if ratio["low"] is not None else "")
    slope = trained["slope"]
    lines += [
        "",
        f"On the same trained BN + dropout networks, at the training batch size "
        f"({noise['training_batch_size']}): BN's noise alone (batch mates vary, dropout off) "
        f"{fmt_pm(same['bn']['relative_std'], 3)}, dropout's alone (one batch composition, "
        f"masks vary) {fmt_pm(same['dropout']['relative_std'], 3)}, both "
        f"{fmt_pm(same['both']['relative_std'], 3)} (relative std of the logits). BN's "
        f"over dropout's: {ratio_text} (geometric mean over seeds, 95% interval). "
        f"Disagreement between two draws: BN {fmt_pct(same['bn']['disagreement'])}, dropout "
        f"{fmt_pct(same['dropout']['disagreement'])}.",
        "",
        f"Theory check: BN's noise should fall roughly like 1/√B, a slope of "
        f"{noise['theory_slope']} on log-log axes. Fitted slope: {fmt_pm(slope, 3)} for the "
        f"trained network, {_num(noise['bn_untrained']['slope'], 2)} for the untrained one — "
        + ("within" if s["slope_within_theory"] else "outside")
        + f" ± {noise['slope_tolerance']} of the theory.",
    ]
    return lines


def _answer(s: dict[str, Any]) -> str:
    v, claims = s["verdicts"], s["claims"]
    gap = {"supported": "BN narrows the generalization gap",
           "contradicted": "BN does not narrow the generalization gap by a margin that "
                           "matters",
           "inconclusive": "whether BN narrows the generalization gap is not resolved"}
    fit_note = "" if claims["gap_tuned"]["fit"]["equal"] else (
        " (the two networks do not fit their training images equally well, so their gaps "
        "cannot be compared)")
    control = {"supported": "Dropout, the positive control, does narrow the gap here, so "
                            "this scale can show a regularizer at work.",
               "contradicted": "Dropout, the positive control, does not narrow the gap by a "
                               "margin that matters either: this scale shows little gap for "
                               "any regularizer to close.",
               "inconclusive": "Dropout, the positive control, does not measurably narrow "
                               "the gap either, so this scale cannot tell a regularizer at "
                               "work."}[v["dropout_gap"]]
    noise = {"supported": "BN does inject noise that falls as the batch grows",
             "contradicted": "BN's noise does not fall as the batch grows",
             "inconclusive": "Whether BN's noise falls with the batch size is not resolved"}
    return (f"At this scale, at each network's own tuned learning rate, "
            f"{gap[v['gap_tuned']]}{fit_note}; at the common rate the verdict is "
            f"*{v['gap_common']}*. BN's higher test accuracy: *{v['test_acc_tuned']}* at the "
            f"tuned rates, *{v['test_acc_common']}* at the common one. {control} "
            f"{noise[v['noise_shrinks']]} (slope {fmt_pm(s['noise']['bn_trained']['slope'], 3)}"
            f" on log-log axes).")


def _no_ghost(s: dict[str, Any]) -> str:
    if not s["settings"].get("ghost", True):
        return (f"Not run at preset `{s['preset']}`: a ghost-BN run costs about two BN runs, "
                "more than this preset's budget allows; `--preset standard` runs it.")
    return "No ghost batch size below the training batch at this scale."


def render(study_dir: Path) -> str:
    """The Q1 section, drawn from ``summary.json`` alone."""
    s = read_summary(study_dir)
    names = list(s["claims"])
    ghost = [n for n in names if n.startswith("ghost")]
    main = [n for n in names if n not in ghost and n != "noise_shrinks"]
    lines = [
        *_header(s),
        "**Answer.** " + _answer(s), "",
        "### Experiment 1: the generalization gap, at equal fit",
        "",
        "The train accuracy that training logs is measured in training mode (augmented "
        "images, dropout active, BN on batch statistics), so it mixes fit and noise; each "
        "final network was also evaluated in eval mode on the un-augmented training images: "
        "that accuracy is its *fit*, and minus the test accuracy its *eval-mode gap*.",
        "",
        *_arms_table(s), "",
        *_claims_table(s, main), "",
        f"![Left: train accuracy (training mode) minus test accuracy against the epoch, one "
        f"line per arm, bands ± 1 std over seeds, stars the final eval-mode gap; right: each "
        f"run's test accuracy against its eval-mode train accuracy, the diagonal marking no "
        f"gap]({s['figures']['gap']})",
        "",
        "### Experiment 2: BN's noise alone, by ghost batches",
        "",
        "The gradient batch stays the same; BN computes its statistics over virtual (ghost) "
        "batches of fewer images (Hoffer et al. 2017), so the only change is more noise in "
        "BN's statistics. Ghost BN runs on bnlab's BN (`norm bnlab`, `norm_kind ghost`); its "
        "running statistics are updated once per ghost batch.",
        "",
        *(_claims_table(s, ghost) if ghost else [_no_ghost(s)]),
        "",
        "### Experiment 3: the noise BN injects, and dropout's on the same network",
        "",
        f"A fixed network in training mode: each of {s['noise']['pool_images']} training "
        f"images is placed in {s['noise']['draws']} random batch compositions (parameters and "
        "running statistics untouched). *Relative std* = the std of its centred logits "
        "across draws over their mean's RMS; *disagreement* = the chance two draws predict "
        "different classes.",
        "",
        *_noise_lines(s), "",
        *_claims_table(s, ["noise_shrinks"]), "",
        f"![Left: relative std of an image's logits across random batch compositions (log "
        f"y) against batch size B (images, log x), trained and untrained BN networks, the "
        f"1/√B line of theory, and dropout's noise on the BN + dropout network as a band; "
        f"right: BN's, dropout's and both noises on that same network]"
        f"({s['figures']['noise']})",
        "",
        "### The post's claim, the scale, and the literature",
        "",
        f"The post: {s['post_claim']}",
        "",
        f"- BN narrows the gap (tuned rates, equal fit): "
        f"{VERDICT_TEXT[s['verdicts']['gap_tuned']]}",
        f"- BN gives a higher test accuracy (tuned rates): "
        f"{VERDICT_TEXT[s['verdicts']['test_acc_tuned']]}",
        f"- BN adds noise that shrinks with the batch size: "
        f"{VERDICT_TEXT[s['verdicts']['noise_shrinks']]}",
        "",
        f"These answers hold at preset `{s['preset']}` only: All-CNN-C at width "
        f"{s['settings']['width']} on {s['settings']['train_images']} images for "
        f"{s['settings']['epochs']} epochs is far from the paper's scale, where the networks "
        f"memorize their training set and a regularizer has a gap to close. "
        f"At full scale: {s['literature']}",
    ]
    return "\n".join(lines) + "\n"
