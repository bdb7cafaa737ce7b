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
from bnlab.config import TrainConfig, resolve_device
from bnlab.engines import load_model
from bnlab.evidence.stats import interval_verdict, mean_std, paired_difference
from bnlab.evidence.stats import no_worse_verdict as stats_no_worse
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
    AUGMENT_SEED,
    EXACT_CHUNK,
    MIN_EFFECT,
    MIN_UPDATES,
    NAME,
    NORMS,
    STAT_KINDS,
    TITLE,
    VARIANTS,
    SweepPoint,
    _claim,
    epoch_time_stats,
    scale_plan,
    start_weight,
    study_epochs,
    sweep_plan,
)
from bnlab.studies.tuning import tune_lr
from bnlab.train import DivergenceError, RunResult, prepare_dataset

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
    done = _finished(result)
    return {"seed": seed, "status": result.status,
            "test_acc": result.final_test_acc if done else None,
            "train_acc": result.metrics[-1]["train_acc"] if done else None,
            "epoch_time_s": epoch_time_stats([result.metrics])["mean"] if done else None}


def _final_stats(entries: Sequence[dict[str, Any]], key: str = "test_acc") -> dict[str, Any]:
    return mean_std([e[key] for e in entries if e[key] is not None])


def _by_seed(entries: Sequence[dict[str, Any]], key: str = "test_acc") -> dict[int, Any]:
    return {e["seed"]: e[key] for e in entries}


def judged(difference: dict[str, Any], expected: str, enough_updates: bool,
           min_effect: float = MIN_EFFECT) -> str:
    """:func:`~bnlab.evidence.stats.interval_verdict` of a paired difference, or
    "inconclusive" when the runs behind it had fewer than ``MIN_UPDATES`` updates."""
    return interval_verdict(difference, expected, min_effect) if enough_updates \
        else "inconclusive"


def no_worse_verdict(difference: dict[str, Any], min_effect: float = MIN_EFFECT) -> str:
    """:func:`bnlab.evidence.stats.no_worse_verdict` at Q3's minimum effect: the verdict on
    "X costs nothing that matters" from the paired interval of X's cost.

    >>> no_worse_verdict({"low": -0.02, "high": 0.005}), no_worse_verdict({"low": 0.03,
    ...                                                                    "high": 0.09})
    ('supported', 'contradicted')
    """
    return stats_no_worse(difference, min_effect)


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


def augmented_train_batches(dataset: bdata.CIFAR10, size: int, channels_last: bool,
                            seed: int = AUGMENT_SEED) -> Iterator[tuple[Tensor, Tensor]]:
    """Every training image once, randomly cropped and flipped as in training
    (:func:`bnlab.data.train_batches` with augmentation), in batches of ``size`` (the last
    one smaller); the same crops for the same ``seed``, so the exact statistics, which
    pass over the set once per layer, see the same images every pass."""
    generator = torch.Generator(device=dataset.train_images.device).manual_seed(seed)
    return bdata.train_batches(dataset, min(size, dataset.num_train), generator=generator,
                               augment=True, drop_last=False, channels_last=channels_last)


def measure_discrepancy(run_dir: Path, config: TrainConfig, dataset: bdata.CIFAR10,
                        recompute_batch: int) -> dict[str, Any]:
    """Test accuracy of one trained BN run under the five kinds of statistics (module
    docstring, experiment 2), and how far its running averages are from the exact ones
    (of the un-augmented and of the augmented training images)."""
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
        augmented = copy.deepcopy(module)
        recompute_exact(augmented, lambda: augmented_train_batches(data, EXACT_CHUNK, cl))
        result["exact_augmented"] = accuracy(augmented, test(config.eval_batch_size))
    result["running_vs_exact"] = stats_mismatch(exact, module)
    result["running_vs_exact_augmented"] = stats_mismatch(augmented, module)
    return result


