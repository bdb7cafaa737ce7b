"""Q3's Markdown section, drawn from its summary.json alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bnlab.evidence.stats import fmt_pct, fmt_pm
from bnlab.studies.common import read_summary
from bnlab.studies.q3.plan import (
    TITLE,
    VERDICT_TEXT,
)

# ---- the section --------------------------------------------------------------------------


def _points(value: float | None, digits: int = 1) -> str:
    """A difference of fractions in percentage points, signed."""
    return "n/a" if value is None else f"{value * 100:+.{digits}f} points"


def _direction(cmp_: dict[str, Any], unit: Callable[[float | None], str] = _points) -> str:
    d = cmp_["direction"]
    if d == "one seed":
        return f"difference {unit(cmp_['difference'])}, one seed: no spread to judge it by"
    if d == "within spread":
        return (f"difference {unit(cmp_['difference'])}, within the seed spread "
                f"{unit(cmp_['spread']).lstrip('+')}")
    return (f"difference {unit(cmp_['difference'])}, beyond the seed spread "
            f"{unit(cmp_['spread']).lstrip('+')}")


def _pp(stat: dict[str, Any] | None, digits: int = 1) -> str:
    """``22.5 ± 0.6 points`` from a mean_std dict of differences of fractions."""
    if not stat or stat.get("mean") is None:
        return "n/a"
    return f"{fmt_pm(stat, digits, 100.0)} points"


def _largest_gain_text(disc: dict[str, Any]) -> str:
    """Where exact statistics gain most over the running averages (shuffled runs), and how
    much of their initial values the running averages still hold there."""
    size = disc.get("largest_gain_batch_size")
    group = next((g for g in disc["groups"] if g["order"] == "shuffled"
                  and g["batch_size"] == size), None)
    if group is None:
        return ""
    text = (f" Exact statistics gain most over the running averages at batch {size} "
            f"({_points(group['exact_vs_running']['difference'])}).")
    if group.get("initial_weight") is not None:
        text += (f" There the running averages had {group['updates']} updates, so they still "
                 f"hold {group['initial_weight'] * 100:.1f} % of their initial values (mean "
                 f"0, variance 1): (1 − {disc['bn_momentum']:g})^{group['updates']} in "
                 "PyTorch's convention, where momentum weights the new batch (Q5).")
    return text


def _sorted_reading(srt: dict[str, Any], sorted_bn: dict[str, Any]) -> str:
    """What the class-sorted runs say about where the loss comes from."""
    text = ""
    if sorted_bn["exact_vs_running"]["direction"] == "within spread":
        text += (" Recomputing the statistics does not rescue it, so the loss is not in the "
                 "moving averages but in what the network learned.")
    if srt["none_sorted_vs_shuffled"]["direction"] == "below":
        text += (f" Without BN class-sorted batches cost {_pp(srt['drop_none'])} as well, "
                 f"ending at {fmt_pct(srt['configs']['none_class_sorted']['test_acc'])}: batches "
                 "of one class hurt training with or without BN.")
        if srt["sorted_bn_vs_none"]["direction"] == "within spread":
            text += (" Both end at the same accuracy, so BN loses more only because it had "
                     "more to lose.")
    return text


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f} s"


def render(study_dir: Path) -> str:
    """The Q3 section, drawn from ``summary.json`` alone."""
    s = read_summary(study_dir)
    st, bs, disc, srt, tm = (s["settings"], s["batch_size"], s["discrepancy"],
                             s["class_sorted"], s["time"])
    n = s["seeds"]
    points = bs["points"]
    reduced = [p for p in points if p["reduced"]]
    lines = [
        f"## {TITLE}",
        "",
        f"Data: **{s['data']}**; preset `{s['preset']}`, {n} seed(s) per configuration. "
        f"All-CNN-C at width {st['width']:g}, {st['train_images']} training images, "
        f"{st['test_images']} test images, {st['optimizer']} with a {st['lr_schedule']} "
        f"schedule, augmentation {'on' if st['augment'] else 'off'}, {st['epochs']} epoch(s)"
        + (f" (half the preset's {st['scale_epochs']}, so that the study fits its time "
           "budget)" if st["epochs"] != st["scale_epochs"] else "")
        + f" at batch {st['batch_size']} and lr {st['lr']:g} unless said otherwise. Numbers are "
        "mean ± sample std over seeds; a difference counts when it exceeds the sum of the two "
        "standard deviations (the error bars do not overlap), and needs two seeds.",
        "",
        "**Answer.** " + _answer(s),
        "",
    ]
    if s.get("wall_time_s") is not None:
        clock, ledger = s["stage_time_s"], s.get("runs", {"reused": 0, "trained": 0})
        reused = (f" {ledger['reused']} of the {ledger['reused'] + ledger['trained']} runs were "
                  "reused from the folder (resumed), so this covers only the rest."
                  if ledger["reused"] else "")
        lines += [f"Wall time of this study: {s['wall_time_s'] / 60:.1f} min (batch-size "
                  f"sweep {clock['batch_size_s']:.0f} s, class-sorted runs "
                  f"{clock['class_sorted_s']:.0f} s, test-time statistics "
                  f"{clock['discrepancy_s']:.0f} s, timing runs {clock['time_s']:.0f} s)."
                  + reused, ""]
    lines += [
        "### Small batches",
        "",
        f"Final test accuracy at each batch size, with BN (PyTorch's layer) and without, at a "
        f"fixed number of epochs. The learning rate follows the square-root rule for Adam, "
        f"lr = {st['lr']:g} × √(batch / {st['batch_size']}).",
    ]
    if reduced:
        lines[-1] += (" Batch sizes below " + str(st["full_length_from"]) + " are slow per "
                      "image on a CPU and train fewer epochs (" +
                      ", ".join(f"batch {p['batch_size']}: {p['epochs']}" for p in reduced) +
                      "); the figure draws them hollow. The BN/no-BN comparison at each size "
                      "is like for like.")
    if bs["skipped"]:
        lines[-1] += (f" Skipped, larger than the {st['train_images']} training images: "
                      f"batch {', '.join(str(b) for b in bs['skipped'])}.")
    lines += [
        "",
        "| batch | epochs | lr | test acc, BN | test acc, no BN | BN − no BN |",
        "|---|---|---|---|---|---|",
    ]
    for p in points:
        diverged = "".join(f" ({p[norm]['diverged']} diverged)" for norm in ("torch", "none")
                           if p[norm]["diverged"])
        lines.append(f"| {p['batch_size']} | {p['epochs']} | {p['lr']:.2g} | "
                     f"{fmt_pct(p['torch']['test_acc'])} | {fmt_pct(p['none']['test_acc'])} | "
                     f"{_direction(p['bn_vs_none'])}{diverged} |")
    lines += [
        "",
        f"![Final test accuracy (fraction) vs batch size (images per step, log scale), with BN "
        f"and without; error bars ± 1 std over {n} seed(s); hollow points trained fewer "
        f"epochs]({s['figures']['batch_size']})",
        "",
        "### Train/test discrepancy",
        "",
        "In training, BN normalizes each batch with that batch's own mean and variance; at "
        "test time, with running averages kept during training. Each trained BN network "
        "above was tested four ways: with the running averages (eval mode); with the "
        "statistics of each test batch (BN in training mode for the forward only, test "
        "batches of the network's own training batch size, running buffers restored); with "
        "the statistics recomputed after training by PyTorch's recipe (momentum=None, "
        "reset_running_stats(), a pass over the un-augmented training set in training mode, "
        f"in equal batches of {disc['recompute_batch_size']}: the average over batches of "
        "the batch means, which is the exact mean because the batches are equal, and of the "
        "unbiased batch variances, which misses the variance *between* batch means); and "
        "with the exact population statistics, computed layer by layer (each layer's input "
        "mean and variance over the whole training set, chunk statistics merged in float64, "
        "with the layers before it already in eval mode on their exact statistics).",
        "",
        "| network | running averages | test-batch stats | recomputed, cumulative | "
        "recomputed, exact | running vs exact: mean shift (std) | running vs exact: abs. ln var "
        "ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in disc["groups"]:
        lines.append(f"| {g['label']} | {fmt_pct(g['running'])} | {fmt_pct(g['batch'])} | "
                     f"{fmt_pct(g['cumulative'])} | {fmt_pct(g['exact'])} | "
                     f"{fmt_pm(g['mean_shift'], 3)} | {fmt_pm(g['log_var_ratio'], 3)} |")
    small, large = disc["groups"][0], disc["groups"][len(points) - 1]
    lines += [
        "",
        f"At batch {small['batch_size']}, exact statistics against the running averages: "
        f"{_direction(small['exact_vs_running'])}; test-batch statistics against them: "
        f"{_direction(small['batch_vs_running'])}. At batch {large['batch_size']}: exact "
        f"statistics {_direction(large['exact_vs_running'])}; test-batch statistics "
        f"{_direction(large['batch_vs_running'])}." + _largest_gain_text(disc) + " The last "
        "two columns say how far the running averages are from the exact statistics, "
        "averaged over channels and layers.",
        "",
        f"![Test accuracy (fraction) of each trained BN network under four kinds of "
        f"normalization statistics: running averages, test-batch statistics, recomputed "
        f"cumulative average, exact layer-by-layer population statistics; error bars ± 1 std "
        f"over {n} seed(s)]({s['figures']['discrepancy']})",
        "",
        "### Batches that do not represent the data",
        "",
        f"`batch_order=\"class_sorted\"`: the training images sorted by class, cut into "
        f"batches of {srt['batch_size']} (one class each, two where a class ends), batches "
        f"in random order; {srt['epochs']} epoch(s) at lr {srt['lr']:g}, against the shuffled "
        "runs above.",
        "",
        "| configuration | final test acc | final train acc (training mode) |",
        "|---|---|---|",
    ]
    for config in srt["configs"].values():
        lines.append(f"| {config['label']} | {fmt_pct(config['test_acc'])} | "
                     f"{fmt_pct(config['train_acc'])} |")
    sorted_bn = next(g for g in disc["groups"] if g["order"] == "class_sorted")
    lines += [
        "",
        f"Test accuracy lost to class-sorted batches (per seed, shuffled − sorted): "
        f"{_pp(srt['drop_torch'])} with BN, {_pp(srt['drop_none'])} without "
        f"({_direction(srt['drop_bn_vs_none'])}). The class-sorted BN network scores "
        f"{fmt_pct(sorted_bn['running'])} with its running averages, "
        f"{fmt_pct(sorted_bn['exact'])} with exact statistics and {fmt_pct(sorted_bn['batch'])} "
        "with (shuffled) test-batch statistics." + _sorted_reading(srt, sorted_bn),
        "",
        f"![Train accuracy (training mode, left) and test accuracy (eval mode, right) as "
        f"fractions vs epoch, with and without BN, shuffled (solid) and class-sorted "
        f"(dashed) batches; bands ± 1 std over {n} seed(s)]({s['figures']['class_sorted']})",
        "",
        "### Time",
        "",
        f"Training seconds per epoch (evaluation excluded) at batch {st['batch_size']}, from "
        "`metrics.jsonl`, over the epochs after the first and over seeds. The autograd runs "
        f"without BN and with PyTorch's BN are those of the batch-size sweep; the others "
        f"are dedicated runs of {tm['dedicated_epochs']} epoch(s). Measured on "
        f"{tm.get('device', 'an unrecorded device')} with {tm.get('torch_threads', '?')} "
        "PyTorch thread(s); on a shared machine these times move with its load.",
        "",
        "| engine, normalization | s per epoch | images per s | time vs no BN |",
        "|---|---|---|---|",
    ]
    for config in tm["configs"].values():
        overhead = config.get("overhead")
        lines.append(f"| {config['label']} | {fmt_pm(config['epoch_time_s'], 2)} | "
                     f"{fmt_pm(config['images_per_s'], 0)} | "
                     f"{'—' if overhead is None else f'{overhead * 100:+.0f} %'} |")
    if not tm["configs"]["autograd_none"]["epoch_time_s"].get("skipped_first", True):
        lines += ["", "These runs had one epoch only, so the first epoch is included."]
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
        "### The post's claims against the data",
        "",
    ]
    lines += _claim_lines(s)
    lines += ["", "Recurrent networks, another drawback often listed for BN, are not measured "
              "here: All-CNN-C has no recurrence."]
    return "\n".join(lines) + "\n"


def _answer(s: dict[str, Any]) -> str:
    """The one-paragraph answer, from the summary's numbers."""
    points, tm, srt = s["batch_size"]["points"], s["time"]["configs"], s["class_sorted"]
    small, base = points[0], next(p for p in points if p["batch_size"] ==
                                  s["settings"]["batch_size"])
    g_small = s["discrepancy"]["groups"][0]
    overhead = tm["autograd_torch"].get("overhead")
    parts = [
        f"at batch {base['batch_size']} BN reaches {fmt_pct(base['torch']['test_acc'])} test "
        f"accuracy against {fmt_pct(base['none']['test_acc'])} without; at batch "
        f"{small['batch_size']}, {fmt_pct(small['torch']['test_acc'])} against "
        f"{fmt_pct(small['none']['test_acc'])}.",
        f"The BN network trained at batch {g_small['batch_size']} scores "
        f"{fmt_pct(g_small['running'])} with its running averages and "
        f"{fmt_pct(g_small['exact'])} with exact training-set statistics.",
        f"Class-sorted batches cost BN {_pp(srt['drop_torch'])} of test accuracy and the "
        f"network without BN {_pp(srt['drop_none'])}.",
    ]
    if overhead is not None:
        parts.append(f"An epoch with PyTorch's BN takes {overhead * 100:+.0f} % of the time "
                     f"of one without ({fmt_pm(tm['autograd_torch']['epoch_time_s'], 2)} s "
                     f"vs {fmt_pm(tm['autograd_none']['epoch_time_s'], 2)} s).")
    return "Measured: " + " ".join(parts)


