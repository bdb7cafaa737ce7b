"""The manual engine end to end: All-CNN-C's gradients, optimizer steps and training.

What is promised, and checked here against autograd on the ``bnlab.models.AllCNNC`` twin
(norm="torch" and norm="bnlab"), in float64:

- every parameter gradient, the input gradient, the loss and the logits agree to 1e-10
  relative, with and without BN, with and without dropout (masks shared through seeded
  generators), in training and in evaluation mode; BN's running buffers agree too;
- a few AMSGrad steps (``bnlab.optim.Adam(amsgrad=True)`` vs ``torch.optim.Adam``) give
  the same parameters and buffers;
- the manual training step builds no autograd graph;
- training on a tiny learnable problem drives the loss down.

Tolerance: see ``test_manual_layers.py``; through 9 layers the observed errors stay below
1e-14, so 1e-10 has a wide margin and still catches any real mistake (a float32
intermediate alone would show as ~1e-7). Small widths (0.125: 12 and 24 channels) and
16x16 images (final map 2x2; All-CNN-C needs at least 9x9) keep the file fast; the tests
run single-threaded, which is much faster for such small tensors on a busy 2-core machine.
"""

from __future__ import annotations

import pytest
import torch

from bnlab.check_engines import compare_engines, randomize_batchnorm_, relative_error
from bnlab.manual import all_cnn_c, softmax_cross_entropy, train_step
from bnlab.models import AllCNNC
from tests.helpers import print_then_assert, single_thread  # noqa: F401 (an autouse fixture)

TOL = 1e-10
F64 = torch.float64


# ---------------------------------------------------------------------------------------
# Gradients of the whole network
# ---------------------------------------------------------------------------------------

# (name, norm, dropout, training, extra kwargs)
NETWORK_CASES = [
    (f"{norm} {'dropout' if dropout else 'no-dropout'} {'train' if training else 'eval'}",
     norm, dropout, training, {})
    for norm in ("torch", "bnlab", "none")
    for dropout in (False, True)
    for training in (True, False)
] + [
    ("torch dropout train channels_last", "torch", True, True, {"channels_last": True}),
    ("bnlab eval channels_last", "bnlab", False, False, {"channels_last": True}),
    ("torch label smoothing", "torch", False, True, {"label_smoothing": 0.1}),
    ("torch 12x12 batch 3 width 0.25", "torch", True, True,
     {"image_size": 12, "batch_size": 3, "width": 0.25}),
    ("none 32x32 (6x6 final map)", "none", False, True, {"image_size": 32, "batch_size": 2}),
]


@pytest.mark.parametrize(
    "norm, dropout, training, kwargs",
    [c[1:] for c in NETWORK_CASES],
    ids=[c[0] for c in NETWORK_CASES],
)
def test_network_gradients_are_autograd(norm, dropout, training, kwargs):
    errors = compare_engines(norm=norm, dropout=dropout, training=training, seed=11, **kwargs)
    expected = {"loss", "logits", "input"}
    assert expected <= set(errors)
    assert any(k.startswith("grad conv9") for k in errors)
    if norm != "none":
        assert "grad bn8.weight" in errors and "buffer bn8.running_var" in errors
    print_then_assert(errors)


def test_compare_engines_detects_a_wrong_gradient(monkeypatch):
    """The check can fail: halve ReLU's gradient and the errors jump far above 1e-10."""
    from bnlab.manual import layers

    original = layers.ReLU.backward

    def wrong(self, dy, need_dx=True):
        dx = original(self, dy, need_dx)
        return None if dx is None else dx * 0.5

    monkeypatch.setattr(layers.ReLU, "backward", wrong)
    errors = compare_engines(norm="torch")
    assert errors["grad conv1.weight"] > 1e-3