def _parameter_counts(width: float) -> dict[str, int]:
    """Parameters of All-CNN-C at ``width`` with and without BN, and BN's gamma and beta."""
    with_bn, without = AllCNNC(norm="torch", width=width), AllCNNC(norm="none", width=width)
    bn = sum(p.numel() for m in bn_modules(with_bn) for p in m.parameters())
    return {"with_bn": sum(p.numel() for p in with_bn.parameters()),
            "without_bn": sum(p.numel() for p in without.parameters()),
            "bn_gamma_beta": bn}


def _tuned_rates(ctx: StudyContext) -> dict[str, Any]:
    """Each network's own learning rate at the scale's batch size: the shared sweep of
    :func:`bnlab.studies.tuning.tune_lr` for BN (``norm="torch"``) and without."""
    tuned = {norm: tune_lr(ctx, norm=norm) for norm, _ in NORMS}
    return {norm: t.to_json() for norm, t in tuned.items()}


def _variant_applies(key: str, batch_size: int, config: TrainConfig) -> bool:
    """Ghost BN over batches no larger than its virtual batch is plain BN: not trained."""
    return key != "ghost" or batch_size > config.virtual_batch_size


def _sweep(ctx: StudyContext, points: Sequence[SweepPoint], rates: dict[str, Any],
           ledger: dict[str, int]) -> tuple[list[dict], dict]:
    """Experiment 1; returns the summary points and the RunResults by (B, norm)."""
    out, results = [], {}
    for point in points:
        factor = point.lr / ctx.scale.lr  # the square-root rule's factor sqrt(B / B0)
        entry: dict[str, Any] = {"batch_size": point.batch_size, "epochs": point.epochs,
                                 "updates": point.updates,
                                 "enough_updates": point.enough_updates, "lr": {},
                                 "variants": []}
        kinds = [(norm, label, {"norm": norm}, rates[norm]["best"]) for norm, label in NORMS]
        if point.variants:
            kinds += [(key, label, fields, rates["torch"]["best"])
                      for key, label, fields in VARIANTS
                      if _variant_applies(key, point.batch_size, ctx.config(**fields))]
        for key, label, fields, tuned in kinds:
            lr = tuned * factor
            entry["lr"][key] = lr
            runs = []
            for seed in ctx.seed_list():
                config = ctx.config(**fields, batch_size=point.batch_size, lr=lr,
                                    epochs=point.epochs, seed=seed,
                                    case=f"bs{point.batch_size}-{key}")
                result = _train(ctx, f"bs{point.batch_size}-{key}-seed{seed}", config, ledger)
                results.setdefault((point.batch_size, key), []).append((seed, config, result))
                runs.append(_run_entry(seed, result))
            entry[key] = {"label": label, "test_acc": _final_stats(runs), "runs": runs,
                          "diverged": sum(r["status"] != "finished" for r in runs)}
            if key not in ("torch", "none"):
                entry["variants"].append(key)
                entry[key]["vs_bn"] = paired_difference(_by_seed(runs),
                                                        _by_seed(entry["torch"]["runs"]))
        entry["bn_vs_none"] = paired_difference(_by_seed(entry["torch"]["runs"]),
                                                _by_seed(entry["none"]["runs"]))
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
    rates = _tuned_rates(ctx)
    clock["tuning_s"] = time.perf_counter() - started

    started = time.perf_counter()
    sweep, results = _sweep(ctx, points, rates, ledger)
    clock["batch_size_s"] = time.perf_counter() - started

    started = time.perf_counter()
    base = next(p for p in points if p.batch_size == scale.batch_size)
    sorted_block, sorted_results = _class_sorted(ctx, base, rates, results, ledger)
    clock["class_sorted_s"] = time.perf_counter() - started

    started = time.perf_counter()
    groups, discrepancy = _discrepancy(ctx, dataset, points, base, results, sorted_results)
    clock["discrepancy_s"] = time.perf_counter() - started

    started = time.perf_counter()
    timing, epochs = _timing(ctx, base, results, ledger)
    clock["time_s"] = time.perf_counter() - started

    plan = scale_plan(scale)
    summary: dict[str, Any] = {
        "study": NAME,
        "title": TITLE,
        "data": dataset.source,
        "preset": scale.name,
        # seeds as a count: the acceptance walk reads every int under a "seeds" key
        "seeds": ctx.seeds, "seed_list": ctx.seed_list(),
        "n_seeds": ctx.seeds,
        "settings": {"width": scale.width, "epochs": epochs, "scale_epochs": scale.epochs,
                     "train_images": num_train,
                     "test_images": dataset.num_test, "batch_size": scale.batch_size,
                     "lr": scale.lr, "lr_schedule": "cosine", "optimizer": "Adam",
                     "augment": True, "min_updates": MIN_UPDATES, "min_effect": MIN_EFFECT,
                     "max_epochs": plan.max_epochs,
                     "virtual_batch_size": ctx.config().virtual_batch_size},
        "tuning": rates,
        "batch_size": {"lr_rule": "sqrt", "lr_source": "tuned", "points": sweep,
                       "skipped": skipped,
                       "variant_batch_sizes": [p.batch_size for p in points if p.variants]},
        "discrepancy": discrepancy,
        "class_sorted": sorted_block,
        "time": timing,
        "claims": _claims(sweep, groups, sorted_block, timing),
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


def _class_sorted(ctx: StudyContext, base: SweepPoint, rates: dict[str, Any], results: dict,
                  ledger: dict) -> tuple[dict[str, Any], dict[str, list]]:
    """Experiment 3: class-sorted batches at the scale's batch size, beside the shuffled
    runs of the sweep (same seeds, same rates); returns the summary block and the runs
    (seed, config, result)."""
    sorted_block: dict[str, Any] = {"batch_size": base.batch_size, "epochs": base.epochs,
                                    "updates": base.updates,
                                    "enough_updates": base.enough_updates, "lr": {},
                                    "configs": {}}
    sorted_results: dict[str, list] = {}
    drops: dict[str, dict[int, float | None]] = {}
    for norm, label in NORMS:
        shuffled = results[(base.batch_size, norm)]
        lr = shuffled[0][1].lr
        sorted_block["lr"][norm] = lr
        sorted_runs = []
        for seed in ctx.seed_list():
            config = ctx.config(norm=norm, batch_order="class_sorted", seed=seed, lr=lr,
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
        # the drop per seed: shuffled - class-sorted, same seed
        drop = paired_difference(
            _by_seed(sorted_block["configs"][f"{norm}_shuffled"]["runs"]),
            _by_seed(sorted_block["configs"][f"{norm}_class_sorted"]["runs"]))
        sorted_block[f"drop_{norm}"] = drop
        drops[norm] = {seed: None for seed in ctx.seed_list()}
        shuffled_acc = _by_seed(sorted_block["configs"][f"{norm}_shuffled"]["runs"])
        for e in sorted_block["configs"][f"{norm}_class_sorted"]["runs"]:
            if e["test_acc"] is not None and shuffled_acc.get(e["seed"]) is not None:
                drops[norm][e["seed"]] = shuffled_acc[e["seed"]] - e["test_acc"]
    # BN's own cost of unrepresentative batches: its drop beyond the no-BN network's
    sorted_block["drop_bn_minus_none"] = paired_difference(drops["torch"], drops["none"])
    return sorted_block, sorted_results


def _discrepancy(ctx: StudyContext, dataset: bdata.CIFAR10, points: Sequence[SweepPoint],
                 base: SweepPoint, results: dict, sorted_results: dict
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Experiment 2: the train/test discrepancy of every trained BN network."""
    recompute_batch = ctx.scale.batch_size
    groups = []
    targets = [(f"batch {p.batch_size}", "shuffled", p, results[(p.batch_size, "torch")])
               for p in points]
    targets.append((f"batch {base.batch_size}, class-sorted", "class_sorted", base,
                    sorted_results["torch"]))
    momentum = ctx.config().bn_momentum
    for label, order, point, runs in targets:
        per_seed = []
        for seed, config, result in runs:
            if not _finished(result):
                continue
            ctx.log(f"[{ctx.out.name}] train/test statistics of {result.run_dir.name}")
            per_seed.append({"seed": seed, **measure_discrepancy(
                result.run_dir, config, dataset, recompute_batch)})
        group: dict[str, Any] = {"label": label, "order": order,
                                 "batch_size": point.batch_size, "per_seed": per_seed,
                                 "updates": point.updates,
                                 "enough_updates": point.enough_updates,
                                 # what is left of the initial (0, 1) in the running averages
                                 "initial_weight": start_weight(momentum, point.updates)}
        for key, _ in STAT_KINDS:
            group[key] = mean_std([s[key] for s in per_seed])
        for key in ("mean_shift", "log_var_ratio"):
            group[key] = mean_std([s["running_vs_exact"][key] for s in per_seed])
            group[f"{key}_augmented"] = mean_std([s["running_vs_exact_augmented"][key]
                                                  for s in per_seed])
        by = {key: {s["seed"]: s[key] for s in per_seed} for key, _ in STAT_KINDS}
        group["exact_vs_running"] = paired_difference(by["exact"], by["running"])
        group["exact_augmented_vs_running"] = paired_difference(by["exact_augmented"],
                                                                by["running"])
        group["exact_vs_exact_augmented"] = paired_difference(by["exact"],
                                                              by["exact_augmented"])
        group["batch_vs_running"] = paired_difference(by["batch"], by["running"])
        groups.append(group)
    shuffled_groups = [g for g in groups if g["order"] == "shuffled" and g["exact"]["n"]]
    largest_gain = max(shuffled_groups, default=None,
                       key=lambda g: g["exact"]["mean"] - g["running"]["mean"])
    return groups, {"recompute_batch_size": recompute_batch, "exact_chunk": EXACT_CHUNK,
                    "augment_seed": AUGMENT_SEED, "bn_momentum": momentum, "groups": groups,
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
    epochs = base.epochs
    # the sweep's runs serve when they have an epoch after the warm-up one
    timing["reuses_sweep"] = reuse = base.epochs >= 2
    for key, label, fields in _TIME_CONFIGS:
        if fields is None and not reuse:
            fields = {"norm": key.split("_")[1]}
        if fields is None:  # the shuffled runs of experiment 1 at the scale's batch size
            norm = key.split("_")[1]
            runs = [(seed, r) for seed, _, r in results[(base.batch_size, norm)]]
            epochs = base.epochs
        else:
            runs = [(seed, _train(ctx, f"time-{key}-seed{seed}",
                                  ctx.config(epochs=time_epochs, seed=seed, case=f"time-{key}",
                                             **fields), ledger))
                    for seed in ctx.seed_list()]
            epochs = time_epochs
        metrics = [r.metrics for _, r in runs if _finished(r)]
        timing["configs"][key] = {"label": label, "epochs": epochs,
                                  "epoch_time_s": epoch_time_stats(metrics),
                                  "images_per_s": epoch_time_stats(metrics, "images_per_s"),
                                  "per_seed": {seed: _run_entry(seed, r)["epoch_time_s"]
                                               for seed, r in runs}}
    t = timing["configs"]
    for bn_key, none_key in (("autograd_torch", "autograd_none"),
                             ("autograd_bnlab", "autograd_none"),
                             ("manual_bnlab", "manual_none")):
        a, b = t[bn_key]["epoch_time_s"], t[none_key]["epoch_time_s"]
        t[bn_key]["overhead"] = (a["mean"] / b["mean"] - 1.0) if a["mean"] and b["mean"] \
            else None
        # seconds per epoch, with BN minus without, paired by seed
        t[bn_key]["vs_none"] = paired_difference(t[bn_key]["per_seed"], t[none_key]["per_seed"])
    timing["parameters"] = _parameter_counts(ctx.scale.width)
    params = timing["parameters"]
    timing["bn_parameter_fraction"] = params["bn_gamma_beta"] / params["with_bn"]
    return timing, epochs


def _claims(sweep: list, groups: list, sorted_block: dict, timing: dict) -> dict[str, Any]:
    """Each claim about BN's cost with its paired difference (95% t interval over seeds),
    the minimum effect it is judged against, and its verdict (:data:`VERDICTS` words). A
    claim resting on runs shorter than ``MIN_UPDATES`` updates is inconclusive."""
    t = timing["configs"]
    smallest = sweep[0]
    shuffled = [g for g in groups if g["order"] == "shuffled"]
    smallest_group, largest_group = shuffled[0], shuffled[-1]
    sorted_group = next(g for g in groups if g["order"] == "class_sorted")
    enough = sorted_block["enough_updates"]
    claims: dict[str, Any] = {
        "time": {**_claim("time"), "difference": t["autograd_torch"]["vs_none"],
                 "min_effect": 0.0, "unit": "s",
                 "verdict": interval_verdict(t["autograd_torch"]["vs_none"], "above")},
        "unrepresentative": {
            **_claim("unrepresentative"), "difference": sorted_block["drop_bn_minus_none"],
            "min_effect": MIN_EFFECT, "updates": sorted_block["updates"],
            "enough_updates": enough,
            # "not a problem": BN's drop beyond the no-BN drop is ruled out above min_effect
            "verdict": no_worse_verdict(sorted_block["drop_bn_minus_none"]) if enough
            else "inconclusive"},
        "sorted_recovery": {
            **_claim("sorted_recovery"), "difference": sorted_group["exact_vs_running"],
            "min_effect": MIN_EFFECT, "updates": sorted_group["updates"],
            "enough_updates": enough,
            "recovered_fraction": _fraction(sorted_group["exact_vs_running"]["mean"],
                                            sorted_block["drop_torch"]["mean"]),
            "verdict": judged(sorted_group["exact_vs_running"], "above", enough)},
        "small_batch": {**_claim("small_batch"), "batch_size": smallest["batch_size"],
                        "difference": smallest["bn_vs_none"], "min_effect": MIN_EFFECT,
                        "updates": smallest["updates"],
                        "enough_updates": smallest["enough_updates"],
                        "verdict": judged(smallest["bn_vs_none"], "below",
                                          smallest["enough_updates"])},
        "train_test": {**_claim("train_test"), "batch_size": smallest_group["batch_size"],
                       "difference": smallest_group["exact_vs_running"],
                       "min_effect": MIN_EFFECT, "updates": smallest_group["updates"],
                       "enough_updates": smallest_group["enough_updates"],
                       "largest_batch_size": largest_group["batch_size"],
                       "largest_difference": largest_group["exact_vs_running"],
                       "largest_updates": largest_group["updates"],
                       "largest_initial_weight": largest_group["initial_weight"],
                       "verdict": judged(smallest_group["exact_vs_running"], "above",
                                         smallest_group["enough_updates"])},
    }
    for key, expected_at in (("group", "smallest"), ("renorm", "smallest"),
                             ("ghost", "largest")):
        where = [p for p in sweep if key in p["variants"]]
        if not where:
            continue
        point = where[0] if expected_at == "smallest" else where[-1]
        claims[key] = {**_claim(key), "batch_size": point["batch_size"],
                       "difference": point[key]["vs_bn"], "min_effect": MIN_EFFECT,
                       "updates": point["updates"], "enough_updates": point["enough_updates"],
                       "verdict": judged(point[key]["vs_bn"], "above",
                                         point["enough_updates"])}
    return claims


def _fraction(part: float | None, whole: float | None) -> float | None:
    """``part / whole``, None when either is missing or ``whole`` is not positive."""
    if part is None or whole is None or whole <= 0:
        return None
    return part / whole
