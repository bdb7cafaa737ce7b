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
# # 2. Manual back propagation of a whole network
#
# The post's case c trains a convolutional network with every gradient written by hand.
# bnlab's manual engine (`bnlab.manual`) does the same for All-CNN-C (Springenberg et al.
# 2015) with no autograd at all: each layer has a `forward` that keeps what it needs and a
# `backward` that returns the gradient of its input and fills the gradients of its
# parameters.
#
# **What you will learn**
#
# 1. One block (convolution → BN → ReLU) read forward and backward, side by side with
#    autograd on the same weights.
# 2. That the whole network's gradients agree with autograd's to float64 precision.
# 3. That the hand-written AMSGrad takes the very same steps as `torch.optim.Adam(amsgrad=True)`,
#    and how far the post's own "AMSGrad" rule drifts from it.
# 4. The post's three cases (a: no BN; b: PyTorch's BN; c: hand-written BN, manual back
#    propagation, AMSGrad) trained briefly on the CIFAR-10 sample, beside the curves the
#    post itself logged on the full data set.
#
# **Run time**: about a minute on a 2-core CPU, most of it the three short training runs.
# Everything runs offline on the CIFAR-10 sample that bnlab carries (5,085 training and
# 1,017 test images): its accuracies are not CIFAR-10 accuracies.

# %%
import dataclasses
import inspect
import tempfile
import time

import matplotlib.pyplot as plt
import torch

from bnlab.check_engines import compare_engines, relative_error  # max|a - b| / max|b|
from bnlab.data import load_embedded_sample
from bnlab.manual import BatchNorm2d, Conv2d, ReLU, Sequential
from bnlab.optim import AMSGrad
from bnlab.post.log import load_logged_metrics
from bnlab.train import TrainConfig, train

# Small tensors: a second intra-op thread buys little, and on a busy machine it spin-waits.
torch.set_num_threads(1)
torch.manual_seed(0)

# %% [markdown]
# ## One block, forward and backward
#
# A manual layer is two methods. The forward of bnlab's BN layer computes the batch
# statistics, updates the running averages and keeps `(x, statistics)` for later; its
# backward is the closed form of notebook 1:

# %%
print(inspect.getsource(BatchNorm2d.backward))

# %% [markdown]
# The same block built twice from the same weights, in float64: bnlab's manual layers, and
# `torch.nn` modules differentiated by autograd. The manual backward walks the layers in
# reverse, each turning `dL/d(output)` into `dL/d(input)`:

# %%
block = Sequential([
    ("conv", Conv2d(3, 8, 3, padding=1, bias=False, dtype=torch.float64)),
    ("bn", BatchNorm2d(8, dtype=torch.float64)),
    ("relu", ReLU()),
])
twin = torch.nn.Sequential()
twin.add_module("conv", torch.nn.Conv2d(3, 8, 3, padding=1, bias=False))
twin.add_module("bn", torch.nn.BatchNorm2d(8))
twin.add_module("relu", torch.nn.ReLU())
twin = twin.double()
with torch.no_grad():
    twin.bn.weight.uniform_(0.5, 1.5)
    twin.bn.bias.uniform_(-0.5, 0.5)
block.load_state_dict(twin.state_dict())  # the parameter names match

x = torch.randn(8, 3, 10, 10, dtype=torch.float64)
dy = torch.randn(8, 8, 10, 10, dtype=torch.float64)  # some gradient arriving from above

y = block.forward(x, training=True)  # manual: conv → bn → relu, caches kept
dx = block.backward(dy)  # manual: relu' → bn' → conv', caches released

leaf = x.clone().requires_grad_()
y_ref = twin(leaf)
y_ref.backward(dy)  # autograd
print(f"{'tensor':<26}{'shape':<18}relative error vs autograd")
rows = [("y", y, y_ref.detach()), ("dL/dx", dx, leaf.grad)]
grads = block.named_gradients()
rows += [(f"dL/d {name}", grads[name], p.grad) for name, p in twin.named_parameters()]
rows += [(f"buffer {name}", b, twin.state_dict()[name])
         for name, b in block.named_buffers().items() if b.is_floating_point()]
for name, ours, ref in rows:
    error = relative_error(ours, ref)
    print(f"{name:<26}{tuple(ours.shape)!s:<18}{error:.1e}")
    assert error < 1e-12, (name, error)

