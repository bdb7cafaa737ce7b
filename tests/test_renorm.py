"""Batch Renormalization (Ioffe 2017): the hand-derived backward, Algorithm 1, and BN as a
special case.

The paper's Algorithm 1 is written out below in float64 (``algorithm1``), independently of
bnlab's code; the layer must follow it step by step, outputs, gradients and running
statistics, with and without binding clips and during the warm-up.
"""

from __future__ import annotations

import math

import pytest
import torch

import bnlab.nn as bnn
from bnlab import kernels
from bnlab.checks import max_rel_err, textbook_batch_renorm
from bnlab.manual import BatchRenorm2d as ManualBatchRenorm2d
from bnlab.variants import renorm
from tests.helpers import (
    FORMATS,
    assert_eval_is_bn,
    assert_manual_step_is_autograd,
    copy_to_manual,
    grads,
    memory_format,
)

MODULES = {2: bnn.BatchRenorm1d, 3: bnn.BatchRenorm1d, 4: bnn.BatchRenorm2d,
           5: bnn.BatchRenorm3d}
SHAPES = [(16, 4), (8, 4, 6), (6, 4, 5, 5), (4, 3, 3, 4, 2)]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]


def make(shape, dtype=torch.float64, seed=0, **kwargs):
    """A Batch Renorm module with random gamma, beta and running statistics."""
    gen = torch.Generator().manual_seed(seed)
    m = MODULES[len(shape)](shape[1], dtype=dtype, **kwargs)
    with torch.no_grad():
        m.weight.copy_(torch.rand(shape[1], generator=gen) + 0.5)
        m.bias.copy_(torch.randn(shape[1], generator=gen))
        m.running_mean.copy_(torch.randn(shape[1], generator=gen) * 0.6 + 0.5)
        m.running_var.copy_(torch.rand(shape[1], generator=gen) * 6 + 1)
    return m


# ---- the backward against autograd -------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(shape, fmt, training):
    """Finite differences see r and d move with x; where both clips bind they do not, so
    there the stop-gradient backward is the true derivative (running statistics far off)."""
    gen = torch.Generator().manual_seed(1)
    c = shape[1]
    x = memory_format(torch.randn(shape, generator=gen, dtype=torch.float64), fmt)
    w = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(c, generator=gen, dtype=torch.float64)
    running_mean = torch.randn(c, generator=gen, dtype=torch.float64) + 50.0
    running_var = torch.rand(c, generator=gen, dtype=torch.float64) * 100 + 100.0

    def f(x, w, b):
        saved = renorm.batch_renorm_stats(x.detach(), running_mean, running_var,
                                          training=training, rmax=2.0, dmax=1.5)
        return renorm.BatchRenormFunction.apply(x, w, b, saved)

    if training:  # the premise: both clips bind in every channel
        saved = renorm.batch_renorm_stats(x, running_mean, running_var, rmax=2.0, dmax=1.5)
        assert torch.equal(saved.r, torch.full_like(saved.r, 0.5))
        assert torch.equal(saved.d, torch.full_like(saved.d, -1.5))
    inputs = [t.requires_grad_(True) for t in (x, w, b)]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matches_autograd_of_textbook_forward(shape, fmt):
    """Running statistics chosen so that some channels' clips bind and others' do not."""
    gen = torch.Generator().manual_seed(2)
    x = memory_format(torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5, fmt)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    m = make(shape, rmax=1.5, dmax=0.5)
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    y, g = grads(m, x, dy)
    inputs = [t.detach().clone().requires_grad_(True) for t in (x, m.weight, m.bias)]
    y_ref = textbook_batch_renorm(*inputs, rm, rv, m.eps, 1.5, 0.5)
    g_ref = torch.autograd.grad(y_ref, inputs, dy)
    errors = [max_rel_err(y, y_ref)] + [max_rel_err(a, b) for a, b in zip(g, g_ref, strict=True)]
    print(f"{shape} {fmt}: y, dx, dgamma, dbeta rel errors {errors}")
    assert max(errors) < 1e-12
    assert g[0].stride() == x.stride()

    assert_eval_is_bn(m, x, dy)  # evaluation: BN's, with the running statistics as constants