# ---------------------------------------------------------------------------------------
# Optimizer steps and running buffers
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["torch", "bnlab"])
def test_amsgrad_steps_match_autograd_twin(norm):
    """3 steps: bnlab.optim.Adam(amsgrad=True) on manual gradients == torch.optim.Adam."""
    from bnlab.optim import Adam

    gen = torch.Generator().manual_seed(5)
    model = AllCNNC(norm=norm, dropout=True, width=0.125, generator=gen, dtype=F64,
                    dropout_generator=torch.Generator().manual_seed(9))
    randomize_batchnorm_(model, gen)
    net = all_cnn_c(bn=True, dropout=True, width=0.125, dtype=F64,
                    dropout_generator=torch.Generator().manual_seed(9))
    net.load_state_dict(model.state_dict())
    torch_opt = torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=True)
    manual_opt = Adam(net.parameters(), lr=1e-2, amsgrad=True)
    for _ in range(3):
        images = torch.randn(4, 3, 16, 16, generator=gen, dtype=F64)
        labels = torch.randint(0, 10, (4,), generator=gen)
        torch_opt.zero_grad()
        loss_ref = torch.nn.functional.cross_entropy(model(images), labels)
        loss_ref.backward()
        torch_opt.step()
        loss, _ = train_step(net, manual_opt, images, labels)
        assert relative_error(loss, loss_ref.detach()) <= TOL
    ours = net.state_dict()
    errors = {
        name: relative_error(ours[name], t)
        for name, t in model.state_dict().items() if t.is_floating_point()
    }
    print_then_assert(errors)
    assert int(ours["bn1.num_batches_tracked"]) == 3
    twin_count = model.state_dict()["bn1.num_batches_tracked"]
    assert torch.equal(ours["bn1.num_batches_tracked"], twin_count)
    moved = relative_error(net.parameters()[0], AllCNNC(
        norm=norm, width=0.125, generator=torch.Generator().manual_seed(5), dtype=F64
    ).state_dict()["conv1.weight"])
    assert moved > 1e-3  # the parameters did change


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_buffers_match_after_steps(momentum):
    torch.manual_seed(2)
    model = AllCNNC(norm="torch", width=0.125, momentum=momentum, dtype=F64)
    net = all_cnn_c(bn=True, width=0.125, momentum=momentum, dtype=F64)
    net.load_state_dict(model.state_dict())
    for _ in range(4):
        images = torch.randn(3, 3, 12, 12, dtype=F64) * 2 + 0.5
        model(images)
        with torch.no_grad():
            net.forward(images, training=True)
    errors = {
        name: relative_error(net.named_buffers()[name], b)
        for name, b in model.named_buffers() if b.is_floating_point()
    }
    print_then_assert(errors)
    assert int(net.named_buffers()["bn8.num_batches_tracked"]) == 4


# ---------------------------------------------------------------------------------------
# No autograd
# ---------------------------------------------------------------------------------------


def test_manual_step_builds_no_autograd_graph():
    """Even with grad mode on and parameters that require grad, nothing is recorded."""
    from bnlab.optim import Adam

    torch.manual_seed(0)
    net = all_cnn_c(bn=True, dropout=True, width=0.125)
    for p in net.parameters():
        p.requires_grad_(True)  # would make every op record a graph if autograd ran
    opt = Adam(net.parameters(), lr=1e-3, amsgrad=True)
    images, labels = torch.randn(4, 3, 12, 12), torch.randint(0, 10, (4,))
    saved = []
    assert torch.is_grad_enabled()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss, logits = train_step(net, opt, images, labels)
    assert saved == [], "autograd saved tensors for a backward pass"
    assert loss.grad_fn is None and logits.grad_fn is None
    assert all(g.grad_fn is None and not g.requires_grad for g in net.gradients())
    assert all(p.grad is None for p in net.parameters())