# %% [markdown]
# ## The whole network against autograd
#
# `bnlab.check_engines.compare_engines` builds All-CNN-C twice from one seed — the manual
# network and the `nn.Module` — gives every BN random parameters and running statistics,
# runs one forward and backward pass on random images in float64 and returns the relative
# error of every output, gradient and buffer. (This is what `bnlab gradcheck` runs.) Float64
# rounding over nine layers: expect 1e-15 to 1e-13; a wrong gradient would show 1e-2 or more.

# %%
for norm, dropout, training in (("torch", False, True), ("torch", True, True),
                                ("torch", False, False), ("none", False, True)):
    errors = compare_engines(norm=norm, dropout=dropout, training=training)
    worst = max(errors, key=errors.get)
    label = (f"BN {'on ' if norm != 'none' else 'off'}, dropout {'on ' if dropout else 'off'}, "
             f"{'training' if training else 'eval'} mode")
    print(f"{label:<40} {len(errors):>3} tensors compared, largest error {errors[worst]:.1e}"
          f" ({worst})")
    assert errors[worst] < 1e-10, (label, worst, errors[worst])

# %% [markdown]
# ## Hand-written AMSGrad against `torch.optim`, step by step
#
# `bnlab.optim.AMSGrad(rule="torch")` is Adam with the element-wise maximum of the second
# moment (Reddi et al. 2018) and Adam's bias corrections, as `torch.optim.Adam(amsgrad=True)`
# computes it. The post's case c ran a different rule (`rule="post"`: one comparison of
# whole-tensor sums per step, no bias correction). One parameter tensor, the same 100
# random gradients fed to each, in float64:

# %%
steps = 100
start = torch.randn(50, dtype=torch.float64)
gradients = [torch.randn(50, dtype=torch.float64) * (1 + 0.5 * torch.randn(1).abs().item())
             for _ in range(steps)]

p_torch = start.clone().requires_grad_()
opt_torch = torch.optim.Adam([p_torch], lr=1e-2, amsgrad=True)
params = {rule: start.clone() for rule in ("torch", "post")}
optimizers = {rule: AMSGrad([params[rule]], lr=1e-2, rule=rule) for rule in params}
distance = {rule: [] for rule in params}
for g in gradients:
    p_torch.grad = g.clone()
    opt_torch.step()
    for rule, optimizer in optimizers.items():
        optimizer.step([g])
        distance[rule].append((params[rule] - p_torch.detach()).abs().max().item())

print(f"bnlab AMSGrad rule 'torch': largest difference from torch.optim over {steps} steps "
      f"{max(distance['torch']):.1e}")
print(f"bnlab AMSGrad rule 'post':  difference after {steps} steps {distance['post'][-1]:.1e}")
assert max(distance["torch"]) < 1e-12, max(distance["torch"])

fig, ax = plt.subplots(figsize=(6.5, 3.6))
for rule, label in (("torch", "bnlab AMSGrad, rule 'torch'"),
                    ("post", "bnlab AMSGrad, rule 'post' (the post's case c)")):
    # an exact 0 (rule 'torch' matches torch.optim to the last bit) is drawn at 1e-18
    ax.semilogy(range(1, steps + 1), [max(d, 1e-18) for d in distance[rule]], label=label)
ax.set(xlabel="optimizer step", ylabel="max |θ − θ_torch.optim| (0 drawn at 1e-18)",
       title="Hand-written AMSGrad vs torch.optim.Adam(amsgrad=True), lr 1e-2")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The three cases, trained briefly
#
# The same trainer as `bnlab compare` (`bnlab.train.train`), at a scale that fits a minute
# of a 2-core CPU: All-CNN-C at width 0.125 (12 and 24 channels instead of 96 and 192),
# 512 training images of the sample, 4 epochs of batch 32, Adam or AMSGrad at lr 2e-3
# with a cosine schedule, tested after each epoch on the first 512 test images. Each row of
# the table appears as its epoch ends.
#
# | case | engine | BN | optimizer |
# |---|---|---|---|
# | a | autograd | none | Adam (torch.optim) |
# | b | autograd | PyTorch's `BatchNorm2d` | Adam (torch.optim) |
# | c | manual back propagation | bnlab's hand-written BN | AMSGrad (bnlab.optim) |