# ---- BN as a special case ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_rmax_1_dmax_0_is_bn_exactly(shape, fmt):
    """Bit for bit, over several steps (the running statistics differ: renorm's rule).

    Both layers on bnlab.functional (``kernels.disabled()``): the identity is one of the
    math, so it is checked through one implementation of it; BN's fused kernel rounds in
    another order (its agreement with the reference is tests/test_kernels.py's)."""
    gen = torch.Generator().manual_seed(3)
    ours = MODULES[len(shape)](shape[1], rmax=1.0, dmax=0.0)
    bn = {2: bnn.BatchNorm1d, 3: bnn.BatchNorm1d, 4: bnn.BatchNorm2d, 5: bnn.BatchNorm3d}[
        len(shape)](shape[1])
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5, generator=gen)
        ours.bias.uniform_(-1, 1, generator=gen)
    bn.load_state_dict(ours.state_dict())
    for step in range(3):
        x = memory_format(torch.randn(shape, generator=gen) * (step + 1) + step, fmt)
        dy = torch.randn(shape, generator=gen)
        with kernels.disabled():
            y, g = grads(ours, x, dy)
            y_bn, g_bn = grads(bn, x, dy)
        assert torch.equal(y, y_bn), step
        for a, b in zip(g, g_bn, strict=True):
            assert torch.equal(a, b), step


# ---- Algorithm 1, written out --------------------------------------------------------------


def algorithm1(batches, dys, gamma, beta, *, momentum, eps, limits):
    """Ioffe 2017, Algorithm 1 in float64, with BN's initial running statistics (mean 0,
    variance 1, so sigma = sqrt(1 + eps)); ``limits(t)`` gives (rmax, dmax) at step t.

    Returns per step: y, (dx, dgamma, dbeta) from autograd with r, d detached, and the
    running (mu, sigma) after the step.
    """
    c = gamma.numel()
    mu, sigma = torch.zeros(c, dtype=torch.float64), torch.full((c,), math.sqrt(1 + eps),
                                                                 dtype=torch.float64)
    out = []
    for t, (x, dy) in enumerate(zip(batches, dys, strict=True)):
        dims = [0, *range(2, x.dim())]
        view = (1, -1, *[1] * (x.dim() - 2))
        x = x.detach().clone().requires_grad_(True)
        g, b = gamma.clone().requires_grad_(True), beta.clone().requires_grad_(True)
        mu_b = x.mean(dims)
        sigma_b = torch.sqrt(((x - mu_b.view(view)) ** 2).mean(dims) + eps)
        rmax, dmax = limits(t)
        r = torch.clamp(sigma_b / sigma, 1 / rmax, rmax).detach()
        d = torch.clamp((mu_b - mu) / sigma, -dmax, dmax).detach()
        x_hat = (x - mu_b.view(view)) / sigma_b.view(view) * r.view(view) + d.view(view)
        y = g.view(view) * x_hat + b.view(view)
        grads_ = torch.autograd.grad(y, (x, g, b), dy)
        mu = mu + momentum * (mu_b.detach() - mu)
        sigma = sigma + momentum * (sigma_b.detach() - sigma)
        out.append((y.detach(), grads_, mu.clone(), sigma.clone(), r, d))
    return out


