"""The post's network in both engines: layers, BN flavours, gradients and case c's errors.

What is promised, checked in float64:

- ELU, AvgPool2d, GlobalAvgPool2d and PerActivationBatchNorm: the hand-written backward is
  autograd's on a reference forward (train and eval, contiguous and channels_last);
- the two BN flavours as the post ran them: forward and running statistics against a
  reference written here, the per-activation one also against ``torch.nn.BatchNorm1d``;
- the whole post net: the manual engine with every switch off computes autograd's
  gradients of ``bnlab.post.net.PostNet`` (both BN engines), evaluation mode agrees, and
  state dicts copy both ways;
- each switch of ``GRADIENT_ERRORS`` changes the gradients by exactly its documented
  factor, and all three together are autograd of a network whose backward has the same
  three deliberate errors;
- initialization: N(0, 0.05²), identical in both engines from one seed.

Tolerance (see ``test_manual_layers.py``): float64 sums of at most a few thousand terms
in different orders differ by ~1e-14 relative; 1e-10 leaves a wide margin and still
catches a wrong factor, a missing term or a float32 intermediate (~1e-7). The switch
factors are powers of two here (4, 16, N·H·W = 16 or 128), and scaling by a power of two
commutes with rounding, so those checks are exact (``torch.equal``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

from bnlab import functional as F
from bnlab.manual import (
    ELU,
    AvgPool2d,
    BatchNorm2d,
    GlobalAvgPool2d,
    PerActivationBatchNorm,
    Sequential,
    softmax_cross_entropy,
    train_step,
)
from bnlab.plans import post_net_plan
from bnlab.post.manual_net import GRADIENT_ERRORS, post_net
from bnlab.post.net import PostNet
from tests.helpers import (  # noqa: F401 (single_thread: an autouse fixture)
    check,
    layer_vs_autograd,
    print_then_assert,
    rel_err,
    single_thread,
)

TOL = 1e-10
F64 = torch.float64
CL = torch.channels_last
EPS = 1e-8  # the post's BN epsilon


def fmt(channels_last: bool, x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=CL if channels_last else torch.contiguous_format)


# ---------------------------------------------------------------------------------------
# ELU
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_elu_backward_is_autograd(alpha, channels_last, training):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 6, dtype=F64) * 2
    x[0, 0, 0, :3] = 0.0  # the kink: dy/dx = alpha there, as in PyTorch
    x = fmt(channels_last, x)
    y, dx, y_ref, dx_ref, _ = layer_vs_autograd(
        ELU(alpha), torch.nn.ELU(alpha), x, training
    )
    check("y", y, y_ref)
    check("dx", dx, dx_ref)
    assert ELU(alpha).forward(x, training).is_contiguous(memory_format=CL) == channels_last


def test_elu_positive_slope_doubles_dx_exactly_where_x_is_positive():
    """The post's case c: dx = 2 dy for x > 0, unchanged (dy (y + 1)) for x <= 0."""
    torch.manual_seed(1)
    x, dy = torch.randn(4, 3, 5, 5, dtype=F64), torch.randn(4, 3, 5, 5, dtype=F64)
    true_elu, post_elu = ELU(), ELU(positive_slope=2.0)
    y = true_elu.forward(x, training=True)
    dx_true = true_elu.backward(dy)
    assert torch.equal(post_elu.forward(x, training=True), y)
    dx_post = post_elu.backward(dy)
    positive = x > 0
    assert 0 < int(positive.sum()) < x.numel()
    assert torch.equal(dx_post[positive], 2 * dx_true[positive])
    assert torch.equal(dx_post[positive], 2 * dy[positive])
    assert torch.equal(dx_post[~positive], dx_true[~positive])
    assert torch.equal(dx_post[~positive], dy[~positive] * (y[~positive] + 1))


def test_elu_errors():
    with pytest.raises(ValueError, match="alpha > 0"):
        ELU(0.0)
    with pytest.raises(RuntimeError, match="before forward"):
        ELU().backward(torch.ones(2))


# ---------------------------------------------------------------------------------------
# Average pooling
# ---------------------------------------------------------------------------------------

# (name, shape, kernel, channels_last)
POOL_CASES = [
    ("2x2 on 8x8", (3, 4, 8, 8), 2, False),
    ("2x2 on 8x6 channels_last", (2, 5, 8, 6), 2, True),
    ("2x2 on 7x5 (last row and column dropped)", (2, 3, 7, 5), 2, False),
    ("3x3 on 9x7 channels_last", (2, 3, 9, 7), 3, True),
]


