"""Q3's Markdown section, drawn from its summary.json alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bnlab.evidence.stats import fmt_pct, fmt_pm
from bnlab.studies.common import read_summary
from bnlab.studies.q3.plan import (
    LITERATURE,
    TITLE,
    VERDICT_TEXT,
)

# ---- the section --------------------------------------------------------------------------


def _points(value: float | None, digits: int = 1) -> str:
    """A difference of fractions in percentage points, signed."""
    return "n/a" if value is None else f"{value * 100:+.{digits}f} points"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f} s"


def _ci(diff: dict[str, Any], unit: Callable[[float | None], str] = _points) -> str:
    """``+1.2 points (95% interval −0.5 to +2.9, 3 seeds)`` from a paired difference."""
    if not diff or diff.get("mean") is None:
        return "n/a (no paired seeds)"
    if diff.get("low") is None:
        return f"{unit(diff['mean'])} (one paired seed: no interval)"
    return (f"{unit(diff['mean'])} (95% interval {unit(diff['low'])} to "
            f"{unit(diff['high'])}, {diff['n']} seeds)")


def _pp(stat: dict[str, Any] | None, digits: int = 1) -> str:
    """``22.5 ± 0.6 points`` from a mean_std dict of differences of fractions."""
    if not stat or stat.get("mean") is None:
        return "n/a"
    return f"{fmt_pm(stat, digits, 100.0)} points"


def _short(updates: int, minimum: int) -> str:
    return "" if updates >= minimum else " (short)"


def _largest_gain_text(disc: dict[str, Any]) -> str:
    """Where exact statistics gain most over the running averages (shuffled runs), and how
    much of their initial values the running averages still hold there."""
    size = disc.get("largest_gain_batch_size")
    group = next((g for g in disc["groups"] if g["order"] == "shuffled"
                  and g["batch_size"] == size), None)
    if group is None:
        return ""
    text = (f" Exact statistics gain most over the running averages at batch {size} "
            f"({_ci(group['exact_vs_running'])}).")
    if group.get("initial_weight") is not None:
        text += (f" There the running averages had {group['updates']} updates, so they still "
                 f"hold {group['initial_weight'] * 100:.1f} % of their initial values (mean "
                 f"0, variance 1): (1 − {disc['bn_momentum']:g})^{group['updates']} in "
                 "PyTorch's convention, where momentum weights the new batch (Q5)")
        text += (": part of that gain is the too-short average, not BN."
                 if group["initial_weight"] > 0.01 else ".")
    return text


def _verdict_line(claim: dict[str, Any], minimum: int) -> str:
    """Why a verdict is what it is, when the runs were too short."""
    if claim.get("enough_updates", True):
        return ""
    return (f" The runs behind it had {claim['updates']} updates, fewer than the {minimum} "
            "this study asks for, so the answer is inconclusive at this scale whatever the "
            "interval says.")


def render(study_dir: Path) -> str:
    """The Q3 section, drawn from ``summary.json`` alone: one function per subsection."""
    s = read_summary(study_dir)
    lines = [*_setup(s), *_wall_time(s), *_small_batches(s), *_variants(s),
             *_discrepancy(s), *_class_sorted(s), *_time(s), *_claims(s)]
    return "\n".join(lines) + "\n"


def _setup(s: dict[str, Any]) -> list[str]:
    """Title, data and recipe, how claims are judged, the answer and its scale."""
    st, n, tuning = s["settings"], s["n_seeds"], s["tuning"]
    minimum, effect = st["min_updates"], st["min_effect"]
    return [
        f"## {TITLE}",
        "",
        f"Data: **{s['data']}**; preset `{s['preset']}`, {n} seed(s) per configuration, "
        "paired by seed. "
        f"All-CNN-C at width {st['width']:g}, {st['train_images']} training images, "
        f"{st['test_images']} test images, {st['optimizer']} with a {st['lr_schedule']} "
        f"schedule, augmentation {'on' if st['augment'] else 'off'}. Each network trains at "
        f"its own learning rate, tuned at batch {st['batch_size']} by the shared sweep "
        f"(lowest final training loss): {tuning['torch']['best']:.3g} with BN, "
        f"{tuning['none']['best']:.3g} without"
        + ("; a tuned rate at the end of its grid may not be the best" if
           tuning["torch"]["edge"] or tuning["none"]["edge"] else "")
        + "; GroupNorm, Batch Renorm and ghost BN use BN's. The rate is scaled to each batch "
        f"size by the square-root rule, lr × √(batch / {st['batch_size']}), not tuned per "
        f"batch size. Every batch size trains toward {minimum} updates, at most "
        f"{st['max_epochs']} epoch(s). Differences are paired by seed: mean with a 95% "
        f"Student-t interval; a claim is *supported* when the interval lies beyond the "
        f"minimum effect of {effect * 100:g} accuracy point(s) in its direction, "
        "*contradicted* when it lies wholly on the other side of zero, else *inconclusive*; "
        f"a claim resting on runs of fewer than {minimum} updates is inconclusive.",
        "",
        "**Answer.** " + _answer(s),
        "",
        "**Scale.** " + _scale_text(s),
        "",
    ]


def _wall_time(s: dict[str, Any]) -> list[str]:
    """How long the study took, by stage ([] when not recorded)."""
    lines: list[str] = []
    if s.get("wall_time_s") is not None:
        clock, ledger = s["stage_time_s"], s.get("runs", {"reused": 0, "trained": 0})
        reused = (f" {ledger['reused']} of the {ledger['reused'] + ledger['trained']} runs were "
                  "reused from the folder (resumed), so this covers only the rest."
                  if ledger["reused"] else "")
        lines += [f"Wall time of this study: {s['wall_time_s'] / 60:.1f} min (learning-rate "
                  f"sweep {clock['tuning_s']:.0f} s, batch-size sweep "
                  f"{clock['batch_size_s']:.0f} s, class-sorted runs "
                  f"{clock['class_sorted_s']:.0f} s, test-time statistics "
                  f"{clock['discrepancy_s']:.0f} s, timing runs {clock['time_s']:.0f} s)."
                  + reused, ""]
    return lines


def _small_batches(s: dict[str, Any]) -> list[str]:
    """Final test accuracy per batch size, with BN and without."""
    st, bs = s["settings"], s["batch_size"]
    minimum, points = st["min_updates"], bs["points"]
    short = [p for p in points if not p["enough_updates"]]
    lines = [
        "### Small batches",
        "",
        "Final test accuracy at each batch size, with BN (PyTorch's layer) and without, each "
        "network at its tuned rate scaled by √batch.",
    ]
    if short:
        lines[-1] += (f" Runs shorter than {minimum} updates (marked *short*: " +
                      ", ".join(f"batch {p['batch_size']}: {p['updates']} updates" for p in
                                short) +
                      ") are drawn hollow, and no verdict rests on them: at this scale the "
                      "answer there is inconclusive.")
    if bs["skipped"]:
        lines[-1] += (f" Skipped, larger than the {st['train_images']} training images: "
                      f"batch {', '.join(str(b) for b in bs['skipped'])}.")
    lines += [
        "",
        "| batch | epochs | updates | lr, BN | lr, no BN | test acc, BN | test acc, no BN | "
        "BN − no BN |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        diverged = "".join(f" ({p[norm]['diverged']} diverged)" for norm in ("torch", "none")
                           if p[norm]["diverged"])
        lines.append(f"| {p['batch_size']} | {p['epochs']} | {p['updates']}"
                     f"{_short(p['updates'], minimum)} | {p['lr']['torch']:.2g} | "
                     f"{p['lr']['none']:.2g} | {fmt_pct(p['torch']['test_acc'])} | "
                     f"{fmt_pct(p['none']['test_acc'])} | {_ci(p['bn_vs_none'])}{diverged} |")
    return lines


def _variants(s: dict[str, Any]) -> list[str]:
    """GroupNorm, Batch Renorm and ghost BN beside BN; the literature; the batch figure."""
    st, n = s["settings"], s["n_seeds"]
    minimum = st["min_updates"]
    lines: list[str] = []
    variant_points = [p for p in s["batch_size"]["points"] if p["variants"]]
    if variant_points:
        lines += [
            "",
            f"Normalizations built for what BN lacks, beside BN at batch "
            f"{', '.join(str(p['batch_size']) for p in variant_points)}: GroupNorm (no batch "
            f"axis; {st.get('num_groups') or 'gcd(32, channels)'} groups), Batch Renorm "
            "(Ioffe 2017; r in [1/3, 3], d in [−5, 5]) and ghost BN (statistics over "
            f"virtual batches of {st['virtual_batch_size']}; at a batch no larger than that "
            "it is BN, and is not trained). Each against BN, paired by seed:",
            "",
            "| batch | updates | variant | test acc | variant − BN |",
            "|---|---|---|---|---|",
        ]
        for p in variant_points:
            for key in p["variants"]:
                v = p[key]
                diverged = f" ({v['diverged']} diverged)" if v["diverged"] else ""
                lines.append(f"| {p['batch_size']} | {p['updates']}"
                             f"{_short(p['updates'], minimum)} | {v['label']} | "
                             f"{fmt_pct(v['test_acc'])} | {_ci(v['vs_bn'])}{diverged} |")
    lines += [
        "",
        f"At full scale: {LITERATURE['small_batch']} {LITERATURE['renorm']} "
        f"{LITERATURE['ghost']}",
        "",
        f"![Final test accuracy (fraction) vs batch size (images per step, log scale), with BN, "
        f"without, and the BN variants; error bars ± 1 std over {n} seed(s); hollow points had "
        f"fewer than {minimum} updates]({s['figures']['batch_size']})",
        "",
    ]
    return lines


def _discrepancy(s: dict[str, Any]) -> list[str]:
    """Test accuracy under five kinds of normalization statistics."""
    disc, n, minimum = s["discrepancy"], s["n_seeds"], s["settings"]["min_updates"]
    lines = [
        "### Train/test discrepancy",
        "",
        "In training, BN normalizes each batch with that batch's own mean and variance; at "
        "test time, with running averages kept during training. Each trained BN network "
        "above was tested five ways: with the running averages (eval mode); with the "
        "statistics of each test batch (BN in training mode for the forward only, test "
        "batches of the network's own training batch size, running buffers restored); with "
        "the statistics recomputed after training by PyTorch's recipe (momentum=None, "
        "reset_running_stats(), a pass over the un-augmented training set in training mode, "
        f"in equal batches of {disc['recompute_batch_size']}: the average over batches of "
        "the batch means, and of the unbiased batch variances, which misses the variance "
        "*between* batch means); with the exact population statistics, computed layer by "
        "layer (each layer's input mean and variance over the whole training set, chunk "
        "statistics merged in float64, with the layers before it already in eval mode on "
        "their exact statistics); and with the same exact statistics of the *augmented* "
        "training images (one pass of random crops and flips, as training saw them), which "
        "is what the running averages estimate: the un-augmented ones also measure the "
        "augmentation (padding adds black pixels).",
        "",
        "| network | updates | running averages | test-batch stats | recomputed, cumulative | "
        "exact | exact, augmented | running vs exact: mean shift (std) | running vs exact: "
        "abs. ln var ratio | the same vs exact, augmented |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in disc["groups"]:
        lines.append(f"| {g['label']} | {g['updates']}{_short(g['updates'], minimum)} | "
                     f"{fmt_pct(g['running'])} | {fmt_pct(g['batch'])} | "
                     f"{fmt_pct(g['cumulative'])} | {fmt_pct(g['exact'])} | "
                     f"{fmt_pct(g['exact_augmented'])} | "
                     f"{fmt_pm(g['mean_shift'], 3)} | {fmt_pm(g['log_var_ratio'], 3)} | "
                     f"{fmt_pm(g['mean_shift_augmented'], 3)}, "
                     f"{fmt_pm(g['log_var_ratio_augmented'], 3)} |")
    shuffled = [g for g in disc["groups"] if g["order"] == "shuffled"]
    small, large = shuffled[0], shuffled[-1]
    lines += [
        "",
        f"At batch {small['batch_size']}, exact statistics minus running averages: "
        f"{_ci(small['exact_vs_running'])}; exact on augmented images minus running: "
        f"{_ci(small['exact_augmented_vs_running'])}; test-batch statistics minus running: "
        f"{_ci(small['batch_vs_running'])}. At batch {large['batch_size']}: exact "
        f"{_ci(large['exact_vs_running'])}; exact, augmented "
        f"{_ci(large['exact_augmented_vs_running'])}; test-batch statistics "
        f"{_ci(large['batch_vs_running'])}." + _largest_gain_text(disc) + " What "
        "augmentation alone changes (exact minus exact on augmented images), at batch "
        f"{small['batch_size']}: {_ci(small['exact_vs_exact_augmented'])}. The last columns "
        "say how far the running averages are from the exact statistics, averaged over "
        "channels and layers.",
        "",
        f"At full scale: {LITERATURE['statistics']}",
        "",
        f"![Test accuracy (fraction) of each trained BN network under five kinds of "
        f"normalization statistics: running averages, test-batch statistics, recomputed "
        f"cumulative average, exact layer-by-layer population statistics of the plain and of "
        f"the augmented training images; error bars ± 1 std over {n} seed(s)]"
        f"({s['figures']['discrepancy']})",
        "",
    ]
    return lines


def _class_sorted(s: dict[str, Any]) -> list[str]:
    """Class-sorted batches against shuffled ones, and what exact statistics recover."""
    srt, disc, n = s["class_sorted"], s["discrepancy"], s["n_seeds"]
    minimum = s["settings"]["min_updates"]
    lines = [
        "### Batches that do not represent the data",
        "",
        f"`batch_order=\"class_sorted\"`: the training images sorted by class, cut into "
        f"batches of {srt['batch_size']} (one class each, two where a class ends), batches "
        f"in random order; {srt['epochs']} epoch(s), {srt['updates']} updates"
        f"{_short(srt['updates'], minimum)}, each network at the rate of its shuffled runs "
        "above, against those runs (same seeds).",
        "",
        "| configuration | final test acc | final train acc (training mode) |",
        "|---|---|---|",
    ]
    for config in srt["configs"].values():
        lines.append(f"| {config['label']} | {fmt_pct(config['test_acc'])} | "
                     f"{fmt_pct(config['train_acc'])} |")
    sorted_bn = next(g for g in disc["groups"] if g["order"] == "class_sorted")
    recovery = s["claims"]["sorted_recovery"]
    fraction = recovery.get("recovered_fraction")
    lines += [
        "",
        f"Test accuracy lost to class-sorted batches (per seed, shuffled − sorted): "
        f"{_ci(srt['drop_torch'])} with BN, {_ci(srt['drop_none'])} without. BN's own "
        f"share, its drop minus the no-BN drop: {_ci(srt['drop_bn_minus_none'])}. The "
        f"class-sorted BN network scores {fmt_pct(sorted_bn['running'])} with its running "
        f"averages, {fmt_pct(sorted_bn['exact'])} with exact statistics "
        f"({fmt_pct(sorted_bn['exact_augmented'])} on augmented images) and "
        f"{fmt_pct(sorted_bn['batch'])} with (shuffled) test-batch statistics; exact minus "
        f"running: {_ci(sorted_bn['exact_vs_running'])}"
        + (f", {fraction * 100:.0f} % of BN's drop." if fraction is not None else ".")
        + f" At full scale: {LITERATURE['unrepresentative']}",
        "",
        f"![Train accuracy (training mode, left) and test accuracy (eval mode, right) as "
        f"fractions vs epoch, with and without BN, shuffled (solid) and class-sorted "
        f"(dashed) batches; bands ± 1 std over {n} seed(s)]({s['figures']['class_sorted']})",
        "",
    ]
    return lines


def _time(s: dict[str, Any]) -> list[str]:
    """Training seconds per epoch per engine and normalization; BN's parameter share."""
    st, tm, n = s["settings"], s["time"], s["n_seeds"]
    lines = [
        "### Time",
        "",
        f"Training seconds per epoch (evaluation excluded) at batch {st['batch_size']}, from "
        "`metrics.jsonl`, over the epochs after the first and over seeds. "
        + ("The autograd runs without BN and with PyTorch's BN are those of the batch-size "
           "sweep; the others are dedicated runs" if tm.get("reuses_sweep", True) else
           "Every configuration has dedicated runs (the sweep's had a single epoch, whose "
           "time includes the warm-up)")
        + f" of {tm['dedicated_epochs']} epoch(s). Measured on "
        f"{tm.get('device', 'an unrecorded device')} with {tm.get('torch_threads', '?')} "
        "PyTorch thread(s); on a shared machine these times move with its load.",
        "",
        "| engine, normalization | s per epoch | images per s | time vs no BN | with BN − "
        "without, per seed |",
        "|---|---|---|---|---|",
    ]
    for config in tm["configs"].values():
        overhead = config.get("overhead")
        paired = _ci(config["vs_none"], _seconds) if "vs_none" in config else "—"
        lines.append(f"| {config['label']} | {fmt_pm(config['epoch_time_s'], 2)} | "
                     f"{fmt_pm(config['images_per_s'], 0)} | "
                     f"{'—' if overhead is None else f'{overhead * 100:+.0f} %'} | {paired} |")
    if not tm["configs"]["autograd_none"]["epoch_time_s"].get("skipped_first", True):
        lines += ["", "The sweep's runs had one epoch only, so their first epoch is included."]
    params = tm["parameters"]
    lines += [
        "",
        f"BN's γ and β are {params['bn_gamma_beta']} of the {params['with_bn']} parameters "
        f"({tm['bn_parameter_fraction'] * 100:.2f} %); the network without BN has "
        f"{params['without_bn']} (its convolutions keep the biases BN's β replaces).",
        "",
        f"![Training time per epoch in seconds for each engine and normalization, error bars "
        f"± 1 std over later epochs and {n} seed(s); labels give the time relative to the "
        f"same engine without BN]({s['figures']['time']})",
        "",
    ]
    return lines


