"""Q3's experiment: the sweeps, the measurements, the summary and its figures.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
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
from bnlab.evidence.stats import compare_means, mean_std, verdict
from bnlab.models import AllCNNC
from bnlab.progress import cpu_allocator_tuned
from bnlab.studies.common import StudyContext, read_summary, write_summary
from bnlab.studies.q3.figures import (
    _plot_batch_size,
    _plot_class_sorted,
    _plot_discrepancy,
    _plot_time,
)
from bnlab.studies.q3.plan import (
    EXACT_CHUNK,
    FULL_LENGTH_FROM,
    NAME,
    NORMS,
    STAT_KINDS,
    TITLE,
    SweepPoint,
    _claim,
    epoch_time_stats,
    study_epochs,
    sweep_plan,
)
from bnlab.train import (
    DivergenceError,
    RunResult,
    TrainConfig,
    load_model,
    prepare_dataset,
    resolve_device,
)

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

    started = time.perf_counter()
    base = next(p for p in points if p.batch_size == scale.batch_size)
    sorted_block, sorted_results = _class_sorted(ctx, base, results, ledger)
    clock["class_sorted_s"] = time.perf_counter() - started

    started = time.perf_counter()
    groups, discrepancy = _discrepancy(ctx, dataset, points, base, results, sorted_results,
                                       num_train)
    clock["discrepancy_s"] = time.perf_counter() - started

    started = time.perf_counter()
    timing, epochs = _timing(ctx, base, results, ledger)
    clock["time_s"] = time.perf_counter() - started

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
        "claims": _claims(sweep, groups, len(points), sorted_block, timing),
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


def _class_sorted(ctx: StudyContext, base: SweepPoint, results: dict, ledger: dict
                  ) -> tuple[dict[str, Any], dict[str, list]]:
    """Experiment 3: class-sorted batches at the scale's batch size, beside the shuffled
    runs of the sweep; returns the summary block and the runs (seed, config, result)."""
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
    return sorted_block, sorted_results


def _discrepancy(ctx: StudyContext, dataset: bdata.CIFAR10, points: Sequence[SweepPoint],
                 base: SweepPoint, results: dict, sorted_results: dict, num_train: int
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Experiment 2: the train/test discrepancy of every trained BN network."""
    recompute_batch = ctx.scale.batch_size
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
    return groups, {"recompute_batch_size": recompute_batch, "exact_chunk": EXACT_CHUNK,
                    "bn_momentum": momentum, "groups": groups,
                    "largest_gain_batch_size": largest_gain and largest_gain["batch_size"]}


_TIME_CONFIGS = (  # (key, label, fields of a dedicated run; None: the sweep's runs)
    ("autograd_none", "autograd, no BN", None),
    ("autograd_torch", "autograd, PyTorch BN", None),
    ("autograd_bnlab", "autograd, bnlab BN", {"engine": "autograd", "norm": "bnlab"}),
    ("manual_none", "manual engine, no BN",
     {"engine": "manual", "norm": "none", "optimizer_impl": "bnlab"}),
    ("manual_bnlab", "manual engine, bnlab BN",
     {"engine": "manual", "norm": "bnlab", "optimizer_impl": "bnlab"}),
)


def _timing(ctx: StudyContext, base: SweepPoint, results: dict, ledger: dict
            ) -> tuple[dict[str, Any], int]:
    """Experiment 4: time per epoch of both engines with and without BN. Returns the block
    and the epochs of the last configuration timed (what ``settings.epochs`` has reported
    since Q3 was written; kept so summaries stay comparable)."""
    time_epochs = max(2, study_epochs(ctx.scale))
    timing: dict[str, Any] = {"dedicated_epochs": time_epochs, "configs": {},
                              "device": str(resolve_device(ctx.device)),
                              "torch_threads": torch.get_num_threads()}
    epochs = study_epochs(ctx.scale)
    for key, label, fields in _TIME_CONFIGS:
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
    timing["parameters"] = _parameter_counts(ctx.scale.width)
    params = timing["parameters"]
    timing["bn_parameter_fraction"] = params["bn_gamma_beta"] / params["with_bn"]
    return timing, epochs


def _claims(sweep: list, groups: list, n_points: int, sorted_block: dict,
            timing: dict) -> dict[str, Any]:
    """The four claims of the post about BN's cost, each with its comparison and verdict."""
    t = timing["configs"]
    smallest = sweep[0]
    smallest_group = groups[0]
    largest_group = groups[n_points - 1]
    return {
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