@pytest.mark.parametrize(
    ("rmax", "dmax", "warmup_steps"),
    [(1e6, 1e6, 0), (2.0, 1.0, 0), (3.0, 5.0, 4), (math.inf, math.inf, 3)],
    ids=["large-clips", "binding-clips", "warm-up", "no-clips-warm-up"],
)
@pytest.mark.parametrize("shape", [(8, 3, 4, 4), (12, 5)], ids=["2d", "1d"])
def test_follows_algorithm_1(shape, rmax, dmax, warmup_steps):
    gen = torch.Generator().manual_seed(4)
    steps, momentum, eps = 6, 0.3, 1e-5
    # batches far from the initial running statistics (0, 1), drifting: r, d far from 1, 0
    batches = [torch.randn(shape, generator=gen, dtype=torch.float64) * (2 + 0.3 * t) + 3 - t
               for t in range(steps)]
    dys = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(steps)]
    layer = MODULES[len(shape)](shape[1], eps=eps, momentum=momentum, rmax=rmax, dmax=dmax,
                                warmup_steps=warmup_steps, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=gen)
        layer.bias.uniform_(-1, 1, generator=gen)

    def limits(t):  # the documented warm-up, linear from (1, 0)
        if warmup_steps == 0:
            return rmax, dmax
        f = min(1.0, t / warmup_steps)
        return (1.0, 0.0) if f == 0 else (1 + (rmax - 1) * f, dmax * f)

    ref = algorithm1(batches, dys, layer.weight.detach(), layer.bias.detach(),
                     momentum=momentum, eps=eps, limits=limits)
    rs, ds = [], []
    for t, (x, dy) in enumerate(zip(batches, dys, strict=True)):
        y, g = grads(layer, x, dy)
        y_ref, g_ref, mu, sigma, r, d = ref[t]
        rs.append(r)
        ds.append(d)
        errors = [max_rel_err(y, y_ref)] + [max_rel_err(a, b) for a, b in zip(g, g_ref,
                                                                                strict=True)]
        stats = [max_rel_err(layer.running_mean, mu),
                 max_rel_err(torch.sqrt(layer.running_var + eps), sigma)]
        print(f"step {t}: r {r.tolist()}, errors {errors}, running {stats}")
        assert max(errors) < 1e-12, t
        assert max(stats) < 1e-14, t
    if rmax > 1e5 and warmup_steps == 0:  # unclipped: training output is the eval output
        assert max(abs(r - 1).max().item() for r in rs) > 0.3  # a real correction
        layer.eval()
        x = batches[-1]
        sigma_before = ref[-2][3]
        y_train = ref[-1][0]
        view = (1, -1, *[1] * (x.dim() - 2))
        y_eval = (layer.weight.view(view) * (x - ref[-2][2].view(view))
                  / sigma_before.view(view) + layer.bias.view(view))
        assert max_rel_err(y_train, y_eval) < 1e-12
    if rmax == 2.0:  # the premise of "binding-clips": some clips bind, some do not
        r, d = torch.stack(rs), torch.stack(ds)
        bound = (r == rmax) | (r == 1 / rmax) | (d.abs() == dmax)
        assert bound.any() and not bound.all()
    if warmup_steps:  # the first step is BN's: r = 1, d = 0
        assert torch.equal(ref[0][4], torch.ones_like(ref[0][4]))


def test_renorm_limits():
    assert renorm.renorm_limits(0, 3.0, 5.0, 0) == (3.0, 5.0)
    assert renorm.renorm_limits(0, 3.0, 5.0, 10) == (1.0, 0.0)
    assert renorm.renorm_limits(5, 3.0, 5.0, 10) == (2.0, 2.5)
    assert renorm.renorm_limits(25, 3.0, 5.0, 10) == (3.0, 5.0)
    assert renorm.renorm_limits(0, math.inf, math.inf, 10) == (1.0, 0.0)


