"""Helpers several test modules share: tolerances in words, memory formats, gradients.

Import what a module needs (``from tests.helpers import grads, memory_format``); the
``single_thread`` fixture takes effect in a module that imports it.
"""

from __future__ import annotations

import pytest
import torch

from bnlab.checks import max_rel_err

FORMATS = ["contiguous", "channels_last"]
TOL = 1e-10  # float64 agreement of two computations of one thing (engines, layers)


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread for the test (restored after), whatever BNLAB_TEST_THREADS says."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (the absolute error if expected is 0)."""
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    return diff / scale if scale > 0 else diff


def check(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    """Print a few pairs and the error, then assert (a check that only prints never fails).

    The error is :func:`rel_err` in float64.
    """
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    err = rel_err(actual.double(), expected.double())
    pairs = list(zip(actual.flatten()[:2].tolist(), expected.flatten()[:2].tolist(), strict=True))
    print(f"{name}: max rel err {err:.2e}  (ours, reference) {pairs}")
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"


def memory_format(x: torch.Tensor, fmt: str | bool) -> torch.Tensor:
    """``x`` in channels_last (4D) or channels_last_3d (5D) when ``fmt`` is
    ``"channels_last"`` or True; else ``x`` itself."""
    if fmt is True or fmt == "channels_last":
        if x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        if x.dim() == 5:
            return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def grads(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor):
    """``(y, (dx, dgamma, dbeta))`` of ``module`` at a fresh leaf copy of ``x``, through
    autograd with upstream gradient ``dy`` (gamma/beta left out where the module has none)."""
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    wrt = [x, *[p for p in (module.weight, module.bias) if p is not None]]
    return y, torch.autograd.grad(y, wrt, dy)


def assert_eval_is_bn(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor,
                      tol: float = 1e-12) -> None:
    """In evaluation mode ``module`` is BN with its running statistics as constants:
    output and gradients (dx, dgamma, dbeta) against autograd through the textbook
    ``(x - running_mean) / sqrt(running_var + eps) * gamma + beta``, to ``tol`` relative."""
    module.eval()
    y, g = grads(module, x, dy)
    inputs = [t.detach().clone().requires_grad_(True) for t in (x, module.weight, module.bias)]
    view = (1, -1, *[1] * (x.dim() - 2))
    y_ref = ((inputs[0] - module.running_mean.view(view))
             / torch.sqrt(module.running_var.view(view) + module.eps)
             * inputs[1].view(view) + inputs[2].view(view))
    g_ref = torch.autograd.grad(y_ref, inputs, dy)
    assert max_rel_err(y, y_ref) < tol
    for a, b in zip(g, g_ref, strict=True):
        assert max_rel_err(a, b) < tol



def layer_vs_autograd(layer, reference, x: torch.Tensor, training: bool = True,
                      dy_format: torch.memory_format | None = None):
    """Run ``layer`` (manual engine) and ``reference`` (autograd) on ``x`` with one random dy.

    ``dy`` is ``torch.randn_like`` of the reference output (from the global RNG), in
    ``dy_format`` when given. Returns ``(y, dx, y_ref, dx_ref, dy)``.
    """
    xr = x.clone().requires_grad_()
    y_ref = reference(xr)
    dy = torch.randn_like(y_ref)
    if dy_format is not None:
        dy = dy.contiguous(memory_format=dy_format)
    y_ref.backward(dy)
    with torch.no_grad():
        y = layer.forward(x, training=training)
        dx = layer.backward(dy)
    return y, dx, y_ref.detach(), xr.grad, dy


def print_then_assert(errors: dict[str, float], tol: float = TOL) -> None:
    """Print the four largest of ``errors`` (name -> relative error), then assert all <= tol."""
    worst = sorted(errors.items(), key=lambda kv: -kv[1])
    print(f"{len(errors)} tensors compared; largest relative errors:")
    for name, err in worst[:4]:
        print(f"  {name:32s} {err:.2e}")
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol:.0e}: {bad}"


def copy_to_manual(module: torch.nn.Module, layer) -> None:
    """Give a manual-engine BN ``layer`` copies of ``module``'s parameters and BN buffers."""
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    layer.params.update({k: state[k] for k in ("weight", "bias")})
    layer.buffers.update({k: state[k] for k in ("running_mean", "running_var",
                                                "num_batches_tracked")})


def assert_manual_step_is_autograd(module: torch.nn.Module, layer, x: torch.Tensor,
                                   dy: torch.Tensor, training: bool, step: int) -> None:
    """One step of the autograd ``module`` and its manual twin ``layer`` in ``training``
    mode: y, dx, dgamma, dbeta and every buffer equal bit for bit."""
    module.train(training)
    y_ref, (dx_ref, dw_ref, db_ref) = grads(module, x, dy)
    y = layer.forward(x, training)
    dx = layer.backward(dy)
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref), step
    assert torch.equal(layer.grads["weight"], dw_ref), step
    assert torch.equal(layer.grads["bias"], db_ref), step
    for k, v in module.named_buffers():
        assert torch.equal(layer.buffers[k], v), (step, k)
