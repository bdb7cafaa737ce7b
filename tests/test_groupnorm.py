"""bnlab's GroupNorm is a drop-in for torch.nn.GroupNorm, with a hand-derived backward.

Checked against torch.nn.GroupNorm (outputs, gradients, errors, PyTorch's own module
database entries), against autograd through a textbook float64 forward, by finite
differences, and the manual engine's layer against the autograd one.
"""

from __future__ import annotations

import copy

import pytest
import torch

import bnlab.nn as bnn
from bnlab.checks import max_rel_err, textbook_group_norm
from bnlab.manual import GroupNorm as ManualGroupNorm
from bnlab.variants.groupnorm import GroupNormFunction
from tests.helpers import grads, memory_format

# (shape, num_groups): LayerNorm-like (G = 1), InstanceNorm-like (G = C) and in between;
# 2D to 5D input.
CASES = [
    ((6, 4), 2),
    ((4, 6, 7), 3),
    ((4, 6, 7), 1),
    ((3, 6, 5, 5), 2),
    ((3, 6, 5, 5), 6),
    ((3, 8, 4, 5), 1),
    ((2, 4, 3, 3, 2), 2),
]
IDS = [f"{'x'.join(map(str, s))}-G{g}" for s, g in CASES]


def pair(num_groups: int, channels: int, dtype: torch.dtype, **kwargs):
    ours = bnn.GroupNorm(num_groups, channels, dtype=dtype, **kwargs)
    if ours.weight is not None:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            if ours.bias is not None:
                ours.bias.uniform_(-1, 1)
    theirs = torch.nn.GroupNorm(num_groups, channels, dtype=dtype, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def dx_term_scale(x: torch.Tensor, num_groups: int, gamma: torch.Tensor,
                  dy: torch.Tensor) -> float:
    """Size of the terms whose sum is dx: max |gamma * invstd * dy|.

    dx = gamma invstd (dy - mean(dy) - x_hat mean(dy x_hat)) over a group can cancel far
    below its terms (with 2 values per group x_hat = +-1), so float32 is judged relative
    to the terms (as tests/test_nn.py does for BN).
    """
    var = x.double().reshape(x.shape[0], num_groups, -1).var(-1, unbiased=False)
    return dy.abs().max().item() * gamma.abs().max().item() * (var + 1e-5).rsqrt().max().item()


def dx_err(dx: torch.Tensor, ref: torch.Tensor, scale: float) -> float:
    """Largest error of dx over the larger of its reference's magnitude and its terms'."""
    return ((dx.double() - ref.double()).abs().max() / max(ref.abs().max().item(), scale)).item()


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize(("shape", "num_groups"), CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_group_norm(shape, num_groups, channels_last, dtype):
    """Against torch.nn.GroupNorm run in float64 (the truth for both dtypes)."""
    gen = torch.Generator().manual_seed(0)
    x = memory_format(torch.randn(shape, generator=gen, dtype=dtype) * 3 + 1, channels_last)
    dy = memory_format(torch.randn(shape, generator=gen, dtype=dtype), channels_last)
    ours, theirs = pair(num_groups, shape[1], dtype)
    y, g = grads(ours, x, dy)
    y_ref, g_ref = grads(copy.deepcopy(theirs).double(), x.double(), dy.double())
    # float32: each value passes through ~10 rounded operations (2**-24 each) and sums of
    # up to 150 terms; 1e-5 relative to the values (to dx's terms for dx) is ~10x that.
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    scale = dx_term_scale(x, num_groups, ours.weight.detach(), dy)
    errors = [max_rel_err(y, y_ref), dx_err(g[0], g_ref[0], scale),
              *[max_rel_err(a, b) for a, b in zip(g[1:], g_ref[1:], strict=True)]]
    print(f"{shape} G={num_groups}: y, dx, dgamma, dbeta rel errors {errors}")
    assert max(errors) < tol
    y_torch = theirs(x)
    assert y.is_contiguous(memory_format=torch.channels_last) == \
        y_torch.is_contiguous(memory_format=torch.channels_last)
    assert g[0].stride() == x.stride()  # dx in the input's memory format


@pytest.mark.parametrize("options", [{"affine": False}, {"bias": False}, {"eps": 0.1}],
                         ids=["no-affine", "no-bias", "eps"])
def test_options_match_torch(options):
    if "bias" in options and "bias" not in torch.nn.GroupNorm.__init__.__code__.co_varnames:
        pytest.skip("this PyTorch's GroupNorm has no bias argument")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 3, 3, generator=gen, dtype=torch.float64)
    dy = torch.randn_like(x)
    ours, theirs = pair(3, 6, torch.float64, **options)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    y, g = grads(ours, x, dy)
    y_ref, g_ref = grads(theirs, x, dy)
    assert len(g) == len(g_ref)
    assert max_rel_err(y, y_ref) < 1e-12
    for a, b in zip(g, g_ref, strict=True):
        assert max_rel_err(a, b) < 1e-12


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize(("shape", "num_groups"), CASES, ids=IDS)
def test_gradcheck_float64(shape, num_groups, channels_last):
    gen = torch.Generator().manual_seed(2)
    x = memory_format(torch.randn(shape, generator=gen, dtype=torch.float64), channels_last)
    w = torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(shape[1], generator=gen, dtype=torch.float64)
    inputs = [t.requires_grad_(True) for t in (x, w, b)]

    def f(x, w, b):
        return GroupNormFunction.apply(x, w, b, num_groups, 1e-5)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize(("shape", "num_groups"), CASES, ids=IDS)
def test_matches_autograd_of_textbook_forward(shape, num_groups, channels_last):
    gen = torch.Generator().manual_seed(3)
    x = memory_format(torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 5,
                      channels_last)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    ours = bnn.GroupNorm(num_groups, shape[1], dtype=torch.float64)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5, generator=gen)
        ours.bias.uniform_(-1, 1, generator=gen)
    for training in (True, False):  # GroupNorm computes the same function in both modes
        ours.train(training)
        y, g = grads(ours, x, dy)
        inputs = [t.detach().clone().requires_grad_(True) for t in (x, ours.weight, ours.bias)]
        y_ref = textbook_group_norm(inputs[0], num_groups, inputs[1], inputs[2], ours.eps)
        g_ref = torch.autograd.grad(y_ref, inputs, dy)
        scale = dx_term_scale(x, num_groups, ours.weight.detach(), dy)
        errors = [max_rel_err(y, y_ref), dx_err(g[0], g_ref[0], scale),
                  *[max_rel_err(a, b) for a, b in zip(g[1:], g_ref[1:], strict=True)]]
        print(f"training={training}: {errors}")
        assert max(errors) < 1e-12


