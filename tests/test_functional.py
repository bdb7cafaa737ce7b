"""The math of bnlab.functional: gradients against autograd in float64, numerics in float32/16.

Reference values are computed in float64 from the *same* input values the function under
test sees, so the errors measured are those of the computation, not of the input's rounding.
"""

from __future__ import annotations

import pytest
import torch

from bnlab import functional as F
from bnlab.nn import BatchNormFunction

torch.set_default_dtype(torch.float32)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error, relative to the largest reference magnitude (norm-wise)."""
    a, ref = a.double(), ref.double()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def report(name: str, a: torch.Tensor, ref: torch.Tensor) -> float:
    err = rel_err(a, ref)
    pairs = ", ".join(f"{u:.6g}/{v:.6g}" for u, v in zip(a.flatten()[:3].tolist(),
                                                          ref.flatten()[:3].tolist(), strict=True))
    print(f"{name}: max rel err {err:.3e}  (first pairs ours/ref: {pairs})")
    return err


def reference_bn(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float):
    """Float64 autograd reference of training-mode BN (the textbook formula)."""
    x = x.detach().double().requires_grad_(True)
    g = gamma.detach().double().requires_grad_(True)
    b = beta.detach().double().requires_grad_(True)
    dims = F.reduce_dims(x)
    mu = x.mean(dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dims, keepdim=True)
    shape = (1, -1, *[1] * (x.dim() - 2))
    y = (x - mu) / torch.sqrt(var + eps) * g.view(shape) + b.view(shape)
    return y, (x, g, b)


SHAPES = {
    "1d (N, C)": (6, 3),
    "1d (N, C, L)": (4, 3, 5),
    "2d": (3, 2, 4, 3),
    "2d batch of 2": (2, 3, 2, 2),
    "3d": (2, 2, 3, 2, 2),
}


@pytest.fixture(params=[False, True], ids=["one chunk", "many chunks"])
def chunked(request, monkeypatch):
    """Run each check with the CPU chunking off and with tiny chunks (many partial sums)."""
    if request.param:
        monkeypatch.setattr(F, "_CHUNK_ELEMENTS", 8)
    return request.param


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_gradcheck_float64(shape, training, affine, chunked):
    gen = torch.Generator().manual_seed(hash((shape, training, affine)) % 2**31)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    c = shape[1]
    w = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(affine)
    b = torch.randn(c, generator=gen, dtype=torch.float64).requires_grad_(affine)
    rm = torch.randn(c, generator=gen, dtype=torch.float64)
    rv = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5

    def f(x, w, b):
        saved = F.batch_norm_prepare(x.detach(), rm, rv, training=training, eps=1e-5)
        return BatchNormFunction.apply(x, w if affine else None, b if affine else None, saved)

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_channels_last(chunked):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 3, 2, generator=gen, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w = (torch.rand(4, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return BatchNormFunction.apply(x, w, b, F.batch_norm_prepare(x.detach(), eps=1e-5))

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_closed_form_equals_autograd_reference(shape, chunked):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 2
    gamma = torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.5
    beta = torch.randn(shape[1], generator=gen, dtype=torch.float64)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    y, saved = F.batch_norm_forward(x, gamma, beta, eps=1e-5)
    dx, dgamma, dbeta = F.batch_norm_backward(dy, x, saved, gamma)
    y_ref, inputs = reference_bn(x, gamma, beta, 1e-5)
    grads_ref = torch.autograd.grad(y_ref, inputs, dy)
    for name, ours, ref in zip(("y", "dx", "dgamma", "dbeta"), (y, dx, dgamma, dbeta),
                               (y_ref, *grads_ref), strict=True):
        assert report(name, ours, ref) <= 1e-12


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_staged_backward_equals_closed_form(shape):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    gamma = torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.5
    beta = torch.randn(shape[1], generator=gen, dtype=torch.float64)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    y_staged, cache = F.batch_norm_forward_staged(x, gamma, beta, eps=1e-5)
    staged = F.batch_norm_backward_staged(dy, cache, eps=1e-5)
    y, saved = F.batch_norm_forward(x, gamma, beta, eps=1e-5)
    closed = F.batch_norm_backward(dy, x, saved, gamma)
    assert report("y", y_staged, y) <= 1e-13
    for name, a, b in zip(("dx", "dgamma", "dbeta"), staged, closed, strict=True):
        assert report(name, a, b) <= 1e-12


# ---- numerics -----------------------------------------------------------------------------

OFFSETS = {"mean 1e4, std 1": (1e4, 1.0), "mean -3e3, std 0.1": (-3e3, 0.1)}


@pytest.mark.parametrize("mean,std", OFFSETS.values(), ids=OFFSETS.keys())
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_offset_inputs_float32_accuracy(mean, std, memory_format):
    """Target 1e-5: the float32 result must carry ~17 good bits despite |mean|/std = 1e4-3e4.

    PyTorch's native kernel is printed beside ours for comparison (it measured 1.7e-4 and
    1e-3 on these inputs); bnlab must be the more accurate of the two.
    """
    gen = torch.Generator().manual_seed(0)
    shape = (64, 8, 16, 16)  # 2**17 values: large enough to be chunked (2**19 elements)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * std + mean).float()
    x = x.contiguous(memory_format=memory_format)
    gamma, beta = torch.rand(8, generator=gen) + 0.5, torch.randn(8, generator=gen)
    dy = torch.randn(shape, generator=gen).contiguous(memory_format=memory_format)

    y, saved = F.batch_norm_forward(x, gamma, beta, eps=1e-5)
    dx, dgamma, dbeta = F.batch_norm_backward(dy, x, saved, gamma)
    y_ref, inputs = reference_bn(x, gamma, beta, 1e-5)
    dx_ref, dgamma_ref, dbeta_ref = torch.autograd.grad(y_ref, inputs, dy.double())

    native = torch.nn.functional.batch_norm(x, None, None, gamma, beta, training=True, eps=1e-5)
    native_err = report("native y", native, y_ref)
    assert y.is_contiguous(memory_format=memory_format)
    errs = [report("y", y, y_ref), report("dx", dx, dx_ref), report("dgamma", dgamma, dgamma_ref),
            report("dbeta", dbeta, dbeta_ref)]
    assert max(errs) <= 1e-5
    assert errs[0] < native_err


def test_constant_channel_and_batch_of_two():
    """A constant channel normalizes to beta with finite gradients, as PyTorch's does."""
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    x[:, 1] = 5.0
    gamma = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    beta = torch.tensor([0.0, -1.0, 3.0], dtype=torch.float64)
    dy = torch.randn_like(x)
    y, saved = F.batch_norm_forward(x, gamma, beta, eps=1e-5)
    dx, dgamma, dbeta = F.batch_norm_backward(dy, x, saved, gamma)
    assert saved.var[1].item() == 0.0
    assert torch.equal(y[:, 1], torch.full_like(y[:, 1], -1.0))
    y_ref, inputs = reference_bn(x, gamma, beta, 1e-5)
    grads_ref = torch.autograd.grad(y_ref, inputs, dy)
    for name, a, b in zip(("dx", "dgamma", "dbeta"), (dx, dgamma, dbeta), grads_ref, strict=True):
        assert torch.isfinite(a).all()
        assert report(name, a, b) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("offset", [0.0, 100.0], ids=["centred", "offset 100"])
