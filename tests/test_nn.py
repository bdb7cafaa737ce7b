"""bnlab.nn.BatchNorm*d is a drop-in for torch.nn.BatchNorm*d: same API, same numbers."""

from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnlab.nn as bnn
from bnlab import functional as F
from bnlab import kernels

PAIRS = {1: (bnn.BatchNorm1d, torch.nn.BatchNorm1d), 2: (bnn.BatchNorm2d, torch.nn.BatchNorm2d),
         3: (bnn.BatchNorm3d, torch.nn.BatchNorm3d)}
INPUT_SHAPES = {1: [(6, 3), (4, 3, 5)], 2: [(3, 3, 4, 2)], 3: [(2, 3, 2, 3, 2)]}

OPTIONS = {
    "default": {},
    "momentum 0.3": {"momentum": 0.3},
    "cumulative (momentum None)": {"momentum": None},
    "no affine": {"affine": False},
    "no running stats": {"track_running_stats": False},
    "neither": {"affine": False, "track_running_stats": False},
    "eps 1e-3": {"eps": 1e-3},
}


def rel_err(a: torch.Tensor, ref: torch.Tensor, scale: float = 0.0) -> float:
    """Largest absolute error over max(largest reference magnitude, ``scale``)."""
    a, ref = a.double(), ref.double()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(max(scale, 1e-300))).item()


def dx_term_scale(m: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> float:
    """Size of the terms whose sum is dx in training mode: max |gamma * invstd * dy|.

    dx = gamma * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat)) can cancel to far
    below its terms (with 2 values per channel x_hat = +-1 and dx ~ eps/var of them), so
    no implementation is accurate relative to dx itself; both are relative to its terms.
    """
    var = x.double().var(F.reduce_dims(x), unbiased=False)
    gamma = m.weight.detach().abs().max().item() if m.affine else 1.0
    return dy.abs().max().item() * gamma * (var + m.eps).rsqrt().max().item()


def make_pair(dim: int, num_features: int, dtype: torch.dtype, **options):
    ours_cls, torch_cls = PAIRS[dim]
    ours = ours_cls(num_features, dtype=dtype, **options)
    theirs = torch_cls(num_features, dtype=dtype, **options)
    if ours.affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.uniform_(-1, 1)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def run_steps(ours, theirs, shape, dtype, steps, tol, memory_format=torch.contiguous_format):
    """Several training steps then eval steps; compare everything at each step."""
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        training = step < steps - 2
        ours.train(training)
        theirs.train(training)
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1).to(dtype)
        if len(shape) == 4:
            x = x.contiguous(memory_format=memory_format)
        dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        results = []
        for m in (ours, theirs):
            xi = x.clone().requires_grad_(True)
            y = m(xi)
            wrt = [xi] + ([m.weight, m.bias] if m.affine else [])
            results.append((y, torch.autograd.grad(y, wrt, dy)))
        (y0, g0), (y1, g1) = results
        batch_stats = training or theirs.running_mean is None
        scale = dx_term_scale(theirs, x, dy) if batch_stats else 0.0
        errs = {"y": rel_err(y0, y1), "dx": rel_err(g0[0], g1[0], scale)}
        if theirs.affine:
            errs["dweight"], errs["dbias"] = rel_err(g0[1], g1[1]), rel_err(g0[2], g1[2])
        for name in ("running_mean", "running_var"):
            if getattr(theirs, name) is not None:
                errs[name] = rel_err(getattr(ours, name), getattr(theirs, name))
        print(f"step {step} ({'train' if training else 'eval'}):",
              ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
        assert max(errs.values()) <= tol, errs
        if theirs.num_batches_tracked is not None:
            assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)
        if len(shape) == 4:
            assert y0.is_contiguous(memory_format=memory_format)


CASES = [(dim, shape, name) for dim, shapes in INPUT_SHAPES.items() for shape in shapes
         for name in OPTIONS]


@pytest.mark.parametrize("dim,shape,option", CASES,
                         ids=[f"{d}d-{s}-{o}" for d, s, o in CASES])
