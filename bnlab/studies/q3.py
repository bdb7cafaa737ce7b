"""Q3 — What does BN cost? Small batches, the train/test discrepancy, batches that do not
represent the data, and time.

The post names two drawbacks: BN "took more time to train" ("expected since with batch
normalization we have two more parameters to optimize"), and, through the moving averages
used at test time, a model whose mini-batches do not represent the data "could be heavily
decreased" — which the post then doubts: "I don't think that would be a problem". The
drawback most often listed beside these, the small-batch failure, is not in the post's text;
it is measured here too. Four experiments, All-CNN-C, Adam, cosine schedule, ``ctx.seeds``
seeds each:

Experiment 1, batch size. Final test accuracy at batch sizes B in ``SWEEP_BATCH_SIZES``
plus the scale's own batch size B0 (a size larger than the training set is skipped and
noted), with BN (``norm="torch"``) and without. The learning rate follows the square-root
rule for Adam, anchored at the scale's (lr0, B0):

    lr(B) = lr0 * sqrt(B / B0)

Every run of this study trains E = ``study_epochs(scale)`` = half the scale's epochs (at
least 1), so that the study fits its share of the quick budget; sizes below
``min(FULL_LENGTH_FROM, B0)`` (batch 2: a thousand steps per epoch on 2,000 images, slow per
image on a CPU) train ``ceil(E * B / FULL_LENGTH_FROM)`` epochs; the section and the figure
mark them.

Experiment 2, the train/test discrepancy. Each trained BN network of experiment 1 (and of
experiment 3) is loaded from its checkpoint and tested four ways, differing only in the
mean and variance each BN layer normalizes with:

    running      eval mode: the exponential moving averages kept during training
    batch        the statistics of the test batch itself (BN modules in training mode for
                 the forward only, test batches of the run's own B; running buffers saved
                 and restored)
    cumulative   PyTorch's recipe: momentum=None, reset_running_stats(), one pass over the
                 un-augmented training set in training mode (so each layer sees inputs
                 normalized with batch statistics upstream), in equal batches of B0; this
                 gives the plain average over batches of the batch means (the exact mean,
                 since the batches are equal) and of the *unbiased batch variances*, which
                 is the population variance only if a batch's values were independent
                 (pixels of one image are not; the variance of the batch means is missed)
    exact        the population statistics of the training set, layer by layer: layer k's
                 input mean and (biased) variance over the whole training set (chunks merged
                 in float64), with layers 1..k-1 already in eval mode on their exact
                 statistics — the statistics the eval-mode network actually sees

Experiment 3, batches that do not represent the data. ``batch_order="class_sorted"``: each
batch holds one class (two where a class ends), with and without BN, against the shuffled
runs of experiment 1 at B0. Per seed, the drop = acc(shuffled) - acc(class-sorted).

Experiment 4, time. ``epoch_time_s`` (training only, evaluation excluded) and
``images_per_s`` from ``metrics.jsonl``, pooled over the epochs after the first (warm-up)
and over seeds, for: autograd without BN, autograd with PyTorch's BN (both from experiment
1 at B0), autograd with bnlab's hand-derived BN, and the manual engine (bnlab BN, bnlab's
Adam) with and without BN. Overhead = time(with BN) / time(without BN) - 1, per engine.

A difference counts when the two means differ by more than the sum of their sample
standard deviations over seeds, with at least two seeds each (:func:`compare_means`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bnlab import data as bdata
from bnlab.bnstats import (
    accuracy,
    bn_modules,
    recompute_cumulative,
    recompute_exact,
    stats_mismatch,
)
from bnlab.evidence.figures import color, save_figure, short_data
from bnlab.evidence.stats import compare_means, fmt_pct, fmt_pm, mean_std, verdict
from bnlab.models import AllCNNC
from bnlab.studies.common import StudyContext, StudyScale, read_summary, write_summary
from bnlab.train import (
    DivergenceError,
    RunResult,
    TrainConfig,
    cpu_allocator_tuned,
    load_model,
    prepare_dataset,
    resolve_device,
)

__all__ = [
    "NAME",
    "TITLE",
    "SweepPoint",
    "epoch_time_stats",
    "measure_discrepancy",
    "render",
    "run",
    "sqrt_scaled_lr",
    "study_epochs",
    "sweep_plan",
]

NAME = "q3"
TITLE = "Q3 — What does BN cost?"

SWEEP_BATCH_SIZES = (2, 8, 32, 256)  # plus the scale's batch size
FULL_LENGTH_FROM = 8                 # smaller batches train ceil(epochs * B / 8) epochs
EXACT_CHUNK = 250                    # images per forward of the exact-statistics passes
NORMS = (("torch", "BN"), ("none", "no BN"))
CHANCE = 0.1                         # accuracy of a guess among 10 classes
STAT_KINDS = (  # (key, legend label) of the train/test discrepancy
    ("running", "running averages (eval mode)"),
    ("batch", "test-batch statistics"),
    ("cumulative", "recomputed: cumulative average"),
    ("exact", "recomputed: exact, layer by layer"),
)
VERDICT_TEXT = {"supported": "The data support it.",
                "contradicted": "The data contradict it.",
                "inconclusive": "Inconclusive at this scale."}
CLAIMS = {
    "time": ("the post", "with BN the network \"took more time to train\", which the post "
             "expects \"since with batch normalization we have two more parameters to "
             "optimize\"."),
    "unrepresentative": ("the post", "a mini-batch that does not represent the whole data "
                         "could hurt a BN network through the moving averages used at test "
                         "time, but \"I don't think that would be a problem\"."),
    "small_batch": ("not in the post's text; the drawback most often listed beside its two",
                    "BN fails at small batch sizes: at the smallest batch a network with BN "
                    "does worse than one without."),
    "train_test": ("the post, its reason for caution: \"we are going to use the saved "
                   "moving exponential average in testing time\"",
                   "the moving averages used at test time are not the statistics the network "
                   "needs, and that costs accuracy — most at small batch sizes."),
}


# ---- the plan ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepPoint:
    """One batch size of experiment 1: how long it trains and at which learning rate."""

    batch_size: int
    epochs: int
    lr: float
    reduced: bool  # trains fewer epochs than the scale's


def sqrt_scaled_lr(base_lr: float, batch_size: int, base_batch_size: int) -> float:
    """The square-root rule for Adam: ``base_lr * sqrt(batch_size / base_batch_size)``.

    >>> sqrt_scaled_lr(2e-3, 256, 64)
    0.004
    """
    return base_lr * math.sqrt(batch_size / base_batch_size)


def study_epochs(scale: StudyScale) -> int:
    """The run length of this study: half the scale's epochs, at least 1.

    >>> from bnlab.studies.common import SCALES
    >>> study_epochs(SCALES["quick"]), study_epochs(SCALES["paper"])
    (3, 15)
    """
    return max(1, scale.epochs // 2)


def sweep_plan(scale: StudyScale, num_train: int) -> tuple[list[SweepPoint], list[int]]:
    """The batch sizes of experiment 1 at ``scale`` on ``num_train`` images, and those skipped.

    Sizes: ``SWEEP_BATCH_SIZES`` and the scale's own, ascending; a size above ``num_train``
    is skipped. A size below ``min(FULL_LENGTH_FROM, scale.batch_size)`` trains
    ``ceil(E * B / FULL_LENGTH_FROM)`` epochs (at least 1), the others E =
    :func:`study_epochs`.

    >>> from bnlab.studies.common import SCALES
    >>> points, skipped = sweep_plan(SCALES["quick"], 2000)
    >>> [(p.batch_size, p.epochs) for p in points], skipped
    ([(2, 1), (8, 3), (32, 3), (64, 3), (256, 3)], [])
    """
    sizes = sorted(set(SWEEP_BATCH_SIZES) | {scale.batch_size})
    full_from = min(FULL_LENGTH_FROM, scale.batch_size)
    full = study_epochs(scale)
    points, skipped = [], []
    for b in sizes:
        if b > num_train:
            skipped.append(b)
            continue
        epochs = full if b >= full_from else max(1, math.ceil(full * b / FULL_LENGTH_FROM))
        points.append(SweepPoint(b, epochs, sqrt_scaled_lr(scale.lr, b, scale.batch_size),
                                 epochs < full))
    return points, skipped


# ---- measurements on a trained network ----------------------------------------------------


def epoch_time_stats(runs: Sequence[Sequence[dict[str, Any]]], key: str = "epoch_time_s"
                     ) -> dict[str, Any]:
    """``mean_std`` of ``key`` over the epochs after the first of every run, pooled.

    The first epoch carries the warm-up (allocator, kernel selection) and is left out; a
    run of one epoch has nothing else, so when no run has a second epoch every epoch is
    used. ``skipped_first`` says which.

    >>> stats = epoch_time_stats([[{"epoch": 1, "epoch_time_s": 9.0},
    ...                             {"epoch": 2, "epoch_time_s": 2.0}],
    ...                           [{"epoch": 1, "epoch_time_s": 8.0},
    ...                            {"epoch": 2, "epoch_time_s": 4.0}]])
    >>> stats["mean"], stats["n"], stats["skipped_first"]
    (3.0, 2, True)
    """
    later = [m[key] for run in runs for m in run if m["epoch"] > 1]
    if later:
        return {**mean_std(later), "skipped_first": True}
    return {**mean_std([m[key] for run in runs for m in run]), "skipped_first": False}


# ---- running the experiments --------------------------------------------------------------

def _train(ctx: StudyContext, name: str, config: TrainConfig,
           ledger: dict[str, int]) -> RunResult:
    """``ctx.train_run``, where a diverged run is returned (status "diverged"), not raised;
    ``ledger`` counts the runs trained now and those reused from the folder."""
    reused = (ctx.out / "runs" / name / "result.json").exists()
    ledger["reused" if reused else "trained"] += 1
    try:
        return ctx.train_run(name, config)
    except DivergenceError as error:
        ctx.log(f"[{ctx.out.name}] {name} diverged: {error}")
        return ctx.train_run(name, config)  # the stored result.json of the diverged run


def _finished(result: RunResult) -> bool:
    return result.status == "finished" and bool(result.metrics)


def _run_entry(seed: int, result: RunResult) -> dict[str, Any]:
    return {"seed": seed, "status": result.status,
            "test_acc": result.final_test_acc if _finished(result) else None,
            "train_acc": result.metrics[-1]["train_acc"] if _finished(result) else None}


def _final_stats(entries: Sequence[dict[str, Any]], key: str = "test_acc") -> dict[str, Any]:
    return mean_std([e[key] for e in entries if e[key] is not None])


def _curves(results: Sequence[RunResult]) -> dict[str, Any]:
    """Per epoch mean ± std over the finished runs of train and test accuracy."""
    done = [r.metrics for r in results if _finished(r)]
    if not done:
        return {"epoch": [], "train_acc": {"mean": [], "std": []},
                "test_acc": {"mean": [], "std": []}}
    epochs = min(len(m) for m in done)
    out: dict[str, Any] = {"epoch": list(range(1, epochs + 1))}
    for key in ("train_acc", "test_acc"):
        stats = [mean_std([m[e][key] for m in done]) for e in range(epochs)]
        out[key] = {"mean": [s["mean"] for s in stats], "std": [s["std"] for s in stats]}
    return out


def _train_set_batches(dataset: bdata.CIFAR10, size: int, channels_last: bool,
                       drop_last: bool) -> Iterator[tuple[Tensor, Tensor]]:
    """The training images in stored order, un-augmented, normalized, in batches of ``size``."""
    n = dataset.num_train
    stop = n - n % size if drop_last else n
    for start in range(0, stop, size):
        yield (bdata.normalize(dataset.train_images[start:start + size],
                               channels_last=channels_last),
               dataset.train_labels[start:start + size])


def measure_discrepancy(run_dir: Path, config: TrainConfig, dataset: bdata.CIFAR10,
                        recompute_batch: int) -> dict[str, Any]:
    """Test accuracy of one trained BN run under the four kinds of statistics (module
    docstring, experiment 2), and how far its running averages are from the exact ones."""
    device = resolve_device(config.device)
    data = prepare_dataset(config, device, dataset)
    module = load_model(run_dir, device).module
    cl = config.channels_last

    def test(size: int) -> Iterator[tuple[Tensor, Tensor]]:
        return bdata.test_batches(data, size, channels_last=cl)

    with cpu_allocator_tuned(device.type == "cpu"):
        result = {"running": accuracy(module, test(config.eval_batch_size)),
                  "batch": accuracy(module, test(config.batch_size), "batch")}
        cumulative = copy.deepcopy(module)
        recompute_cumulative(cumulative, _train_set_batches(data, recompute_batch, cl, True))
        result["cumulative"] = accuracy(cumulative, test(config.eval_batch_size))
        exact = copy.deepcopy(module)
        recompute_exact(exact, lambda: _train_set_batches(data, EXACT_CHUNK, cl, False))
        result["exact"] = accuracy(exact, test(config.eval_batch_size))
    result["running_vs_exact"] = stats_mismatch(exact, module)
    return result


def _parameter_counts(width: float) -> dict[str, int]:
    """Parameters of All-CNN-C at ``width`` with and without BN, and BN's gamma and beta."""
    with_bn, without = AllCNNC(norm="torch", width=width), AllCNNC(norm="none", width=width)
    bn = sum(p.numel() for m in bn_modules(with_bn) for p in m.parameters())
    return {"with_bn": sum(p.numel() for p in with_bn.parameters()),
            "without_bn": sum(p.numel() for p in without.parameters()),
            "bn_gamma_beta": bn}


