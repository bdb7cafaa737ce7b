"""Each manual layer's backward equals autograd's on its torch twin, in float64.

Tolerance. Both sides evaluate the same sums in float64 (unit roundoff 1.1e-16) in
different orders; a sum of m terms differs by at most ~m·u relative to the sum of
magnitudes, so with m ≤ a few thousand here the errors are ~1e-14 (BN's backward
subtracts quantities of the size of its result and keeps that scale). 1e-10 leaves four
orders of magnitude of margin and would still catch any wrong factor, missing term or
float32 intermediate (~1e-7). Errors are measured relative to the largest reference
value (a per-element ratio is meaningless where the reference is near zero).
"""

from __future__ import annotations

import pytest
import torch

from bnlab.manual import (
    BatchNorm2d,
    Conv2d,
    Dropout,
    Flatten,
    GlobalAvgPool2d,
    ReLU,
    Sequential,
    dropout_mask,
    softmax_cross_entropy,
)
from bnlab.models import Dropout as AutogradDropout
from tests.helpers import check, layer_vs_autograd

F64 = torch.float64


def fmt(memory_format: torch.memory_format, x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=memory_format)


# ---------------------------------------------------------------------------------------
# Conv2d
# ---------------------------------------------------------------------------------------

# (name, N, C_in, C_out, H, W, kernel, stride, padding, bias, channels_last)
CONV_CASES = [
    ("3x3 pad1", 3, 4, 5, 7, 7, 3, 1, 1, True, False),
    ("3x3 stride2 pad1", 2, 3, 6, 9, 8, 3, 2, 1, False, False),
    ("3x3 valid", 2, 5, 4, 6, 6, 3, 1, 0, True, False),
    ("1x1", 4, 6, 3, 5, 5, 1, 1, 0, True, False),
    ("rect kernel, stride (2,1), pad (0,2)", 2, 3, 4, 7, 6, (3, 2), (2, 1), (0, 2), True, False),
    ("5x5 stride3 pad2", 2, 2, 3, 11, 10, 5, 3, 2, False, False),
    ("3x3 channels_last", 3, 4, 5, 6, 6, 3, 2, 1, True, True),
    ("1x1 channels_last no bias", 2, 8, 4, 4, 4, 1, 1, 0, False, True),
]


@pytest.mark.parametrize(
    "n, c_in, c_out, h, w, kernel, stride, padding, bias, channels_last",
    [c[1:] for c in CONV_CASES],
    ids=[c[0] for c in CONV_CASES],
)
def test_conv2d_backward_is_autograd(n, c_in, c_out, h, w, kernel, stride, padding, bias,
                                     channels_last):
    torch.manual_seed(0)
    mf = torch.channels_last if channels_last else torch.contiguous_format
    layer = Conv2d(c_in, c_out, kernel, stride, padding, bias=bias, dtype=F64).to(memory_format=mf)
    twin = torch.nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=bias, dtype=F64)
    with torch.no_grad():
        twin.weight.copy_(layer.params["weight"])
        if bias:
            twin.bias.copy_(layer.params["bias"])
    x = fmt(mf, torch.randn(n, c_in, h, w, dtype=F64))
    y, dx, y_ref, dx_ref, dy = layer_vs_autograd(layer, twin, x, dy_format=mf)
    check("y", y, y_ref)
    check("dx", dx, dx_ref)
    check("dweight", layer.grads["weight"], twin.weight.grad)
    if bias:
        check("dbias", layer.grads["bias"], twin.bias.grad)
    assert layer.backward(dy, need_dx=False) is None


def test_conv2d_default_init_is_torch_default_init():
    torch.manual_seed(3)
    twin = torch.nn.Conv2d(5, 7, 3)
    torch.manual_seed(3)
    layer = Conv2d(5, 7, 3)
    assert torch.equal(layer.params["weight"], twin.weight.detach())
    assert torch.equal(layer.params["bias"], twin.bias.detach())
    bound = 1 / (5 * 9) ** 0.5
    assert layer.params["weight"].abs().max() <= bound