def test_matches_torch_float64(dim, shape, option):
    ours, theirs = make_pair(dim, shape[1], torch.float64, **OPTIONS[option])
    run_steps(ours, theirs, shape, torch.float64, steps=5, tol=1e-12)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_matches_torch_float32(memory_format):
    """float32: both sides round differently, each within a few ulps of the exact value.

    Each output is a short chain of float32 operations on sums of m = 4096 terms; both
    implementations carry errors of order u * log2(m) ~ 1e-6 relative (u = 6e-8), so they
    differ by at most a few times that. 2e-5 leaves a margin of ~10x.
    """
    ours, theirs = make_pair(2, 16, torch.float32)
    run_steps(ours, theirs, (64, 16, 8, 8), torch.float32, steps=5, tol=2e-5,
              memory_format=memory_format)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dims=st.sampled_from([1, 2, 3]),
    n=st.integers(2, 6),
    c=st.integers(1, 4),
    spatial=st.integers(1, 3),
    momentum=st.one_of(st.none(), st.floats(0.01, 0.99)),
    affine=st.booleans(),
    track=st.booleans(),
)
def test_property_matches_torch(dims, n, c, spatial, momentum, affine, track):
    shape = (n, c) if dims == 1 else (n, c, *[spatial] * dims)
    ours, theirs = make_pair(dims, c, torch.float64, momentum=momentum, affine=affine,
                             track_running_stats=track)
    run_steps(ours, theirs, shape, torch.float64, steps=4, tol=1e-12)


def test_state_dict_is_interchangeable():
    ours, theirs = make_pair(2, 5, torch.float32)
    ours.train()
    ours(torch.randn(4, 5, 3, 3))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())  # strict, both ways
    ours2 = bnn.BatchNorm2d(5)
    ours2.load_state_dict(theirs.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(v, ours2.state_dict()[k]), k
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    theirs.load_state_dict(torch.load(buffer, weights_only=True))


def test_old_state_dict_without_num_batches_tracked_loads_as_in_torch():
    """Version-1 state dicts (no num_batches_tracked) load exactly as PyTorch loads them."""
    sd = torch.nn.BatchNorm2d(3).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    loaded = []
    for cls in (bnn.BatchNorm2d, torch.nn.BatchNorm2d):
        m = cls(3)
        m.num_batches_tracked.fill_(7)
        m.load_state_dict(sd)
        loaded.append(m.num_batches_tracked.item())
    assert loaded[0] == loaded[1]


def test_repr_and_parameters_match_torch():
    ours, theirs = bnn.BatchNorm2d(8, momentum=None), torch.nn.BatchNorm2d(8, momentum=None)
    assert repr(ours) == repr(theirs)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    assert "bias_correction=True" in repr(bnn.BatchNorm2d(8, bias_correction=True))


# ---- errors: same type and message as PyTorch --------------------------------------------

ERROR_CASES = {
    "wrong channels": (lambda cls: cls(3), torch.randn(4, 4, 2, 2), True),
    "wrong dims": (lambda cls: cls(3), torch.randn(4, 3, 2), True),
    "one value per channel": (lambda cls: cls(3), torch.randn(1, 3, 1, 1), True),
    "eps zero": (lambda cls: cls(3, eps=0.0), torch.randn(4, 3, 2, 2), True),
    "eps negative": (lambda cls: cls(3, eps=-1e-5), torch.randn(4, 3, 2, 2), True),
    "wrong channels, eval": (lambda cls: cls(3).eval(), torch.randn(4, 4, 2, 2), False),
}


@pytest.mark.parametrize("case", ERROR_CASES, ids=ERROR_CASES.keys())
def test_errors_match_torch(case):
    make, x, _ = ERROR_CASES[case]
    with pytest.raises(Exception) as theirs:
        make(torch.nn.BatchNorm2d)(x)
    with pytest.raises(theirs.type) as ours:
        make(bnn.BatchNorm2d)(x)
    print(f"torch: {theirs.value!r}\nbnlab: {ours.value!r}")
    assert str(ours.value) == str(theirs.value)


def test_bad_constructor_arguments_match_torch():
    for kwargs in ({"num_features": -1},):
        with pytest.raises(Exception) as theirs:
            torch.nn.BatchNorm2d(**kwargs)
        with pytest.raises(theirs.type):
            bnn.BatchNorm2d(**kwargs)


@pytest.mark.parametrize("fused", [True, False], ids=["kernels", "kernels-disabled"])
def test_gradients_come_from_the_hand_derived_backward(monkeypatch, fused):
    """The module's backward is bnlab's closed form, not autograd tracing the forward: the
    entry point of bnlab.kernels (the fused kernel where it is built, else the reference it
    falls back to), or with ``kernels.disabled()`` around the forward, the reference alone."""
    calls = []
    real_kernels, real_functional = kernels.batch_norm_backward, F.batch_norm_backward

    def spy(name, real):
        def called(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        return called

    monkeypatch.setattr(kernels, "batch_norm_backward", spy("kernels", real_kernels))
    monkeypatch.setattr(F, "batch_norm_backward", spy("functional", real_functional))
    x = torch.randn(4, 3, requires_grad=True)
    with contextlib.nullcontext() if fused else kernels.disabled():
        y = bnn.BatchNorm1d(3)(x)
    y.sum().backward()  # outside the block: the path was chosen by the forward
    if not fused:
        assert calls == ["functional"]
    elif kernels.load():
        assert calls == ["kernels"]
    else:  # no compiler here: the kernels' entry point hands over to the reference
        assert calls == ["kernels", "functional"]


# ---- bias-corrected running averages (opt-in, the post's Q5) ---------------------------------

def test_bias_correction_off_by_default_and_on_when_asked():
    torch.manual_seed(0)
    plain, corrected = bnn.BatchNorm1d(4), bnn.BatchNorm1d(4, bias_correction=True)
    x = torch.randn(64, 4) * 3 + 5
    for m in (plain, corrected):
        m(x)  # one training step with a batch whose mean is ~5 and variance ~9
        m.eval()
    assert torch.equal(plain.running_mean, corrected.running_mean)  # buffers: PyTorch's
    y_plain, y_corrected = plain(x), corrected(x)
    # After one step the corrected averages are exactly the batch statistics (unbiased var).
    mean, var = x.double().mean(0), x.double().var(0, unbiased=True)
    expected = (x.double() - mean) / torch.sqrt(var + 1e-5)
    assert rel_err(y_corrected, expected) < 1e-5
    assert rel_err(y_plain, expected) > 0.5  # the raw running mean is 0.5, far from 5


# ---- convert_batchnorm -----------------------------------------------------------------------

def small_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4, momentum=0.2), torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 6),
                            torch.nn.BatchNorm1d(6, affine=False)),
    )


