"""The fused BN kernel (bnlab.kernels) computes what the eager reference (bnlab.functional)
computes, in every layout, dtype and mode, and falls back to it wherever it does not apply.

Tolerances come from the precision, not from trial. With u the unit roundoff (2**-24 in
float32, 2**-53 in float64) and m values per channel, both paths round each element-wise
result a few times (``c = 16`` ulps covers them) and each per-channel sum with an error of at
most about ``u * log2(m)`` times the sum of the magnitudes of its terms (PyTorch's cascade
sums in the eager path, float64 sums in the kernel). The eager path may also compute
``x * s + t`` unshifted, which costs ``u * |mu| / sigma`` relative (its cancellation guard
allows that up to a ratio of 8 in float32, and without bound in float64), so ``|mu| / sigma``
enters the bounds of ``y`` and ``dx``.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil

import numpy as np
import pytest
import torch

from bnlab import functional as F
from bnlab import kernels

C16 = 16.0

# Layouts: (name, shape, memory format applied to a 4D/5D tensor or None).
LAYOUTS = [
    ("1d-NC", (64, 5), None),
    ("1d-NCL", (6, 4, 11), None),
    ("2d-contiguous", (8, 6, 5, 7), torch.contiguous_format),
    ("2d-channels_last", (8, 6, 5, 7), torch.channels_last),
    ("3d-contiguous", (3, 4, 2, 3, 5), torch.contiguous_format),
    ("3d-channels_last", (3, 4, 2, 3, 5), torch.channels_last_3d),
    ("2d-large", (32, 24, 40, 40), torch.contiguous_format),  # many blocks, several threads
]
DTYPES = [torch.float32, torch.float64]
OFFSETS = [0.0, 1e4]  # mean 0 and mean 1e4, standard deviation about 1


def _compiler_present() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None


@pytest.fixture(scope="module")
def fused_built():
    """The extension builds wherever a compiler is present (else these tests skip)."""
    if not _compiler_present():
        pytest.skip("no C++ compiler: the fused path is the eager one here")
    assert kernels.load(), kernels.fused_status()


def _make(shape, fmt, dtype, offset, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + offset).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=dtype)
    c = shape[1]
    weight = (torch.rand(c, generator=g, dtype=dtype) + 0.5)
    bias = torch.randn(c, generator=g, dtype=dtype)
    if fmt is not None:
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    return x, dy, weight, bias


def _report(name, a, b, tol):
    err = (a.double() - b.double()).abs().max().item()
    print(f"{name:7s} fused {a.flatten()[:2].tolist()} eager {b.flatten()[:2].tolist()} "
          f"max abs err {err:.2e} (tolerance {tol:.2e})")
    return err


def _bounds(x, dy, weight, bias, saved, saved_ref):
    """Largest differences allowed between the fused and the eager results (module doc):
    per element a few roundings (C16 ulps) of the terms' magnitudes, per channel sum
    ``u * log2(m)`` of the sum of its terms' magnitudes, ``|mu| / sigma`` for y and dx."""
    dtype, c = x.dtype, x.shape[1]
    u = torch.finfo(dtype).eps / 2
    m = x.numel() // c
    log_m = math.log2(m)
    dims = F.reduce_dims(x)
    x64 = x.double()
    mu, invstd = saved_ref.mean, saved_ref.invstd  # float64, (C,)
    x_hat = (x64 - F._channel_view(mu, x)) * F._channel_view(invstd, x)
    ratio = (mu.abs() * invstd).max().item()  # |mu| / sigma
    spread = (x64 - F._channel_view(mu, x)).abs().max().item()
    gamma_max, beta_max, dy_max = weight.abs().max().item(), bias.abs().max().item(), \
        dy.abs().max().item()
    k_off = max(((saved.shift.double() - mu).abs() * invstd).max().item(),
                ((saved_ref.shift.double() - mu).abs() * invstd).max().item())

    tol = {
        "mean": C16 * u * log_m * spread,
        "var": C16 * u * log_m * spread**2,
        "y": C16 * u * (gamma_max * (x_hat.abs().max().item() + ratio + 1) + beta_max),
        "dx": C16 * u * log_m * gamma_max * invstd.max().item() * dy_max
        * (x_hat.abs().max().item() + ratio + 1),
        "dgamma": C16 * u * log_m
        * (dy.double().abs() * (x_hat.abs() + k_off + 1)).sum(dims).max().item(),
        "dbeta": C16 * u * log_m * dy.double().abs().sum(dims).max().item(),
    }
    return tol