def test_conv2d_rejects_bad_input():
    with pytest.raises(ValueError, match="expected 4D input"):
        Conv2d(3, 4, 3).forward(torch.randn(3, 8, 8), training=True)
    with pytest.raises(RuntimeError, match="before forward"):
        Conv2d(3, 4, 3).backward(torch.randn(1, 4, 2, 2))


# ---------------------------------------------------------------------------------------
# BatchNorm2d
# ---------------------------------------------------------------------------------------

# (name, shape, training, kwargs, channels_last, offset)
BN_CASES = [
    ("train", (4, 3, 5, 5), True, {}, False, 0.0),
    ("eval", (4, 3, 5, 5), False, {}, False, 0.0),
    ("train momentum None", (3, 4, 3, 2), True, {"momentum": None}, False, 0.0),
    ("train eps 1e-3 momentum 0.3", (5, 2, 4, 4), True, {"eps": 1e-3, "momentum": 0.3}, False,
     0.0),
    ("train affine=False", (4, 3, 3, 3), True, {"affine": False}, False, 0.0),
    ("train scale-only (bias=False)", (4, 3, 3, 3), True, {"bias": False}, False, 0.0),
    ("eval no running stats", (4, 3, 3, 3), False, {"track_running_stats": False}, False, 0.0),
    ("train channels_last", (4, 6, 3, 5), True, {}, True, 0.0),
    ("eval channels_last", (4, 6, 3, 5), False, {}, True, 0.0),
    ("train 1x1 map", (6, 5, 1, 1), True, {}, False, 0.0),
    ("train mean 1e4", (4, 3, 4, 4), True, {}, False, 1e4),
]


@pytest.mark.parametrize(
    "shape, training, kwargs, channels_last, offset",
    [c[1:] for c in BN_CASES],
    ids=[c[0] for c in BN_CASES],
)
def test_batchnorm2d_backward_is_autograd(shape, training, kwargs, channels_last, offset):
    torch.manual_seed(1)
    mf = torch.channels_last if channels_last else torch.contiguous_format
    c = shape[1]
    layer = BatchNorm2d(c, dtype=F64, **kwargs)
    twin = torch.nn.BatchNorm2d(c, dtype=F64, **kwargs)
    # non-trivial parameters and running statistics, the same in both
    with torch.no_grad():
        for name, t in twin.named_parameters():
            t.copy_(torch.randn(c, dtype=F64) * 0.5 + (1.0 if name == "weight" else 0.0))
        if twin.running_mean is not None:
            twin.running_mean.copy_(torch.randn(c, dtype=F64) + offset)
            twin.running_var.copy_(torch.rand(c, dtype=F64) + 0.5)
    Sequential([("bn", layer)]).load_state_dict(
        {f"bn.{k}": v for k, v in twin.state_dict().items()}
    )
    twin.train(training)
    x = fmt(mf, torch.randn(*shape, dtype=F64) * 2 + offset)
    y, dx, y_ref, dx_ref, _ = layer_vs_autograd(layer, twin, x, training, dy_format=mf)
    check("y", y, y_ref)
    check("dx", dx, dx_ref)
    for name, p in twin.named_parameters():
        check(f"d{name}", layer.grads[name], p.grad)
    assert set(layer.grads) == {n for n, _ in twin.named_parameters()}
    for name, b in twin.named_buffers():
        if b.is_floating_point():
            check(name, layer.buffers[name], b)
        else:
            assert torch.equal(layer.buffers[name], b), name
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("bias", [True, False], ids=["affine", "scale-only"])
def test_batchnorm_feature_view_gives_per_activation_bn(training, bias):
    """The hook a per-activation BN needs: statistics over the batch axis only.

    Overriding ``_features`` to view (N, C, H, W) as (N, C*H*W) is the whole variant; it is
    checked against ``torch.nn.BatchNorm1d(C*H*W)`` on the flattened input.
    """
    from bnlab.manual.layers import _BatchNorm

    class PerActivation(_BatchNorm):
        def _features(self, x):
            return x.reshape(x.shape[0], -1)

    torch.manual_seed(9)
    n, c, h, w = 6, 2, 3, 3
    layer = PerActivation(c * h * w, bias=bias, dtype=F64)
    twin = torch.nn.BatchNorm1d(c * h * w, bias=bias, dtype=F64)
    with torch.no_grad():
        twin.weight.uniform_(0.5, 1.5)
        twin.running_mean.normal_()
    state = {f"bn.{k}": v for k, v in twin.state_dict().items()}
    Sequential([("bn", layer)]).load_state_dict(state)
    twin.train(training)
    x = fmt(torch.channels_last, torch.randn(n, c, h, w, dtype=F64))
    y, dx, y_ref, dx_ref, _ = layer_vs_autograd(
        layer, lambda xr: twin(xr.reshape(n, -1)).reshape(n, c, h, w), x, training
    )
    check("y", y, y_ref)
    check("dx", dx, dx_ref)
    check("dweight", layer.grads["weight"], twin.weight.grad)
    assert ("bias" in layer.grads) == bias
    check("running_var", layer.buffers["running_var"], twin.running_var)