def test_each_sample_is_normalized_alone():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 6, 4, 4, generator=gen)
    gn = bnn.GroupNorm(3, 6)
    alone = torch.cat([gn(x[i:i + 1]) for i in range(5)])
    assert torch.allclose(gn(x), alone, atol=1e-6, rtol=0)


def test_large_mean_is_as_accurate_as_centred():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(4, 6, 8, 8, generator=gen, dtype=torch.float64)
    gn = bnn.GroupNorm(2, 6)
    ones, zeros = torch.ones(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    for offset in (0.0, 1e4):
        x = (base + offset).float()  # the float32 input, exactly
        ref = textbook_group_norm(x.double(), 2, ones, zeros, 1e-5)
        err = max_rel_err(gn(x), ref)
        print(f"mean {offset:g}: rel error {err:.2e}")
        assert err < 1e-6  # a few float32 roundings of a value of order 1, either way


def test_empty_batch_matches_torch():
    ours, theirs = pair(2, 4, torch.float32)
    x = torch.randn(0, 4, 3, requires_grad=True)
    y = ours(x)
    assert y.shape == theirs(x).shape == (0, 4, 3)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(ours.weight.grad, torch.zeros(4))


BAD_INPUTS = [torch.randn(3), torch.randn(2, 6, 3), torch.randn(2, 5, 3), torch.randn(2, 3, 3),
              torch.randn(1, 2), torch.randn(1, 2, 1)]


@pytest.mark.parametrize("x", BAD_INPUTS,
                         ids=["1D", "6ch-for-4", "5ch-G2", "3ch-G2", "1x2", "1x2x1"])
@pytest.mark.parametrize("affine", [True, False])
def test_forward_errors_are_torchs(x, affine):
    channels = 2 if x.dim() >= 2 and x.shape[1] == 2 else 4
    ours, theirs = pair(2, channels, torch.float32, affine=affine)
    try:
        theirs(x)
    except Exception as expected:  # whatever PyTorch raises, we must raise too
        with pytest.raises(type(expected)) as got:
            ours(x)
        assert str(got.value) == str(expected)
    else:
        assert ours(x).shape == x.shape


@pytest.mark.parametrize(("num_groups", "channels"), [(3, 10), (5, 13), (4, 6)])
def test_constructor_errors_are_torchs(num_groups, channels):
    for cls in (torch.nn.GroupNorm, bnn.GroupNorm):
        with pytest.raises(ValueError, match=rf"num_channels \({channels}\) must be divisible"):
            cls(num_groups, channels)
    with pytest.raises(ValueError, match=rf"num_channels \({channels}\) must be divisible"):
        ManualGroupNorm(num_groups, channels)


def module_db_entry():
    common_modules = pytest.importorskip("torch.testing._internal.common_modules")
    (info,) = [m for m in common_modules.module_db if m.module_cls is torch.nn.GroupNorm]
    return info


@pytest.mark.parametrize("training", [True, False])
def test_pytorch_module_db_inputs(training):
    """Every GroupNorm input in PyTorch's own module test database, outputs and gradients."""
    info = module_db_entry()
    inputs = info.module_inputs_func(info, device="cpu", dtype=torch.float64,
                                     requires_grad=True, training=training)
    assert len(inputs) >= 8
    for entry in inputs:
        args, kwargs = entry.constructor_input.args, entry.constructor_input.kwargs
        theirs = torch.nn.GroupNorm(*args, **kwargs, dtype=torch.float64).train(training)
        ours = bnn.GroupNorm(*args, **kwargs, dtype=torch.float64).train(training)
        if ours.weight is not None:
            with torch.no_grad():
                ours.weight.uniform_(0.5, 1.5)
                if ours.bias is not None:
                    ours.bias.uniform_(-1, 1)
        theirs.load_state_dict(ours.state_dict())
        (x,) = entry.forward_input.args
        dy = torch.randn_like(x)
        y, g = grads(ours, x, dy)
        y_ref, g_ref = grads(theirs, x, dy)
        assert max_rel_err(y, y_ref) < 1e-12, entry.desc
        for a, b in zip(g, g_ref, strict=True):
            assert max_rel_err(a, b) < 1e-12, entry.desc


def test_pytorch_module_db_error_inputs():
    info = module_db_entry()
    errors = info.module_error_inputs_func(info, device="cpu", dtype=torch.float64,
                                           requires_grad=False, training=True)
    assert errors
    for entry in errors:
        constructor = entry.module_error_input.constructor_input
        assert entry.error_on.name == "CONSTRUCTION_ERROR"
        with pytest.raises(entry.error_type, match=entry.error_regex):
            bnn.GroupNorm(*constructor.args, **constructor.kwargs)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("num_groups", [1, 3, 6])
def test_manual_layer_matches_autograd_layer(num_groups, channels_last):
    gen = torch.Generator().manual_seed(6)
    x = memory_format(torch.randn(4, 6, 5, 5, generator=gen, dtype=torch.float64),
                      channels_last)
    dy = torch.randn(4, 6, 5, 5, generator=gen, dtype=torch.float64)
    auto = bnn.GroupNorm(num_groups, 6, dtype=torch.float64)
    with torch.no_grad():
        auto.weight.uniform_(0.5, 1.5, generator=gen)
        auto.bias.uniform_(-1, 1, generator=gen)
    manual = ManualGroupNorm(num_groups, 6, dtype=torch.float64)
    manual.params.update({k: v.detach().clone() for k, v in auto.state_dict().items()})
    for training in (True, False):
        y_ref, (dx_ref, dw_ref, db_ref) = grads(auto, x, dy)
        y = manual.forward(x, training)
        dx = manual.backward(dy)
        assert torch.equal(y, y_ref)
        assert torch.equal(dx, dx_ref)
        assert torch.equal(manual.grads["weight"], dw_ref)
        assert torch.equal(manual.grads["bias"], db_ref)


def test_one_group_is_layer_norm_and_c_groups_instance_norm():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 6, 4, 5, generator=gen, dtype=torch.float64) * 2 + 1
    layer_norm = torch.nn.functional.layer_norm(x, x.shape[1:], eps=1e-5)
    instance_norm = torch.nn.functional.instance_norm(x, eps=1e-5)
    assert max_rel_err(bnn.GroupNorm(1, 6, affine=False)(x), layer_norm) < 1e-13
    assert max_rel_err(bnn.GroupNorm(6, 6, affine=False)(x), instance_norm) < 1e-13


def test_output_takes_an_inplace_relu_as_torch_groupnorm_does():
    """``nn.ReLU(inplace=True)`` after GroupNorm (as in a network) works and keeps the
    gradients: its output is not a view autograd must protect."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    ours = bnn.GroupNorm(2, 4).double()
    native = torch.nn.GroupNorm(2, 4).double()
    dx_ours, = torch.autograd.grad(torch.relu_(ours(x)).square().sum(), x)
    dx_native, = torch.autograd.grad(torch.relu_(native(x)).square().sum(), x)
    print(f"max |dx - dx_native| {(dx_ours - dx_native).abs().max().item():.1e}")
    torch.testing.assert_close(dx_ours, dx_native, rtol=1e-10, atol=1e-12)
