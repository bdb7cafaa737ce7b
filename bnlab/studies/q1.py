"""Q1 — Is BN a regularizer? Two measurements: the generalization gap, and the noise BN injects.

The post says BN regularizes "as a side effect": like dropout it adds noise, and its case b
(BN) reached a higher test accuracy with a lower train accuracy than case a (no BN). A
regularizer, in the sense measured here, is something that (1) shrinks the gap between
how well the network fits its training images and how well it does on unseen ones, and
(2) does it by making the training-time function noisy.

Experiment 1, the gap. All-CNN-C at the study's scale in four configurations, norm
none/torch x dropout off/on, ``ctx.seeds`` seeds each (Adam, the scale's lr, cosine).
Per epoch, from ``metrics.jsonl``:

    accuracy gap = train_acc - test_acc,        loss gap = test_loss - train_loss

where ``train_acc``/``train_loss`` are measured *in training mode during the epoch*, on
augmented images, with dropout active and BN on batch statistics. That number mixes the
fit with the noise, so after the run the final network is also evaluated in eval mode on
the un-augmented training subset (the checkpoint loaded into a fresh
:class:`~bnlab.train.Model`); the *eval-mode gap* is the one that answers the question.

Experiment 2, the noise. A fixed network in training mode: BN normalizes with the
statistics of whatever batch the image sits in, so one image's logits depend on its batch
mates. Each draw permutes a pool of training images (the training subset, capped) and cuts
it into batches of B, exactly as an epoch does; every image in the pool gets one sample per
draw. With the centred logits ``c = z - mean_k z`` (softmax ignores a shift) of N images,
K classes and D draws:

    noise^2  = mean_{i,k} var_d c[d,i,k]            (unbiased variance over draws)
    signal^2 = mean_{d,i,k} c[d,i,k]^2 - noise^2    (the mean logit's power, unbiased)
    relative std = noise / signal

and the *disagreement*, the chance that two draws give an image different predicted
classes. One forward runs many batches at once: :func:`grouped_train_forward` normalizes
each consecutive group of B images with that group's own statistics (exactly what B
separate forwards do; tested) and never calls the BN modules, so the running statistics
stay untouched. Beside it, the same measure for dropout without BN (the trained dropout
network in train mode, across random masks). Theory: the batch mean and variance of B
values scatter with a standard deviation ~ 1/sqrt(B), so BN's noise should fall like
B^(-1/2): the slope of log(relative std) against log(B) should be near -0.5.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bnlab import data as bdata
from bnlab.evidence.figures import color, save_figure
from bnlab.evidence.stats import compare_means, fmt_pct, fmt_pm, mean_std, verdict, verdict_phrase
from bnlab.studies.common import StudyContext, note_lines, read_summary, write_summary
from bnlab.train import (
    DivergenceError,
    Model,
    RunResult,
    TrainConfig,
    load_model,
    prepare_dataset,
    resolve_device,
)

__all__ = [
    "NAME",
    "TITLE",
    "evaluate_on_train_set",
    "fit_slope",
    "gap_curves",
    "grouped_train_forward",
    "logit_spread",
    "noise_samples",
    "render",
    "run",
]

NAME = "q1"
TITLE = "Q1 — Is BN a regularizer?"

# (key, norm, dropout, legend label): the 2 x 2 of the gap experiment
CONFIGS: tuple[tuple[str, str, bool, str], ...] = (
    ("none", "none", False, "no BN, no dropout"),
    ("dropout", "none", True, "no BN, dropout"),
    ("bn", "torch", False, "BN, no dropout"),
    ("bn_dropout", "torch", True, "BN + dropout"),
)
BATCH_SIZES = (4, 8, 16, 32, 64, 128, 256)  # of the noise measurement, clamped to the pool
NOISE_DRAWS = 2            # batch compositions (or dropout masks) per image and batch size
NOISE_POOL_CAP = 8192      # images of the training subset the noise is measured on, at most
THEORY_SLOPE = -0.5        # noise ~ B^(-1/2)
SLOPE_TOLERANCE = 0.15     # "roughly 1/sqrt(B)": the fitted slope within -0.5 ± this
CHUNK_IMAGES = 512         # images per forward call of the noise measurement
POST_CLAIM = ("BN regularizes as a side effect: like dropout it adds noise to training, "
              "and with BN (case b) the model reached a higher test accuracy with a lower "
              "train accuracy than without (case a), so BN \"really does help with "
              "generalization\".")


# ---- experiment 1: the generalization gap -------------------------------------------------

def gap_curves(metrics: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Per epoch: ``acc_gap`` = train_acc - test_acc, ``loss_gap`` = test_loss - train_loss.

    >>> gap_curves([{"epoch": 1, "train_acc": 0.6, "test_acc": 0.5,
    ...              "train_loss": 1.0, "test_loss": 1.5}])["loss_gap"]
    [0.5]
    """
    return {
        "epoch": [int(m["epoch"]) for m in metrics],
        "acc_gap": [m["train_acc"] - m["test_acc"] for m in metrics],
        "loss_gap": [m["test_loss"] - m["train_loss"] for m in metrics],
    }