def test_batchnorm2d_buffers_follow_torch_over_steps():
    """num_batches_tracked and the cumulative average (momentum=None) over several batches."""
    torch.manual_seed(2)
    for momentum in (0.1, None):
        layer = BatchNorm2d(3, momentum=momentum, dtype=F64)
        twin = torch.nn.BatchNorm2d(3, momentum=momentum, dtype=F64)
        for _ in range(4):
            x = torch.randn(5, 3, 2, 2, dtype=F64) * 3 + 1
            twin(x)
            layer.forward(x, training=True)
        for name, b in twin.named_buffers():
            check(f"{name} momentum={momentum}", layer.buffers[name].double(), b.double())


def test_batchnorm2d_bias_correction_matches_bnlab_nn():
    from bnlab.nn import BatchNorm2d as BnlabBN

    torch.manual_seed(4)
    layer = BatchNorm2d(3, bias_correction=True, dtype=F64)
    twin = BnlabBN(3, bias_correction=True, dtype=F64)
    for _ in range(3):
        x = torch.randn(6, 3, 2, 2, dtype=F64) + 2
        twin(x)
        layer.forward(x, training=True)
    twin.eval()
    x = torch.randn(6, 3, 2, 2, dtype=F64)
    check("bias-corrected eval output", layer.forward(x, training=False), twin(x).detach())


def test_batchnorm2d_errors_like_torch():
    layer = BatchNorm2d(3)
    with pytest.raises(ValueError, match="expected 4D input"):
        layer.forward(torch.randn(4, 3), training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer.forward(torch.randn(1, 3, 1, 1), training=True)
    with pytest.raises(RuntimeError, match="should contain 4 elements not 3"):
        layer.forward(torch.randn(2, 4, 2, 2), training=True)


# ---------------------------------------------------------------------------------------
# ReLU, Dropout, pooling, flatten
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
@pytest.mark.parametrize(
    "shape, channels_last",
    [((3, 4, 5, 5), False), ((9, 8, 32, 32), True), ((2, 7), False)],
    ids=["small", "channels_last, several slices", "2D"],
)
def test_relu_backward_is_autograd(shape, channels_last, inplace, monkeypatch):
    from bnlab.manual import layers

    monkeypatch.setattr(layers, "_CHUNK_ELEMENTS", 1 << 14)  # several slices of the batch
    torch.manual_seed(5)
    mf = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(*shape, dtype=F64)
    x = fmt(mf, x) if x.dim() == 4 else x
    x[..., 0] = 0.0  # the kink: derivative taken as 0, as torch does
    xr = x.clone().requires_grad_()
    y_ref = torch.relu(xr)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    layer = ReLU(inplace=inplace)
    with torch.no_grad():
        y = layer.forward(x.clone(), training=True)
        dx = layer.backward(dy.clone())
    check("y", y, y_ref.detach(), tol=0.0)
    check("dx", dx, xr.grad, tol=0.0)


def test_relu_backward_takes_broadcast_gradient():
    layer = ReLU(inplace=True)
    y = layer.forward(torch.tensor([[-1.0, 2.0, 3.0]]).expand(2, 3).clone(), training=True)
    dy = torch.tensor([[4.0]]).expand(2, 3)  # a broadcast view is not overwritten
    assert torch.equal(layer.backward(dy), torch.tensor([[0.0, 4.0, 4.0], [0.0, 4.0, 4.0]]))
    assert y.shape == (2, 3)


@pytest.mark.parametrize("p", [0.2, 0.5])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dropout_backward_is_autograd_with_shared_masks(p, training):
    x = torch.randn(4, 3, 5, 5, dtype=F64)
    layer = Dropout(p, generator=torch.Generator().manual_seed(7))
    twin = AutogradDropout(p, generator=torch.Generator().manual_seed(7)).train(training)
    xr = x.clone().requires_grad_()
    y_ref = twin(xr)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    with torch.no_grad():
        y = layer.forward(x, training=training)
        dx = layer.backward(dy)
    check("y", y, y_ref.detach(), tol=0.0)
    check("dx", dx, xr.grad, tol=0.0)
    if training:
        kept = (y != 0).double().mean().item()
        assert abs(kept - (1 - p)) < 0.15, kept
        torch.testing.assert_close(y[y != 0], x[y != 0] / (1 - p), rtol=1e-15, atol=0)


def test_dropout_mask_is_inverted_and_seeded():
    x = torch.ones(10_000, dtype=F64)
    a = dropout_mask(x, 0.3, torch.Generator().manual_seed(0))
    b = dropout_mask(x, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) == {0.0, 1 / 0.7}
    assert abs(a.mean().item() - 1.0) < 0.05  # E[mask] = 1
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.0)


