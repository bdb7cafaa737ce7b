"""Ghost batch normalization (Hoffer et al. 2017): BN per virtual batch, hand-derived.

With ``virtual_batch_size = N`` it is BN; with ``N / k`` it is BN applied to each of the k
slices in turn (outputs, gradients and running statistics); an uneven last slice is its own
smaller batch.
"""

from __future__ import annotations

import pytest
import torch

import bnlab.nn as bnn
from bnlab import kernels
from bnlab.checks import max_rel_err, textbook_ghost_batch_norm
from bnlab.manual import GhostBatchNorm2d as ManualGhostBatchNorm2d
from bnlab.variants import ghost
from tests.helpers import (
    FORMATS,
    assert_eval_is_bn,
    assert_manual_step_is_autograd,
    copy_to_manual,
    grads,
    memory_format,
)

# (N, virtual_batch_size): even, uneven (last slice smaller), one slice, size > N
SPLITS = [(8, 4), (8, 3), (9, 2), (6, 6), (5, 8)]
SPLIT_IDS = [f"N{n}-B{b}" for n, b in SPLITS]


def make(channels, size, dtype=torch.float64, seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    m = bnn.GhostBatchNorm2d(channels, virtual_batch_size=size, dtype=dtype, **kwargs)
    with torch.no_grad():
        m.weight.copy_(torch.rand(channels, generator=gen) + 0.5)
        m.bias.copy_(torch.randn(channels, generator=gen))
    return m


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("n", "size"), SPLITS, ids=SPLIT_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(n, size, fmt, training):
    gen = torch.Generator().manual_seed(1)
    x = memory_format(torch.randn(n, 3, 3, 2, generator=gen, dtype=torch.float64), fmt)
    w = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(3, generator=gen, dtype=torch.float64)
    running = (torch.randn(3, generator=gen, dtype=torch.float64),
               torch.rand(3, generator=gen, dtype=torch.float64) + 0.5)

    def f(x, w, b):
        saved, step = ghost.ghost_batch_norm_step(
            x.detach(), *running, None, training=training, virtual_batch_size=size,
            momentum=0.1, eps=1e-5)
        return ghost.GhostBatchNormFunction.apply(x, w, b, saved, step)

    inputs = [t.requires_grad_(True) for t in (x, w, b)]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("n", "size"), SPLITS, ids=SPLIT_IDS)
def test_matches_autograd_of_textbook_forward(n, size, fmt):
    gen = torch.Generator().manual_seed(2)
    x = memory_format(torch.randn(n, 4, 3, 3, generator=gen, dtype=torch.float64) * 2 + 3, fmt)
    dy = torch.randn(n, 4, 3, 3, generator=gen, dtype=torch.float64)
    m = make(4, size)
    y, g = grads(m, x, dy)
    inputs = [t.detach().clone().requires_grad_(True) for t in (x, m.weight, m.bias)]
    y_ref = textbook_ghost_batch_norm(*inputs, m.eps, size)
    g_ref = torch.autograd.grad(y_ref, inputs, dy)
    errors = [max_rel_err(y, y_ref)] + [max_rel_err(a, b) for a, b in zip(g, g_ref, strict=True)]
    print(f"N={n} B={size} {fmt}: y, dx, dgamma, dbeta rel errors {errors}")
    assert max(errors) < 1e-12
    assert y.stride() == x.stride() and g[0].stride() == x.stride()

    assert_eval_is_bn(m, x, dy)  # evaluation: BN's, with the running statistics as constants


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_whole_batch_is_bn(fmt, momentum):
    """virtual_batch_size = N (or more) is BN, bit for bit, buffers included: both on
    bnlab.functional (``kernels.disabled()``), since BN's fused kernel rounds in another
    order (its agreement with the reference is tests/test_kernels.py's)."""
    with kernels.disabled():
        gen = torch.Generator().manual_seed(3)
        for size in (8, 100):
            ours = make(4, size, dtype=torch.float32, momentum=momentum)
            bn = bnn.BatchNorm2d(4, momentum=momentum)
            bn.load_state_dict(ours.state_dict())
            for step in range(3):
                x = memory_format(torch.randn(8, 4, 3, 3, generator=gen) * 2 + step, fmt)
                dy = torch.randn(8, 4, 3, 3, generator=gen)
                y, g = grads(ours, x, dy)
                y_bn, g_bn = grads(bn, x, dy)
                assert torch.equal(y, y_bn)
                for a, b in zip(g, g_bn, strict=True):
                    assert torch.equal(a, b)
            for k, v in bn.state_dict().items():
                assert torch.equal(ours.state_dict()[k], v), k
            x = torch.randn(8, 4, 3, 3, generator=gen)
            assert torch.equal(ours.eval()(x), bn.eval()(x))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("n", "size"), [(8, 4), (8, 2), (8, 3), (9, 4)],
                         ids=["N/2", "N/4", "uneven-3-3-2", "uneven-4-4-1"])
