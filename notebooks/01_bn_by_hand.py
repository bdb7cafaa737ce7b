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
# # 1. Batch normalization by hand
#
# **What you will learn**
#
# 1. What BN computes (Ioffe & Szegedy 2015, Algorithm 1), written the way `bnlab.functional`
#    writes it, and what it does to the activations of a real layer.
# 2. The backward pass twice: node by node through the computational graph, and in closed
#    form — and how to convince yourself that both are right: a numeric gradient and a
#    float64 comparison with autograd, each printed beside the error you should expect.
# 3. Why *how* the statistics are computed matters: an input with mean 1e4, bnlab against
#    PyTorch's own kernel, measured here.
# 4. The running averages used at test time, and why they need a bias correction at the
#    start of training (the post's Q5), plotted.
#
# **Run time**: about 15 s on a 2-core CPU (tiny tensors; no training).
# Everything runs offline: the images are the CIFAR-10 sample that bnlab carries.
#
# Anchors: cs231n's `BatchNormalization.ipynb` (staged and simplified backward, gradient
# checks), Kratzert (2016) for the staged graph, Ioffe & Szegedy (2015) for the math.

# %%
import inspect

import matplotlib.pyplot as plt
import torch

from bnlab import functional as F
from bnlab.check_engines import relative_error  # max|a - b| / max|b|
from bnlab.data import load_embedded_sample, normalize
from bnlab.nn import BatchNorm2d

# Tiny tensors: a second intra-op thread buys nothing, and on a busy machine it spin-waits.
torch.set_num_threads(1)
torch.manual_seed(0)

# %% [markdown]
# ## What BN computes
#
# For an input `x` of shape `(N, C, H, W)` BN works per channel `c`, over the
# `m = N·H·W` values of that channel in the batch (shape legend of `bnlab.functional`):
#
# | step | formula | shape |
# |---|---|---|
# | batch mean | `mu = (1/m) Σ x` | `(C,)` |
# | batch variance (biased) | `var = (1/m) Σ (x − mu)²` | `(C,)` |
# | normalize | `x_hat = (x − mu) / sqrt(var + eps)` | `(N, C, H, W)` |
# | scale and shift | `y = gamma · x_hat + beta` | `(N, C, H, W)` |
#
# `gamma` and `beta` (PyTorch's `weight` and `bias`) are learned, so the layer can undo the
# normalization if that helps. Here it is on the output of a randomly initialised
# convolution applied to 256 real CIFAR-10 images: each channel arrives with its own mean
# and spread, and leaves with mean 0 and variance 1.

# %%
sample = load_embedded_sample()  # 5,085 train / 1,017 test images, offline
images = normalize(sample.train_images[:256])  # (256, 3, 32, 32), float32
conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
with torch.no_grad():
    conv.bias.copy_(torch.linspace(-2.0, 3.0, 8))  # give the channels different centres
    activations = conv(images)  # (256, 8, 32, 32): the input BN sees
gamma, beta = torch.ones(8), torch.zeros(8)
normalized, saved = F.batch_norm_forward(activations, gamma, beta, eps=1e-5)

fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
for c in range(0, 8, 2):
    for ax, t in zip(axes, (activations, normalized), strict=True):
        ax.hist(t[:, c].flatten().numpy(), bins=80, histtype="step", density=True,
                label=f"channel {c}")
axes[0].set(title="conv output: the input of BN", xlabel="activation (arbitrary units)",
            ylabel="density")
axes[1].set(title="after BN (gamma = 1, beta = 0)", xlabel="normalized activation x_hat")
for ax in axes:
    ax.legend()
plt.tight_layout()
plt.show()
print("per-channel mean before:", activations.mean((0, 2, 3)).numpy().round(2))
print("per-channel mean after: ", normalized.mean((0, 2, 3)).numpy().round(6))
print("per-channel var after:  ", normalized.var((0, 2, 3), unbiased=False).numpy().round(4))