@pytest.mark.parametrize(
    "shape, channels_last",
    [((3, 4, 6, 6), False), ((2, 5, 3, 7), True), ((2, 3, 1, 1), False)],
    ids=["6x6", "3x7 channels_last", "1x1"],
)
def test_global_avg_pool_and_flatten_backward_is_autograd(shape, channels_last):
    torch.manual_seed(6)
    mf = torch.channels_last if channels_last else torch.contiguous_format
    x = fmt(mf, torch.randn(*shape, dtype=F64))
    xr = x.clone().requires_grad_()
    twin = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    y_ref = twin(xr)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    net = Sequential([("pool", GlobalAvgPool2d()), ("flatten", Flatten())])
    with torch.no_grad():
        y = net.forward(x)
        dx = net.backward(dy)
    check("y", y, y_ref.detach())
    check("dx", dx, xr.grad)


# ---------------------------------------------------------------------------------------
# Softmax cross-entropy
# ---------------------------------------------------------------------------------------

# (name, N, K, scale, offset, label_smoothing)
CE_CASES = [
    ("plain", 8, 10, 3.0, 0.0, 0.0),
    ("label smoothing 0.1", 8, 10, 3.0, 0.0, 0.1),
    ("label smoothing 1.0", 5, 4, 2.0, 0.0, 1.0),
    ("one example", 1, 3, 1.0, 0.0, 0.0),
    ("huge logits (exp would overflow)", 6, 10, 50.0, 1e4, 0.2),
    ("two classes", 16, 2, 5.0, -300.0, 0.0),
]


@pytest.mark.parametrize(
    "n, k, scale, offset, label_smoothing", [c[1:] for c in CE_CASES], ids=[c[0] for c in CE_CASES]
)
def test_softmax_cross_entropy_is_torch(n, k, scale, offset, label_smoothing):
    torch.manual_seed(8)
    logits = torch.randn(n, k, dtype=F64) * scale + offset
    target = torch.randint(0, k, (n,))
    lr = logits.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(lr, target, label_smoothing=label_smoothing)
    ref.backward()
    loss, dlogits = softmax_cross_entropy(logits, target, label_smoothing)
    assert torch.isfinite(loss) and torch.isfinite(dlogits).all()
    check("loss", loss, ref.detach())
    check("dlogits", dlogits, lr.grad)


def test_softmax_cross_entropy_errors():
    logits = torch.zeros(2, 3)
    with pytest.raises(IndexError, match="out of bounds"):
        softmax_cross_entropy(logits, torch.tensor([0, 3]))
    with pytest.raises(RuntimeError, match="label_smoothing"):
        softmax_cross_entropy(logits, torch.tensor([0, 1]), label_smoothing=1.5)
    with pytest.raises(ValueError, match="shape"):
        softmax_cross_entropy(logits, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        softmax_cross_entropy(torch.zeros(3), torch.tensor([0]))
