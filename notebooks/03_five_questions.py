# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3. The post's five questions, each with a small live experiment
#
# The post asks: **Q1** does BN act as a regularizer? **Q2** what does it buy? **Q3** what
# does it cost? **Q4** what is (internal) covariate shift? **Q5** what are exponentially
# weighted averages? Here each question gets one small experiment that runs live, its
# figure, and a pointer to the full study (`bnlab study qN`), which answers it with several
# seeds, confidence intervals and a verdict (*supported*, *contradicted* or *inconclusive*).
#
# **What you will learn**: how to *measure* each claim — the noise BN injects and how it
# scales with the batch size (Q1); what BN does to the learning rate a network tolerates
# (Q2); how BN fails with small batches, and what it costs in time (Q3); how a layer's input
# distribution moves during training with and without BN (Q4); why the running averages
# need a bias correction early in training (Q5).
#
# **Run time**: about a minute on a 2-core CPU (the training runs are 30-40 steps each). The
# experiments are deliberately tiny — All-CNN-C at width 0.125, 1,024 images of the CIFAR-10
# sample bnlab carries, one seed — so read them as demonstrations of the method, not as
# answers: one seed cannot tell a real difference from luck. That is what the studies do.

# %%
import copy
import math
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as TF

from bnlab import functional as F
from bnlab.data import load_embedded_sample, normalize, train_batches
from bnlab.models import AllCNNC
from bnlab.nn import BatchNorm2d

# Small tensors: a second intra-op thread buys little, and on a busy machine it spin-waits.
torch.set_num_threads(1)
torch.manual_seed(0)

WIDTH, BATCH_SIZE, STEPS = 0.125, 32, 40
dataset = load_embedded_sample()  # offline: 5,085 train / 1,017 test images
train_set = dataset.subset(1024, seed=0)
test_images, test_labels = normalize(dataset.test_images), dataset.test_labels  # all 1,017


def make_model(norm: str, seed: int = 0) -> AllCNNC:
    """All-CNN-C with norm "none", "torch" (torch.nn.BatchNorm2d) or "bnlab"; same init per seed."""
    return AllCNNC(norm=norm, width=WIDTH, generator=torch.Generator().manual_seed(seed))