def _claim_lines(s: dict[str, Any]) -> list[str]:
    claims, tm = s["claims"], s["time"]
    t = tm["configs"]
    out = []
    c = claims["time"]
    overhead = t["autograd_torch"].get("overhead")
    extra = ""
    if overhead is not None:
        extra = (f" Per epoch: {fmt_pm(t['autograd_torch']['epoch_time_s'], 2)} s with BN, "
                 f"{fmt_pm(t['autograd_none']['epoch_time_s'], 2)} s without "
                 f"({_direction(c['comparison'], _seconds)}). γ and β are "
                 f"{tm['bn_parameter_fraction'] * 100:.2f} % of the parameters; the epoch "
                 f"takes {overhead * 100:+.0f} % of the time.")
        if c["verdict"] == "supported" and overhead > 10 * tm["bn_parameter_fraction"]:
            extra += (" So the time goes to normalizing every activation, forward and "
                      "backward, not to optimizing two more parameters per layer.")
    out.append(f"- **Time** ({c['source']}): {c['claim']}{extra} "
               f"**{VERDICT_TEXT[c['verdict']]}**")
    c = claims["unrepresentative"]
    srt = s["class_sorted"]
    configs = srt["configs"]
    out.append(f"- **Batches that do not represent the data** ({c['source']}): {c['claim']} "
               f"With class-sorted batches from the same data set, the BN network ends at "
               f"{fmt_pct(configs['torch_class_sorted']['test_acc'])} test accuracy against "
               f"{fmt_pct(configs['torch_shuffled']['test_acc'])} with shuffled ones "
               f"({_direction(c['comparison'])}); without BN, "
               f"{fmt_pct(configs['none_class_sorted']['test_acc'])} against "
               f"{fmt_pct(configs['none_shuffled']['test_acc'])}. **{VERDICT_TEXT[c['verdict']]}**")
    c = claims["small_batch"]
    small = s["batch_size"]["points"][0]
    out.append(f"- **Small batches** ({c['source']}): {c['claim']} At batch "
               f"{c['batch_size']}: {fmt_pct(small['torch']['test_acc'])} with BN, "
               f"{fmt_pct(small['none']['test_acc'])} without ({_direction(c['comparison'])})"
               + (f", both trained {small['epochs']} epoch(s) there" if small["reduced"] else "")
               + f". **{VERDICT_TEXT[c['verdict']]}**")
    c = claims["train_test"]
    out.append(f"- **Train/test discrepancy** ({c['source']}): {c['claim']} Exact "
               f"statistics against the running averages at batch {c['batch_size']}: "
               f"{_direction(c['comparison'])}; at batch {c['largest_batch_size']}: "
               f"{_direction(c['largest_comparison'])}."
               f"{_largest_gain_text(s['discrepancy'])} **{VERDICT_TEXT[c['verdict']]}**")
    return out