def _sweep(ctx: StudyContext, points: Sequence[SweepPoint],
           ledger: dict[str, int]) -> tuple[list[dict], dict]:
    """Experiment 1; returns the summary points and the RunResults by (B, norm)."""
    out, results = [], {}
    for point in points:
        entry: dict[str, Any] = {"batch_size": point.batch_size, "epochs": point.epochs,
                                 "lr": point.lr, "reduced": point.reduced}
        for norm, _ in NORMS:
            runs = []
            for seed in ctx.seed_list():
                config = ctx.config(norm=norm, batch_size=point.batch_size, lr=point.lr,
                                    epochs=point.epochs, seed=seed,
                                    case=f"bs{point.batch_size}-{norm}")
                result = _train(ctx, f"bs{point.batch_size}-{norm}-seed{seed}", config,
                                ledger)
                results[(point.batch_size, norm)] = [*results.get((point.batch_size, norm), []),
                                                     (seed, config, result)]
                runs.append(_run_entry(seed, result))
            entry[norm] = {"test_acc": _final_stats(runs), "runs": runs,
                           "diverged": sum(r["status"] != "finished" for r in runs)}
        entry["bn_vs_none"] = compare_means(entry["torch"]["test_acc"],
                                            entry["none"]["test_acc"])
        out.append(entry)
    return out, results