def fit(model: torch.nn.Module, lr: float, steps: int = STEPS, *, seed: int = 0,
        probe=None, probe_every: int = 10) -> list[float]:
    """Adam on shuffled batches of the training subset; returns the loss of every step.

    ``probe(model, step)`` is called every ``probe_every`` steps and after the last. A loss
    that stops being finite ends the run (the rest of the curve is NaN): it diverged.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    batches, losses = iter(()), []
    for step in range(steps):
        if probe is not None and step % probe_every == 0:
            probe(model, step)
        images_labels = next(batches, None)
        if images_labels is None:  # a new epoch
            batches = train_batches(train_set, BATCH_SIZE, generator=generator, augment=False)
            images_labels = next(batches)
        images, labels = images_labels
        model.train()
        loss = TF.cross_entropy(model(images), labels)
        if not torch.isfinite(loss):
            return losses + [math.nan] * (steps - step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    if probe is not None:
        probe(model, steps)
    return losses


@torch.no_grad()
def test_accuracy(model: torch.nn.Module, batch_size: int = 256, batch_statistics: bool = False,
                  n: int | None = None) -> float:
    """Accuracy on the test images; ``batch_statistics`` normalizes with each test batch's
    own statistics (training mode, on a copy, so the running averages stay untouched)."""
    net = copy.deepcopy(model).train() if batch_statistics else model.eval()
    images, labels = test_images[:n], test_labels[:n]
    if batch_statistics:  # equal batches only: a short last batch would have other statistics
        keep = len(images) - len(images) % batch_size
        images, labels = images[:keep], labels[:keep]
    correct = sum((net(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
                  for i in range(0, len(images), batch_size))
    return correct / len(images)


def smooth(values: list[float], k: int = 10) -> np.ndarray:
    """Running mean over the last k steps (the first points average what there is)."""
    v = np.asarray(values, dtype=float)
    c = np.cumsum(np.insert(v, 0, 0.0))
    return np.array([(c[i + 1] - c[max(0, i + 1 - k)]) / (i + 1 - max(0, i + 1 - k))
                     for i in range(len(v))])


# %% [markdown]
# ## Q2 first: what does BN buy? (the runs the other questions reuse)
#
# Ioffe & Szegedy (2015) report faster training and tolerance to much higher learning
# rates; the post saw higher accuracy and "faster convergence". Live: All-CNN-C with and
# without BN, the same initial weights and batches, Adam at lr 1e-3 and at 1e-2 (ten times
# higher), 40 steps each. While they train, the runs at 1e-3 also record the input
# distribution of two layers every 10 steps (used in Q4).

# %%
LAYERS = (2, 8)  # the inputs of relu2 and relu8: after BN where there is one, else the conv
PERCENTILES = torch.tensor([0.15, 0.50, 0.85])
probe_images = normalize(train_set.train_images[:64])  # a fixed batch, not augmented


def record_percentiles(store: dict):
    """A probe: the 15/50/85th percentiles of each LAYERS input, per channel, averaged."""
    def probe(model: torch.nn.Module, step: int) -> None:
        net, seen = copy.deepcopy(model).train(), {}  # training mode, as in training
        # the ReLUs work in place: keep a copy of the input before the ReLU overwrites it
        hooks = [getattr(net, f"bn{k}" if hasattr(net, f"bn{k}") else f"conv{k}")
                 .register_forward_hook(lambda m, i, out, k=k: seen.__setitem__(k, out.clone()))
                 for k in LAYERS]
        with torch.no_grad():
            net(probe_images)
        for hook in hooks:
            hook.remove()
        for k in LAYERS:
            per_channel = seen[k].transpose(0, 1).flatten(1)  # (C, N*H*W)
            store.setdefault(k, []).append((step, per_channel.quantile(PERCENTILES, dim=1)
                                            .mean(1).tolist()))
    return probe


NORM_LABELS = {"none": "no BN", "torch": "BN"}
losses, models, percentiles = {}, {}, {}
started = time.perf_counter()
for lr in (1e-3, 1e-2):
    for norm in NORM_LABELS:
        models[norm, lr] = make_model(norm)
        probe = record_percentiles(percentiles.setdefault(norm, {})) if lr == 1e-3 else None
        losses[norm, lr] = fit(models[norm, lr], lr, probe=probe)
print(f"4 runs of {STEPS} steps in {time.perf_counter() - started:.0f} s")

fig, ax = plt.subplots(figsize=(7, 4))
for (norm, lr), curve in losses.items():
    ax.plot(range(1, STEPS + 1), smooth(curve, 5), ls="-" if norm == "torch" else "--",
            label=f"{NORM_LABELS[norm]}, lr {lr:g}")
ax.axhline(math.log(10), color="grey", ls=":", label="chance: ln 10")
ax.set(xlabel="training step (batches of 32)", ylabel="training loss (nats, mean of 5 steps)",
       title="Q2: All-CNN-C (width 0.125) with and without BN, Adam")
ax.legend()
plt.tight_layout()
plt.show()
print(f"{'':<18}{'final loss':>11}{'test acc':>10}   (loss: mean of the last 5 steps)")
for (norm, lr), model in models.items():
    final = np.nanmean(losses[norm, lr][-5:]) if not math.isnan(losses[norm, lr][-1]) else math.nan
    print(f"{NORM_LABELS[norm] + f', lr {lr:g}':<18}{final:>11.3f}"
          f"{100 * test_accuracy(model):>9.1f}%")

# %% [markdown]
# Read it with care: one seed, 40 steps. In this window the runs with BN leave the chance
# level (ln 10) at either learning rate, and the runs without BN barely have: faster
# convergence here, not a claim about final accuracy or about the range of learning rates,
# which need longer runs, a sweep and several seeds.
#
# **The full study**: `bnlab study q2` (quick preset: 7 minutes measured on a quiet 2-core CPU)
# sweeps the learning rate a third of a decade apart for Adam and SGD, with and without BN,
# every rate at full length on 3 seeds; it compares the networks each at its own best rate
# and at a common rate (training loss against steps, final accuracy), and measures the width
# of the range of usable learning rates, interpolated between grid points, with an interval
# over seeds. Its verdicts and numbers are in its `section.md` and `summary.json`.
# **Measured** by `bnlab study all --preset quick` (the embedded sample, All-CNN-C at width
# 0.25, 1,500 images, 5 epochs, 3 seeds; a 2-core AMD EPYC in float32, 30 Nov 2026; its
# `report.md` has the intervals): faster convergence with BN is
# *supported* for Adam and for SGD, at each network's best rate and at a common rate; higher
# final accuracy is *supported* for SGD at the best rates and *inconclusive* otherwise; a wider
# usable range of rates is *inconclusive* (Adam 0.76 vs 0.66 decades, SGD 0.69 vs 0.36).
#
# ## Q1: does BN act as a regularizer?
#
# The post: like dropout, BN adds noise, so it regularizes "as a side effect". The noise is
# real: in training mode an image is normalized with the statistics of whatever batch it sits
# in, so its logits depend on its batch mates. Live: the trained BN network of Q2 (lr 1e-3),
# 128 training images cut into random batches of B, three draws each; per image, the spread
# of its (centred) logits across draws, relative to their size. The batch mean and variance
# of B values scatter like `1/sqrt(B)`, so the noise should fall with slope about −0.5 on a
# log-log plot.

# %%
@torch.no_grad()
def relative_logit_noise(model: torch.nn.Module, images: torch.Tensor, batch_size: int,
                         draws: int = 3, seed: int = 0) -> float:
    """noise / signal of the centred logits of ``images`` across random batchings."""
    net = copy.deepcopy(model).train()  # batch statistics; the copy's buffers absorb updates
    generator = torch.Generator().manual_seed(seed)
    n = len(images)
    logits = torch.empty(draws, n, 10)
    for d in range(draws):
        order = torch.randperm(n, generator=generator)
        out = torch.cat([net(images[order[i:i + batch_size]]) for i in range(0, n, batch_size)])
        logits[d, order] = out  # back to the images' own order
    centred = logits - logits.mean(2, keepdim=True)  # softmax ignores a shift
    noise2 = centred.var(0).mean()  # unbiased variance across draws, averaged
    signal2 = centred.square().mean() - noise2
    return (noise2 / signal2).sqrt().item()


batch_sizes = [4, 8, 16, 32]
pool = normalize(train_set.train_images[:128])
noise = [relative_logit_noise(models["torch", 1e-3], pool, b) for b in batch_sizes]
slope, intercept = np.polyfit(np.log(batch_sizes), np.log(noise), 1)
for b, r in zip(batch_sizes, noise, strict=True):
    print(f"B = {b:>3}: relative noise of the logits {r:.3f}")
print(f"slope of log(noise) against log(B): {slope:.2f} (theory: -0.5)")
assert slope < 0, slope  # larger batches, less noise

fig, ax = plt.subplots(figsize=(6, 3.8))
ax.loglog(batch_sizes, noise, "o", label="measured (BN network, training mode)")
fit_line = np.exp(intercept) * np.asarray(batch_sizes, dtype=float) ** slope
ax.loglog(batch_sizes, fit_line, "-", label=f"fit: slope {slope:.2f}")
ax.loglog(batch_sizes, noise[0] * (np.asarray(batch_sizes) / batch_sizes[0]) ** -0.5, ":",
          color="grey", label="slope −0.5")
ax.set(xlabel="batch size B (images)", ylabel="noise / signal of the logits",
       title="Q1: the noise BN injects, by batch size")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# Noise alone does not make a regularizer: it must also shrink the gap between training
# and test accuracy. **The full study**: `bnlab study q1` (quick preset: 9 minutes measured,
# with the learning-rate sweep the studies share) trains with and without BN and dropout over
# seeds, measures the generalization gap in eval mode, and this noise with dropout's beside it.
# **Measured** by `bnlab study all --preset quick` (the embedded sample, All-CNN-C at width
# 0.25, 1,500 images, 5 epochs, 3 seeds; a 2-core AMD EPYC in float32, 30 Nov 2026; its
# `report.md` has the intervals): BN's higher test accuracy is *supported*
# (+9.6 points, 95% interval [+4.9, +14.4], at each network's tuned rate); whether BN narrows
# the generalization gap is *inconclusive* — the BN network fits its training images 13 points
# better, so the gaps are not compared at equal fit — and dropout, the positive control, does
# not measurably narrow it either: this scale cannot show a regularizer at work.
#
# ## Q3: what does BN cost?
#
# Two costs the post and the literature name: BN depends on the batch (small or
# unrepresentative batches give poor statistics), and it costs time. Live, first the batch:
# the BN network of Q2 tested with each test batch's own statistics (training mode) at
# batch sizes from 2 to 128 (256 test images), against eval mode with the running averages
# (independent of the batch size).

# %%
bn_model = models["torch", 1e-3]
eval_mode = test_accuracy(bn_model, n=256)
sizes = [2, 4, 8, 32, 128]
batch_mode = [test_accuracy(bn_model, batch_size=b, batch_statistics=True, n=256) for b in sizes]
for b, acc in zip(sizes, batch_mode, strict=True):
    print(f"test batch {b:>3}, batch statistics: {100 * acc:5.1f}%")
print(f"eval mode, running averages:     {100 * eval_mode:5.1f}%")

fig, ax = plt.subplots(figsize=(6, 3.8))
ax.semilogx(sizes, [100 * a for a in batch_mode], "o-", label="batch statistics (training mode)")
ax.axhline(100 * eval_mode, color="C1", ls="--", label="running averages (eval mode)")
ax.axhline(10, color="grey", ls=":", label="chance (10%)")
ax.set(xlabel="test batch size (images)", ylabel="test accuracy (%)",
       title="Q3: BN's statistics from small batches")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# Small test batches give noisy statistics and lower accuracy. (Eval mode can sit below the
# large-batch line here: after 40 steps the running averages still lag the fast-moving
# weights — Q5's subject.)
#
# Then the time: one training step with and without BN, measured side by side in this
# process (interleaved rounds, so a busy machine slows both alike). A ratio, not a
# benchmark: `bnlab bench bn` and `bnlab bench engine` are the benchmarks.

# %%
step_images, step_labels = next(train_batches(train_set, BATCH_SIZE,
                                              generator=torch.Generator().manual_seed(1)))
timed = {norm: make_model(norm) for norm in NORM_LABELS}
optimizers = {norm: torch.optim.Adam(model.parameters()) for norm, model in timed.items()}
seconds = {norm: [] for norm in NORM_LABELS}
for _ in range(3):  # rounds
    for norm, model in timed.items():
        t0 = time.perf_counter()
        for _ in range(3):
            loss = TF.cross_entropy(model(step_images), step_labels)
            optimizers[norm].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[norm].step()
        seconds[norm].append((time.perf_counter() - t0) / 3)
median = {norm: float(np.median(s)) for norm, s in seconds.items()}
print(f"one step of batch 32: no BN {1000 * median['none']:.1f} ms, "
      f"BN {1000 * median['torch']:.1f} ms; BN costs {median['torch'] / median['none'] - 1:+.0%}"
      f" ({torch.get_num_threads()} thread)")

# %% [markdown]
# **The full study**: `bnlab study q3` (quick preset: 8 minutes measured) trains at batch sizes
# from 2 up, with and without BN; tests each BN network four ways (running, batch,
# cumulative and exact population statistics); trains on class-sorted batches (batches that
# do not represent the data — the post's worry); and times both engines with and without BN.
# **Measured** by `bnlab study all --preset quick` (the embedded sample, All-CNN-C at width
# 0.25, 1,500 images, 5 epochs, 3 seeds; a 2-core AMD EPYC in float32, 30 Nov 2026; its
# `report.md` has the intervals): at this scale no batch size
# reaches the 1,000 updates an answer needs, so BN against no BN at batch 2 (+3.1 points,
# interval [-10.7, +17.0]) and the variants beside BN are *inconclusive*; class-sorted batches
# cost BN 13.8 ± 2.3 points and the network without BN 8.1 ± 3.6; an epoch with PyTorch's BN
# takes 8% longer than one without.
#
# ## Q4: what is internal covariate shift, and does BN reduce it?
#
# Internal covariate shift (Ioffe & Szegedy 2015) is the change in the distribution of a
# layer's input while the layers before it learn. Their Fig. 1 tracks the 15th, 50th and
# 85th percentiles of one layer's input during training. Live: those percentiles for the
# inputs of relu2 and relu8 (after BN where there is one), recorded every 10 steps by the Q2
# runs at lr 1e-3.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
for ax, k in zip(axes, LAYERS, strict=True):
    for norm, style in (("none", "--"), ("torch", "-")):
        steps_seen = [s for s, _ in percentiles[norm][k]]
        values = np.array([v for _, v in percentiles[norm][k]])  # (probes, 3)
        for j, (q, color) in enumerate(zip((15, 50, 85), ("C0", "C1", "C2"), strict=True)):
            ax.plot(steps_seen, values[:, j], style, color=color,
                    label=f"{NORM_LABELS[norm]}, {q}th percentile")
    ax.set(xlabel="training step", ylabel="input of the ReLU (activation units)",
           title=f"Q4: input distribution of relu{k} during training")
fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=6, fontsize=8)
plt.tight_layout(rect=(0, 0.08, 1, 1))
plt.show()


def drift(records: list) -> float:
    """Largest move of any percentile from its step-0 value, in units of the mean 15-85 spread."""
    values = np.array([v for _, v in records])
    spread = np.mean(values[:, 2] - values[:, 0])
    return float(np.abs(values - values[0]).max() / spread)


for k in LAYERS:
    print(f"relu{k} input: drift {drift(percentiles['none'][k]):.2f} spreads without BN, "
          f"{drift(percentiles['torch'][k]):.2f} with BN")

# %% [markdown]
# With BN the layer's input is renormalized at every step, so its percentiles stay put by
# construction (up to gamma and beta); whether that is what makes BN work is another
# question. Santurkar et al. (2018) measured shift by the change of a layer's *gradient*
# when the earlier layers take their step, and found BN does not reduce it. **The full
# study**: `bnlab study q4` (quick preset: 3 minutes measured) measures both, over seeds.
# **Measured** by `bnlab study all --preset quick` (the embedded sample, All-CNN-C at width
# 0.25, 1,500 images, 5 epochs, 3 seeds; a 2-core AMD EPYC in float32, 30 Nov 2026; its
# `report.md` has the intervals): that BN reduces the shift of a
# layer's input distribution is *supported* (before and after BN); that BN with injected noise
# still beats no BN, that BN leaves the gradient-sense shift unreduced, and that BN smooths
# the loss along the gradient are *inconclusive* at this scale.
#
# ## Q5: exponentially weighted averages
#
# At test time BN normalizes with running averages kept during training (notebook 1 shows
# the averages on their own). They start at mean 0 and variance 1, and with PyTorch's
# momentum 0.1 the start still weighs 35% after 10 steps, so early in training the test-time
# network normalizes with the wrong statistics. Live: a network with bnlab's BN trained for
# 30 steps. At every step, bn1's running mean and variance, raw and bias-corrected
# (`bnlab.functional.bias_corrected_running_stats`), against the statistics they estimate:
# those of bn1's input over 128 training images with the current weights. And at a few
# steps, test accuracy in eval mode with the raw averages, with the bias-corrected ones
# (`bnlab.nn.BatchNorm2d(bias_correction=True)`), and with each test batch's own statistics
# as the reference. (The images are normalized, so bn1's input has a mean near 0 and the
# running mean starts nearly right; the variance is where the start shows.)

# %%
def set_bias_correction(model: torch.nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if isinstance(module, BatchNorm2d):
            module.bias_correction = enabled


Q5_STEPS, ACCURACY_STEPS = 30, (3, 10, 30)
statistic_error = {"mean, raw": [], "mean, bias-corrected": [],
                   "variance, raw": [], "variance, bias-corrected": []}
accuracy = {"raw running averages": [], "bias-corrected": [], "test batch's own statistics": []}


@torch.no_grad()
def q5_probe(model: torch.nn.Module, step: int) -> None:
    if step == 0:
        return
    bn1 = model.bn1
    inputs = model.conv1(pool)  # bn1's input, (128, C, 32, 32)
    mean, var = inputs.mean((0, 2, 3)), inputs.var((0, 2, 3))  # what the averages estimate
    corrected = F.bias_corrected_running_stats(bn1.running_mean, bn1.running_var,
                                               int(bn1.num_batches_tracked), bn1.momentum)
    for label, (m, v) in (("raw", (bn1.running_mean, bn1.running_var)),
                          ("bias-corrected", corrected)):
        statistic_error[f"mean, {label}"].append(((m - mean).abs() / var.sqrt()).mean().item())
        statistic_error[f"variance, {label}"].append(((v - var).abs() / var).mean().item())
    if step in ACCURACY_STEPS:
        for label, enabled in (("raw running averages", False), ("bias-corrected", True)):
            set_bias_correction(model, enabled)
            accuracy[label].append(test_accuracy(model, n=256))
        set_bias_correction(model, False)
        accuracy["test batch's own statistics"].append(
            test_accuracy(model, n=256, batch_statistics=True))


q5_model = make_model("bnlab")
fit(q5_model, 1e-3, steps=Q5_STEPS, probe=q5_probe, probe_every=1)

fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for label, values in statistic_error.items():
    axes[0].semilogy(range(1, Q5_STEPS + 1), values, "-" if "raw" in label else "--",
                     label=label)
axes[0].set(xlabel="training steps so far (momentum 0.1)",
            ylabel="error (mean: in std units; var: relative)",
            title="Q5: bn1's running statistics vs the true ones")
axes[0].legend(fontsize=8)
for label, values in accuracy.items():
    axes[1].plot(ACCURACY_STEPS, [100 * v for v in values], "o-", label=label)
axes[1].axhline(10, color="grey", ls=":", label="chance (10%)")
axes[1].set(xlabel="training steps so far", ylabel="test accuracy (%)",
            title="Q5: test accuracy early in training")
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()
print(f"after 10 steps, bn1's running variance is off by "
      f"{statistic_error['variance, raw'][9]:.0%} raw, "
      f"{statistic_error['variance, bias-corrected'][9]:.0%} bias-corrected")
for label, values in accuracy.items():
    print(f"{label:<28} " + " ".join(f"{100 * v:5.1f}%" for v in values)
          + f"   (after {', '.join(map(str, ACCURACY_STEPS))} steps)")
assert statistic_error["variance, bias-corrected"][9] < statistic_error["variance, raw"][9]

# %% [markdown]
# **The full study**: `bnlab study q5` (quick preset: 4 minutes measured) measures how long
# averages with several betas need to forget their start, compares BN's running statistics
# with the exact population statistics during training, and replays one run under several
# momentum values, raw and bias-corrected. `bnlab study all` runs the five studies and
# writes one report (30 minutes measured on a quiet 2-core CPU in float32).
# **Measured** by `bnlab study all --preset quick` (the embedded sample, All-CNN-C at width
# 0.25, 1,500 images, 5 epochs, 3 seeds; a 2-core AMD EPYC in float32, 30 Nov 2026; its
# `report.md` has the intervals): over the first 10 steps the raw
# running statistics are off by 0.27 (mean) and 0.34 (variance), the bias-corrected ones by
# 0.06 and 0.10; after training, momentum 0.1's running statistics give 0.394 ± 0.020 test
# accuracy against 0.401 ± 0.011 with the population statistics. The runs (115 steps) are too
# short for the momentum sweep's verdict, which needs 1,000.
#
# ## What to try next
#
# - Q1: put dropout beside BN (`AllCNNC(norm="none", dropout=True)`) and measure its noise
#   the same way; which falls with the batch size?
# - Q2: add lr 3e-2 or swap Adam for SGD with momentum: where does the network without BN
#   stop training?
# - Q3: train the BN network at batch size 4 instead of 32 (`BATCH_SIZE`) and test it again.
# - Q4: probe `relu5` too, or start from a larger learning rate.
# - Q5: set `momentum=0.01` on the BN layers (`AllCNNC(..., momentum=0.01)`): how long do the
#   raw averages lag now?
# - Run the full studies, with several seeds and verdicts: `bnlab study q1` ... `q5`, or
#   `bnlab study all`.
