"""Q4: internal covariate shift, measured two ways, with and without BN.

Internal covariate shift (ICS; Ioffe & Szegedy 2015) is the change in the distribution of
a layer's input while the layers before it learn. The post defines it so and says BN
"limits the internal co-variate shift by normalizing the data over and over again". Two
measurements answer whether it does, on All-CNN-C trained with and without BN (the
default-convention ``torch.nn.BatchNorm2d``), from the same seeds:

1. **The distribution** (Ioffe & Szegedy 2015, Fig. 1). Every few steps a fixed batch of
   training images (not augmented) goes through the network and the input of ``relu2``,
   ``relu5`` and ``relu8`` (after BN where there is one) is recorded as the 15th, 50th and
   85th percentile of each channel, averaged over channels (:func:`relu_input_percentiles`).
   BN runs in training mode (it normalizes with the probe batch's own statistics, as it
   does in training); its running buffers are saved and restored, so the probe leaves the
   run untouched. Summary: the *drift* (:func:`percentile_drift`), how far a percentile
   moves from its value at step 0, in units of the mean 15-85 spread.

2. **The gradient's response to the earlier layers' step** (Santurkar et al. 2018,
   Definition 2.1). At step t, on a batch B: ``G`` is the gradient of layer i's weights;
   the optimizer's own step is applied to layers 1..i-1 only (a deep copy of the model and
   of its Adam state, so the update is exactly the one the optimizer makes, moments
   included); ``G'`` is the gradient of layer i's weights on the same batch after that.
   ``||G - G'|| / ||G||`` and ``cos(G, G')`` measure how much the earlier layers' update
   changes what layer i should do (:func:`gradient_shift`). Santurkar et al. found that BN
   does not reduce ICS in this sense (their BN networks often showed more).

Training runs go through :meth:`StudyContext.train_run`; the measurements are taken by
its ``on_step`` hook and appended to ``probes.jsonl`` in each run folder (one line per
step, the last line of a step wins), so a finished run is reused with its measurements
and an interrupted one resumes and re-measures the steps it replays.
"""

from __future__ import annotations

import copy
import math
import re
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from bnlab import data as bdata
from bnlab.bnstats import batch_mode
from bnlab.evidence.figures import mean_band, new_figure, save_figure
from bnlab.evidence.stats import fmt_pm, mean_std, plural, relation
from bnlab.studies.common import ProbeLog, StudyContext, note_lines, read_summary, write_summary
from bnlab.train import Model, TrainConfig, prepare_dataset, resolve_device

NAME = "q4"
TITLE = "Q4 — What is internal covariate shift, and does BN reduce it?"

LAYERS: tuple[int, ...] = (2, 5, 8)           # relu2/conv2, relu5/conv5, relu8/conv8
PERCENTILES: tuple[float, ...] = (15.0, 50.0, 85.0)  # Ioffe & Szegedy's Fig. 1
NORMS: dict[str, str] = {"none": "no BN", "torch": "BN"}  # TrainConfig.norm -> label
PROBE_IMAGES = 128          # the fixed probe batch of the percentile measurement
PERCENTILE_SAMPLE = 16384   # values per channel the percentiles are taken over (fixed ones)
PERCENTILE_POINTS = 48      # about this many percentile probes per run
SHIFT_POINTS = 24           # about this many gradient-shift measurements per run
_PROBE_SEED, _SHIFT_SEED = 4242, 7919

__all__ = [
    "LAYERS",
    "NAME",
    "PERCENTILES",
    "TITLE",
    "ProbeLog",
    "channel_percentiles",
    "gradient_shift",
    "percentile_drift",
    "relu_input_percentiles",
    "render",
    "run",
]


# ---- measurements ------------------------------------------------------------------------