def test_manual_step_runs_in_inference_mode():
    from bnlab.optim import Adam

    torch.manual_seed(0)
    net = all_cnn_c(bn=True, width=0.125)
    assert not any(p.requires_grad for p in net.parameters())
    opt = Adam(net.parameters(), lr=1e-3, amsgrad=True)
    before = [p.clone() for p in net.parameters()]
    with torch.inference_mode():
        loss, _ = train_step(net, opt, torch.randn(4, 3, 12, 12), torch.randint(0, 10, (4,)))
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bn", [True, False], ids=["bn", "no-bn"])
def test_manual_training_drives_the_loss_down(bn):
    """64 random 12x12 images with random (memorizable) labels, width 0.125, full batch.

    lr 3e-3: at 1e-2 the network without BN can kill every logit's ReLU and stall, which is
    a property of the network (BN's benefit), not of the engine.
    """
    from bnlab.optim import Adam

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(64, 3, 12, 12, generator=gen)
    labels = torch.randint(0, 10, (64,), generator=gen)
    net = all_cnn_c(bn=bn, width=0.125, generator=gen)
    opt = Adam(net.parameters(), lr=3e-3, amsgrad=True)
    losses = [train_step(net, opt, images, labels)[0].item() for _ in range(150)]
    print(f"bn={bn}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


# ---------------------------------------------------------------------------------------
# The Sequential container
# ---------------------------------------------------------------------------------------


def test_names_and_state_dict_keys_are_the_twins():
    for bn, norm in ((True, "torch"), (True, "bnlab"), (False, "none")):
        model = AllCNNC(norm=norm, dropout=True, width=0.25)
        net = all_cnn_c(bn=bn, dropout=True, width=0.25)
        assert list(net.state_dict()) == list(model.state_dict())
        assert list(net.named_parameters()) == [n for n, _ in model.named_parameters()]
        assert list(net.named_buffers()) == [n for n, _ in model.named_buffers()]
        for name, t in model.state_dict().items():
            assert net.state_dict()[name].shape == t.shape
            assert net.state_dict()[name].dtype == t.dtype, name
    assert "bn1.num_batches_tracked" in all_cnn_c(bn=True, width=0.25).state_dict()


def test_load_state_dict_both_ways():
    model = AllCNNC(norm="torch", width=0.25, generator=torch.Generator().manual_seed(1))
    net = all_cnn_c(bn=True, width=0.25, generator=torch.Generator().manual_seed(2))
    randomize_batchnorm_(model, torch.Generator().manual_seed(3))
    net.load_state_dict(model.state_dict())
    assert all(torch.equal(net.state_dict()[k], v) for k, v in model.state_dict().items())
    for p in net.parameters():
        p.add_(1.0)
    net.state_dict()["bn2.num_batches_tracked"].fill_(7)
    model.load_state_dict(net.state_dict())
    assert all(torch.equal(net.state_dict()[k], v) for k, v in model.state_dict().items())
    assert int(model.bn2.num_batches_tracked) == 7


def test_load_state_dict_errors():
    net = all_cnn_c(bn=True, width=0.25)
    state = dict(net.state_dict())
    del state["bn1.running_var"]
    state["extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"Missing key.*bn1\.running_var"):
        net.load_state_dict(state)
    with pytest.raises(RuntimeError, match=r"Unexpected key.*extra"):
        net.load_state_dict(state)
    net.load_state_dict(state, strict=False)
    wrong = dict(net.state_dict(), **{"conv1.weight": torch.zeros(1, 3, 3, 3)})
    with pytest.raises(RuntimeError, match=r"size mismatch for conv1\.weight"):
        net.load_state_dict(wrong)


def test_gradients_follow_parameter_order():
    torch.manual_seed(0)
    net = all_cnn_c(bn=True, width=0.125)
    with pytest.raises(RuntimeError, match="run forward and backward"):
        net.gradients()
    with torch.no_grad():
        logits = net.forward(torch.randn(2, 3, 12, 12))
        _, dlogits = softmax_cross_entropy(logits, torch.tensor([1, 2]))
        assert net.backward(dlogits, need_input_grad=False) is None
    grads = net.gradients()
    assert [g.shape for g in grads] == [p.shape for p in net.parameters()]
    assert list(net.named_gradients()) == list(net.named_parameters())


def test_train_eval_and_to():
    torch.manual_seed(0)
    net = all_cnn_c(bn=True, dropout=True, width=0.125)
    assert net.training and not net.eval().training and net.train().training
    x = torch.randn(2, 3, 12, 12)
    net.eval()
    with torch.no_grad():
        a, b = net.forward(x), net.forward(x)
    assert torch.equal(a, b)  # evaluation: no dropout, running statistics
    assert int(net.named_buffers()["bn1.num_batches_tracked"]) == 0
    net.to(dtype=F64, memory_format=torch.channels_last)
    assert net["conv2"].params["weight"].is_contiguous(memory_format=torch.channels_last)
    assert all(p.dtype == F64 for p in net.parameters())
    assert net.named_buffers()["bn1.num_batches_tracked"].dtype == torch.long
    with torch.no_grad():
        out = net.forward(x.double().contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, a.double(), rtol=1e-5, atol=1e-6)
    assert "conv1" in repr(net) and len(net) == len(list(net))


def test_bench_engine_smoke():
    from bnlab.bench_engine import bench_engine, format_engine_table

    rows = bench_engine(widths=(0.0625,), batch_size=4, steps=2, warmup=1, image_size=12)
    assert [r["variant"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["ratio_to_a"] == 1.0 and all(r["median_s"] > 0 for r in rows)
    table = format_engine_table(rows)
    print(table)
    assert "images/s" in table and "manual engine" in table