def _claims(s: dict[str, Any]) -> list[str]:
    """Each claim with its verdict; what is not measured."""
    return ["### The claims against the data", "", *_claim_lines(s),
            "", "Recurrent networks, another drawback often listed for BN, are not measured "
            "here: All-CNN-C has no recurrence."]


def _scale_text(s: dict[str, Any]) -> str:
    """At which scale these answers hold, and where the runs were long enough to count."""
    st, points = s["settings"], s["batch_size"]["points"]
    counted = [str(p["batch_size"]) for p in points if p["enough_updates"]]
    return (f"These answers were obtained at preset `{s['preset']}` (All-CNN-C at width "
            f"{st['width']:g}, {st['train_images']} training images of {s['data']}, "
            f"{s['n_seeds']} seeds), not on full CIFAR-10 or ImageNet. Runs reached the "
            f"{st['min_updates']} updates an answer needs "
            + (f"at batch {', '.join(counted)}" if counted else "at no batch size")
            + "; every other comparison is reported with its update count and is "
            "inconclusive at this scale. What the papers report at full scale follows each "
            "subsection.")


def _answer(s: dict[str, Any]) -> str:
    """The one-paragraph answer, from the summary's numbers."""
    points, tm, srt = s["batch_size"]["points"], s["time"]["configs"], s["class_sorted"]
    claims = s["claims"]
    small, base = points[0], next(p for p in points if p["batch_size"] ==
                                  s["settings"]["batch_size"])
    g_small = s["discrepancy"]["groups"][0]
    overhead = tm["autograd_torch"].get("overhead")
    parts = [
        f"at batch {base['batch_size']} ({base['updates']} updates) BN reaches "
        f"{fmt_pct(base['torch']['test_acc'])} test accuracy against "
        f"{fmt_pct(base['none']['test_acc'])} without; at batch {small['batch_size']} "
        f"({small['updates']} updates), {fmt_pct(small['torch']['test_acc'])} against "
        f"{fmt_pct(small['none']['test_acc'])}, BN − no BN {_ci(small['bn_vs_none'])}: "
        f"{claims['small_batch']['verdict']}.",
        f"The BN network trained at batch {g_small['batch_size']} scores "
        f"{fmt_pct(g_small['running'])} with its running averages and "
        f"{fmt_pct(g_small['exact_augmented'])} with exact statistics of the augmented "
        "training images.",
        f"Class-sorted batches cost BN {_pp(srt['drop_torch'])} of test accuracy and the "
        f"network without BN {_pp(srt['drop_none'])}; BN's own share "
        f"{_ci(srt['drop_bn_minus_none'])}.",
    ]
    for key, name in (("group", "GroupNorm"), ("renorm", "Batch Renorm"), ("ghost", "ghost BN")):
        if key in claims:
            c = claims[key]
            parts.append(f"{name} − BN at batch {c['batch_size']}: {_ci(c['difference'])}: "
                         f"{c['verdict']}.")
    if overhead is not None:
        parts.append(f"An epoch with PyTorch's BN takes {overhead * 100:+.0f} % of the time "
                     f"of one without ({fmt_pm(tm['autograd_torch']['epoch_time_s'], 2)} s "
                     f"vs {fmt_pm(tm['autograd_none']['epoch_time_s'], 2)} s).")
    return "Measured: " + " ".join(parts)