def channel_percentiles(x: Tensor, q: Sequence[float] = PERCENTILES,
                        max_values: int | None = None) -> list[float]:
    """Percentiles ``q`` (0-100) of each channel of ``x`` (N, C, ...), averaged over channels.

    Per channel, over the N * H * W values, with linear interpolation between order
    statistics (``torch.quantile``'s default), computed by sorting so any size works. With
    ``max_values``, over that many of the N * H * W positions only, the same ones at every
    call for a given shape (a seeded choice): sorting all of them dominated the probe's cost.
    """
    channels = x.shape[1]
    values = x.detach().transpose(0, 1).reshape(channels, -1)
    if max_values is not None and values.shape[1] > max_values:
        g = torch.Generator().manual_seed(values.shape[1])
        keep = torch.randperm(values.shape[1], generator=g)[:max_values].to(values.device)
        values = values[:, keep]
    values = values.float().sort(dim=1).values
    n = values.shape[1]
    out = []
    for percent in q:
        position = percent / 100.0 * (n - 1)
        low = math.floor(position)
        frac = position - low
        high = min(low + 1, n - 1)
        per_channel = values[:, low] + (values[:, high] - values[:, low]) * frac
        out.append(per_channel.mean().item())
    return out



@torch.no_grad()
def relu_input_percentiles(module: nn.Module, images: Tensor, layers: Sequence[int] = LAYERS,
                           q: Sequence[float] = PERCENTILES,
                           max_values: int | None = PERCENTILE_SAMPLE) -> dict[str, list[float]]:
    """The input of ``relu{i}`` for each i in ``layers`` on ``images``: its channel-averaged
    percentiles ``q`` (:func:`channel_percentiles` over at most ``max_values`` fixed
    positions per channel), keyed by ``str(i)``.

    Read by forward pre-hooks (before the in-place ReLU overwrites its input), with BN in
    training mode and its running buffers restored afterwards (:func:`bnlab.bnstats.batch_mode`).
    """
    found: dict[str, list[float]] = {}
    handles = []
    for i in layers:
        relu = getattr(module, f"relu{i}")
        handles.append(relu.register_forward_pre_hook(
            lambda _m, args, key=str(i): found.__setitem__(
                key, channel_percentiles(args[0], q, max_values))))
    try:
        with batch_mode(module):
            module(images)
    finally:
        for handle in handles:
            handle.remove()
    return found


def _layer_of(parameter_name: str) -> int | None:
    """``conv5.weight`` and ``bn5.bias`` belong to layer 5; None for names without a number."""
    match = re.match(r"^[A-Za-z_]+(\d+)\.", parameter_name)
    return int(match.group(1)) if match else None


def gradient_shift(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    layers: Sequence[int] = LAYERS,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = TF.cross_entropy,
) -> dict[str, dict[str, float]]:
    """Santurkar et al.'s internal covariate shift of ``conv{i}.weight`` for i in ``layers``.

    With W_1..W_k the layers' parameters at step t and (x, y) the batch::

        G  = grad_{W_i} L(W_1,      ..., W_{i-1},      W_i, ..., W_k; x, y)
        G' = grad_{W_i} L(W_1 + d_1, ..., W_{i-1} + d_{i-1}, W_i, ..., W_k; x, y)

    where d_j is the step ``optimizer`` takes for layer j from the gradient on (x, y) (its
    state -- Adam's moments, the step count, the learning rate -- is copied, so d_j is the
    exact update, not an SGD approximation). A parameter belongs to layer j when its name
    is ``<letters>j.`` (``conv3.weight``, ``bn3.bias``). BN is in training mode, dropout
    off. Returns ``{str(i): {"rel_diff": ||G - G'|| / ||G||, "cosine": cos(G, G')}}``;
    ``module`` and ``optimizer`` are left untouched (the work is done on deep copies).
    """
    twin, twin_optimizer = copy.deepcopy((module, optimizer))
    params = dict(twin.named_parameters())
    weights = {i: params[f"conv{i}.weight"] for i in layers}
    out: dict[str, dict[str, float]] = {}
    with batch_mode(twin):
        for p in params.values():
            p.grad = None
        loss_fn(twin(x), y).backward()
        before_grad = {i: w.grad.detach().clone() for i, w in weights.items()}
        before = {n: p.detach().clone() for n, p in params.items()}
        twin_optimizer.step()
        after = {n: p.detach().clone() for n, p in params.items()}
        for i in layers:
            with torch.no_grad():
                for n, p in params.items():
                    layer = _layer_of(n)
                    p.copy_(after[n] if layer is not None and layer < i else before[n])
            for p in params.values():
                p.grad = None
                p.requires_grad_(p is weights[i])  # autograd stops at layer i
            loss_fn(twin(x), y).backward()
            g, g2 = before_grad[i].double().flatten(), weights[i].grad.double().flatten()
            norm, norm2 = g.norm().item(), g2.norm().item()
            out[str(i)] = {
                "rel_diff": (g - g2).norm().item() / norm if norm > 0 else float("nan"),
                "cosine": (g @ g2).item() / (norm * norm2) if norm * norm2 > 0 else float("nan"),
            }
    return out