# %% [markdown]
# ## The backward pass, node by node
#
# Break the forward into elementary nodes and walk them backwards; each line of
# `bnlab.functional.batch_norm_backward_staged` is one node's local derivative times the
# gradient arriving at it. Where a value feeds two nodes (`x` feeds the mean and the
# centring; `xmu` feeds the square and the normalization) the two gradients add.

# %%
print(inspect.getsource(F.batch_norm_backward_staged))

# %% [markdown]
# ## ... and in closed form
#
# Substituting the nodes into one another gives three lines (the derivation is in the
# docstring of `batch_norm_backward`, printed below):
#
#     dbeta  = Σ dy
#     dgamma = Σ dy · x_hat
#     dx     = gamma / (m · sqrt(var + eps)) · (m · dy − dbeta − x_hat · dgamma)
#
# One pass over the data instead of nine, and the same numbers. Both in float64 on the
# same input and upstream gradient:

# %%
print(F.batch_norm_backward.__doc__.split("Implementation:")[0])

x = torch.randn(16, 4, 5, 5, dtype=torch.float64) * 3 + 2
gamma = torch.rand(4, dtype=torch.float64) + 0.5
beta = torch.randn(4, dtype=torch.float64)
dy = torch.randn_like(x)

y_staged, cache = F.batch_norm_forward_staged(x, gamma, beta)
staged = F.batch_norm_backward_staged(dy, cache)
y_closed, saved = F.batch_norm_forward(x, gamma, beta, eps=1e-5)
closed = F.batch_norm_backward(dy, x, saved, gamma)
print(f"forward: staged vs closed form, relative error {relative_error(y_staged, y_closed):.1e}")
for name, a, b in zip(("dx", "dgamma", "dbeta"), staged, closed, strict=True):
    print(f"{name:>7}: staged vs closed form, relative error {relative_error(a, b):.1e}")

# %% [markdown]
# ## Checking a gradient: three ways, three expected errors
#
# A check that only prints can never fail, so every check below prints first, then asserts
# against the band the precision allows (reasoned, not tuned):
#
# - **numeric gradient**: central differences `(L(x+h) − L(x−h)) / 2h` with `h = 1e-6` in
#   float64. Truncation error `~h²` plus rounding `~1e-16/h`: expect about 1e-9 (a wrong
#   formula gives 1e-1 or worse).
# - **autograd, float64**: autograd through the plain staged forward. A few ulps of float64
#   per operation: expect below 1e-13.
# - **float32**: bnlab in single precision against the float64 reference. Float32 rounds at
#   2⁻²⁴ ≈ 6e-8 per operation: expect 1e-7 to 1e-6.

