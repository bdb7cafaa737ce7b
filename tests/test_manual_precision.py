"""The manual engine's mixed precision by hand (bfloat16 convolutions, float32 masters, BN and
loss in float32) does what torch.autocast("cpu", torch.bfloat16) does to the autograd twin.

Tolerances. bfloat16 keeps 8 significant bits: one rounding moves a value by up to 2**-9
relative, two roundings that disagree by one ulp differ by 2**-8. Where both engines round
the same tensors at the same places (bnlab's BN in both) every result is the same, except
the convolution bias gradient, which autocast rounds to bfloat16 and the manual engine
keeps in float32 (one rounding, 2**-8). With PyTorch's BN in the twin (case b against
b-manual), the two BN kernels' float32 results round to bfloat16 differently here and there,
and one-ulp flips propagate: the engines then differ by a fraction of what bfloat16 itself
changes against float32, measured in the same step (0.4-0.5 of it here; a manual engine
still in float32 would sit at 1.0).
"""

from __future__ import annotations

import copy

import pytest
import torch

from bnlab.check_engines import randomize_batchnorm_
from bnlab.manual import Conv2d, all_cnn_c, set_compute_dtype, softmax_cross_entropy
from bnlab.models import AllCNNC

BF16_ULP = 2.0**-8


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error in the Euclidean norm, ||a - b|| / ||b||."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_conv_forward_and_backward_are_autocasts():
    g = torch.Generator().manual_seed(0)
    conv = Conv2d(4, 6, 3, padding=1, generator=g, compute_dtype=torch.bfloat16)
    twin = torch.nn.Conv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        twin.weight.copy_(conv.params["weight"])
        twin.bias.copy_(conv.params["bias"])
    x = torch.randn(5, 4, 7, 7, generator=g)
    dy = torch.randn(5, 6, 7, 7, generator=g)
    leaf = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = twin(leaf)
    y_ref.backward(dy.bfloat16())
    y = conv.forward(x, training=True)
    dx = conv.backward(dy)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    assert dx.dtype == torch.bfloat16 and torch.equal(dx.float(), leaf.grad)
    assert conv.grads["weight"].dtype == torch.float32
    assert torch.equal(conv.grads["weight"], twin.weight.grad)
    err = _rel(conv.grads["bias"], twin.bias.grad)
    print(f"dbias: float32 sum vs autocast's bfloat16 result, relative error {err:.1e}")
    assert conv.grads["bias"].dtype == torch.float32 and err <= BF16_ULP
    assert conv.params["weight"].dtype == torch.float32  # the master is untouched


def test_bfloat16_logits_give_a_float32_loss():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(8, 10, generator=g) * 3).bfloat16()
    labels = torch.randint(0, 10, (8,), generator=g)
    loss, dlogits = softmax_cross_entropy(logits, labels, 0.1)
    leaf = logits.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.cross_entropy(leaf, labels, label_smoothing=0.1)
    ref.backward()
    assert loss.dtype == torch.float32 == ref.dtype
    assert abs(loss.item() - ref.item()) <= 1e-6 * ref.item()
    assert dlogits.dtype == torch.bfloat16 and torch.equal(dlogits, leaf.grad)


def test_set_compute_dtype():
    net = all_cnn_c(bn=True, width=0.125)
    assert set_compute_dtype(net, torch.bfloat16) == 9
    assert all(layer.compute_dtype == torch.bfloat16 for _, layer in net
               if isinstance(layer, Conv2d))
    assert "compute_dtype=torch.bfloat16" in repr(net["conv1"])
    assert set_compute_dtype(net, None) == 9 and net["conv1"].compute_dtype is None
    with pytest.raises(ValueError, match=r"got torch\.float64"):
        set_compute_dtype(net, torch.float64)


def _one_step(norm: str, memory_format: torch.memory_format, seed: int = 0):
    """One forward and backward of All-CNN-C (width 0.25, batch 16, training mode) in three
    ways: the manual engine in bfloat16 by hand, the autograd twin under autocast, and the
    twin in float32. Returns {name: (manual, autocast, float32)}."""
    gen = torch.Generator().manual_seed(seed)
    model = AllCNNC(norm=norm, width=0.25, generator=gen)
    randomize_batchnorm_(model, gen)
    net = all_cnn_c(bn=True, width=0.25)
    net.load_state_dict(model.state_dict())
    model.to(memory_format=memory_format)
    net.to(memory_format=memory_format)
    set_compute_dtype(net, torch.bfloat16)
    model32 = copy.deepcopy(model)
    images = torch.randn(16, 3, 32, 32, generator=gen).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 10, (16,), generator=gen)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ref = torch.nn.functional.cross_entropy(model(images), labels)
    loss_ref.backward()
    loss32 = torch.nn.functional.cross_entropy(model32(images), labels)
    loss32.backward()
    with torch.no_grad():
        loss, dlogits = softmax_cross_entropy(net.forward(images, training=True), labels)
        net.backward(dlogits, need_input_grad=False)

    out = {"loss": (loss, loss_ref.detach(), loss32.detach())}
    grads = net.named_gradients()
    for (name, p), p32 in zip(model.named_parameters(), model32.parameters(), strict=True):
        assert grads[name].dtype == torch.float32
        out[f"grad {name}"] = (grads[name], p.grad, p32.grad)
    buffers = net.named_buffers()
    for (name, b), b32 in zip(model.named_buffers(), model32.buffers(), strict=True):
        if b.is_floating_point():
            out[f"buffer {name}"] = (buffers[name], b, b32)
    return out


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_manual_bf16_step_is_autocast_with_the_same_bn(memory_format):
    """bnlab's BN in both engines: the same roundings everywhere, so the same results,
    but for the convolution bias gradients (float32 here, bfloat16 under autocast)."""
    results = _one_step("bnlab", memory_format)
    for name, (manual, autocast, _) in results.items():
        err = _rel(manual, autocast)
        tol = BF16_ULP if name.endswith(".bias") and "conv" in name else 1e-6
        print(f"{name:28s} manual vs autocast {err:.1e} (tolerance {tol:.0e})")
        assert err <= tol, name


def test_manual_bf16_step_follows_autocast_with_torch_bn():
    """Case b (PyTorch's BN under autocast) against b-manual in bfloat16: the manual engine
    is closer to autocast than autocast is to float32 (all gradients together)."""
    results = _one_step("torch", torch.channels_last)
    grads = [k for k in results if k.startswith("grad")]
    manual = torch.cat([results[k][0].flatten() for k in grads])
    autocast = torch.cat([results[k][1].flatten() for k in grads])
    full = torch.cat([results[k][2].flatten() for k in grads])
    err, noise = _rel(manual, autocast), _rel(autocast, full)
    loss_m, loss_a, loss_f = results["loss"]
    print(f"gradients: manual vs autocast {err:.3f}, autocast vs float32 {noise:.3f} "
          f"(ratio {err / noise:.2f}); loss {loss_m.item():.5f} {loss_a.item():.5f} "
          f"{loss_f.item():.5f}")
    assert err <= 0.75 * noise
    assert _rel(loss_m, loss_a) <= BF16_ULP
    for name in (k for k in results if k.startswith("buffer")):  # statistics in float32
        manual_b, autocast_b, _ = results[name]
        assert _rel(manual_b, autocast_b) <= BF16_ULP, name