def percentile_drift(series: Sequence[Sequence[float]]) -> float:
    """How far the percentiles move: ``max_t max_j |p_j(t) - p_j(0)|`` over the mean spread
    ``p_last(t) - p_first(t)`` (the 15-85 range). 0 for a still distribution; 1 when it
    moves by its own width.

    >>> percentile_drift([[-1.0, 0.0, 1.0], [0.0, 1.0, 2.0]])
    0.5
    """
    p = torch.tensor(series, dtype=torch.float64)
    spread = (p[:, -1] - p[:, 0]).mean().item()
    move = (p - p[0]).abs().max().item()
    return move / spread if spread > 0 else float("nan")


# ---- measurements in a training run -------------------------------------------------------

def _train_images(dataset: bdata.CIFAR10, index: Tensor, config: TrainConfig) -> Tensor:
    return bdata.normalize(dataset.train_images[index], channels_last=config.channels_last)


class _Probe:
    """The ``on_step`` hook of one run: percentiles every ``pct_every`` steps, the gradient
    shift every ``shift_every`` steps (global step = (epoch - 1) * steps_per_epoch + step),
    and both for the initial weights (step 0) before the first."""

    def __init__(self, config: TrainConfig, dataset: bdata.CIFAR10, log: ProbeLog,
                 steps_per_epoch: int, pct_every: int, shift_every: int) -> None:
        self.config, self.dataset, self.log = config, dataset, log
        self.steps_per_epoch, self.pct_every, self.shift_every = (
            steps_per_epoch, pct_every, shift_every)
        g = torch.Generator().manual_seed(_PROBE_SEED)
        index = torch.randperm(dataset.num_train, generator=g)[:PROBE_IMAGES]
        self.probe = _train_images(dataset, index.to(dataset.device), config)

    def shift_batch(self, step: int) -> tuple[Tensor, Tensor]:
        """Batch B of the gradient shift at ``step``: a seeded draw of training images."""
        g = torch.Generator().manual_seed(_SHIFT_SEED * 1_000_003 + self.config.seed * 65_537
                                          + step)
        index = torch.randperm(self.dataset.num_train, generator=g)[:self.config.batch_size]
        index = index.to(self.dataset.device)
        return _train_images(self.dataset, index, self.config), self.dataset.train_labels[index]

    def measure(self, model: Model, step: int) -> None:
        record: dict[str, Any] = {"step": step}
        if step % self.pct_every == 0:
            record["percentiles"] = relu_input_percentiles(model.module, self.probe)
        if step % self.shift_every == 0:
            x, y = self.shift_batch(step)
            record["shift"] = gradient_shift(model.module, model.optimizer, x, y)
        if len(record) > 1:
            self.log.append(record)

    def __call__(self, model: Model, epoch: int, step: int) -> None:
        global_step = (epoch - 1) * self.steps_per_epoch + step
        if global_step == 1:
            self.measure(Model(self.config, model.device), 0)
        self.measure(model, global_step)