# ---- running statistics -------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_running_statistics_follow_the_documented_rule(momentum):
    """sqrt(running_var + eps) is the moving (or, with None, cumulative) average of the biased
    batch standard deviations sqrt(var_B + eps); running_mean that of the batch means."""
    gen = torch.Generator().manual_seed(5)
    eps = 1e-3
    layer = bnn.BatchRenorm2d(3, eps=eps, momentum=momentum, dtype=torch.float64)
    mean, std = torch.zeros(3, dtype=torch.float64), torch.full((3,), math.sqrt(1 + eps),
                                                                dtype=torch.float64)
    means, stds = [], []
    for t in range(5):
        x = torch.randn(6, 3, 2, 2, generator=gen, dtype=torch.float64) * (t + 1) + t
        layer(x)
        means.append(x.mean((0, 2, 3)))
        stds.append(torch.sqrt(x.var((0, 2, 3), unbiased=False) + eps))
        factor = 1 / (t + 1) if momentum is None else momentum
        mean = mean + factor * (means[-1] - mean)
        std = std + factor * (stds[-1] - std)
    if momentum is None:
        assert torch.allclose(std, torch.stack(stds).mean(0), rtol=1e-14, atol=0)
    assert torch.allclose(layer.running_mean, mean, rtol=1e-14, atol=0)
    assert torch.allclose(torch.sqrt(layer.running_var + eps), std, rtol=1e-14, atol=0)
    assert int(layer.num_batches_tracked) == 5
    before = layer.state_dict()
    layer.eval()(torch.randn(6, 3, 2, 2, dtype=torch.float64))
    for k, v in layer.state_dict().items():  # evaluation changes nothing
        assert torch.equal(v, before[k]), k


def test_state_dict_is_batchnorms_and_eval_is_bns():
    gen = torch.Generator().manual_seed(6)
    layer = bnn.BatchRenorm2d(4, rmax=2.0, dmax=1.0)
    for _ in range(3):
        layer(torch.randn(8, 4, 3, 3, generator=gen) * 2 + 1)
    bn = torch.nn.BatchNorm2d(4)
    bn.load_state_dict(layer.state_dict())
    x = torch.randn(8, 4, 3, 3, generator=gen)
    assert torch.allclose(layer.eval()(x), bn.eval()(x), atol=1e-6, rtol=0)
    fresh = bnn.BatchRenorm2d(4)
    fresh.load_state_dict(bn.state_dict())
    assert "rmax=3.0, dmax=5.0, warmup_steps=0" in repr(fresh)


# ---- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"rmax": 0.5}, "rmax must be >= 1"), ({"dmax": -1.0}, "dmax must be >= 0"),
     ({"warmup_steps": -1}, "warmup_steps must be a non-negative integer"),
     ({"warmup_steps": 1.5}, "got 1.5"), ({"rmax": math.nan}, "got nan"),
     ({"track_running_stats": False}, "track_running_stats must be True")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bnn.BatchRenorm2d(4, **kwargs)
    with pytest.raises(ValueError, match=match):
        ManualBatchRenorm2d(4, **kwargs)


def test_bad_input():
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        bnn.BatchRenorm2d(4)(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        bnn.BatchRenorm1d(4)(torch.randn(2, 4, 3, 3))
    with pytest.raises(RuntimeError, match="running_mean should contain 3 elements not 4"):
        bnn.BatchRenorm1d(4)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bnn.BatchRenorm1d(4)(torch.randn(1, 4))


# ---- the manual engine's twin ------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_manual_layer_matches_autograd_layer(fmt):
    gen = torch.Generator().manual_seed(7)
    options = {"momentum": 0.2, "rmax": 2.0, "dmax": 1.0, "warmup_steps": 2}
    auto = make((8, 4, 3, 3), seed=8, **options)
    manual = ManualBatchRenorm2d(4, dtype=torch.float64, **options)
    copy_to_manual(auto, manual)
    for step in range(5):
        training = step < 4
        x = memory_format(torch.randn(8, 4, 3, 3, generator=gen, dtype=torch.float64) * 2
                          + step, fmt)
        dy = torch.randn(8, 4, 3, 3, generator=gen, dtype=torch.float64)
        assert_manual_step_is_autograd(auto, manual, x, dy, training, step)