def _claim_lines(s: dict[str, Any]) -> list[str]:
    claims, tm = s["claims"], s["time"]
    minimum = s["settings"]["min_updates"]
    t = tm["configs"]
    out = []
    c = claims["time"]
    overhead = t["autograd_torch"].get("overhead")
    extra = ""
    if overhead is not None:
        extra = (f" Per epoch: {fmt_pm(t['autograd_torch']['epoch_time_s'], 2)} s with BN, "
                 f"{fmt_pm(t['autograd_none']['epoch_time_s'], 2)} s without; with BN − "
                 f"without, per seed: {_ci(c['difference'], _seconds)}. γ and β are "
                 f"{tm['bn_parameter_fraction'] * 100:.2f} % of the parameters; the epoch "
                 f"takes {overhead * 100:+.0f} % of the time.")
        if c["verdict"] == "supported" and overhead > 10 * tm["bn_parameter_fraction"]:
            extra += (" So the time goes to normalizing every activation, forward and "
                      "backward, not to optimizing two more parameters per layer.")
    out.append(f"- **Time** ({c['source']}): {c['claim']}{extra} "
               f"**{VERDICT_TEXT[c['verdict']]}**")
    c = claims["unrepresentative"]
    configs = s["class_sorted"]["configs"]
    out.append(f"- **Batches that do not represent the data** ({c['source']}): {c['claim']} "
               f"With class-sorted batches, the BN network ends at "
               f"{fmt_pct(configs['torch_class_sorted']['test_acc'])} test accuracy against "
               f"{fmt_pct(configs['torch_shuffled']['test_acc'])} with shuffled ones; without "
               f"BN, {fmt_pct(configs['none_class_sorted']['test_acc'])} against "
               f"{fmt_pct(configs['none_shuffled']['test_acc'])}. BN's drop minus the no-BN "
               f"drop: {_ci(c['difference'])}; \"not a problem\" holds when the whole "
               f"interval lies below {c['min_effect'] * 100:g} point(s)."
               f"{_verdict_line(c, minimum)} **{VERDICT_TEXT[c['verdict']]}**")
    c = claims["sorted_recovery"]
    out.append(f"- **What recomputed statistics recover** ({c['source']}): {c['claim']} "
               f"Exact minus running on the class-sorted BN network: {_ci(c['difference'])}"
               + (f", {c['recovered_fraction'] * 100:.0f} % of BN's drop" if
                  c.get("recovered_fraction") is not None else "")
               + f".{_verdict_line(c, minimum)} **{VERDICT_TEXT[c['verdict']]}**")
    c = claims["small_batch"]
    out.append(f"- **Small batches** ({c['source']}): {c['claim']} At batch "
               f"{c['batch_size']}, BN − no BN: {_ci(c['difference'])}."
               f"{_verdict_line(c, minimum)} **{VERDICT_TEXT[c['verdict']]}**")
    c = claims["train_test"]
    weight = c.get("largest_initial_weight")
    out.append(f"- **Train/test discrepancy** ({c['source']}): {c['claim']} Exact "
               f"statistics minus running averages at batch {c['batch_size']}: "
               f"{_ci(c['difference'])}; at batch {c['largest_batch_size']} "
               f"({c['largest_updates']} updates"
               + (f", the running averages still holding {weight * 100:.1f} % of their start"
                  if weight is not None else "")
               + f"): {_ci(c['largest_difference'])}.{_verdict_line(c, minimum)} "
               f"**{VERDICT_TEXT[c['verdict']]}**")
    for key, title in (("group", "GroupNorm at small batches"),
                       ("renorm", "Batch Renorm at small batches"),
                       ("ghost", "Ghost BN at large batches")):
        if key not in claims:
            continue
        c = claims[key]
        out.append(f"- **{title}** ({c['source']}): {c['claim']} At batch {c['batch_size']}, "
                   f"variant − BN: {_ci(c['difference'])}.{_verdict_line(c, minimum)} "
                   f"**{VERDICT_TEXT[c['verdict']]}**")
    return out