def test_equals_bn_applied_to_each_slice(n, size, fmt):
    """Outputs and dx slice by slice, dgamma/dbeta summed, and the running statistics of BN
    stepped once per slice, in order."""
    with kernels.disabled():  # both on bnlab.functional: buffers must agree exactly
        gen = torch.Generator().manual_seed(4)
        ours = make(3, size, dtype=torch.float64)
        bn = bnn.BatchNorm2d(3, dtype=torch.float64)
        bn.load_state_dict(ours.state_dict())
        for step in range(2):
            x = memory_format(torch.randn(n, 3, 4, 4, generator=gen, dtype=torch.float64) + step,
                              fmt)
            dy = torch.randn(n, 3, 4, 4, generator=gen, dtype=torch.float64)
            y, (dx, dgamma, dbeta) = grads(ours, x, dy)
            slices = [grads(bn, xk, dyk) for xk, dyk in zip(x.split(size), dy.split(size),
                                                              strict=True)]
            assert len(slices) == -(-n // size)
            assert torch.allclose(y, torch.cat([s[0] for s in slices]), rtol=0, atol=1e-14)
            assert torch.allclose(dx, torch.cat([s[1][0] for s in slices]), rtol=0, atol=1e-14)
            assert torch.allclose(dgamma, sum(s[1][1] for s in slices), rtol=1e-14, atol=1e-14)
            assert torch.allclose(dbeta, sum(s[1][2] for s in slices), rtol=1e-14, atol=1e-14)
            for k, v in bn.named_buffers():
                assert torch.equal(getattr(ours, k), v), k
        assert int(ours.num_batches_tracked) == 2 * len(slices)


def test_without_running_stats_eval_uses_ghost_batches():
    gen = torch.Generator().manual_seed(5)
    m = make(3, 4, track_running_stats=False)
    x = torch.randn(8, 3, 2, 2, generator=gen, dtype=torch.float64)
    y_train = m(x)
    assert torch.equal(m.eval()(x), y_train)
    assert torch.allclose(y_train[:4], (make(3, 4, track_running_stats=False))(x[:4]))


@pytest.mark.parametrize("size", [0, -2, 2.5, True, "4"])
def test_bad_virtual_batch_size(size):
    with pytest.raises((ValueError, TypeError), match="virtual_batch_size"):
        bnn.GhostBatchNorm2d(3, virtual_batch_size=size)
    with pytest.raises((ValueError, TypeError), match="virtual_batch_size"):
        ManualGhostBatchNorm2d(3, virtual_batch_size=size)


def test_bad_input():
    layer = bnn.GhostBatchNorm2d(3, virtual_batch_size=2)
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        layer(torch.randn(4, 3, 2))
    with pytest.raises(RuntimeError, match="running_mean should contain 4 elements not 3"):
        layer(torch.randn(4, 4, 2, 2))
    # a last ghost batch of one 1x1 sample has one value per channel: BN's error
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel.*virtual batch"):
        layer(torch.randn(5, 3, 1, 1))
    assert layer.eval()(torch.randn(5, 3, 1, 1)).shape == (5, 3, 1, 1)  # eval needs none


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("n", "size"), [(8, 3), (8, 4)], ids=["uneven", "even"])
def test_manual_layer_matches_autograd_layer(n, size, fmt):
    gen = torch.Generator().manual_seed(6)
    auto = make(4, size, momentum=0.3)
    manual = ManualGhostBatchNorm2d(4, momentum=0.3, virtual_batch_size=size,
                                    dtype=torch.float64)
    copy_to_manual(auto, manual)
    for step in range(4):
        training = step < 3
        x = memory_format(torch.randn(n, 4, 3, 3, generator=gen, dtype=torch.float64) + step,
                          fmt)
        dy = torch.randn(n, 4, 3, 3, generator=gen, dtype=torch.float64)
        assert_manual_step_is_autograd(auto, manual, x, dy, training, step)