@pytest.mark.parametrize(
    "shape, kernel, channels_last", [c[1:] for c in POOL_CASES], ids=[c[0] for c in POOL_CASES]
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_avg_pool_backward_is_autograd(shape, kernel, channels_last, training):
    torch.manual_seed(2)
    x = fmt(channels_last, torch.randn(*shape, dtype=F64))
    y, dx, y_ref, dx_ref, _ = layer_vs_autograd(
        AvgPool2d(kernel), torch.nn.AvgPool2d(kernel), x, training
    )
    check("y", y, y_ref)
    check("dx", dx, dx_ref)
    assert dx.is_contiguous(memory_format=CL) == channels_last


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_avg_pool_without_division_copies_dy_to_the_four_inputs(channels_last):
    """The post's case c: every input of a window gets dy itself, 4x the true share."""
    torch.manual_seed(3)
    x = fmt(channels_last, torch.randn(2, 3, 6, 4, dtype=F64))
    dy = torch.randn(2, 3, 3, 2, dtype=F64)
    true_pool, post_pool = AvgPool2d(2), AvgPool2d(2, divide_gradient=False)
    true_pool.forward(x, training=True)
    post_pool.forward(x, training=True)
    dx_true, dx_post = true_pool.backward(dy), post_pool.backward(dy)
    assert torch.equal(dx_post, dy.repeat_interleave(2, 2).repeat_interleave(2, 3))
    assert torch.equal(dx_post, 4 * dx_true)


def test_avg_pool_errors():
    with pytest.raises(ValueError, match="expected 4D input"):
        AvgPool2d(2).forward(torch.randn(3, 4, 4), training=True)
    with pytest.raises(ValueError, match="smaller than the 2x2 window"):
        AvgPool2d(2).forward(torch.randn(1, 1, 1, 4), training=True)
    with pytest.raises(ValueError, match="kernel_size"):
        AvgPool2d(0)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_global_avg_pool_without_division_returns_dy_at_every_position(channels_last):
    torch.manual_seed(4)
    x = fmt(channels_last, torch.randn(3, 4, 8, 8, dtype=F64))
    _, dx_true, _, dx_ref, dy = layer_vs_autograd(
        GlobalAvgPool2d(), torch.nn.AdaptiveAvgPool2d(1), x
    )
    check("dx", dx_true, dx_ref)
    post_gap = GlobalAvgPool2d(divide_gradient=False)
    post_gap.forward(x, training=True)
    dx_post = post_gap.backward(dy)
    assert torch.equal(dx_post, dy.expand(x.shape))
    assert torch.equal(dx_post, 64 * dx_true)  # H W = 64 at the post's 8x8 map


# ---------------------------------------------------------------------------------------
# Per-activation batch normalization
# ---------------------------------------------------------------------------------------


def per_activation_reference(x, gamma, beta, running_mean, running_var, training, eps):
    """y = gamma (x - mu) / sqrt(var + eps) + beta per (c, h, w), written out in float64."""
    n = x.shape[0]
    xf = x.reshape(n, -1)
    if training:
        mu, var = xf.mean(0), ((xf - xf.mean(0)) ** 2).mean(0)  # biased
    else:
        mu, var = running_mean, running_var
    y = (xf - mu) / torch.sqrt(var + eps)
    if gamma is not None:
        y = gamma * y
    if beta is not None:
        y = y + beta
    return y.reshape(x.shape)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("bias", [True, False], ids=["affine", "scale-only"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_per_activation_bn_backward_is_autograd(training, bias, channels_last):
    torch.manual_seed(5)
    n, c, h, w = 6, 3, 4, 2
    layer = PerActivationBatchNorm(c, h, w, eps=1e-5, bias=bias, dtype=F64)
    gamma = (torch.rand(c * h * w, dtype=F64) + 0.5).requires_grad_()
    beta = (torch.randn(c * h * w, dtype=F64) * 0.5).requires_grad_() if bias else None
    running_mean = torch.randn(c * h * w, dtype=F64)
    running_var = torch.rand(c * h * w, dtype=F64) + 0.5
    state = {"bn.weight": gamma.detach(), "bn.running_mean": running_mean,
             "bn.running_var": running_var, "bn.num_batches_tracked": torch.tensor(0)}
    if bias:
        state["bn.bias"] = beta.detach()
    Sequential([("bn", layer)]).load_state_dict(state)

    x = fmt(channels_last, torch.randn(n, c, h, w, dtype=F64) * 2 + 1)

    def reference(xr):
        return per_activation_reference(
            xr, gamma, beta, running_mean, running_var, training, 1e-5
        )

    y, dx, y_ref, dx_ref, _ = layer_vs_autograd(layer, reference, x, training)
    check("y", y, y_ref)
    check("dx", dx, dx_ref)
    check("dgamma", layer.grads["weight"], gamma.grad)
    if bias:
        check("dbeta", layer.grads["bias"], beta.grad)
    assert set(layer.grads) == ({"weight", "bias"} if bias else {"weight"})
    if training:  # the running averages moved toward the unbiased batch statistics
        xf = x.reshape(n, -1)
        check("running_mean", layer.buffers["running_mean"], 0.9 * running_mean + 0.1 * xf.mean(0))
        check("running_var", layer.buffers["running_var"],
              0.9 * running_var + 0.1 * xf.var(0, correction=1))


def test_per_activation_bn_rejects_other_shapes():
    layer = PerActivationBatchNorm(2, 3, 3)
    for bad in [torch.randn(4, 2, 3, 4), torch.randn(4, 3, 3, 3), torch.randn(4, 18)]:
        with pytest.raises(ValueError, match=r"expected input of shape \(N, 2, 3, 3\)"):
            layer.forward(bad, training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer.forward(torch.randn(1, 2, 3, 3), training=True)
    with pytest.raises(ValueError, match="positive sizes"):
        PerActivationBatchNorm(2, 0, 3)


def test_update_running_stats_biased_and_unbiased():
    mean, var = torch.tensor([2.0], dtype=F64), torch.tensor([3.0], dtype=F64)
    for unbiased, expected_var in [(True, 0.5 * 1 + 0.5 * 3 * 4 / 3), (False, 0.5 * 1 + 0.5 * 3)]:
        rm, rv = torch.zeros(1, dtype=F64), torch.ones(1, dtype=F64)
        F.update_running_stats(rm, rv, mean, var, 4, 0.5, unbiased=unbiased)
        assert rm.item() == 1.0 and rv.item() == pytest.approx(expected_var, rel=1e-15)


def test_bias_correction_knows_the_initial_running_var():
    """After one step the bias-corrected running statistics are the batch's own.

    With the post's initial running variance 0, the correction must remove
    0.9 * 0, not 0.9 * 1 (which would leave var - 9, negative, and NaN outputs).
    """
    torch.manual_seed(6)
    x = torch.randn(8, 3, 2, 2, dtype=F64) * 2 + 1
    layer = BatchNorm2d(3, bias_correction=True, running_var_init=0.0, dtype=F64)
    layer.forward(x, training=True)
    y_eval = layer.forward(x, training=False)
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), correction=1, keepdim=True)
    check("bias-corrected eval output", y_eval, (x - mean) / torch.sqrt(var + 1e-5))


# ---------------------------------------------------------------------------------------
# The two BN flavours as the post ran them, in the three implementations
# ---------------------------------------------------------------------------------------


def post_bn(flavour: str, impl: str, image_size: int = 8):
    """bn1 of the post net at width 0.125 (24 channels), from either engine."""
    if impl == "manual":
        return post_net(flavour, 0.125, image_size=image_size, dtype=F64)["bn1"]
    return PostNet(impl, flavour, 0.125, image_size=image_size, dtype=F64).bn1


def run_bn(bn, x: torch.Tensor, training: bool) -> torch.Tensor:
    if isinstance(bn, torch.nn.Module):
        bn.train(training)
        with torch.no_grad():
            return bn(x)
    return bn.forward(x, training=training)


def buffers(bn) -> dict[str, torch.Tensor]:
    return dict(bn.named_buffers()) if isinstance(bn, torch.nn.Module) else bn.buffers


@pytest.mark.parametrize("impl", ["manual", "torch", "bnlab"])
@pytest.mark.parametrize("flavour", ["channel", "activation"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_post_bn_flavours_match_a_float64_reference(flavour, impl, channels_last):
    """Case b: per channel, unbiased running var; case c: per activation, biased running var.

    Both: gamma only (no beta), running averages from 0 with weight 0.1 on the new batch,
    eps 1e-8; 3 training steps, then evaluation with the running averages.
    """
    torch.manual_seed(7)
    bn = post_bn(flavour, impl)
    bn_features = 24 if flavour == "channel" else 24 * 8 * 8
    gamma = torch.rand(bn_features, dtype=F64) + 0.5
    if isinstance(bn, torch.nn.Module):
        with torch.no_grad():
            bn.weight.copy_(gamma)
        assert [n for n, _ in bn.named_parameters()] == ["weight"]
    else:
        bn.params["weight"].copy_(gamma)
        assert list(bn.params) == ["weight"]
    b = buffers(bn)
    assert torch.equal(b["running_var"], torch.zeros(bn_features, dtype=F64))
    assert torch.equal(b["running_mean"], torch.zeros(bn_features, dtype=F64))

    dims, shape = ((0, 2, 3), (1, -1, 1, 1)) if flavour == "channel" else ((0,), (-1,))
    running_mean = torch.zeros(bn_features, dtype=F64)
    running_var = torch.zeros(bn_features, dtype=F64)
    for _ in range(3):
        x = fmt(channels_last, torch.randn(5, 24, 8, 8, dtype=F64) * 3 + 2)
        xf = x if flavour == "channel" else x.reshape(5, -1)
        mu, var = xf.mean(dims), xf.var(dims, correction=0)
        y_ref = gamma.reshape(shape) * (xf - mu.reshape(shape)) / (var.reshape(shape) + EPS).sqrt()
        check("y train", run_bn(bn, x, True), y_ref.reshape(x.shape))
        m = xf.numel() // bn_features
        new_var = var * m / (m - 1) if flavour == "channel" else var  # unbiased / biased
        running_mean = 0.9 * running_mean + 0.1 * mu
        running_var = 0.9 * running_var + 0.1 * new_var
    b = buffers(bn)
    check("running_mean", b["running_mean"], running_mean)
    check("running_var", b["running_var"], running_var)
    assert int(b["num_batches_tracked"]) == 3
    x = fmt(channels_last, torch.randn(5, 24, 8, 8, dtype=F64))
    xf = x if flavour == "channel" else x.reshape(5, -1)
    y_ref = gamma.reshape(shape) * (xf - running_mean.reshape(shape)) / (
        running_var.reshape(shape) + EPS
    ).sqrt()
    check("y eval", run_bn(bn, x, False), y_ref.reshape(x.shape))


@pytest.mark.parametrize("impl", ["manual", "torch", "bnlab"])
@pytest.mark.parametrize("flavour", ["channel", "activation"])
def test_post_bn_bias_correction_divides_out_the_zero_start(flavour, impl):
    """After one step from 0, the bias-corrected running statistics are the batch's own.

    Set as an attribute after construction, as the trainer does.
    """
    torch.manual_seed(9)
    bn = post_bn(flavour, impl)
    bn.bias_correction = True
    x = torch.randn(5, 24, 8, 8, dtype=F64) * 2 + 1
    run_bn(bn, x, True)
    xf = x if flavour == "channel" else x.reshape(5, -1)
    dims, shape = ((0, 2, 3), (1, -1, 1, 1)) if flavour == "channel" else ((0,), (-1,))
    var = xf.var(dims, correction=1 if flavour == "channel" else 0)  # what was averaged
    y_ref = (xf - xf.mean(dims).reshape(shape)) / (var.reshape(shape) + EPS).sqrt()
    check("bias-corrected eval output", run_bn(bn, x, False), y_ref.reshape(x.shape))


@pytest.mark.parametrize("impl", ["manual", "torch", "bnlab"])
def test_per_activation_bn_is_batchnorm1d_on_flattened_features(impl):
    """torch.nn.BatchNorm1d(C*H*W) with bias 0 and running var from 0 (its own is unbiased)."""
    torch.manual_seed(8)
    n = 6
    bn = post_bn("activation", impl)
    twin = torch.nn.BatchNorm1d(24 * 8 * 8, eps=EPS, momentum=0.1, dtype=F64)
    with torch.no_grad():
        twin.weight.uniform_(0.5, 1.5)
        twin.running_var.zero_()
        if isinstance(bn, torch.nn.Module):
            bn.weight.copy_(twin.weight)
        else:
            bn.params["weight"].copy_(twin.weight)
        for _ in range(3):
            x = torch.randn(n, 24, 8, 8, dtype=F64) + 1
            check("y", run_bn(bn, x, True), twin(x.reshape(n, -1)).reshape(x.shape))
    b = buffers(bn)
    check("running_mean", b["running_mean"], twin.running_mean)
    # from 0, the running variance is linear in the batch variances: undo Bessel's n/(n-1)
    check("running_var", b["running_var"], twin.running_var * (n - 1) / n)


# ---------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------


def test_plan_is_the_posts_network():
    plan = post_net_plan(bn="channel")
    convs = [s.args for s in plan if s.kind == "conv"]
    got = [(a["in_channels"], a["out_channels"], a["kernel_size"], a["padding"]) for a in convs]
    assert got == [
        (3, 96, 3, 1), (96, 96, 3, 1), (96, 192, 3, 1),
        (192, 192, 3, 1), (192, 192, 3, 1), (192, 192, 3, 1),
        (192, 192, 3, 1), (192, 192, 1, 0), (192, 10, 1, 0),
    ]
    assert all(a["stride"] == 1 and a["bias"] is False for a in convs)
    names = [s.name for s in plan]
    assert names == [
        "conv1", "elu1", "conv2", "elu2", "conv3", "elu3", "bn1", "pool1",
        "conv4", "elu4", "conv5", "elu5", "conv6", "elu6", "bn2", "pool2",
        "conv7", "elu7", "conv8", "elu8", "conv9", "elu9", "gap", "flatten",
    ]
    assert [s.name for s in post_net_plan(bn="none")] == [n for n in names if "bn" not in n]
    weights = 3 * 96 * 9 + 96 * 96 * 9 + 96 * 192 * 9 + 4 * 192 * 192 * 9 + 192 * 192 + 1920
    assert weights == 1_617_312
    count = {bn: sum(p.numel() for p in PostNet("torch", bn).parameters())
             for bn in ("channel", "activation")}
    assert count == {"channel": weights + 2 * 192,
                     "activation": weights + 192 * 32 * 32 + 192 * 16 * 16}
    assert sum(p.numel() for p in post_net("activation").parameters()) == count["activation"]


def test_width_rounds_and_final_map_is_8x8():
    channels = [s.args["out_channels"] for s in post_net_plan(width=0.01) if s.kind == "conv"]
    assert channels == [1, 1, 2, 2, 2, 2, 2, 2, 10]  # max(1, round(96 w)), round(192 w)
    model = PostNet("torch", "activation", width=0.125)
    seen = {}

    def record(module, inputs, output) -> None:
        seen["shape"] = inputs[0].shape

    model.gap.register_forward_hook(record)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert seen["shape"] == (2, 10, 8, 8)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="bn must be one of"):
        post_net("batch")
    with pytest.raises(ValueError, match="image_size must be at least 4"):
        post_net(image_size=3)
    with pytest.raises(ValueError, match="width must be positive"):
        post_net_plan(width=0)
    with pytest.raises(ValueError, match="bn_kind must be one of"):
        PostNet("torch", "pixel")
    with pytest.raises(ValueError, match="norm must be one of"):
        PostNet("tf")
    with pytest.raises(ValueError, match=r"the valid ones are \('elu', 'pool', 'loss'\)"):
        post_net(gradient_errors=("elu", "relu"))


# ---------------------------------------------------------------------------------------
# The whole network: manual engine == autograd
# ---------------------------------------------------------------------------------------


def twins(bn: str, norm: str, seed: int = 11, image_size: int = 8, memory_format=None):
    """The manual post net (width 0.125) and its autograd twin, float64, same weights."""
    net = post_net(bn, 0.125, image_size=image_size, generator=torch.Generator().manual_seed(seed),
                   dtype=F64, memory_format=memory_format)
    model = PostNet("none" if bn == "none" else norm, "channel" if bn == "none" else bn, 0.125,
                    image_size=image_size, generator=torch.Generator().manual_seed(seed),
                    dtype=F64)
    return net, model


def randomize_bn_(model: PostNet, seed: int) -> None:
    """Random gamma and running statistics (running var > 0), for evaluation mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("bn1", "bn2"):
            bn = getattr(model, name, None)
            if bn is not None:
                c = bn.num_features
                bn.weight.copy_(torch.rand(c, generator=gen, dtype=F64) + 0.5)
                bn.running_mean.copy_(torch.randn(c, generator=gen, dtype=F64) * 0.1)
                bn.running_var.copy_(torch.rand(c, generator=gen, dtype=F64) * 0.1 + 0.05)


def engine_errors(net, model, images, labels, training: bool) -> dict[str, float]:
    """Relative errors of loss, logits, dL/d(images), every gradient and buffer."""
    model.train(training)
    xr = images.clone().requires_grad_()
    logits_ref = model(xr)
    loss_ref = TF.cross_entropy(logits_ref, labels)
    loss_ref.backward()
    with torch.no_grad():
        logits = net.forward(images, training=training)
        loss, dlogits = softmax_cross_entropy(logits, labels)
        dx = net.backward(dlogits)
    errors = {"loss": rel_err(loss, loss_ref.detach()),
              "logits": rel_err(logits, logits_ref.detach()),
              "input": rel_err(dx, xr.grad)}
    grads = net.named_gradients()
    assert set(grads) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        errors[f"grad {name}"] = rel_err(grads[name], p.grad)
    for name, b in model.named_buffers():
        errors[f"buffer {name}"] = rel_err(net.state_dict()[name].double(), b.double())
    return errors


# (name, bn, norm, extra kwargs of the twins, batch)
NET_CASES = [
    ("no BN", "none", "none", {}, 4),
    ("channel torch", "channel", "torch", {}, 4),
    ("channel bnlab", "channel", "bnlab", {}, 4),
    ("activation torch", "activation", "torch", {}, 4),
    ("activation bnlab", "activation", "bnlab", {}, 4),
    ("activation torch channels_last", "activation", "torch", {"memory_format": CL}, 4),
    ("channel torch 32x32 (8x8 final map)", "channel", "torch", {"image_size": 32}, 2),
]


@pytest.mark.parametrize(
    "bn, norm, kwargs, batch", [c[1:] for c in NET_CASES], ids=[c[0] for c in NET_CASES]
)
def test_post_net_gradients_are_autograd(bn, norm, kwargs, batch):
    net, model = twins(bn, norm, **kwargs)
    size = kwargs.get("image_size", 8)
    gen = torch.Generator().manual_seed(12)
    images = torch.randn(batch, 3, size, size, generator=gen, dtype=F64)
    if kwargs.get("memory_format") is not None:
        images = images.contiguous(memory_format=kwargs["memory_format"])
    labels = torch.randint(0, 10, (batch,), generator=gen)
    errors = engine_errors(net, model, images, labels, training=True)
    assert "grad conv9.weight" in errors
    if bn != "none":
        assert "grad bn2.weight" in errors and "buffer bn2.running_var" in errors
    print_then_assert(errors)


@pytest.mark.parametrize("bn, norm", [("channel", "torch"), ("activation", "bnlab"),
                                      ("activation", "torch")])
def test_post_net_evaluation_mode_is_autograd(bn, norm):
    net, model = twins(bn, norm)
    randomize_bn_(model, seed=13)
    net.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(14)
    images = torch.randn(4, 3, 8, 8, generator=gen, dtype=F64)
    labels = torch.randint(0, 10, (4,), generator=gen)
    print_then_assert(engine_errors(net, model, images, labels, training=False))
    model.eval()
    check("predict", net.predict(images), model(images).detach())


@pytest.mark.parametrize("bn", ["channel", "activation"])
def test_state_dict_copies_both_ways(bn):
    net, _ = twins(bn, "torch", seed=1)
    _, model = twins(bn, "torch", seed=2)
    assert list(net.state_dict()) == list(model.state_dict())
    # make the running statistics non-trivial: one training step in the manual engine
    net.forward(torch.randn(4, 3, 8, 8, dtype=F64), training=True)
    model.load_state_dict(net.state_dict())
    for key, value in net.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    _, other = twins(bn, "bnlab", seed=3)
    randomize_bn_(other, seed=4)
    net.load_state_dict(other.state_dict())
    for key, value in other.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key


# ---------------------------------------------------------------------------------------
# Case c's gradient errors, one switch at a time
# ---------------------------------------------------------------------------------------


def layer_gradients(net: Sequential, images: torch.Tensor, labels: torch.Tensor):
    """Back-propagate layer by layer; returns ({layer: dL/d(its input)}, {param: grad}, dys).

    ``dys[name]`` is the gradient that arrived at layer ``name`` (dL/d(its output)).
    """
    with torch.no_grad():
        logits = net.forward(images, training=True)
        _, dy = softmax_cross_entropy(logits, labels, mean_gradient=net.mean_gradient)
        into, arrived = {"logits": dy}, {}
        for name, layer in reversed(list(net)):
            arrived[name] = dy
            dy = layer.backward(dy)
            into[name] = dy
    return into, dict(net.named_gradients()), arrived


def switch_pair(error: str, bn: str = "activation", image_size: int = 8, batch: int = 4):
    """Gradients of the true and the ``error``-switched net: same weights, same batch."""
    gen = torch.Generator().manual_seed(21)
    images = torch.randn(batch, 3, image_size, image_size, generator=gen, dtype=F64)
    labels = torch.randint(0, 10, (batch,), generator=gen)
    results = []
    for errors in ((), (error,)):
        net = post_net(bn, 0.125, image_size=image_size, gradient_errors=errors,
                       generator=torch.Generator().manual_seed(22), dtype=F64)
        results.append((net, *layer_gradients(net, images, labels)))
    return results


def test_switches_reach_the_layers():
    net = post_net("activation", 0.125, gradient_errors=GRADIENT_ERRORS)
    assert all(net[f"elu{i}"].positive_slope == 2.0 for i in range(1, 10))
    assert not net["pool1"].divide_gradient and not net["pool2"].divide_gradient
    assert not net["gap"].divide_gradient and net.mean_gradient is False
    clean = post_net("activation", 0.125)
    assert clean.mean_gradient is True and clean["gap"].divide_gradient
    assert all(clean[f"elu{i}"].positive_slope == 1.0 for i in range(1, 10))
    # one switch sets only its own layers
    assert post_net(gradient_errors=["pool"]).mean_gradient is True
    assert post_net(gradient_errors=["loss"])["pool1"].divide_gradient


@pytest.mark.parametrize("bn", ["none", "channel", "activation"])
def test_pool_switch_multiplies_the_gradient_below_each_pool_by_4(bn):
    (true, into_t, grads_t, _), (_, into_p, grads_p, _) = switch_pair("pool", bn)
    names = [name for name, _ in true]
    below_pool1 = names[: names.index("pool1") + 1]  # conv1 ... pool1 (its input gradient)
    between = names[names.index("pool1") + 1 : names.index("pool2") + 1]
    above = names[names.index("pool2") + 1 :]
    factor = {**dict.fromkeys(below_pool1, 16), **dict.fromkeys(between, 4),
              **dict.fromkeys(above, 1)}
    for name in names:
        if into_t[name] is not None:
            assert torch.equal(into_p[name], factor[name] * into_t[name]), name
    for key in grads_t:
        layer = key.split(".")[0]
        assert torch.equal(grads_p[key], factor[layer] * grads_t[key]), key
    print({name: factor[name] for name in names})


@pytest.mark.parametrize("image_size, batch", [(8, 4), (32, 2)], ids=["2x2 map", "8x8 map"])
def test_loss_switch_multiplies_dlogits_by_n_and_the_gap_gradient_by_hw(image_size, batch):
    (_, into_t, grads_t, _), (post, into_p, grads_p, _) = switch_pair(
        "loss", "channel", image_size, batch
    )
    hw = (image_size // 4) ** 2
    assert torch.equal(into_p["logits"], batch * into_t["logits"])  # p - q, not (p - q) / N
    assert torch.equal(into_p["flatten"], batch * into_t["flatten"])
    assert torch.equal(into_p["gap"], batch * hw * into_t["gap"])  # dy, not dy / (H W)
    for key in grads_t:
        assert torch.equal(grads_p[key], batch * hw * grads_t[key]), key
    assert post.mean_gradient is False


def test_loss_gradient_without_mean_is_softmax_minus_onehot():
    torch.manual_seed(23)
    logits, labels = torch.randn(6, 10, dtype=F64), torch.randint(0, 10, (6,))
    loss_mean, d_mean = softmax_cross_entropy(logits, labels)
    loss_sum, d_sum = softmax_cross_entropy(logits, labels, mean_gradient=False)
    assert torch.equal(loss_sum, loss_mean)  # the loss value is the batch mean either way
    check("dlogits", d_sum, torch.softmax(logits, 1) - TF.one_hot(labels, 10).to(F64), 1e-14)
    check("N * mean gradient", d_sum, 6 * d_mean, 1e-15)


def test_train_step_passes_mean_gradient():
    class Recorder:
        def step(self, grads):
            self.grads = [g.clone() for g in grads]

    gen = torch.Generator().manual_seed(24)
    images = torch.randn(4, 3, 8, 8, generator=gen, dtype=F64)
    labels = torch.randint(0, 10, (4,), generator=gen)
    recorded = []
    for mean_gradient in (True, False):
        net = post_net("none", 0.125, image_size=8, generator=torch.Generator().manual_seed(25),
                       dtype=F64)
        opt = Recorder()
        train_step(net, opt, images, labels, mean_gradient=mean_gradient)
        recorded.append(opt.grads)
    for g_mean, g_sum in zip(*recorded, strict=True):
        assert torch.equal(g_sum, 4 * g_mean)


@pytest.mark.parametrize("bn", ["none", "activation"])
def test_elu_switch_doubles_the_gradient_through_positive_activations(bn):
    (_, into_t, grads_t, _), (post, into_p, grads_p, arrived_p) = switch_pair("elu", bn)
    # above the last ELU nothing changes; through it, exactly 2x where conv9's output > 0
    for name in ("flatten", "gap"):
        assert torch.equal(into_p[name], into_t[name])
    positive = post["elu9"]._y > 0
    assert 0 < int(positive.sum()) < positive.numel()
    assert torch.equal(into_p["elu9"][positive], 2 * into_t["elu9"][positive])
    assert torch.equal(into_p["elu9"][~positive], into_t["elu9"][~positive])
    # every ELU of the switched net applies the post's rule to what arrives at it
    for i in range(1, 10):
        y, dy = post[f"elu{i}"]._y, arrived_p[f"elu{i}"]
        assert torch.equal(into_p[f"elu{i}"], torch.where(y > 0, 2 * dy, dy * (y + 1))), i
    # and further down the errors compound: every weight gradient changes
    for key in grads_t:
        assert rel_err(grads_p[key], grads_t[key]) > 1e-3, key


# ---------------------------------------------------------------------------------------
# All three errors: autograd of a backward with the same deliberate errors
# ---------------------------------------------------------------------------------------


class PostELU(torch.autograd.Function):
    """ELU whose backward is case c's: 2 for x > 0, y + 1 for x <= 0."""

    @staticmethod
    def forward(ctx, x):
        y = TF.elu(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return torch.where(y > 0, 2 * dy, dy * (y + 1))


class PostAvgPool(torch.autograd.Function):
    """2x2 average pool whose backward copies dy to the four inputs (no 1/4)."""

    @staticmethod
    def forward(ctx, x):
        return TF.avg_pool2d(x, 2)

    @staticmethod
    def backward(ctx, dy):
        return dy.repeat_interleave(2, 2).repeat_interleave(2, 3)


class PostGlobalAvgPool(torch.autograd.Function):
    """Global average pool whose backward is dy at every position (no 1/(H W))."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.mean((2, 3), keepdim=True)

    @staticmethod
    def backward(ctx, dy):
        return dy.expand(ctx.shape)


class Apply(torch.nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function.apply(x)


def with_post_backward(model: PostNet, errors) -> PostNet:
    """Swap the autograd twin's ELU and pools for the versions with case c's backward."""
    for name, module in list(model.named_children()):
        if "elu" in errors and isinstance(module, torch.nn.ELU):
            setattr(model, name, Apply(PostELU))
        elif "pool" in errors and isinstance(module, torch.nn.AvgPool2d):
            setattr(model, name, Apply(PostAvgPool))
        elif "loss" in errors and isinstance(module, torch.nn.AdaptiveAvgPool2d):
            setattr(model, name, Apply(PostGlobalAvgPool))
    return model


def buggy_errors(bn: str, manual_errors, reference_errors) -> dict[str, float]:
    gen = torch.Generator().manual_seed(31)
    images = torch.randn(4, 3, 8, 8, generator=gen, dtype=F64)
    labels = torch.randint(0, 10, (4,), generator=gen)
    net = post_net(bn, 0.125, image_size=8, gradient_errors=manual_errors,
                   generator=torch.Generator().manual_seed(32), dtype=F64)
    model = PostNet("none" if bn == "none" else "torch", "channel" if bn == "none" else bn,
                    0.125, image_size=8, generator=torch.Generator().manual_seed(32), dtype=F64)
    model = with_post_backward(model, reference_errors)
    loss_ref = TF.cross_entropy(model(images), labels, reduction="sum" if "loss" in
                                reference_errors else "mean")
    loss_ref.backward()
    train_step(net, type("Keep", (), {"step": lambda self, g: None})(), images, labels,
               mean_gradient=net.mean_gradient)
    grads = net.named_gradients()
    return {name: rel_err(grads[name], p.grad) for name, p in model.named_parameters()}


@pytest.mark.parametrize("bn", ["none", "channel", "activation"])
def test_all_switches_are_autograd_of_the_posts_backward(bn):
    print_then_assert(buggy_errors(bn, GRADIENT_ERRORS, GRADIENT_ERRORS))


@pytest.mark.parametrize("missing", GRADIENT_ERRORS)
def test_the_comparison_sees_each_missing_switch(missing):
    """The check above can fail: drop one switch from the manual net and it does."""
    manual = [e for e in GRADIENT_ERRORS if e != missing]
    errors = buggy_errors("activation", manual, GRADIENT_ERRORS)
    assert max(errors.values()) > 1e-2, errors


# ---------------------------------------------------------------------------------------
# Initialization
# ---------------------------------------------------------------------------------------


def test_init_is_normal_005_and_the_same_in_both_engines():
    net = post_net("channel", generator=torch.Generator().manual_seed(41))
    model = PostNet("torch", "channel", generator=torch.Generator().manual_seed(41))
    for name, weight in net.named_parameters().items():
        if not name.startswith("conv"):
            assert torch.equal(weight, torch.ones_like(weight)), name  # BN's gamma
            continue
        n = weight.numel()
        std, mean = weight.std().item(), weight.mean().item()
        print(f"{name}: {n} values, std {std:.5f}, mean {mean:+.5f}")
        assert abs(std / 0.05 - 1) < 5 / (2 * n) ** 0.5  # 5 standard errors of a std
        assert abs(mean) < 5 * 0.05 / n**0.5
        assert torch.equal(weight, model.get_parameter(name).detach()), name
    other = PostNet("torch", "channel", generator=torch.Generator().manual_seed(42))
    assert not torch.equal(other.conv1.weight, model.conv1.weight)


def test_init_draws_only_from_the_generator():
    """Nothing is drawn from the global RNG when a generator is given; None uses it."""
    state = torch.get_rng_state()
    post_net("activation", 0.125, generator=torch.Generator().manual_seed(0))
    PostNet("bnlab", "activation", 0.125, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(43)
    net = post_net("none", 0.125)
    torch.manual_seed(43)
    model = PostNet("none", width=0.125)
    for key, value in net.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    reference = post_net("none", 0.125, generator=torch.Generator().manual_seed(43))
    assert torch.equal(reference["conv1"].params["weight"], net["conv1"].params["weight"])
    cl = post_net("none", 0.125, generator=torch.Generator().manual_seed(43), memory_format=CL)
    assert torch.equal(cl["conv2"].params["weight"], net["conv2"].params["weight"])
    assert cl["conv2"].params["weight"].is_contiguous(memory_format=CL)