def _every(total: int, points: int) -> int:
    return max(1, total // points)


def _collect(records: dict[int, dict[str, Any]], key: str, every: int, total: int,
             where: Path) -> tuple[list[int], list[dict[str, Any]]]:
    steps = list(range(0, total + 1, every))
    missing = [s for s in steps if key not in records.get(s, {})]
    if missing:
        raise RuntimeError(f"{where} lacks the '{key}' measurements of steps {missing[:5]}"
                           f"{'...' if len(missing) > 5 else ''}: the run was trained without "
                           f"the Q4 probes; delete that run folder and run the study again")
    return steps, [records[s][key] for s in steps]


# ---- the study ---------------------------------------------------------------------------

def run(ctx: StudyContext) -> dict:
    """Train without and with BN (``ctx.seeds`` seeds each) with both probes; write the
    figures and summary.json; return the summary."""
    dataset = ctx.load_data()
    n_train = ctx.train_images()
    notes: list[str] = []
    batch_size, steps_per_epoch, total = ctx.schedule(notes)
    pct_every, shift_every = _every(total, PERCENTILE_POINTS), _every(total, SHIFT_POINTS)

    curves: dict[str, dict[str, Any]] = {}
    final_acc: dict[str, list[float]] = {}
    for norm in NORMS:
        curves[norm] = {"percentiles": {str(i): [] for i in LAYERS},
                        "rel_diff": {str(i): [] for i in LAYERS},
                        "cosine": {str(i): [] for i in LAYERS}}
        final_acc[norm] = []
        for seed in ctx.seed_list():
            name = f"{norm}-seed{seed}"
            config = ctx.config(norm=norm, seed=seed, case=f"q4-{norm}", batch_size=batch_size)
            run_dir = ctx.out / "runs" / name
            log = ProbeLog(run_dir / "probes.jsonl")
            data = prepare_dataset(config, resolve_device(config.device), dataset)
            probe = _Probe(config, data, log, steps_per_epoch, pct_every, shift_every)
            result = ctx.train_run(name, config, on_step=probe)
            final_acc[norm].append(result.final_test_acc)
            records = log.read()
            pct_steps, pct = _collect(records, "percentiles", pct_every, total, log.path)
            shift_steps, shift = _collect(records, "shift", shift_every, total, log.path)
            for i in map(str, LAYERS):
                curves[norm]["percentiles"][i].append([p[i] for p in pct])
                curves[norm]["rel_diff"][i].append([s[i]["rel_diff"] for s in shift])
                curves[norm]["cosine"][i].append([s[i]["cosine"] for s in shift])
        curves[norm]["percentile_steps"] = pct_steps
        curves[norm]["shift_steps"] = shift_steps

    summary: dict[str, Any] = {
        "data": dataset.source, "preset": ctx.scale.name, "seeds": ctx.seeds,
        "width": ctx.scale.width, "epochs": ctx.scale.epochs, "train_images": n_train,
        "batch_size": batch_size, "lr": ctx.scale.lr, "steps_per_epoch": steps_per_epoch,
        "total_steps": total, "layers": list(LAYERS), "percentiles": list(PERCENTILES),
        "probe_images": min(PROBE_IMAGES, n_train), "percentile_every": pct_every,
        "percentile_sample": PERCENTILE_SAMPLE,
        "shift_every": shift_every, "norms": NORMS, "notes": notes, "curves": curves,
        "final_test_acc": {norm: mean_std(v) for norm, v in final_acc.items()},
    }
    summary.update(_statistics(curves))
    summary["verdicts"] = _verdicts(summary)
    _plot_percentiles(summary, ctx.out / "q4_percentiles.png")
    _plot_shift(summary, ctx.out / "q4_gradient_shift.png")
    write_summary(ctx.out, summary)
    return summary


def _statistics(curves: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per norm and layer, over seeds: the percentile drift, and the gradient shift as the
    median of the run's measurements (robust to the large first steps from the initial
    weights); "all" averages the layers of each seed first."""
    drift: dict[str, dict[str, Any]] = {}
    shift: dict[str, dict[str, Any]] = {}
    for norm, c in curves.items():
        per_seed_drift = {i: [percentile_drift(s) for s in c["percentiles"][i]]
                          for i in c["percentiles"]}
        drift[norm] = {i: mean_std(v) for i, v in per_seed_drift.items()}
        drift[norm]["all"] = mean_std(_layer_means(per_seed_drift))
        shift[norm] = {}
        for measure in ("rel_diff", "cosine"):
            per_seed = {i: [statistics.median(s) for s in c[measure][i]] for i in c[measure]}
            stats = {i: mean_std(v) for i, v in per_seed.items()}
            stats["all"] = mean_std(_layer_means(per_seed))
            shift[norm][measure] = stats
    return {"drift": drift, "shift": shift}


def _layer_means(per_layer: dict[str, list[float]]) -> list[float]:
    """Per seed, the mean over layers of ``{layer: [value per seed]}``."""
    columns = list(zip(*per_layer.values(), strict=True))
    return [sum(c) / len(c) for c in columns]


_VERDICT_TEXT = {
    "support": "The data support it",
    "contradict": "The data contradict it",
    "inconclusive": "Inconclusive at this scale",
}


def _verdicts(summary: dict[str, Any]) -> dict[str, str]:
    """Each claim against the numbers: "support", "contradict" or "inconclusive"."""
    drift = relation(summary["drift"]["torch"]["all"], summary["drift"]["none"]["all"])
    grad = relation(summary["shift"]["torch"]["rel_diff"]["all"],
                   summary["shift"]["none"]["rel_diff"]["all"])
    to_post = {"lower": "support", "higher": "contradict"}
    # Santurkar et al.: BN does *not* reduce ICS in the gradient sense.
    to_santurkar = {"lower": "contradict", "higher": "support", "within": "support"}
    return {
        "drift_comparison": drift,
        "gradient_comparison": grad,
        "cosine_comparison": relation(summary["shift"]["torch"]["cosine"]["all"],
                                     summary["shift"]["none"]["cosine"]["all"]),
        "post_distribution": to_post.get(drift, "inconclusive"),
        "post_gradient": to_post.get(grad, "inconclusive"),
        "santurkar": to_santurkar.get(grad, "inconclusive"),
    }


# ---- figures -----------------------------------------------------------------------------

def _plot_percentiles(summary: dict[str, Any], path: Path) -> None:
    layers, q = summary["layers"], summary["percentiles"]
    fig, axes = new_figure(len(summary["norms"]), len(layers), (4.2 * len(layers), 6.4))
    colors = {0: "tab:blue", 1: "black", 2: "tab:red"}
    for row, (norm, label) in enumerate(summary["norms"].items()):
        c = summary["curves"][norm]
        for col, i in enumerate(layers):
            ax = axes[row][col]
            runs = c["percentiles"][str(i)]  # seed -> step -> [p15, p50, p85]
            for j, percent in enumerate(q):
                mean_band(ax, c["percentile_steps"], [[p[j] for p in r] for r in runs],
                      colors.get(j, f"C{j}"), f"{percent:g}th percentile",
                      "-" if j == len(q) // 2 else "--")
            ax.set_title(f"{label}: input of relu{i}")
            ax.set_xlabel("training step")
            ax.set_ylabel("pre-activation value (a.u.)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"Q4: distribution of ReLU inputs during training, no BN vs BN "
                 f"(percentiles over a fixed batch of {summary['probe_images']} training "
                 f"images; mean ± std over {summary['seeds']} seeds)", fontsize=10)
    save_figure(fig, path)


def _plot_shift(summary: dict[str, Any], path: Path) -> None:
    layers = summary["layers"]
    fig, axes = new_figure(2, len(layers), (4.2 * len(layers), 6.4))
    for col, i in enumerate(layers):
        for k, (norm, label) in enumerate(summary["norms"].items()):
            c = summary["curves"][norm]
            mean_band(axes[0][col], c["shift_steps"], c["rel_diff"][str(i)], f"C{k}", label,
                  band="range")
            mean_band(axes[1][col], c["shift_steps"], c["cosine"][str(i)], f"C{k}", label)
        axes[0][col].set_yscale("log")
        axes[0][col].set_ylabel("||G - G'|| / ||G|| (ratio, log scale)")
        axes[1][col].set_ylabel("cos(G, G') (cosine)")
        axes[0][col].set_title(f"conv{i}.weight: relative gradient change")
        axes[1][col].set_title(f"conv{i}.weight: cosine of G and G'")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("Q4: Santurkar et al.'s internal covariate shift, no BN vs BN: the change of "
                 "a layer's weight gradient when the layers before it take their optimizer "
                 f"step (mean over {summary['seeds']} seeds; band: range over seeds (top), "
                 "± std (bottom))", fontsize=10)
    save_figure(fig, path)


# ---- the section -------------------------------------------------------------------------

def render(study_dir: Path) -> str:
    """The Markdown section, from summary.json alone."""
    s = read_summary(study_dir)
    v = s["verdicts"]
    layers = s["layers"]
    q = ", ".join(f"{p:g}th" for p in s["percentiles"])
    none, bn = s["norms"]["none"], s["norms"]["torch"]
    lines = [
        f"## {TITLE}",
        "",
        "Internal covariate shift is the change in the distribution of a layer's inputs "
        "while the layers before it are trained (Ioffe & Szegedy 2015). Measured here on "
        f"All-CNN-C at width {s['width']:g}, {s['train_images']} training images of "
        f"{s['data']}, {plural(s['epochs'], 'epoch')} of "
        f"{plural(s['steps_per_epoch'], 'step')} (batch "
        f"{s['batch_size']}, Adam, peak lr {s['lr']:g}, cosine schedule), without BN and with "
        f"PyTorch's BN, {plural(s['seeds'], 'seed')} each; numbers are mean ± std over seeds.",
        "",
        "**The post's claim.** The post defines internal covariate shift as the change in "
        "the distribution of the data within the inner layers, and says BN limits it by "
        "normalizing the data over and over again.",
        "",
        "### The distribution of the ReLU inputs (Ioffe & Szegedy's Fig. 1)",
        "",
        f"Every {plural(s['percentile_every'], 'step')} a fixed batch of "
        f"{s['probe_images']} training images (not augmented) goes through the network; "
        f"the {q} percentiles of each channel of a ReLU's input (over at most "
        f"{s['percentile_sample']} fixed image positions per channel) are averaged over "
        "channels. BN is in training mode (normalizing with the probe batch's statistics, "
        "as in training) and its running buffers are restored after the probe. *Drift* is "
        "the largest move of a percentile from its value at step 0, in units of the mean "
        "distance between the outer two "
        "percentiles. With BN the mean and spread of each channel over the batch are set "
        "by BN's scale and shift (gamma, beta), so its input can move only as fast as those "
        "two parameters learn and as its shape changes.",
        "",
        f"| layer | drift, {none} | drift, {bn} |",
        "|---|---|---|",
    ]
    for i in [*map(str, layers), "all"]:
        name = f"relu{i}" if i != "all" else "mean over layers"
        lines.append(f"| {name} | {fmt_pm(s['drift']['none'][i], 2)} | "
                     f"{fmt_pm(s['drift']['torch'][i], 2)} |")
    d_none, d_bn = s["drift"]["none"]["all"], s["drift"]["torch"]["all"]
    lines += [
        "",
        f"Averaged over layers, the ReLU inputs drift by {fmt_pm(d_none, 2)} spreads without "
        f"BN and by {fmt_pm(d_bn, 2)} with BN: {_comparison_words(v['drift_comparison'])}. "
        f"In this distributional sense: {_VERDICT_TEXT[v['post_distribution']]}.",
        "",
        f"![Percentiles ({q}) of the input of {', '.join(f'relu{i}' for i in layers)} on a "
        "fixed batch of training images vs training step, top row without BN, bottom row "
        "with BN; y: pre-activation value (arbitrary units), x: training step; bands: ± std "
        "over seeds](q4_percentiles.png)",
        "",
        "### How much the earlier layers' step changes a layer's gradient (Santurkar et al. "
        "2018)",
        "",
        f"Every {plural(s['shift_every'], 'step')}, on a seeded batch of "
        f"{s['batch_size']} training images: G is the gradient of conv*i*'s weights; the "
        "optimizer's own step (Adam, from a deep copy of its state, so exactly the update "
        "it would make) is applied to layers 1..*i*-1 only; G' is the same gradient after "
        "that step. Each run is summarized by the median over its measurements (the first "
        "steps from the initial weights are much larger than the rest). Santurkar et al.'s "
        "finding: BN does not reduce internal covariate shift in this sense, and their BN "
        "networks often showed more of it.",
        "",
        f"| layer | ‖G−G'‖/‖G‖, {none} | ‖G−G'‖/‖G‖, {bn} | cos(G, G'), {none} | "
        f"cos(G, G'), {bn} |",
        "|---|---|---|---|---|",
    ]
    sh_none, sh_bn = s["shift"]["none"], s["shift"]["torch"]
    for i in [*map(str, layers), "all"]:
        name = f"conv{i}" if i != "all" else "mean over layers"
        lines.append(
            f"| {name} | {fmt_pm(sh_none['rel_diff'][i], 4)} | {fmt_pm(sh_bn['rel_diff'][i], 4)}"
            f" | {fmt_pm(sh_none['cosine'][i], 4)} | {fmt_pm(sh_bn['cosine'][i], 4)} |")
    lines += [
        "",
        f"Averaged over the layers (median over the run), ‖G−G'‖/‖G‖ is "
        f"{fmt_pm(sh_none['rel_diff']['all'], 4)} without BN and "
        f"{fmt_pm(sh_bn['rel_diff']['all'], 4)} with BN: "
        f"{_comparison_words(v['gradient_comparison'])}; cos(G, G') is "
        f"{fmt_pm(sh_none['cosine']['all'], 4)} without BN and "
        f"{fmt_pm(sh_bn['cosine']['all'], 4)} with BN: "
        f"{_comparison_words(v['cosine_comparison'])}. Against Santurkar et al.'s finding: "
        f"{_VERDICT_TEXT[v['santurkar']]}. Against the post's claim, in this sense: "
        f"{_VERDICT_TEXT[v['post_gradient']]}.",
        "",
        f"![Santurkar et al.'s internal covariate shift of "
        f"{', '.join(f'conv{i}' for i in layers)} vs training "
        "step, without and with BN; top: relative change of the weight gradient "
        "‖G−G'‖/‖G‖ (ratio, log scale; band: range over seeds), bottom: cosine of G and G' "
        "(band: ± std over seeds)](q4_gradient_shift.png)",
        "",
        f"**Answer.** Internal covariate shift is the change in a layer's input distribution "
        f"as earlier layers learn. Whether BN reduces it depends on what is measured: the "
        f"distribution of the ReLU inputs drifts {fmt_pm(d_none, 2)} spreads without BN and "
        f"{fmt_pm(d_bn, 2)} with BN; the change of a layer's gradient caused by the earlier "
        f"layers' update is {fmt_pm(sh_none['rel_diff']['all'], 4)} without BN and "
        f"{fmt_pm(sh_bn['rel_diff']['all'], 4)} with BN. Final test accuracy of these runs: "
        f"{fmt_pm(s['final_test_acc']['none'], 3)} without BN, "
        f"{fmt_pm(s['final_test_acc']['torch'], 3)} with BN.",
    ]
    lines += note_lines(s.get("notes", []))
    return "\n".join(lines) + "\n"


def _comparison_words(comparison: str) -> str:
    return {
        "lower": "lower with BN, by more than the seed spread",
        "higher": "higher with BN, by more than the seed spread",
        "within": "the difference is within the seed spread",
        "undetermined": "one seed gives no spread to judge the difference by",
    }[comparison]