@torch.no_grad()
def evaluate_on_train_set(run_dir: Path, dataset: bdata.CIFAR10) -> dict[str, float]:
    """Eval-mode accuracy and mean loss of a run's final network on ``dataset``'s training
    images, un-augmented (``dataset`` must be the run's training set, subset included:
    :func:`bnlab.train.prepare_dataset` makes it). BN uses its running statistics and
    dropout is off, as at test time."""
    model = load_model(run_dir, dataset.device)
    config = model.config
    as_test = dataclasses.replace(dataset, test_images=dataset.train_images,
                                  test_labels=dataset.train_labels)
    loss_sum, correct = 0.0, 0
    for x, y in bdata.test_batches(as_test, config.eval_batch_size,
                                   channels_last=config.channels_last, dtype=model.dtype):
        loss, right = model.evaluate(x, y)
        loss_sum += float(loss)
        correct += int(right)
    n = dataset.num_train
    return {"train_acc_eval": correct / n, "train_loss_eval": loss_sum / n}


# ---- experiment 2: the noise --------------------------------------------------------------

def _is_batch_norm(layer: nn.Module) -> bool:
    return isinstance(layer, nn.modules.batchnorm._NormBase)


def _group_batch_norm(x: Tensor, layer: nn.Module, group_size: int) -> Tensor:
    """Training-mode BN of ``x`` (G*B, C, H, W) where each consecutive group of
    B = group_size images is its own batch: per group and channel, over the m = B*H*W
    values,

        mu = mean(x),  var = mean((x - mu)^2)  (biased, as BN normalizes),
        y  = gamma * (x - mu) / sqrt(var + eps) + beta  =  x * scale + shift.

    The values of a group are read as a (G, B*H*W, C) view, which costs no copy when ``x``
    is channels_last (the training layout). The layer's parameters are read; its running
    statistics are neither used nor updated.
    """
    n, channels = x.shape[0], x.shape[1]
    if n % group_size:
        raise ValueError(f"{n} images do not split into groups of {group_size}")
    spatial = x.shape[2:]
    h = x.movedim(1, -1).reshape(n // group_size, -1, channels)    # (G, m, C)
    var, mu = torch.var_mean(h, dim=1, correction=0, keepdim=True)  # (G, 1, C) each
    scale = torch.rsqrt(var + layer.eps)
    if layer.weight is not None:
        scale = scale * layer.weight
    shift = -mu * scale
    if layer.bias is not None:
        shift = shift + layer.bias
    y = torch.addcmul(shift, h, scale)                              # (G, m, C)
    return y.reshape(n, *spatial, channels).movedim(-1, 1)          # (G*B, C, H, W)


def grouped_train_forward(module: nn.Sequential, x: Tensor, group_size: int) -> Tensor:
    """``module`` in training mode on ``x`` (G*B, ...), each consecutive group of
    B = group_size images one BN batch: the outputs G separate forwards of B images would
    give, in one call. BN layers are applied by :func:`_group_batch_norm` (their running
    statistics untouched); every other layer is called as it is, in training mode (so
    dropout draws masks from its generator)."""
    module.train()
    h = x
    for layer in module:
        h = _group_batch_norm(h, layer, group_size) if _is_batch_norm(layer) else layer(h)
    return h


@torch.no_grad()
def noise_samples(module: nn.Sequential, images: Tensor, batch_size: int, draws: int,
                  generator: torch.Generator, chunk: int = CHUNK_IMAGES) -> Tensor:
    """Outputs (draws, N, K) of ``module`` in training mode for each of the N ``images``,
    each draw in a fresh random batch composition.

    A draw permutes the N images and cuts them into batches of ``batch_size`` (the tail is
    filled up with the permutation's first images, whose second outputs are dropped), as an
    epoch does, so each image's batch mates are a uniform random set of the others. The
    permutations draw from ``generator``; dropout layers draw their masks from their own.
    """
    n = images.shape[0]
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch size {batch_size} needs 1..{n} images in the pool")
    per_call = max(1, chunk // batch_size) * batch_size
    outputs = []
    for _ in range(draws):
        perm = torch.randperm(n, generator=generator).to(images.device)
        padded = torch.cat([perm, perm[: (-n) % batch_size]])
        logits = torch.cat([grouped_train_forward(module, images[padded[i:i + per_call]],
                                                  batch_size)
                            for i in range(0, len(padded), per_call)])
        draw = torch.empty_like(logits[:n])
        draw[perm] = logits[:n]
        outputs.append(draw)
    return torch.stack(outputs)


def logit_spread(samples: Tensor, center: bool = True) -> dict[str, float]:
    """How much an image's outputs move across draws; ``samples`` is (D draws, N, K).

    ``relative_std`` = noise / signal with ``noise^2`` the mean over images and classes of
    the unbiased variance over draws and ``signal^2`` = mean square - noise^2 (the power
    of the mean output); ``center`` first subtracts each output's mean over the K classes
    (logits are defined up to a shift). ``disagreement`` is the fraction of pairs of draws
    in which an image's argmax differs.
    """
    if samples.ndim != 3 or samples.shape[0] < 2:
        raise ValueError(f"expected (draws >= 2, N, K) samples, got {tuple(samples.shape)}")
    s = samples.double()
    if center:
        s = s - s.mean(dim=-1, keepdim=True)
    noise_power = s.var(dim=0, correction=1).mean()
    signal_power = (s.pow(2).mean() - noise_power).clamp_min(1e-300)
    predicted = samples.argmax(dim=-1)  # (D, N)
    d = samples.shape[0]
    pairs = [(predicted[i] != predicted[j]).double().mean() for i in range(d)
             for j in range(i + 1, d)]
    return {"relative_std": math.sqrt(noise_power / signal_power),
            "noise_std": math.sqrt(noise_power), "signal_rms": math.sqrt(signal_power),
            "disagreement": float(torch.stack(pairs).mean())}


def fit_slope(batch_sizes: Sequence[float], values: Sequence[float]) -> float | None:
    """Least-squares slope of log(value) against log(batch size) (None under 2 points).

    >>> round(fit_slope([4, 16, 64], [1.0, 0.5, 0.25]), 6)
    -0.5
    """
    pairs = [(math.log(b), math.log(v)) for b, v in zip(batch_sizes, values, strict=True)
             if v is not None and v > 0]
    if len(pairs) < 2:
        return None
    mx = sum(x for x, _ in pairs) / len(pairs)
    my = sum(y for _, y in pairs) / len(pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    return sum((x - mx) * (y - my) for x, y in pairs) / sxx if sxx > 0 else None


def _noise_sweep(module: nn.Sequential, images: Tensor, batch_sizes: Sequence[int],
                 draws: int, seed: int) -> dict[str, list[float]]:
    """relative std and disagreement of ``module``'s logits at each batch size."""
    out: dict[str, list[float]] = {"relative_std": [], "disagreement": []}
    for b in batch_sizes:
        generator = torch.Generator().manual_seed(seed * 1009 + b)
        spread = logit_spread(noise_samples(module, images, b, draws, generator))
        out["relative_std"].append(spread["relative_std"])
        out["disagreement"].append(spread["disagreement"])
    return out


# ---- the study ----------------------------------------------------------------------------

def _train(ctx: StudyContext, name: str, config: TrainConfig) -> RunResult:
    """One run through ``ctx.train_run``; a divergence is recorded, not raised."""
    try:
        return ctx.train_run(name, config)
    except DivergenceError as error:
        return RunResult(ctx.out / "runs" / name, [], "diverged", str(error))


def _per_epoch_stats(rows: list[list[float]]) -> dict[str, list[float | None]]:
    """Mean and std per epoch over runs (lists of equal length)."""
    stats = [mean_std(column) for column in zip(*rows, strict=True)] if rows else []
    return {"mean": [s["mean"] for s in stats], "std": [s["std"] for s in stats]}


def run(ctx: StudyContext) -> dict:
    """Train the 2 x 2 (BN x dropout) over seeds, measure gaps and noise, write figures and
    summary.json; return the summary."""
    dataset = ctx.load_data()
    base = ctx.config()
    device = resolve_device(base.device)
    train_set = prepare_dataset(base, device, dataset)  # the subset every run trains on
    seeds = ctx.seed_list()

    configs: dict[str, Any] = {}
    run_dirs: dict[tuple[str, int], Path] = {}
    for key, norm, dropout, label in CONFIGS:
        per_seed, acc_rows, loss_rows = [], [], []
        for seed in seeds:
            result = _train(ctx, f"{key}/seed{seed}", ctx.config(norm=norm, dropout=dropout,
                                                                  seed=seed))
            entry: dict[str, Any] = {"seed": seed, "status": result.status}
            if result.status == "finished" and result.metrics:
                run_dirs[(key, seed)] = result.run_dir
                final = result.metrics[-1]
                entry.update({k: final[k] for k in ("train_acc", "test_acc", "train_loss",
                                                    "test_loss")})
                entry.update(evaluate_on_train_set(result.run_dir, train_set))
                entry["acc_gap_train_mode"] = final["train_acc"] - final["test_acc"]
                entry["acc_gap_eval"] = entry["train_acc_eval"] - final["test_acc"]
                entry["loss_gap_eval"] = final["test_loss"] - entry["train_loss_eval"]
                curves = gap_curves(result.metrics)
                acc_rows.append(curves["acc_gap"])
                loss_rows.append(curves["loss_gap"])
            else:
                entry["message"] = result.message
            per_seed.append(entry)
        done = [e for e in per_seed if e["status"] == "finished" and "test_acc" in e]
        final_keys = ("test_acc", "train_acc", "train_acc_eval", "test_loss", "train_loss_eval",
                      "acc_gap_train_mode", "acc_gap_eval", "loss_gap_eval")
        configs[key] = {
            "label": label, "norm": norm, "dropout": dropout, "runs": per_seed,
            "final": {k: mean_std([e[k] for e in done]) for k in final_keys},
            "curves": {"epoch": list(range(1, len(acc_rows[0]) + 1)) if acc_rows else [],
                       "acc_gap": _per_epoch_stats(acc_rows),
                       "loss_gap": _per_epoch_stats(loss_rows)},
        }

    noise = _measure_noise(ctx, train_set, run_dirs, seeds, device)

    gap_none = configs["none"]["final"]["acc_gap_eval"]
    gap_bn = configs["bn"]["final"]["acc_gap_eval"]
    gap_dropout = configs["dropout"]["final"]["acc_gap_eval"]
    bn_vs_none = compare_means(gap_bn, gap_none)
    dropout_vs_none = compare_means(gap_dropout, gap_none)
    test_bn_vs_none = compare_means(configs["bn"]["final"]["test_acc"],
                                    configs["none"]["final"]["test_acc"])
    train_bn_vs_none = compare_means(configs["bn"]["final"]["train_acc_eval"],
                                     configs["none"]["final"]["train_acc_eval"])
    slope = noise["bn_trained"]["slope"]
    slope_is_negative = compare_means(slope, {"mean": 0.0, "std": 0.0, "n": slope["n"]})
    within_theory = (slope["mean"] is not None
                     and abs(slope["mean"] - THEORY_SLOPE) <= SLOPE_TOLERANCE)
    noise_verdict = ("supported" if slope_is_negative["direction"] == "below"
                     else "contradicted" if slope_is_negative["direction"] == "above"
                     else "inconclusive")
    summary = {
        "study": NAME, "title": TITLE,
        "data": dataset.source, "preset": ctx.scale.name, "seeds": ctx.seeds,
        "seed_list": seeds,
        "settings": {"width": base.width, "epochs": base.epochs, "subset": base.subset,
                     "train_images": train_set.num_train, "test_images": train_set.num_test,
                     "batch_size": base.batch_size, "lr": base.lr, "optimizer": base.optimizer,
                     "lr_schedule": base.lr_schedule, "augment": base.augment},
        "configs": configs,
        "noise": noise,
        "post_claim": POST_CLAIM,
        "comparisons": {"gap_bn_vs_none": bn_vs_none, "gap_dropout_vs_none": dropout_vs_none,
                        "test_acc_bn_vs_none": test_bn_vs_none,
                        "train_acc_eval_bn_vs_none": train_bn_vs_none,
                        "slope_vs_zero": slope_is_negative},
        "verdicts": {
            # the post: BN shrinks the gap (gap with BN below the gap without)
            "gap": verdict(bn_vs_none["direction"], "below"),
            # the post: higher test accuracy with BN
            "test_acc": verdict(test_bn_vs_none["direction"], "above"),
            # a noise that shrinks with the batch size (slope below 0)
            "noise_shrinks": noise_verdict,
            "slope_within_theory": bool(within_theory),
        },
        "figures": {"gap": "q1_gap.png", "noise": "q1_noise.png"},
    }
    _plot_gap(summary, ctx.out / "q1_gap.png")
    _plot_noise(summary, ctx.out / "q1_noise.png")
    write_summary(ctx.out, summary)
    return summary


def _measure_noise(ctx: StudyContext, train_set: bdata.CIFAR10,
                   run_dirs: dict[tuple[str, int], Path], seeds: list[int],
                   device: torch.device) -> dict[str, Any]:
    """BN's noise vs batch size (trained BN nets, one per seed; an untrained one) and
    dropout's (trained dropout nets without BN)."""
    pool = min(train_set.num_train, NOISE_POOL_CAP)
    images = bdata.normalize(train_set.train_images[:pool], channels_last=True)
    sizes = sorted({*BATCH_SIZES, ctx.scale.batch_size})
    batch_sizes = [b for b in sizes if b <= pool]
    skipped = [b for b in sizes if b > pool]
    notes = [f"batch size {b} skipped: larger than the {pool} images of the pool"
             for b in skipped]
    ctx.log(f"[{ctx.out.name}] noise: batch sizes {batch_sizes} on {pool} images, "
            f"{NOISE_DRAWS} draws")

    trained = []
    for seed in seeds:
        if ("bn", seed) in run_dirs:
            module = load_model(run_dirs[("bn", seed)], device).module
            trained.append(_noise_sweep(module, images, batch_sizes, NOISE_DRAWS, seed))
    untrained_model = Model(ctx.config(norm="torch", dropout=False, seed=seeds[0]), device)
    untrained = _noise_sweep(untrained_model.module, images, batch_sizes, NOISE_DRAWS,
                             seeds[0])
    dropout = []
    for seed in seeds:
        if ("dropout", seed) in run_dirs:
            model = load_model(run_dirs[("dropout", seed)], device)
            model.dropout_generator.manual_seed(10_007 + seed)
            generator = torch.Generator().manual_seed(seed)
            samples = noise_samples(model.module, images, min(pool, CHUNK_IMAGES),
                                    NOISE_DRAWS, generator)
            dropout.append(logit_spread(samples))

    def over_seeds(sweeps: list[dict[str, list[float]]], key: str) -> list[dict[str, Any]]:
        return [mean_std([s[key][i] for s in sweeps]) for i in range(len(batch_sizes))]

    slopes = [fit_slope(batch_sizes, s["relative_std"]) for s in trained]
    at_training = (batch_sizes.index(ctx.scale.batch_size)
                   if ctx.scale.batch_size in batch_sizes else None)
    bn_rel = over_seeds(trained, "relative_std")
    dropout_rel = mean_std([d["relative_std"] for d in dropout])
    ratio = None
    if at_training is not None and bn_rel[at_training]["mean"] and dropout_rel["mean"]:
        ratio = bn_rel[at_training]["mean"] / dropout_rel["mean"]
    return {
        "batch_sizes": batch_sizes, "skipped_batch_sizes": skipped, "notes": notes,
        "pool_images": pool, "draws": NOISE_DRAWS, "training_batch_size": ctx.scale.batch_size,
        "theory_slope": THEORY_SLOPE, "slope_tolerance": SLOPE_TOLERANCE,
        "bn_trained": {"relative_std": bn_rel,
                       "disagreement": over_seeds(trained, "disagreement"),
                       "per_seed": trained, "slope": mean_std([s for s in slopes
                                                               if s is not None]),
                       "slope_per_seed": slopes,
                       "at_training_batch": bn_rel[at_training] if at_training is not None
                       else None},
        "bn_untrained": {"relative_std": untrained["relative_std"],
                         "disagreement": untrained["disagreement"],
                         "slope": fit_slope(batch_sizes, untrained["relative_std"]),
                         "seed": seeds[0]},
        "dropout_trained": {"relative_std": dropout_rel,
                            "disagreement": mean_std([d["disagreement"] for d in dropout]),
                            "per_seed": dropout},
        "bn_over_dropout_at_training_batch": ratio,
    }


# ---- figures ------------------------------------------------------------------------------

def _colors() -> dict[str, Any]:
    """A config's colour is its normalization's (the one palette); dropout is told by a
    dashed line (:data:`_STYLES`)."""
    return {key: color(norm) for key, norm, *_rest in CONFIGS}


_STYLES = {key: "--" if dropout else "-" for key, _norm, dropout, _label in CONFIGS}


def _plot_gap(summary: dict[str, Any], path: Path) -> None:
    """Accuracy gap and loss gap vs epoch, one line per config (mean ± std band over seeds),
    with the final eval-mode accuracy gap as a star."""
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    colors = _colors()
    for key, config in summary["configs"].items():
        epochs = config["curves"]["epoch"]
        if not epochs:
            continue
        for ax, name in ((ax_acc, "acc_gap"), (ax_loss, "loss_gap")):
            mean = config["curves"][name]["mean"]
            std = config["curves"][name]["std"]
            ax.plot(epochs, mean, _STYLES[key], color=colors[key], marker="o", ms=3, lw=1.8,
                    label=config["label"])
            ax.fill_between(epochs, [m - s for m, s in zip(mean, std, strict=True)],
                            [m + s for m, s in zip(mean, std, strict=True)],
                            color=colors[key], alpha=0.2, lw=0)
        final = config["final"]["acc_gap_eval"]
        if final["mean"] is not None:
            ax_acc.errorbar([epochs[-1] + 0.15], [final["mean"]], yerr=[final["std"]],
                            color=colors[key], marker="*", ms=11, capsize=3, ls="none")
    ax_acc.plot([], [], "k*", ls="none", ms=9, label="final, train acc in eval mode")
    n = summary["seeds"]
    ax_acc.set_title("accuracy gap: train acc (training mode, augmented) − test acc")
    ax_acc.set_ylabel("accuracy gap (fraction)")
    ax_loss.set_title("loss gap: test loss − train loss (training mode, augmented)")
    ax_loss.set_ylabel("loss gap (nats)")
    for ax in (ax_acc, ax_loss):
        ax.set_xlabel("epoch")
        ax.axhline(0.0, color="0.5", lw=0.8)
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_acc.legend(fontsize=8)
    fig.suptitle(f"Generalization gap with and without BN and dropout: All-CNN-C on "
                 f"{summary['settings']['train_images']} training images, mean ± std over "
                 f"{n} seed(s)", fontsize=10)
    save_figure(fig, path)


def _plot_noise(summary: dict[str, Any], path: Path) -> None:
    """BN's noise vs batch size (log-log) with dropout's as a band; disagreement beside."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    noise = summary["noise"]
    sizes = noise["batch_sizes"]
    fig, (ax_rel, ax_dis) = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    colors = _colors()
    trained = noise["bn_trained"]
    for ax, key in ((ax_rel, "relative_std"), (ax_dis, "disagreement")):
        stats = trained[key]
        if stats and stats[0]["mean"] is not None:
            ax.errorbar(sizes, [s["mean"] for s in stats], yerr=[s["std"] for s in stats],
                        color=colors["bn"], marker="o", capsize=3,
                        label="BN net, trained (training mode)")
        ax.plot(sizes, noise["bn_untrained"][key], color=colors["bn"], ls="--", marker="s",
                ms=4, alpha=0.7, label="BN net, untrained")
        drop = noise["dropout_trained"][key]
        if drop["mean"] is not None:
            ax.axhline(drop["mean"], color=colors["dropout"], lw=1.8,
                       label="dropout net without BN, trained (random masks)")
            ax.axhspan(drop["mean"] - drop["std"], drop["mean"] + drop["std"],
                       color=colors["dropout"], alpha=0.15, lw=0)
        ax.axvline(noise["training_batch_size"], color="0.5", ls=":", lw=1,
                   label="training batch size")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.set_xlabel("batch size B (images, log scale)")
        ax.grid(True, alpha=0.3, which="both")
    first = trained["relative_std"][0]["mean"] if trained["relative_std"] else None
    if first:
        ax_rel.plot(sizes, [first * math.sqrt(sizes[0] / b) for b in sizes], color="0.3",
                    lw=1, ls="-.", label="∝ 1/√B (theory)")
    ax_rel.set_yscale("log")
    ax_rel.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
    ax_rel.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
    ax_rel.set_ylabel("relative std of the logits across draws (noise / signal)")
    ax_rel.set_title("how much one image's logits move with its batch mates")
    ax_dis.set_ylabel("P(two draws predict different classes)")
    ax_dis.set_title("prediction disagreement between two draws")
    ax_rel.legend(fontsize=8)
    fig.suptitle(f"The noise BN injects vs batch size: {noise['pool_images']} training images, "
                 f"{noise['draws']} draws each; mean ± std over {summary['seeds']} seed(s)",
                 fontsize=10)
    save_figure(fig, path)


# ---- the section --------------------------------------------------------------------------


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render(study_dir: Path) -> str:
    """The Q1 section, drawn from ``summary.json`` alone."""
    s = read_summary(study_dir)
    st, cfg, noise, verdicts = s["settings"], s["configs"], s["noise"], s["verdicts"]
    cmp_ = s["comparisons"]
    n = s["seeds"]
    subset = f"{st['train_images']} training images" if st["subset"] else "all training images"
    lines = [
        f"## {TITLE}",
        "",
        f"Data: **{s['data']}**; preset `{s['preset']}`, {n} seed(s) per configuration. "
        f"All-CNN-C at width {st['width']}, {subset}, {st['test_images']} test images, "
        f"{st['epochs']} epochs, batch {st['batch_size']}, {st['optimizer']} at lr "
        f"{st['lr']:g} ({st['lr_schedule']}), augmentation {'on' if st['augment'] else 'off'}. "
        "Numbers are mean ± sample std over seeds.",
        "",
    ]
    bn, none, dropout = cfg["bn"]["final"], cfg["none"]["final"], cfg["dropout"]["final"]
    lines += [
        "**Answer.** " + _answer(s),
        "",
        "### Experiment 1: the generalization gap",
        "",
        "Four configurations (BN × dropout). The train accuracy that training logs "
        "(`metrics.jsonl`) is measured in training mode during the epoch — augmented images, "
        "dropout active, BN on batch statistics — so it mixes fit and noise. The final network "
        "was therefore also evaluated in eval mode on the un-augmented training images; the "
        "*eval-mode gap* (that train accuracy minus test accuracy) is the one that answers the "
        "question.",
        "",
        "| configuration | test acc | train acc (training mode) | train acc (eval mode) "
        "| gap, eval mode | gap, training mode | loss gap, eval mode (nats) |",
        "|---|---|---|---|---|---|---|",
    ]
    for config in cfg.values():
        f = config["final"]
        lines.append(f"| {config['label']} | {fmt_pct(f['test_acc'])} | "
                     f"{fmt_pct(f['train_acc'])} | "
                     f"{fmt_pct(f['train_acc_eval'])} | {fmt_pct(f['acc_gap_eval'])} | "
                     f"{fmt_pct(f['acc_gap_train_mode'])} | {fmt_pm(f['loss_gap_eval'], 3)} |")
    diverged = [f"{c['label']} seed {r['seed']}" for c in cfg.values() for r in c["runs"]
                if r["status"] != "finished"]
    if diverged:
        lines += ["", f"Not finished (left out of the means): {', '.join(diverged)}."]
    gap_cmp = cmp_["gap_bn_vs_none"]
    lines += [
        "",
        f"With BN alone the eval-mode gap is {fmt_pct(bn['acc_gap_eval'])} against "
        f"{fmt_pct(none['acc_gap_eval'])} without ({_direction_text(gap_cmp, 'points')}); "
        f"dropout alone gives {fmt_pct(dropout['acc_gap_eval'])} "
        f"({_direction_text(cmp_['gap_dropout_vs_none'], 'points')}). Test accuracy: "
        f"{fmt_pct(bn['test_acc'])} with BN, {fmt_pct(none['test_acc'])} without. A difference "
        "counts when it exceeds the sum of the two seed standard deviations.",
        "",
        f"![Generalization gap vs epoch for the four configurations: left, train accuracy "
        f"(training mode) minus test accuracy as a fraction; right, test loss minus train loss "
        f"in nats; x = epoch; bands are ± 1 std over {n} seed(s); stars mark the final gap with "
        f"the train accuracy measured in eval mode]({s['figures']['gap']})",
        "",
        "### Experiment 2: the noise BN injects",
        "",
        f"A fixed network in training mode: each of {noise['pool_images']} training images is "
        f"placed in {noise['draws']} random batch compositions (a random partition of the "
        "images into batches of B, as an epoch makes them; parameters and running statistics "
        "untouched). *Relative std* = the std of its centred logits across draws over their "
        "mean's RMS, averaged over images and classes; *disagreement* = the chance two draws "
        "predict different classes. Dropout without BN is measured the same way across "
        "random masks.",
        "",
        "| batch size B | BN, trained: relative std | BN, trained: disagreement "
        "| BN, untrained: relative std |",
        "|---|---|---|---|",
    ]
    trained = noise["bn_trained"]
    for i, b in enumerate(noise["batch_sizes"]):
        lines.append(f"| {b} | {fmt_pm(trained['relative_std'][i], 3)} | "
                     f"{fmt_pct(trained['disagreement'][i])} | "
                     f"{_num(noise['bn_untrained']['relative_std'][i])} |")
    drop = noise["dropout_trained"]
    lines += [
        "",
        f"Dropout without BN (trained, random masks): relative std "
        f"{fmt_pm(drop['relative_std'], 3)}, disagreement {fmt_pct(drop['disagreement'])}.",
    ]
    if trained["at_training_batch"] is not None and \
            noise["bn_over_dropout_at_training_batch"] is not None:
        lines.append("")
        lines.append(
            f"At the training batch size ({noise['training_batch_size']}) BN's relative std "
            f"is {fmt_pm(trained['at_training_batch'], 3)}, "
            f"{_num(noise['bn_over_dropout_at_training_batch'], 2)} times dropout's.")
    lines += note_lines(noise["notes"])
    slope = trained["slope"]
    lines += [
        "",
        f"Theory check: BN's noise should fall roughly like 1/√B, a slope of "
        f"{noise['theory_slope']} on log-log axes. Fitted slope of log(relative std) against "
        f"log(B): {fmt_pm(slope, 3)} for the trained network, "
        f"{_num(noise['bn_untrained']['slope'], 2)} for the untrained one — "
        + ("within" if verdicts["slope_within_theory"] else "outside")
        + f" ± {noise['slope_tolerance']} of the theory.",
        "",
        f"![BN's noise vs batch size: left, relative std of an image's logits across random "
        f"batch compositions (log y) against batch size B (images, log x), trained BN network "
        f"(mean ± std over {n} seed(s)) and untrained one, the 1/√B line of theory, and "
        f"dropout without BN as a horizontal band; right, the probability that two draws "
        f"predict different classes]({s['figures']['noise']})",
        "",
        "### The post's claim and the data",
        "",
        f"The post: {s['post_claim']}",
        "",
        f"- BN shrinks the generalization gap on its own (eval-mode gap, BN vs no BN, no "
        f"dropout): {fmt_pct(bn['acc_gap_eval'])} vs {fmt_pct(none['acc_gap_eval'])}. "
        + verdict_phrase(verdicts["gap"]),
        f"- BN gives a higher test accuracy: {fmt_pct(bn['test_acc'])} vs "
        f"{fmt_pct(none['test_acc'])}. " + verdict_phrase(verdicts["test_acc"]),
        f"- BN adds noise that shrinks with the batch size, like a regularizer whose strength "
        f"the batch size sets: slope {fmt_pm(slope, 3)}. "
        + verdict_phrase(verdicts["noise_shrinks"]),
    ]
    return "\n".join(lines) + "\n"


def _direction_text(comparison: dict[str, Any], unit: str) -> str:
    """``"lower by 3.1 points, beyond the seed spread of 1.2"`` and the like."""
    diff, spread = comparison["difference"], comparison["spread"]
    if diff is None:
        return "no finished runs to compare"
    size = f"{'higher' if diff > 0 else 'lower'} by {abs(diff) * 100:.1f} {unit}"
    if comparison["direction"] == "one seed":
        return f"{size}; one seed, so no spread to judge it by"
    where = "beyond" if comparison["direction"] in ("above", "below") else "within"
    return f"{size}, {where} the seed spread of {spread * 100:.1f}"


def _caveats(s: dict[str, Any]) -> list[str]:
    """What limits the gap comparison, decided from the numbers: unequal fits, and whether
    dropout (a regularizer by design) moves the gap at this scale."""
    cfg, cmp_ = s["configs"], s["comparisons"]
    out = []
    if cmp_["train_acc_eval_bn_vs_none"]["direction"] in ("above", "below"):
        out.append(
            f"The two networks fit their training images to different degrees (eval-mode "
            f"train accuracy {fmt_pct(cfg['bn']['final']['train_acc_eval'])} with BN, "
            f"{fmt_pct(cfg['none']['final']['train_acc_eval'])} without), so the gaps compare "
            "unequal fits: a network that has learned little has little gap to show.")
    if cmp_["gap_dropout_vs_none"]["direction"] == "below":
        out.append(
            f"Dropout, a regularizer by design, narrows the gap here "
            f"({fmt_pct(cfg['dropout']['final']['acc_gap_eval'])} vs "
            f"{fmt_pct(cfg['none']['final']['acc_gap_eval'])}), so this scale can show a "
            "regularizer at work.")
    else:
        out.append(
            f"Dropout, a regularizer by design, does not narrow the gap measurably either "
            f"({fmt_pct(cfg['dropout']['final']['acc_gap_eval'])} vs "
            f"{fmt_pct(cfg['none']['final']['acc_gap_eval'])}): at this scale the networks are "
            "far from memorizing their training images, so there is little gap for any "
            "regularizer to close, and the gap cannot decide the question.")
    return out


def _answer(s: dict[str, Any]) -> str:
    """The answer paragraph, chosen by the verdicts."""
    verdicts, noise = s["verdicts"], s["noise"]
    gap = {"supported": "BN alone narrows the gap between train and test accuracy",
           "contradicted": "BN alone widens the gap between train and test accuracy",
           "inconclusive": "BN alone does not measurably change the gap between train and "
                           "test accuracy"}[verdicts["gap"]]
    noise_text = {"supported": "it does inject noise that falls as the batch grows",
                  "contradicted": "its noise does not fall as the batch grows",
                  "inconclusive": "whether its noise falls with the batch size is not "
                                  "resolved"}[verdicts["noise_shrinks"]]
    slope = noise["bn_trained"]["slope"]
    theory = ("close to" if verdicts["slope_within_theory"] else "unlike")
    return " ".join([
        f"At this scale {gap} (eval-mode gap "
        f"{fmt_pct(s['configs']['bn']['final']['acc_gap_eval'])} with BN, "
        f"{fmt_pct(s['configs']['none']['final']['acc_gap_eval'])} without), and {noise_text} "
        f"(slope {fmt_pm(slope, 3)} on log-log axes, {theory} the {noise['theory_slope']} of "
        "1/√B).",
        *_caveats(s),
    ])