@pytest.mark.usefixtures("fused_built")
@pytest.mark.parametrize("offset", OFFSETS, ids=["mean0", "mean1e4"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize(("name", "shape", "fmt"), LAYOUTS, ids=[n for n, _, _ in LAYOUTS])
def test_fused_equals_eager(name, shape, fmt, dtype, training, offset):
    x, dy, weight, bias = _make(shape, fmt, dtype, offset)
    assert kernels.fused_applies(x, dy, weight), "the fused path must be the one tested"
    with torch.no_grad():  # as inside an autograd.Function, with a module's parameter
        assert kernels.fused_applies(x, dy, torch.nn.Parameter(weight))
    c = shape[1]
    running_mean = torch.full((c,), offset, dtype=dtype) + 0.1
    running_var = torch.full((c,), 1.2, dtype=dtype)
    y, saved = kernels.batch_norm_forward(
        x, weight, bias, running_mean, running_var, training=training, eps=1e-5
    )
    y_ref, saved_ref = F.batch_norm_forward(
        x, weight, bias, running_mean, running_var, training=training, eps=1e-5
    )
    dx, dgamma, dbeta = kernels.batch_norm_backward(dy, x, saved, weight)
    dx_ref, dgamma_ref, dbeta_ref = F.batch_norm_backward(dy, x, saved_ref, weight)

    tol = _bounds(x, dy, weight, bias, saved, saved_ref)
    pairs = {"mean": (saved.mean, saved_ref.mean), "var": (saved.var, saved_ref.var),
             "y": (y, y_ref), "dx": (dx, dx_ref), "dgamma": (dgamma, dgamma_ref),
             "dbeta": (dbeta, dbeta_ref)}
    errors = {k: _report(k, a, b, tol[k]) for k, (a, b) in pairs.items()}
    assert y.dtype == dx.dtype == dtype and dgamma.dtype == dbeta.dtype == weight.dtype
    assert y.stride() == x.stride() and dx.stride() == x.stride()  # layout kept
    assert saved.training == training and saved.mean.dtype == torch.float64
    for k, err in errors.items():
        assert err <= tol[k], f"{k}: {err:.3e} > {tol[k]:.3e}"


@pytest.mark.usefixtures("fused_built")
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_offset_input_normalizes_as_accurately_as_centred(dtype, fmt):
    """Mean 1e4, standard deviation 1: y agrees with the formula evaluated in extended
    precision (numpy's longdouble) on the same rounded inputs to a few ulps of |y|, not to
    u * 1e4 as a plain x * s + t would in float32. The one loss left is the float64 mean
    itself (saved as mu, rounded to 2**-53 |mu|), which moves x_hat by 2**-53 |mu| / sigma."""
    if np.finfo(np.longdouble).eps >= np.finfo(np.float64).eps and dtype == torch.float64:
        pytest.skip("no extended precision on this platform for a float64 reference")
    x, _, weight, bias = _make((16, 8, 6, 6), fmt, dtype, 1e4, seed=3)
    y, _ = kernels.batch_norm_forward(x, weight, bias, training=True)
    xl = x.double().numpy().astype(np.longdouble)
    mu = xl.mean((0, 2, 3), keepdims=True)
    var = ((xl - mu) ** 2).mean((0, 2, 3), keepdims=True)
    gamma = weight.double().numpy().astype(np.longdouble).reshape(1, -1, 1, 1)
    beta = bias.double().numpy().astype(np.longdouble).reshape(1, -1, 1, 1)
    ref = (xl - mu) / np.sqrt(var + np.longdouble(1e-5)) * gamma + beta
    err = float(np.abs(y.double().numpy().astype(np.longdouble) - ref).max())
    mu_term = float(np.abs(mu).max() / np.sqrt(var).min() * np.abs(gamma).max())
    tol = 8 * (torch.finfo(dtype).eps * float(np.abs(ref).max())
               + torch.finfo(torch.float64).eps * mu_term)
    print(f"offset 1e4 {dtype}: max abs err {err:.2e}, tolerance {tol:.2e}")
    assert err <= tol


@pytest.mark.usefixtures("fused_built")
def test_dy_in_another_layout_than_x():
    x, dy, weight, bias = _make((8, 6, 5, 7), torch.channels_last, torch.float32, 0.0)
    _, saved = kernels.batch_norm_forward(x, weight, bias)
    dy_contiguous = dy.contiguous()
    assert dy_contiguous.stride() != x.stride()
    ours = kernels.batch_norm_backward(dy_contiguous, x, saved, weight)
    same = kernels.batch_norm_backward(dy, x, saved, weight)
    for a, b in zip(ours, same, strict=True):
        assert torch.equal(a, b)


@pytest.mark.usefixtures("fused_built")
def test_without_weight_and_bias():
    x, dy, _, _ = _make((8, 3, 4, 4), None, torch.float64, 0.0)
    y, saved = kernels.batch_norm_forward(x)
    y_ref, saved_ref = F.batch_norm_forward(x)
    assert (y - y_ref).abs().max() < 1e-13
    dx, dgamma, dbeta = kernels.batch_norm_backward(dy, x, saved, None)
    ref = F.batch_norm_backward(dy, x, saved_ref, None)
    assert dgamma.dtype == x.dtype
    for a, b in zip((dx, dgamma, dbeta), ref, strict=True):
        assert (a - b).abs().max() < 1e-12


@pytest.mark.usefixtures("fused_built")
def test_gradcheck_of_the_fused_path_in_float64():
    """The fused forward and backward, as bnlab.nn's autograd Function (statistics
    recomputed from x on every call), match numerical gradients."""
    from bnlab.nn import BatchNormFunction

    x, _, weight, bias = _make((5, 3, 2, 3), torch.channels_last, torch.float64, 3.0)

    def fn(x, weight, bias):
        saved = kernels.batch_norm_prepare(x.detach(), training=True, eps=1e-5)
        assert kernels.fused_applies(x.detach())
        return BatchNormFunction.apply(x, weight, bias, saved)

    inputs = tuple(t.clone().requires_grad_(True) for t in (x, weight, bias))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8)


# ---- where the fused path does not apply, the eager one runs -------------------------------

def _not_applicable_cases():
    x = torch.randn(8, 4, 5, 5)
    return {
        "float16": (x.half(), None),
        "bfloat16": (x.bfloat16(), None),
        "strided view": (x[:, :, ::2], None),
        "empty": (torch.empty(0, 4, 5, 5), None),
        "1D": (torch.randn(7), None),
        "dy dtype differs": (x, x.double()),
    }


@pytest.mark.parametrize("case", list(_not_applicable_cases()))
def test_fused_does_not_apply(case):
    x, other = _not_applicable_cases()[case]
    assert not kernels.fused_applies(x, other)


@pytest.mark.usefixtures("fused_built")
def test_autograd_recording_takes_the_eager_path():
    x = torch.randn(8, 4, 3, 3, requires_grad=True)
    assert not kernels.fused_applies(x)  # its output would carry no graph
    with torch.no_grad():
        assert kernels.fused_applies(x)


@pytest.mark.usefixtures("fused_built")
def test_vmap_takes_the_eager_path():
    """Under torch.vmap the kernel (which reads raw memory) must not see the batched tensor;
    whether the eager path supports vmap is bnlab.functional's business."""
    x = torch.randn(3, 8, 4, 5, dtype=torch.float64)
    seen = []

    def per_sample(xi):
        seen.append(kernels.fused_applies(xi))
        return xi * 2

    torch.vmap(per_sample)(x)
    assert seen == [False]
    assert kernels.fused_applies(x[0])


def test_strided_input_equals_eager_exactly():
    x = torch.randn(8, 4, 10, 5)[:, :, ::2]
    y, _ = kernels.batch_norm_forward(x)
    y_ref, _ = F.batch_norm_forward(x)
    assert torch.equal(y, y_ref)


def _eager_results_without_error(x, dy, weight, bias):
    with torch.no_grad():
        assert not kernels.fused_applies(x)
        y, saved = kernels.batch_norm_forward(x, weight, bias)
        grads = kernels.batch_norm_backward(dy, x, saved, weight)
    y_ref, saved_ref = F.batch_norm_forward(x, weight, bias)
    assert torch.equal(y, y_ref)
    for a, b in zip(grads, F.batch_norm_backward(dy, x, saved_ref, weight), strict=True):
        assert torch.equal(a, b)


def test_no_compiler_falls_back_with_one_line(monkeypatch, tmp_path, capsys):
    """A machine without a compiler (and no cached build): one line on stderr, then the
    eager results, no error."""
    monkeypatch.setattr(kernels, "_state", None)
    monkeypatch.setattr(kernels, "_build_directory", lambda name: tmp_path / name)
    monkeypatch.setenv("CXX", "bnlab-no-such-compiler")
    _eager_results_without_error(*_make((8, 4, 3, 3), None, torch.float32, 0.0))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "fused BN kernel unavailable (no C++ compiler: bnlab-no-such-compiler" in err[0]
    assert "eager (fused kernel unavailable" in kernels.fused_status()
    assert capsys.readouterr().err == ""  # said once


def test_failed_build_falls_back(monkeypatch, tmp_path, capsys):
    """A compiler that fails: the notice ends the output and carries the error's first line."""
    from torch.utils import cpp_extension

    def broken_build(*args, **kwargs):
        raise RuntimeError("Error building extension 'bnlab_batch_norm'\nninja: build stopped")

    monkeypatch.setattr(kernels, "_state", None)
    monkeypatch.setattr(cpp_extension, "load", broken_build)
    monkeypatch.setattr(kernels, "_build_directory", lambda name: tmp_path / name)
    _eager_results_without_error(*_make((6, 5, 4), None, torch.float64, 0.0))
    err = capsys.readouterr().err.strip().splitlines()
    assert "compiling the fused BN kernel" in err[0]  # the build was attempted...
    assert err[-1].startswith("bnlab: fused BN kernel unavailable (RuntimeError: Error building")
    assert len(err) == 2


def test_opt_out_by_environment(monkeypatch, capsys):
    monkeypatch.setattr(kernels, "_state", None)
    monkeypatch.setenv("BNLAB_FUSED", "0")
    assert not kernels.load()
    assert "BNLAB_FUSED=0" in capsys.readouterr().err


@pytest.mark.usefixtures("fused_built")
def test_a_module_runs_the_fused_path_end_to_end(monkeypatch):
    """Through bnlab.nn's module (an autograd Function with nn.Parameter weights), no eager
    function runs."""
    from bnlab.nn import BatchNorm2d

    def eager_called(*args, **kwargs):
        raise AssertionError("the eager path ran")

    for name in ("batch_norm_stats", "batch_norm_prepare", "batch_norm_normalize",
                 "batch_norm_backward"):
        monkeypatch.setattr(F, name, eager_called)
    bn = BatchNorm2d(6)
    x = torch.randn(8, 6, 5, 5, requires_grad=True)
    y = bn(x)
    dx, dgamma, dbeta = torch.autograd.grad(y, (x, bn.weight, bn.bias), torch.randn_like(y))
    assert dx.shape == x.shape and dgamma.shape == dbeta.shape == (6,)


# ---- bnlab.nn runs the fused path, and computes what it computes on the reference ----------

_MODULES = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}