# %%
def numeric_gradient(f, x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """Central differences of the scalar f(x), one element at a time (cs231n's recipe)."""
    grad = torch.zeros_like(x)
    flat, g = x.view(-1), grad.view(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + h
        plus = f(x)
        flat[i] = old - h
        minus = f(x)
        flat[i] = old
        g[i] = (plus - minus) / (2 * h)
    return grad


small = torch.randn(6, 3, 2, 2, dtype=torch.float64) * 2 + 1
g3, b3 = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
upstream = torch.randn_like(small)


def loss_of(x: torch.Tensor) -> float:
    """L = Σ y · upstream, so that dL/dy = upstream."""
    return (F.batch_norm_forward(x, g3, b3, eps=1e-5)[0] * upstream).sum().item()


_, saved_small = F.batch_norm_forward(small, g3, b3, eps=1e-5)
dx_closed = F.batch_norm_backward(upstream, small, saved_small, g3)[0]
dx_numeric = numeric_gradient(loss_of, small.clone())
error_numeric = relative_error(dx_closed, dx_numeric)
print("a few pairs (closed form, numeric):")
for a, b in list(zip(dx_closed.flatten().tolist(), dx_numeric.flatten().tolist(), strict=True))[:3]:
    print(f"    {a: .10f}  {b: .10f}")
print(f"numeric gradient vs closed form: relative error {error_numeric:.1e}  (expect ~1e-9)")
assert error_numeric < 1e-6, error_numeric

# autograd through the staged forward: plain tensor operations, so autograd differentiates it
leaf = x.clone().requires_grad_()
g_leaf, b_leaf = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
y_ref, _ = F.batch_norm_forward_staged(leaf, g_leaf, b_leaf)
reference = torch.autograd.grad(y_ref, (leaf, g_leaf, b_leaf), dy)
for name, ours_closed, ours_staged, ref in zip(("dx", "dgamma", "dbeta"), closed, staged,
                                               reference, strict=True):
    e_closed, e_staged = relative_error(ours_closed, ref), relative_error(ours_staged, ref)
    print(f"{name:>7} vs autograd (float64): closed form {e_closed:.1e}, staged {e_staged:.1e}"
          "  (expect below 1e-13)")
    assert max(e_closed, e_staged) < 1e-12, (name, e_closed, e_staged)

# float32: the same computation in single precision against the float64 reference
y32, saved32 = F.batch_norm_forward(x.float(), gamma.float(), beta.float(), eps=1e-5)
dx32 = F.batch_norm_backward(dy.float(), x.float(), saved32, gamma.float())[0]
error32 = relative_error(dx32, reference[0])
print(f"     dx in float32 vs the float64 reference: {error32:.1e}  (expect 1e-7 to 1e-6)")
assert error32 < 1e-5, error32

# the drop-in module: torch.autograd.gradcheck runs its own numeric check in float64
bn = BatchNorm2d(3, track_running_stats=False).double()
print("gradcheck of bnlab.nn.BatchNorm2d:",
      torch.autograd.gradcheck(bn, (small.clone().requires_grad_(),), eps=1e-6, atol=1e-8))

# %% [markdown]
# ## Numerics: a badly centred input
#
# The textbook variance `E[x²] − E[x]²` subtracts two large, nearly equal numbers when the
# mean is large against the spread, and float32 has only 24 bits. bnlab computes the
# statistics with the corrected two-pass algorithm (Chan, Golub & LeVeque 1983: subtract a
# rough mean first, then correct), so an input with mean 1e4 normalizes as accurately as one
# centred at zero. Here both bnlab and PyTorch's own kernel
# (`torch.nn.functional.batch_norm`) normalize float32 inputs with standard deviation 1 and
# growing means, against a float64 reference computed from the very same float32 values.

# %%
offsets = [0.0, 1e1, 1e2, 1e3, 1e4, 3e4, 1e5]
errors = {"bnlab": [], "PyTorch kernel": []}
base = torch.randn(64, 4, 8, 8)
for offset in offsets:
    x32 = base + offset  # float32, mean `offset`, std 1
    x64 = x32.double()
    reference_y = (x64 - x64.mean((0, 2, 3), keepdim=True)) / (
        x64.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
    ours = F.batch_norm_forward(x32, eps=1e-5)[0]
    theirs = torch.nn.functional.batch_norm(x32, None, None, training=True, eps=1e-5)
    errors["bnlab"].append(relative_error(ours, reference_y))
    errors["PyTorch kernel"].append(relative_error(theirs, reference_y))

print(f"{'mean of x':>10}  {'bnlab':>9}  {'PyTorch':>9}   (max relative error of y, float32)")
for offset, e_ours, e_theirs in zip(offsets, errors["bnlab"], errors["PyTorch kernel"],
                                    strict=True):
    print(f"{offset:>10.0e}  {e_ours:>9.1e}  {e_theirs:>9.1e}")
assert max(errors["bnlab"]) < 1e-5, errors["bnlab"]  # float32 rounding, whatever the mean

fig, ax = plt.subplots(figsize=(6.5, 3.8))
positions = [max(o, 1.0) for o in offsets]  # 0 drawn at 1 on the log axis
for label, values in errors.items():
    ax.loglog(positions, [max(v, 1e-9) for v in values], "o-", label=label)
ax.axhline(2**-24, color="grey", ls=":", label="float32 unit roundoff 2⁻²⁴")
ax.set(xlabel="mean of the input |mu| (std 1; 0 drawn at 1)",
       ylabel="max relative error of y (float32)",
       title="Normalizing a badly centred input in float32")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Running averages and their bias correction (the post's Q5)
#
# At test time BN cannot use the test batch's statistics, so during training it keeps
# exponentially weighted averages. PyTorch's convention: `momentum` weights the *new* batch
# (0.1); Keras and the post write the same rule with 0.9, the weight of the *old* value:
#
#     running_mean <- (1 − momentum) · running_mean + momentum · mu
#     running_var  <- (1 − momentum) · running_var  + momentum · var · m/(m − 1)
#
# They start at 0 and 1, so after `t` updates the start still weighs `(1 − momentum)^t`:
# 35% after 10 steps. `bnlab.functional.bias_corrected_running_stats` divides that weight
# out, as Adam does for its moments (`bnlab.nn.BatchNorm2d(bias_correction=True)` uses it
# in eval mode). Below: a channel whose values have mean 3 and variance 4, batches of 32.

# %%
momentum, steps, m_batch = 0.1, 60, 32
running_mean, running_var = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
history = {"raw mean": [], "corrected mean": [], "raw var": [], "corrected var": []}
generator = torch.Generator().manual_seed(0)
for t in range(1, steps + 1):
    batch = 3.0 + 2.0 * torch.randn(m_batch, 1, generator=generator, dtype=torch.float64)
    _, stats = F.batch_norm_forward(batch, eps=1e-5)
    F.update_running_stats(running_mean, running_var, stats.mean, stats.var, m_batch, momentum)
    corrected_mean, corrected_var = F.bias_corrected_running_stats(
        running_mean, running_var, t, momentum)
    history["raw mean"].append(running_mean.item())
    history["corrected mean"].append(corrected_mean.item())
    history["raw var"].append(running_var.item())
    history["corrected var"].append(corrected_var.item())

step_axis = range(1, steps + 1)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for ax, what, truth in zip(axes, ("mean", "var"), (3.0, 4.0), strict=True):
    ax.plot(step_axis, history[f"raw {what}"], label="raw (PyTorch's buffers)")
    ax.plot(step_axis, history[f"corrected {what}"], label="bias-corrected")
    ax.axhline(truth, color="black", ls="--", label=f"true {what} ({truth:g})")
    ax.set(xlabel="training step (batches of 32)", ylabel=f"running {what}",
           title=f"running {what}, momentum {momentum}")
    ax.legend()
plt.tight_layout()
plt.show()
gap_raw = abs(history["raw mean"][9] - 3.0)
gap_corrected = abs(history["corrected mean"][9] - 3.0)
print(f"after 10 steps the running mean is off by {gap_raw:.2f} raw, {gap_corrected:.2f} corrected")
assert gap_corrected < gap_raw

# %% [markdown]
# ## What to try next
#
# - Change `h` in `numeric_gradient` from 1e-6 to 1e-3 and to 1e-10: the error grows on both
#   sides (truncation, then rounding). Where is the sweet spot, and why?
# - Break the closed form on purpose (drop the `x_hat · dgamma` term) and watch which checks
#   fail and by how much.
# - Push the offset to 1e6 with a standard deviation of 1: float32 itself can no longer
#   represent the spread (its spacing near 1e6 is 0.06); what do both kernels do?
# - Set `momentum = 0.01` or `0.5` in the last cell: how long does the raw average need to
#   forget its start? (`bnlab study q5` measures this on a training network.)
# - Notebook 2 puts this layer inside a whole network trained with no autograd;
#   `bnlab gradcheck` runs these checks from the command line.
