"""The manual engine's BN variants inside a network: a small conv net trained by manual
back propagation has autograd's gradients and buffers with each normalization (float64)."""

from __future__ import annotations

import pytest
import torch

import bnlab.manual as manual
import bnlab.nn as bnn
from bnlab.checks import max_rel_err


def rel_err(a: torch.Tensor, ref: torch.Tensor, floor: float) -> float:
    """Relative error against at least ``floor``: the bias of a convolution followed by BN
    has a gradient of exactly zero in theory, and both engines return rounding noise."""
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(floor)).item()

NORMS = {
    "renorm": (lambda c: manual.BatchRenorm2d(c, rmax=1.5, dmax=0.5, warmup_steps=1,
                                              dtype=torch.float64),
               lambda c: bnn.BatchRenorm2d(c, rmax=1.5, dmax=0.5, warmup_steps=1,
                                           dtype=torch.float64)),
    "ghost": (lambda c: manual.GhostBatchNorm2d(c, virtual_batch_size=3, dtype=torch.float64),
              lambda c: bnn.GhostBatchNorm2d(c, virtual_batch_size=3, dtype=torch.float64)),
    "group": (lambda c: manual.GroupNorm(2, c, dtype=torch.float64),
              lambda c: bnn.GroupNorm(2, c, dtype=torch.float64)),
}


def networks(norm: str):
    make_manual, make_auto = NORMS[norm]
    torch.manual_seed(0)
    auto = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64), make_auto(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 10, 3, padding=1, dtype=torch.float64), make_auto(10),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    net = manual.Sequential([
        ("0", manual.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)), ("1", make_manual(4)),
        ("2", manual.ReLU()), ("3", manual.Conv2d(4, 10, 3, padding=1, dtype=torch.float64)),
        ("4", make_manual(10)), ("5", manual.GlobalAvgPool2d()), ("6", manual.Flatten())])
    with torch.no_grad():
        for name, p in auto.named_parameters():
            if name.endswith("weight") and p.dim() == 1:
                p.uniform_(0.5, 1.5)
            elif p.dim() == 1 and not name.startswith(("0.", "3.")):
                p.uniform_(-0.5, 0.5)
    net.load_state_dict(auto.state_dict())
    return net, auto


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("norm", list(NORMS))
def test_network_gradients_match_autograd(norm, channels_last):
    net, auto = networks(norm)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(7, 3, 6, 6, generator=gen, dtype=torch.float64) * 2 + step
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, 10, (7,), generator=gen)
        xa = x.clone().requires_grad_(True)
        loss_ref = torch.nn.functional.cross_entropy(auto(xa), labels)
        grads_ref = torch.autograd.grad(loss_ref, [xa, *auto.parameters()])
        loss, dlogits = manual.softmax_cross_entropy(net.forward(x, training=True), labels)
        dx = net.backward(dlogits)
        errors = {"loss": max_rel_err(loss, loss_ref), "dx": max_rel_err(dx, grads_ref[0])}
        floor = max(g.abs().max().item() for g in grads_ref[1:])  # the largest gradient
        for (name, _), g in zip(auto.named_parameters(), grads_ref[1:], strict=True):
            errors[name] = rel_err(net.named_gradients()[name], g, floor)
        for name, b in auto.named_buffers():
            if b.is_floating_point():
                errors[name] = max_rel_err(net.named_buffers()[name], b)
        print(f"step {step}: worst {max(errors, key=errors.get)} {max(errors.values()):.1e}")
        assert max(errors.values()) < 1e-12, errors
    auto.eval()
    x = torch.randn(5, 3, 6, 6, generator=gen, dtype=torch.float64)
    assert max_rel_err(net.predict(x), auto(x)) < 1e-12