def test_convert_batchnorm_both_ways():
    torch.manual_seed(0)
    model = small_model().double()
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    model(x)  # move the running statistics off their initial values
    reference = copy.deepcopy(model)
    converted = bnn.convert_batchnorm(copy.deepcopy(model), to="bnlab")
    kinds = [type(m) for m in converted.modules()]
    assert bnn.BatchNorm2d in kinds and bnn.BatchNorm1d in kinds
    assert torch.nn.BatchNorm2d not in kinds and torch.nn.BatchNorm1d not in kinds
    assert converted[1].momentum == 0.2 and converted[1].training
    for k, v in reference.state_dict().items():
        assert torch.equal(v, converted.state_dict()[k]), k
    for mode in ("train", "eval"):
        reference.train(mode == "train")
        converted.train(mode == "train")
        assert rel_err(converted(x), reference(x)) < 1e-12
    back = bnn.convert_batchnorm(converted, to="torch")
    assert torch.nn.BatchNorm2d in [type(m) for m in back.modules()]
    assert bnn.BatchNorm2d not in [type(m) for m in back.modules()]


def test_convert_batchnorm_leaves_subclasses_and_rejects_bad_target():
    sync = torch.nn.SyncBatchNorm(4)
    assert bnn.convert_batchnorm(torch.nn.Sequential(sync))[0] is sync
    with pytest.raises(ValueError, match="'bnlab' or 'torch'"):
        bnn.convert_batchnorm(small_model(), to="keras")  # type: ignore[arg-type]