def test_half_precision_inputs(dtype, offset):
    """Computed in float32, so the only error of note is rounding the result to ``dtype``.

    Rounding to nearest costs at most half an ulp, ``eps/2 * |value|`` with eps = 2**-10
    (float16) or 2**-7 (bfloat16); we allow one eps of the largest magnitude (a factor 2
    for the float32 work before the rounding, which is ~1e-6 and negligible).
    """
    gen = torch.Generator().manual_seed(0)
    shape = (16, 4, 8, 8)
    x = (torch.randn(shape, generator=gen) * 2 + offset).to(dtype)
    gamma, beta = (torch.rand(4, generator=gen) + 0.5).to(dtype), torch.randn(4, generator=gen)
    beta = beta.to(dtype)
    dy = torch.randn(shape, generator=gen).to(dtype)
    y, saved = F.batch_norm_forward(x, gamma, beta, eps=1e-5)
    dx, dgamma, dbeta = F.batch_norm_backward(dy, x, saved, gamma)
    assert y.dtype == dx.dtype == dtype and dgamma.dtype == dtype
    y_ref, inputs = reference_bn(x, gamma, beta, 1e-5)
    grads_ref = torch.autograd.grad(y_ref, inputs, dy.double())
    eps = torch.finfo(dtype).eps
    for name, a, ref in zip(("y", "dx", "dgamma", "dbeta"), (y, dx, dgamma, dbeta),
                            (y_ref, *grads_ref), strict=True):
        assert report(name, a, ref) <= eps


@pytest.mark.parametrize("offset", [0.0, 1e4, -3e3])
def test_stats_match_float64_two_pass(offset):
    """Mean and variance of float32 data agree with a float64 two-pass over the same values.

    The float32 sums of ``d = x - K`` carry a relative error of about ``u * log2(m)`` for
    m summands (pairwise summation, u = 6e-8): a few 1e-7 here, whatever the offset.
    """
    x = (torch.randn(32, 5, 7, 7, dtype=torch.float64) + offset).float()
    _, mean, var = F.batch_norm_stats(x)
    x64 = x.double()
    mean_ref = x64.mean((0, 2, 3))
    var_ref = ((x64 - mean_ref.view(1, -1, 1, 1)) ** 2).mean((0, 2, 3))
    assert report("var", var, var_ref) <= 1e-6
    assert (mean - mean_ref).abs().max().item() <= 1e-6 * var_ref.sqrt().max().item()


# ---- running statistics ---------------------------------------------------------------------

def test_update_running_stats_uses_unbiased_variance():
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    mean, var = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([4.0, 8.0])
    F.update_running_stats(rm, rv, mean, var.double(), num_per_channel=5, momentum=0.25)
    assert torch.allclose(rm, 0.25 * mean, rtol=0, atol=1e-15)
    assert torch.allclose(rv, 0.75 + 0.25 * var.double() * 5 / 4, rtol=0, atol=1e-15)


def test_bias_corrected_running_stats_recover_the_true_average():
    """After t steps of a constant batch statistic s, the corrected average is exactly s."""
    momentum, s_mean, s_var = 0.1, torch.tensor([3.0]), torch.tensor([0.25])
    rm, rv = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    for t in range(1, 6):
        rm.mul_(1 - momentum).add_(momentum * s_mean.double())
        rv.mul_(1 - momentum).add_(momentum * s_var.double())
        m, v = F.bias_corrected_running_stats(rm, rv, t, momentum)
        assert abs(m.item() - 3.0) < 1e-12 and abs(v.item() - 0.25) < 1e-12
        assert abs(rm.item() - 3.0) > 0.1  # the raw average is still far off: the point of Q5
    assert F.bias_corrected_running_stats(rm, rv, 5, None) == (rm, rv)


def test_bad_eps_and_bad_shape():
    with pytest.raises(ValueError, match="eps must be positive"):
        F.batch_norm_forward(torch.randn(4, 3), eps=0.0)
    with pytest.raises(ValueError, match=r"shape \(N, C, \.\.\.\)"):
        F.reduce_dims(torch.randn(3))