def _module_step(module, x, dy):
    """y, (dx, dgamma, dbeta) and the running buffers after one call of ``module``."""
    x = x.detach().requires_grad_(True)
    y = module(x)
    grads = torch.autograd.grad(y, (x, module.weight, module.bias), dy)
    return y.detach(), grads, (module.running_mean.clone(), module.running_var.clone())


@pytest.mark.usefixtures("fused_built")
@pytest.mark.parametrize("offset", OFFSETS, ids=["mean0", "mean1e4"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize(("name", "shape", "fmt"), LAYOUTS, ids=[n for n, _, _ in LAYOUTS])
def test_nn_fused_equals_nn_eager(monkeypatch, name, shape, fmt, dtype, training, offset):
    """bnlab.nn's module as it runs by default (the fused kernel: checked by counting kernel
    calls) against the same module inside ``kernels.disabled()`` (the reference), within
    the bounds of test_fused_equals_eager; running buffers within those of mean and var."""
    import bnlab.nn as bnn

    x, dy, weight, bias = _make(shape, fmt, dtype, offset)
    c = shape[1]
    modules = []
    for _ in range(2):
        module = getattr(bnn, _MODULES[len(shape)])(c, momentum=0.3).to(dtype)
        with torch.no_grad():
            module.weight.copy_(weight)
            module.bias.copy_(bias)
            module.running_mean.fill_(offset + 0.1)
            module.running_var.fill_(1.2)
        modules.append(module.train(training))
    fused_calls = []
    for op in ("stats", "normalize", "backward"):
        real = getattr(torch.ops.bnlab_fused, op)
        monkeypatch.setattr(torch.ops.bnlab_fused, op,
                            lambda *a, _op=op, _real=real: fused_calls.append(_op) or _real(*a))
    y, grads, buffers = _module_step(modules[0], x, dy)
    assert fused_calls == (["stats"] if training else []) + ["normalize", "backward"]
    with kernels.disabled():
        y_ref, grads_ref, buffers_ref = _module_step(modules[1], x, dy)
    assert fused_calls == (["stats"] if training else []) + ["normalize", "backward"]

    running = (torch.full((c,), offset + 0.1, dtype=dtype), torch.full((c,), 1.2, dtype=dtype))
    _, saved = kernels.batch_norm_forward(x, weight, bias, *running, training=training)
    _, saved_ref = F.batch_norm_forward(x, weight, bias, *running, training=training)
    tol = _bounds(x, dy, weight, bias, saved, saved_ref)
    m = x.numel() // c
    pairs = {"y": (y, y_ref), "dx": (grads[0], grads_ref[0]),
             "dgamma": (grads[1], grads_ref[1]), "dbeta": (grads[2], grads_ref[2]),
             # running buffers: momentum times the mean (var, with m / (m - 1)) bound
             "mean": (buffers[0], buffers_ref[0]), "var": (buffers[1], buffers_ref[1])}
    scale = {"mean": 0.3, "var": 0.3 * m / (m - 1)}
    for k, (a, b) in pairs.items():
        bound = tol[k] * scale.get(k, 1.0) + C16 * torch.finfo(dtype).eps * b.abs().max().item()
        err = _report(k, a, b, bound)
        assert err <= bound, f"{k}: {err:.3e} > {bound:.3e}"
    assert y.stride() == x.stride() and grads[0].stride() == x.stride()


@pytest.mark.usefixtures("fused_built")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nn_empty_input_is_the_same_on_both_paths(training):
    """An empty batch: the kernel does not apply; both paths give an empty output and
    leave the buffers as PyTorch does."""
    import bnlab.nn as bnn

    x = torch.empty(0, 4, 3, 3, requires_grad=True)
    results = []
    for context in (contextlib.nullcontext, kernels.disabled):
        bn = bnn.BatchNorm2d(4).train(training)
        with context():
            y = bn(x)
        y.sum().backward()
        results.append((y.shape, bn.running_mean.clone(), int(bn.num_batches_tracked)))
    torch_bn = torch.nn.BatchNorm2d(4).train(training)
    torch_bn(x)
    assert results[0][0] == results[1][0] == (0, 4, 3, 3)
    assert torch.equal(results[0][1], results[1][1])
    assert torch.equal(results[0][1], torch_bn.running_mean)
    assert results[0][2] == results[1][2] == int(torch_bn.num_batches_tracked)


@pytest.mark.usefixtures("fused_built")
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_nn_on_the_fused_path_is_as_accurate_as_torch_batchnorm2d(dtype, fmt):
    """bnlab.nn.BatchNorm2d (fused) and torch.nn.BatchNorm2d, each against the float64
    reference computed from the same rounded input (mean 3, so the shift matters): bnlab's
    error is at most twice PyTorch's plus a few ulps of the result (C16 u |ref|)."""
    import bnlab.nn as bnn

    assert kernels.load()
    x, dy, weight, bias = _make((16, 12, 9, 9), fmt, dtype, 3.0, seed=5)
    outs = {}
    for name, cls in (("bnlab", bnn.BatchNorm2d), ("torch", torch.nn.BatchNorm2d),
                      ("ref", bnn.BatchNorm2d)):
        bn = cls(12).double() if name == "ref" else cls(12).to(dtype)
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
        xi = x.double() if name == "ref" else x
        dyi = dy.double() if name == "ref" else dy
        with kernels.disabled() if name == "ref" else contextlib.nullcontext():
            y, grads, buffers = _module_step(bn, xi, dyi)
        outs[name] = (y, *grads, *buffers)
    u = torch.finfo(dtype).eps / 2
    labels = ("y", "dx", "dgamma", "dbeta", "running_mean", "running_var")
    for i, label in enumerate(labels):
        ref = outs["ref"][i]
        err = {k: (outs[k][i].double() - ref).abs().max().item() for k in ("bnlab", "torch")}
        bound = 2 * err["torch"] + C16 * u * ref.abs().max().item()
        print(f"{label:12s} bnlab err {err['bnlab']:.2e} torch err {err['torch']:.2e} "
              f"(bound {bound:.2e})")
        assert err["bnlab"] <= bound, label


@pytest.mark.usefixtures("fused_built")
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_float32_sums_that_would_overflow_are_redone_in_float64(fmt):
    """|x - K| near 1e20: float32 squares overflow (max 3.4e38), so the kernel's float32 runs
    give way to float64 sums; mean and var stay finite and agree with the reference (which
    scales by a power of two) to a few float32 ulps of the spread."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(8, 4, 6, 6, generator=g, dtype=torch.float64) * 1e20).float()
    x = x.contiguous(memory_format=fmt)
    assert kernels.fused_applies(x)
    _, mean, var = kernels.batch_norm_stats(x)
    _, mean_ref, var_ref = F.batch_norm_stats(x)
    print(f"var {var.tolist()} reference {var_ref.tolist()}")
    assert torch.isfinite(var).all() and torch.isfinite(mean).all()
    u, m = torch.finfo(torch.float32).eps, x.numel() // 4
    spread = x.double().abs().max().item()
    assert (mean - mean_ref).abs().max() <= C16 * u * math.log2(m) * spread
    assert (var - var_ref).abs().max() <= C16 * u * math.log2(m) * spread**2


@pytest.mark.usefixtures("fused_built")
def test_a_new_process_loads_the_cached_build_without_compiling():
    """Once built, every later process (a CLI run, a test worker) loads the cached library:
    no compile notice, no compiler needed (CXX pointing nowhere)."""
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(kernels.__file__).resolve().parents[2])  # this checkout's bnlab
    env = dict(os.environ, CXX="bnlab-no-such-compiler",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    code = "from bnlab import kernels; print(kernels.load())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300, check=True)
    assert out.stdout.strip() == "True" and out.stderr == "", out.stderr


@pytest.mark.usefixtures("fused_built")
def test_jit_trace_and_disabled_take_the_eager_path():
    """A traced graph must not record the extension's op (a loaded trace would need the
    library); ``disabled()`` nests and restores the fused path on exit, even on an error."""
    x = torch.randn(4, 3, 2, 2)
    seen = []

    def traced(xi):
        seen.append(kernels.fused_applies(xi))
        return xi * 2

    torch.jit.trace(traced, x, check_trace=False)  # one call, the traced one
    assert seen == [False]
    assert kernels.fused_applies(x) and kernels.enabled()
    with pytest.raises(RuntimeError, match="inside"), kernels.disabled():
        with kernels.disabled():
            assert not kernels.fused_applies(x)
        assert not kernels.fused_applies(x) and not kernels.enabled()
        raise RuntimeError("inside")
    assert kernels.fused_applies(x) and kernels.enabled()


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, capsys):
    # a build killed mid-way leaves `lock`; cpp_extension would wait for it forever
    import os
    import time

    lock = tmp_path / "lock"
    lock.write_text("")
    kernels._remove_stale_lock(tmp_path)
    assert lock.exists()  # fresh: a build may be running
    old = time.time() - kernels.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    kernels._remove_stale_lock(tmp_path)
    assert not lock.exists() and "stale build lock" in capsys.readouterr().err
    kernels._remove_stale_lock(tmp_path)  # no lock: nothing to do