# %%
CASES = {
    "a": {"engine": "autograd", "norm": "none", "optimizer": "adam"},
    "b": {"engine": "autograd", "norm": "torch", "optimizer": "adam"},
    "c": {"engine": "manual", "norm": "bnlab", "optimizer": "amsgrad", "optimizer_impl": "bnlab"},
}
SCALE = {"width": 0.125, "subset": 512, "epochs": 4, "batch_size": 32, "lr": 2e-3,
         "lr_schedule": "cosine", "augment": True, "device": "cpu", "seed": 0}

sample = load_embedded_sample()  # offline: no download is tried
dataset = dataclasses.replace(sample, test_images=sample.test_images[:512],
                              test_labels=sample.test_labels[:512],
                              source=f"{sample.source}; its first 512 test images")
results = {}
with tempfile.TemporaryDirectory() as runs:  # run folders are written, then thrown away
    for case, fields in CASES.items():
        print(f"case {case}: {fields}")
        started = time.perf_counter()
        config = TrainConfig(case=case, **fields, **SCALE)
        results[case] = train(config, f"{runs}/{case}", dataset=dataset, progress=False).metrics
        print(f"    {time.perf_counter() - started:.0f} s\n")

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for case, metrics in results.items():
    epochs = [m["epoch"] for m in metrics]
    line, = axes[0].plot(epochs, [m["train_loss"] for m in metrics], "o-", label=f"{case} train")
    axes[0].plot(epochs, [m["test_loss"] for m in metrics], "s--", color=line.get_color(),
                 label=f"{case} test")
    axes[1].plot(epochs, [100 * m["test_acc"] for m in metrics], "o-", color=line.get_color(),
                 label=f"case {case}")
axes[0].set(xlabel="epoch", ylabel="cross-entropy (nats)", title="loss, bnlab on the sample")
axes[1].set(xlabel="epoch", ylabel="test accuracy (%)",
            title="test accuracy, bnlab on the sample (512 test images)")
for ax in axes:
    ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The post's own curves
#
# The post trained each case once (seed 678) for 21 epochs on the full CIFAR-10 with its own
# network (close to, not exactly, All-CNN-C) and logged every epoch; `bnlab.post.log` carries
# those numbers. Its case c also differs from b in more than the engine: per-activation BN,
# a different optimizer rule, and three gradient errors (see the README, "The post as it
# ran"; `bnlab compare --preset post-quick` separates them one at a time).

# %%
logged = load_logged_metrics()
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for case, rows in logged.items():
    epochs = [r["epoch"] + 1 for r in rows]  # the logs count from 0
    line, = axes[0].plot(epochs, [100 * r["train_acc"] for r in rows], label=f"{case} train")
    axes[0].plot(epochs, [100 * r["test_acc"] for r in rows], "--", color=line.get_color(),
                 label=f"{case} test")
    axes[1].plot(epochs, [r["test_cost"] for r in rows], color=line.get_color(),
                 label=f"case {case}")
axes[0].set(xlabel="epoch", ylabel="accuracy (%)",
            title="the post's logs (full CIFAR-10, seed 678): accuracy")
axes[1].set(xlabel="epoch", ylabel="test cross-entropy (nats)",
            title="the post's logs (full CIFAR-10, seed 678): test cost")
for ax in axes:
    ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
for case, rows in logged.items():
    print(f"case {case}: logged final test accuracy {rows[-1]['test_acc']:.4f} (full CIFAR-10, "
          f"21 epochs); here {results[case][-1]['test_acc']:.4f} (sample, 4 short epochs)")

# %% [markdown]
# ## What to try next
#
# - Break a backward on purpose: scale `dx` in a copy of the BN layer by 2 (the post's ELU
#   error did just that) and rerun `compare_engines` — which tensors go wrong, and by how much?
# - Train case c with `"amsgrad_rule": "post"` in its fields: does the post's rule change
#   anything at this scale?
# - Make it longer: `epochs` 10 and `subset` None (all 5,085 sample images), or run
#   `bnlab compare` (the quick preset: a, b, c, 3 seeds each) with proper reports;
#   `bnlab compare --preset post-quick` runs the post's own network and recipe beside these
#   logged curves.
# - `bnlab bench engine` times one training step of the manual engine against autograd.