def run(ctx: StudyContext) -> dict:
    """Train and measure the four experiments; write the figures and ``summary.json``."""
    dataset = ctx.load_data()
    scale = ctx.scale
    num_train = ctx.train_images()
    points, skipped = sweep_plan(scale, num_train)
    if scale.batch_size > num_train:
        raise ValueError(f"the scale's batch size {scale.batch_size} is larger than the "
                         f"{num_train} training images: use a smaller batch or more data")
    clock: dict[str, float] = {}
    ledger = {"trained": 0, "reused": 0}

    started = time.perf_counter()
    sweep, results = _sweep(ctx, points, ledger)
    clock["batch_size_s"] = time.perf_counter() - started

    # Experiment 3: class-sorted batches at the scale's batch size.
    started = time.perf_counter()
    base = next(p for p in points if p.batch_size == scale.batch_size)
    epochs = study_epochs(scale)
    sorted_block: dict[str, Any] = {"batch_size": base.batch_size, "epochs": base.epochs,
                                    "lr": base.lr, "configs": {}}
    sorted_results: dict[str, list] = {}
    for norm, label in NORMS:
        shuffled = results[(base.batch_size, norm)]
        sorted_runs = []
        for seed in ctx.seed_list():
            config = ctx.config(norm=norm, batch_order="class_sorted", seed=seed,
                                epochs=base.epochs, case=f"sorted-{norm}")
            sorted_runs.append((seed, config,
                                _train(ctx, f"sorted-{norm}-seed{seed}", config, ledger)))
        sorted_results[norm] = sorted_runs
        for order, runs in (("shuffled", shuffled), ("class_sorted", sorted_runs)):
            entries = [_run_entry(seed, r) for seed, _, r in runs]
            sorted_block["configs"][f"{norm}_{order}"] = {
                "label": f"{label}, {order.replace('_', '-')} batches", "norm": norm,
                "order": order, "test_acc": _final_stats(entries),
                "train_acc": _final_stats(entries, "train_acc"), "runs": entries,
                "curves": _curves([r for _, _, r in runs])}
        by_seed = {e["seed"]: e["test_acc"] for e in
                   sorted_block["configs"][f"{norm}_shuffled"]["runs"]}
        drops = [by_seed[e["seed"]] - e["test_acc"] for e in
                 sorted_block["configs"][f"{norm}_class_sorted"]["runs"]
                 if e["test_acc"] is not None and by_seed.get(e["seed"]) is not None]
        sorted_block[f"drop_{norm}"] = mean_std(drops)
    sorted_block["drop_bn_vs_none"] = compare_means(sorted_block["drop_torch"],
                                                    sorted_block["drop_none"])
    configs = sorted_block["configs"]
    for norm, _ in NORMS:
        sorted_block[f"{norm}_sorted_vs_shuffled"] = compare_means(
            configs[f"{norm}_class_sorted"]["test_acc"], configs[f"{norm}_shuffled"]["test_acc"])
    sorted_block["sorted_bn_vs_none"] = compare_means(configs["torch_class_sorted"]["test_acc"],
                                                      configs["none_class_sorted"]["test_acc"])
    clock["class_sorted_s"] = time.perf_counter() - started

    # Experiment 2: the train/test discrepancy of every trained BN network.
    started = time.perf_counter()
    recompute_batch = scale.batch_size
    groups = []
    targets = [(f"batch {p.batch_size}", "shuffled", p.batch_size, p.epochs,
                results[(p.batch_size, "torch")]) for p in points]
    targets.append((f"batch {base.batch_size}, class-sorted", "class_sorted", base.batch_size,
                    base.epochs, sorted_results["torch"]))
    momentum = ctx.config().bn_momentum
    for label, order, batch_size, run_epochs, runs in targets:
        per_seed = []
        for seed, config, result in runs:
            if not _finished(result):
                continue
            ctx.log(f"[{ctx.out.name}] train/test statistics of {result.run_dir.name}")
            per_seed.append({"seed": seed, **measure_discrepancy(
                result.run_dir, config, dataset, recompute_batch)})
        updates = run_epochs * (num_train // batch_size)
        group: dict[str, Any] = {"label": label, "order": order, "batch_size": batch_size,
                                 "seeds": per_seed, "updates": updates,
                                 # what is left of the initial (0, 1) in the running averages
                                 "initial_weight": (1.0 - momentum) ** updates
                                 if momentum is not None else None}
        for key, _ in STAT_KINDS:
            group[key] = mean_std([s[key] for s in per_seed])
        for key in ("mean_shift", "log_var_ratio"):
            group[key] = mean_std([s["running_vs_exact"][key] for s in per_seed])
        group["exact_vs_running"] = compare_means(group["exact"], group["running"])
        group["batch_vs_running"] = compare_means(group["batch"], group["running"])
        groups.append(group)
    shuffled_groups = [g for g in groups if g["order"] == "shuffled" and g["exact"]["n"]]
    largest_gain = max(shuffled_groups, default=None,
                       key=lambda g: g["exact"]["mean"] - g["running"]["mean"])
    discrepancy = {"recompute_batch_size": recompute_batch, "exact_chunk": EXACT_CHUNK,
                   "bn_momentum": momentum,
                   "groups": groups,
                   "largest_gain_batch_size": largest_gain and largest_gain["batch_size"]}
    clock["discrepancy_s"] = time.perf_counter() - started

    # Experiment 4: time per epoch.
    started = time.perf_counter()
    time_epochs = max(2, epochs)
    time_configs = [
        ("autograd_none", "autograd, no BN", None),
        ("autograd_torch", "autograd, PyTorch BN", None),
        ("autograd_bnlab", "autograd, bnlab BN", {"engine": "autograd", "norm": "bnlab"}),
        ("manual_none", "manual engine, no BN",
         {"engine": "manual", "norm": "none", "optimizer_impl": "bnlab"}),
        ("manual_bnlab", "manual engine, bnlab BN",
         {"engine": "manual", "norm": "bnlab", "optimizer_impl": "bnlab"}),
    ]
    timing: dict[str, Any] = {"dedicated_epochs": time_epochs, "configs": {},
                              "device": str(resolve_device(ctx.device)),
                              "torch_threads": torch.get_num_threads()}
    for key, label, fields in time_configs:
        if fields is None:  # the shuffled runs of experiment 1 at the scale's batch size
            norm = key.split("_")[1]
            runs = [r for _, _, r in results[(base.batch_size, norm)]]
            epochs = base.epochs
        else:
            runs = [_train(ctx, f"time-{key}-seed{seed}",
                           ctx.config(epochs=time_epochs, seed=seed, case=f"time-{key}",
                                      **fields), ledger)
                    for seed in ctx.seed_list()]
            epochs = time_epochs
        metrics = [r.metrics for r in runs if _finished(r)]
        timing["configs"][key] = {"label": label, "epochs": epochs,
                                  "epoch_time_s": epoch_time_stats(metrics),
                                  "images_per_s": epoch_time_stats(metrics, "images_per_s")}
    t = timing["configs"]
    for bn_key, none_key in (("autograd_torch", "autograd_none"),
                             ("autograd_bnlab", "autograd_none"),
                             ("manual_bnlab", "manual_none")):
        a, b = t[bn_key]["epoch_time_s"], t[none_key]["epoch_time_s"]
        t[bn_key]["overhead"] = (a["mean"] / b["mean"] - 1.0) if a["mean"] and b["mean"] \
            else None
        t[bn_key]["vs_none"] = compare_means(a, b)
    timing["parameters"] = _parameter_counts(scale.width)
    params = timing["parameters"]
    timing["bn_parameter_fraction"] = params["bn_gamma_beta"] / params["with_bn"]
    clock["time_s"] = time.perf_counter() - started

    smallest = sweep[0]
    smallest_group = groups[0]
    largest_group = groups[len(points) - 1]
    claims = {
        "time": {**_claim("time"), "comparison": t["autograd_torch"]["vs_none"],
                 "verdict": verdict(t["autograd_torch"]["vs_none"]["direction"], "above")},
        "unrepresentative": {
            **_claim("unrepresentative"), "comparison": sorted_block["torch_sorted_vs_shuffled"],
            # "not a problem": class-sorted batches cost the BN network nothing beyond the
            # seed spread; a drop beyond it contradicts the claim
            "verdict": {"below": "contradicted", "one seed": "inconclusive"}.get(
                sorted_block["torch_sorted_vs_shuffled"]["direction"], "supported")},
        "small_batch": {**_claim("small_batch"), "batch_size": smallest["batch_size"],
                        "comparison": smallest["bn_vs_none"],
                        "verdict": verdict(smallest["bn_vs_none"]["direction"], "below")},
        "train_test": {**_claim("train_test"), "batch_size": smallest_group["batch_size"],
                       "comparison": smallest_group["exact_vs_running"],
                       "largest_batch_size": largest_group["batch_size"],
                       "largest_comparison": largest_group["exact_vs_running"],
                       "verdict": verdict(smallest_group["exact_vs_running"]["direction"],
                                          "above")},
    }

    summary: dict[str, Any] = {
        "study": NAME,
        "title": TITLE,
        "data": dataset.source,
        "preset": scale.name,
        "seeds": ctx.seeds,
        "settings": {"width": scale.width, "epochs": epochs, "scale_epochs": scale.epochs,
                     "train_images": num_train,
                     "test_images": dataset.num_test, "batch_size": scale.batch_size,
                     "lr": scale.lr, "lr_schedule": "cosine", "optimizer": "Adam",
                     "augment": True, "full_length_from": min(FULL_LENGTH_FROM,
                                                              scale.batch_size)},
        "batch_size": {"lr_rule": "sqrt", "points": sweep, "skipped": skipped},
        "discrepancy": discrepancy,
        "class_sorted": sorted_block,
        "time": timing,
        "claims": claims,
        "stage_time_s": clock,
        "runs": ledger,
        "figures": {"batch_size": "q3_batch_size.png", "discrepancy": "q3_train_test.png",
                    "class_sorted": "q3_class_sorted.png", "time": "q3_time.png"},
    }
    _plot_batch_size(summary, ctx.out / summary["figures"]["batch_size"])
    _plot_discrepancy(summary, ctx.out / summary["figures"]["discrepancy"])
    _plot_class_sorted(summary, ctx.out / summary["figures"]["class_sorted"])
    _plot_time(summary, ctx.out / summary["figures"]["time"])
    write_summary(ctx.out, summary)
    return read_summary(ctx.out)


def _claim(key: str) -> dict[str, str]:
    source, text = CLAIMS[key]
    return {"source": source, "claim": text}


# ---- figures ------------------------------------------------------------------------------

def _setting_text(summary: dict[str, Any]) -> str:
    st = summary["settings"]
    return (f"All-CNN-C ×{st['width']:g}, {st['train_images']} train images of the "
            f"{short_data(summary['data'])}; mean ± std over {summary['seeds']} seed(s)")


def _colors() -> dict[str, Any]:
    return {norm: color(norm) for norm in ("torch", "none")}  # the one palette


def _plot_batch_size(summary: dict[str, Any], path: Path) -> None:
    """Final test accuracy vs batch size (log x), BN and no BN, ±1 std error bars; points
    trained for fewer epochs are drawn hollow and labelled with their epochs."""
    import matplotlib.pyplot as plt

    points = summary["batch_size"]["points"]
    colors = _colors()
    fig, ax = plt.subplots(figsize=(7.5, 4.8), layout="constrained")
    for norm, label in NORMS:
        xs, means, stds = [], [], []
        for p in points:
            stat = p[norm]["test_acc"]
            if stat["mean"] is None:
                continue
            xs.append(p["batch_size"])
            means.append(stat["mean"])
            stds.append(stat["std"])
        ax.errorbar(xs, means, yerr=stds, color=colors[norm], marker="o", ms=6, capsize=4,
                    lw=1.8, label=label)
        for p in points:
            stat = p[norm]["test_acc"]
            if p["reduced"] and stat["mean"] is not None:
                ax.plot([p["batch_size"]], [stat["mean"]], "o", ms=9, mfc="white",
                        mec=colors[norm], mew=2)
                ax.annotate(f"{p['epochs']} epoch(s)", (p["batch_size"], stat["mean"]),
                            textcoords="offset points", xytext=(8, -4), fontsize=8,
                            color=colors[norm])
    ax.axhline(CHANCE, color="0.5", lw=0.8, ls=":", label="chance (10 classes)")
    ax.set_xscale("log", base=2)
    ax.set_xticks([p["batch_size"] for p in points], [str(p["batch_size"]) for p in points])
    ax.set_xlabel("batch size (images per step, log scale)")
    ax.set_ylabel("final test accuracy (fraction)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"Test accuracy vs batch size, with and without BN (Adam, lr ∝ √batch)\n"
                 f"{_setting_text(summary)}", fontsize=9)
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
                 f"evaluation excluded; {which}, {summary['seeds']} seed(s)", fontsize=9)
    save_figure(fig, path)


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
