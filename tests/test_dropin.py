"""A true drop-in (issue 13): eight kinds of BatchNorm behaviour, each over a family of inputs.

Each test compares bnlab (``bnlab.functional``, ``bnlab.nn`` and the manual engine's BN,
where the kind applies) with ``torch.nn.BatchNorm*d`` — or with the float64 value where
torch itself is wrong (kind 6). The functional checks run on both implementations of the
math: the chunked eager fast path and the composite path that transforms, export, compile
and double backward use (the ``path`` fixture).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import bnlab.nn as bnn
from bnlab import functional as F
from bnlab.manual import BatchNorm2d as ManualBatchNorm2d
from bnlab.manual.layers import PerActivationBatchNorm

F64 = torch.float64
PAIRS = {1: (bnn.BatchNorm1d, torch.nn.BatchNorm1d), 2: (bnn.BatchNorm2d, torch.nn.BatchNorm2d),
         3: (bnn.BatchNorm3d, torch.nn.BatchNorm3d)}
SPATIAL = {1: [(), (5,)], 2: [(3, 2)], 3: [(2, 3, 2)]}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error over the largest reference magnitude (0 for equal empties)."""
    a, ref = a.detach().double(), ref.detach().double()
    if a.numel() == 0:
        return 0.0
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def report(name: str, a: torch.Tensor, ref: torch.Tensor) -> float:
    """Print a few pairs and the error (then the caller asserts)."""
    err = rel_err(a, ref)
    pairs = list(zip(a.detach().flatten()[:3].tolist(), ref.detach().flatten()[:3].tolist(),
                     strict=True))
    print(f"{name}: max rel err {err:.2e}  (ours, reference) {pairs}")
    return err


def make_pair(dim: int, c: int, dtype: torch.dtype = F64, seed: int = 0, **options):
    """bnlab and torch BN modules with the same random affine parameters and buffers."""
    ours_cls, torch_cls = PAIRS[dim]
    ours = ours_cls(c, dtype=dtype, **options)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if ours.affine:
            ours.weight.copy_(torch.rand(c, generator=gen, dtype=F64) + 0.5)
            ours.bias.copy_(torch.randn(c, generator=gen, dtype=F64))
        if ours.running_mean is not None:
            ours.running_mean.copy_(torch.randn(c, generator=gen, dtype=F64))
            ours.running_var.copy_(torch.rand(c, generator=gen, dtype=F64) + 0.5)
    theirs = torch_cls(c, dtype=dtype, **options)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.fixture(params=["fast", "composite"])
def path(request, monkeypatch):
    """Run a check on the eager fast path and on the composite path."""
    if request.param == "composite":
        monkeypatch.setattr(F, "_fast_path_ok", lambda *tensors: False)
    return request.param


def textbook(x, gamma, beta, mean, var, eps):
    """Float64 y = gamma (x - mu) / sqrt(var + eps) + beta, broadcast over axis 1."""
    shape = (1, -1, *[1] * (x.dim() - 2))
    return ((x.double() - mean.double().view(shape)) / torch.sqrt(var.double().view(shape) + eps)
            * gamma.double().view(shape) + beta.double().view(shape))


def textbook_train(x, gamma, beta, eps):
    """Float64 autograd reference of training-mode BN; returns (y, leaves)."""
    x = x.detach().double().requires_grad_(True)
    g = gamma.detach().double().requires_grad_(True)
    b = beta.detach().double().requires_grad_(True)
    dims = F.reduce_dims(x)
    mu = x.mean(dims)
    var = ((x - mu.view(1, -1, *[1] * (x.dim() - 2))) ** 2).mean(dims)
    return textbook(x, g, b, mu, var, eps), (x, g, b)


# =========================================================================================
# Kind 1: inputs with no values per channel are a no-op, not an error
# =========================================================================================

EMPTY_SHAPES = {1: [(0, 3), (0, 3, 4), (2, 3, 0)], 2: [(0, 3, 2, 2), (2, 3, 0, 4)],
                3: [(0, 3, 2, 2, 2), (2, 3, 2, 0, 2)]}
EMPTY_CASES = [(d, s) for d, shapes in EMPTY_SHAPES.items() for s in shapes]
MODULE_OPTIONS = {"default": {}, "momentum None": {"momentum": None},
                  "no affine": {"affine": False},
                  "no running stats": {"track_running_stats": False}}


@pytest.mark.parametrize("dim,shape", EMPTY_CASES, ids=[str(s) for _, s in EMPTY_CASES])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("option", MODULE_OPTIONS, ids=MODULE_OPTIONS.keys())
def test_empty_input_nn_matches_torch(dim, shape, training, option):
    ours, theirs = make_pair(dim, 3, **MODULE_OPTIONS[option])
    results = []
    for m in (ours, theirs):
        m.train(training)
        x = torch.randn(shape, dtype=F64, requires_grad=True)
        y = m(x)
        y.sum().backward()
        results.append((y, x.grad, m))
    (y0, dx0, _), (y1, dx1, _) = results
    assert y0.shape == y1.shape == shape and y0.dtype == y1.dtype
    assert dx0.shape == dx1.shape
    for name in ("weight", "bias"):
        if getattr(theirs, name) is not None:
            assert torch.equal(getattr(ours, name).grad, getattr(theirs, name).grad), name
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if getattr(theirs, name) is not None:
            assert torch.equal(getattr(ours, name), getattr(theirs, name)), name


@pytest.mark.parametrize("dim,shape", EMPTY_CASES, ids=[str(s) for _, s in EMPTY_CASES])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_input_functional(dim, shape, training, path):
    c = shape[1]
    x, dy = torch.randn(shape), torch.randn(shape)
    gamma, beta = torch.rand(c) + 0.5, torch.randn(c)
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y, saved = F.batch_norm_forward(x, gamma, beta, rm, rv, training=training)
    if training:
        F.update_running_stats(rm, rv, saved.mean, saved.var, F.num_per_channel(x), 0.1)
    dx, dgamma, dbeta = F.batch_norm_backward(dy, x, saved, gamma)
    assert y.shape == dx.shape == shape
    assert torch.equal(dgamma, torch.zeros(c)) and torch.equal(dbeta, torch.zeros(c))
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


@pytest.mark.parametrize("shape", [(0, 3, 2, 2), (2, 3, 0, 4), (3, 3, 2, 0)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_input_manual_engine_matches_torch(shape, training):
    ours = ManualBatchNorm2d(3, dtype=F64)
    theirs = torch.nn.BatchNorm2d(3, dtype=F64).train(training)
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    y_ref = theirs(x)
    y_ref.sum().backward()
    y = ours.forward(x.detach(), training)
    dx = ours.backward(torch.ones_like(y))
    assert y.shape == dx.shape == shape
    assert torch.equal(ours.grads["weight"], theirs.weight.grad)
    assert torch.equal(ours.grads["bias"], theirs.bias.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(ours.buffers[name], getattr(theirs, name)), name
    per_activation = PerActivationBatchNorm(*shape[1:]) if 0 not in shape[1:] else None
    if per_activation is not None:  # an empty batch through the per-activation view
        y = per_activation.forward(torch.randn(shape), training)
        assert y.shape == shape and per_activation.backward(y).shape == shape


# =========================================================================================
# Kind 2: convert_batchnorm keeps identity; bnlab's classes are torch's _BatchNorm
# =========================================================================================


def bn_model(dim: int) -> torch.nn.Module:
    """A model whose one BN module appears twice, plus a second BN sharing its weight."""
    cls = PAIRS[dim][1]
    shared = cls(3)
    other = cls(3, momentum=0.3)
    other.weight = shared.weight  # a Parameter shared between two modules
    return torch.nn.Sequential(shared, torch.nn.Identity(), shared, other)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_convert_batchnorm_keeps_identity(dim, frozen, mode):
    model = bn_model(dim).train(mode == "train")
    model[3].eval()  # a mix of modes must survive too
    if frozen:
        for p in model.parameters():
            p.requires_grad_(False)
    tensors = {n: t for n, t in [*model.named_parameters(remove_duplicate=False),
                                 *model.named_buffers(remove_duplicate=False)]}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad] or
                                [torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    hook_calls = []
    model[0].register_forward_hook(lambda *args: hook_calls.append(1))
    converted = bnn.convert_batchnorm(model, to="bnlab")
    assert converted is model
    assert converted[0] is converted[2]  # converted once, still shared
    assert type(converted[0]) is PAIRS[dim][0] and type(converted[3]) is PAIRS[dim][0]
    assert converted[3].weight is converted[0].weight
    for name, t in [*converted.named_parameters(remove_duplicate=False),
                    *converted.named_buffers(remove_duplicate=False)]:
        assert t is tensors[name], name
        if isinstance(t, torch.nn.Parameter):
            assert t.requires_grad == (not frozen), name
    assert [m.training for m in converted] == [mode == "train"] * 3 + [False]
    assert converted[3].momentum == 0.3
    x = torch.randn(4, 3, *SPATIAL[dim][-1])
    converted(x).pow(3).sum().backward() if not frozen else converted(x)
    assert hook_calls == [1, 1]
    if not frozen:
        before = converted[0].weight.detach().clone()
        optimizer.step()  # built before the conversion, it still moves the live parameters
        assert not torch.equal(before, converted[0].weight)
    back = bnn.convert_batchnorm(converted, to="torch")
    assert type(back[0]) is PAIRS[dim][1] and back[0] is back[2]
    assert back[0].weight is tensors["0.weight"]


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_bnlab_modules_are_torch_batchnorm_for_the_ecosystem(dim):
    ours_cls = PAIRS[dim][0]
    assert isinstance(ours_cls(3), _BatchNorm)
    # torch.func's helper finds and rewires bnlab's modules; they then use batch statistics.
    model = torch.nn.Sequential(ours_cls(3))
    torch.func.replace_all_batch_norm_modules_(model)
    assert model[0].running_mean is None and not model[0].track_running_stats
    x = torch.randn(2, 4, 3, *SPATIAL[dim][-1])
    y = torch.func.vmap(model)(x)
    ref = torch.func.vmap(torch.nn.Sequential(PAIRS[dim][1](3, track_running_stats=False)))(x)
    assert report("vmap after replace_all_batch_norm_modules_", y, ref) < 1e-6
    # SyncBatchNorm's converter recognises them as BN (it needs no process group to convert).
    sync = torch.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(ours_cls(3)))
    assert type(sync[0]) is torch.nn.SyncBatchNorm


def test_convert_batchnorm_is_extensible():
    class MyBatchNorm2d(bnn.BatchNorm2d):
        pass

    bnn.register_conversion("mine-test", {torch.nn.BatchNorm2d: MyBatchNorm2d})
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.BatchNorm1d(3))
    weight = model[0].weight
    out = bnn.convert_batchnorm(model, to="mine-test")
    assert type(out[0]) is MyBatchNorm2d and out[0].weight is weight
    assert type(out[1]) is torch.nn.BatchNorm1d  # not in this target's mapping
    with pytest.raises(ValueError, match="'keras'"):
        bnn.convert_batchnorm(model, to="keras")


# =========================================================================================
# Kind 3: double backward
# =========================================================================================

DOUBLE_CASES = [(d, s) for d, shapes in SPATIAL.items() for s in shapes]


@pytest.mark.parametrize("dim,spatial", DOUBLE_CASES, ids=[f"{d}d{s}" for d, s in DOUBLE_CASES])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_gradgradcheck_nn(dim, spatial, training, affine):
    ours, _ = make_pair(dim, 3, affine=affine)
    ours.train(training)
    x = torch.randn(4, 3, *spatial, dtype=F64, requires_grad=True)
    params = [ours.weight, ours.bias] if affine else []

    def f(x, *p):
        if affine:
            return torch.func.functional_call(ours, {"weight": p[0], "bias": p[1]}, (x,))
        return ours(x)

    inputs = (x, *[p.detach().clone().requires_grad_(True) for p in params])
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8)
    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-8)


def test_gradgradcheck_channels_last():
    x = torch.randn(3, 2, 3, 2, dtype=F64).contiguous(memory_format=torch.channels_last)
    w = torch.rand(2, dtype=F64, requires_grad=True)
    b = torch.randn(2, dtype=F64, requires_grad=True)

    def f(x, w, b):
        return bnn.batch_norm(x, None, None, w, b, training=True)

    assert torch.autograd.gradgradcheck(f, (x.requires_grad_(True), w, b), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradient_penalty_matches_torch(dim, training):
    """WGAN-GP: the squared norm of d(sum of outputs)/dx, differentiated again."""
    conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[dim]
    results = []
    for which in (0, 1):
        torch.manual_seed(0)
        bn = make_pair(dim, 3)[which]
        model = torch.nn.Sequential(conv(2, 3, 1), bn, torch.nn.Tanh()).double()
        model.train(training)
        x = torch.randn(4, 2, *[3] * dim, dtype=F64, requires_grad=True)
        (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        g.pow(2).sum().backward()
        results.append(torch.cat([p.grad.flatten() for p in model.parameters()]
                                 + [x.grad.flatten()]))
    # One norm-wise error over all gradients: the conv bias's is ~1e-15 of the others
    # (BN removes the bias), a rounding residue in both implementations.
    assert report("penalty gradients", *results) < 1e-10


# =========================================================================================
# Kind 4: torch.func transforms
# =========================================================================================


def _loss(m):
    return lambda x: m(x).pow(3).sum()


TRANSFORMS = {
    "vmap": lambda m, x: torch.func.vmap(m)(x),
    "grad": lambda m, x: torch.func.grad(_loss(m))(x[0]),
    "jacrev": lambda m, x: torch.func.jacrev(m)(x[0]),
    "jacfwd": lambda m, x: torch.func.jacfwd(m)(x[0]),
    "jvp": lambda m, x: torch.func.jvp(m, (x[0],), (x[1],))[1],
    "vmap(grad)": lambda m, x: torch.func.vmap(torch.func.grad(_loss(m)))(x),
    "hessian": lambda m, x: torch.func.hessian(_loss(m))(x[0, :3]),
    "grad of params": lambda m, x: torch.func.grad(
        lambda p: torch.func.functional_call(m, p, (x[0],)).pow(3).sum())(
        dict(m.named_parameters())),
}


def forward_ad(m, x):
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        return fwAD.unpack_dual(m(fwAD.make_dual(x[0], x[1]))).tangent


TRANSFORMS["forward_ad"] = forward_ad
TRANSFORM_CASES = [(d, s) for d, shapes in SPATIAL.items() for s in shapes]


@pytest.mark.parametrize("transform", TRANSFORMS, ids=TRANSFORMS.keys())
@pytest.mark.parametrize("dim,spatial", TRANSFORM_CASES,
                         ids=[f"{d}d{s}" for d, s in TRANSFORM_CASES])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_func_transforms_match_torch(transform, dim, spatial, mode):
    # Training with running statistics would write a batched statistic into an unbatched
    # buffer under vmap, which torch refuses too; its own advice is
    # track_running_stats=False (or replace_all_batch_norm_modules_).
    options = {"track_running_stats": False} if mode == "train" else {}
    ours, theirs = make_pair(dim, 3, **options)
    ours.train(mode == "train")
    theirs.train(mode == "train")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, *spatial, generator=gen, dtype=F64) * 2 + 1
    got, want = TRANSFORMS[transform](ours, x), TRANSFORMS[transform](theirs, x)
    if isinstance(want, dict):
        got, want = torch.cat([v.flatten() for v in got.values()]), torch.cat(
            [v.flatten() for v in want.values()])
    assert report(transform, got, want) < 1e-10


# =========================================================================================
# Kind 5: torch.export in eval mode; torch.compile keeps working
# =========================================================================================


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_export_eval_matches_torch(dim, memory_format):
    if memory_format == "channels_last" and dim == 1:
        pytest.skip("channels_last needs 4D or 5D input")
    ours, theirs = make_pair(dim, 3, dtype=torch.float32)
    shape = (4, 3, *SPATIAL[dim][-1])
    models = [torch.nn.Sequential(torch.nn.Identity(), bn, torch.nn.ReLU()).eval()
              for bn in (ours, theirs)]
    program = torch.export.export(models[0], (torch.randn(shape),))
    x = torch.randn(shape) * 3 + 1
    if memory_format == "channels_last":
        x = x.contiguous(memory_format={2: torch.channels_last,
                                        3: torch.channels_last_3d}[dim])
    assert report("exported", program.module()(x), models[1](x)) < 1e-6


@pytest.mark.slow
def test_compile_matches_torch_without_graph_breaks():
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward."""
    torch._dynamo.reset()
    results = []
    for which in (0, 1):
        torch.manual_seed(0)
        bn = make_pair(2, 4, dtype=torch.float32)[which]
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bn, torch.nn.ReLU())
        step = torch.compile(model, backend="aot_eager", fullgraph=True) if which == 0 else model
        x = torch.randn(8, 3, 6, 6)
        y = step(x)
        y.square().sum().backward()
        model.eval()
        results.append([y, step(x), model[0].weight.grad, bn.running_mean, bn.running_var])
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        assert report(f"compiled output {i}", a, b) < 1e-5


# =========================================================================================
# Kind 6: no float32 overflow in intermediates (torch overflows; the truth is float64's)
# =========================================================================================


def _overflow_inputs() -> dict[str, torch.Tensor]:
    """(16, 2, 3) float32 inputs whose squares (x - K)**2 overflow float32; channel 1 ordinary."""
    base = torch.randn(16, 2, 3, generator=torch.Generator().manual_seed(0))
    one_spike = base.clone()
    one_spike[:, 0] = 0.0
    one_spike[0, 0, 0] = 3e19
    two_sided = base.clone()
    two_sided[:, 0] = torch.linspace(-2.5e19, 2.5e19, 48).view(16, 3)
    offset = base.clone()
    offset[:, 0] = 1e25 + base[:, 0] * 5e19
    return {"3e19 spike": one_spike, "+-2.5e19 ramp": two_sided, "1e25 offset": offset}


OVERFLOW = _overflow_inputs()


@pytest.mark.parametrize("case", OVERFLOW, ids=OVERFLOW.keys())
def test_no_overflow_functional(case, path):
    x = OVERFLOW[case]
    gamma, beta = torch.tensor([1.5, 0.7]), torch.tensor([0.2, -0.1])
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    y, saved = F.batch_norm_forward(x, gamma, beta, eps=1e-5)
    dx, dgamma, dbeta = F.batch_norm_backward(dy, x, saved, gamma)
    y_ref, leaves = textbook_train(x, gamma, beta, 1e-5)
    refs = torch.autograd.grad(y_ref, leaves, dy.double())
    var_ref = x.double().var((0, 2), unbiased=False)
    assert report("var", saved.var, var_ref) < 1e-6
    for name, a, ref in zip(("y", "dx", "dgamma", "dbeta"), (y, dx, dgamma, dbeta),
                            (y_ref, *refs), strict=True):
        assert torch.isfinite(a).all(), name
        assert report(name, a, ref) < 1e-5, name


@pytest.mark.parametrize("case", OVERFLOW, ids=OVERFLOW.keys())
def test_no_overflow_nn_and_manual(case):
    x = OVERFLOW[case]
    y_ref, _ = textbook_train(x, torch.ones(2), torch.zeros(2), 1e-5)
    var_unbiased = x.double().var((0, 2), unbiased=True)
    rv_ref = 0.9 + 0.1 * var_unbiased
    bn = bnn.BatchNorm1d(2)
    xg = x.clone().requires_grad_(True)
    y = bn(xg)
    y.sum().backward()
    manual = ManualBatchNorm2d(2)
    y_manual = manual.forward(x.unsqueeze(-1), True).squeeze(-1)
    for name, a in (("nn y", y), ("manual y", y_manual)):
        assert report(name, a, y_ref) < 1e-5, name
    for name, rv in (("nn running_var", bn.running_var),
                     ("manual running_var", manual.buffers["running_var"])):
        assert report(name, rv, rv_ref) < 1e-6, name
    assert torch.isfinite(xg.grad).all()


def test_no_overflow_of_large_upstream_gradients(path):
    """dy of 1e30: sum(dy) and sum(dy * (x - K)) overflow float32 unless scaled."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 3, generator=gen) * 1e10
    dy = torch.randn(64, 3, generator=gen) * 1e30
    gamma, beta = torch.rand(3, generator=gen) + 0.5, torch.zeros(3)
    _, saved = F.batch_norm_forward(x, gamma, beta)
    grads = F.batch_norm_backward(dy, x, saved, gamma)
    y_ref, leaves = textbook_train(x, gamma, beta, 1e-5)
    refs = torch.autograd.grad(y_ref, leaves, dy.double())
    for name, a, ref in zip(("dx", "dgamma", "dbeta"), grads, refs, strict=True):
        assert report(name, a, ref) < 1e-5, name


# =========================================================================================
# Kind 7: half-precision input with float32 statistics; non-finite shifts
# =========================================================================================

HALF_CASES = {
    # name: (x rows, running_mean, running_var)
    "mean 7e4 beyond float16": ([[6e4, 1.5], [6.5e4, 0.5]], [7e4, 1.0], [4e6, 1.0]),
    "mean -1e5, var 1e8": ([[-6e4, 2.0], [-5e4, -1.0]], [-1e5, 0.5], [1e8, 2.0]),
    "inf input, finite stats": ([[float("inf"), 1.0], [3.0, 2.0]], [1.0, 1.0], [4.0, 1.0]),
    "inf running mean": ([[1.0, 1.0], [3.0, 2.0]], [float("inf"), 1.0], [4.0, 1.0]),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", HALF_CASES, ids=HALF_CASES.keys())
def test_half_input_float32_running_stats(dtype, case):
    rows, rm, rv = HALF_CASES[case]
    x = torch.tensor(rows).to(dtype)
    rm, rv = torch.tensor(rm), torch.tensor(rv)
    # The truth: IEEE float64 arithmetic on the same values, rounded to the input's dtype.
    ref = textbook(x, torch.ones(2), torch.zeros(2), rm, rv, 0.0).to(dtype)
    bn = bnn.BatchNorm1d(2, eps=0.0).eval()
    bn.running_mean.copy_(rm)
    bn.running_var.copy_(rv)
    y_nn = bn(x)
    y_f, _ = F.batch_norm_forward(x, None, None, rm, rv, training=False, eps=0.0)
    manual = ManualBatchNorm2d(2, eps=0.0)
    manual.buffers["running_mean"].copy_(rm)
    manual.buffers["running_var"].copy_(rv)
    y_manual = manual.forward(x.view(2, 2, 1, 1), False).view(2, 2)
    print(f"reference {ref.tolist()}")
    for name, y in (("nn", y_nn), ("functional", y_f), ("manual", y_manual)):
        print(f"{name}: {y.tolist()}")
        assert y.dtype == dtype
        assert torch.equal(y.isnan(), ref.isnan()), name
        finite = torch.isfinite(ref)
        assert torch.equal(y[~finite & ~ref.isnan()], ref[~finite & ~ref.isnan()]), name
        assert (y[finite].double() - ref[finite].double()).abs().max() <= torch.finfo(
            dtype).eps * ref[finite].double().abs().max().clamp_min(1), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_inf_in_one_channel_leaves_the_others_alone_in_training(dtype, path):
    """A channel with an inf gets IEEE's NaN (as torch's does); the other channels are exact."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(8, 3, 2, generator=gen) * 3 + 50).to(dtype)
    x[2, 1, 0] = float("inf")
    y, _ = F.batch_norm_forward(x, eps=1e-5)
    ref = torch.nn.functional.batch_norm(x.float(), None, None, training=True).to(dtype)
    assert torch.equal(y[:, 1].isnan(), ref[:, 1].isnan())
    keep = [0, 2]
    truth, _ = textbook_train(x[:, keep], torch.ones(2), torch.zeros(2), 1e-5)
    # rounding to dtype costs eps/2; float32's own work (|mean|/sigma ~ 17) a few 1e-7 more
    tol = torch.finfo(dtype).eps / 2 + 1e-6
    assert report("finite channels", y[:, keep], truth) <= tol


# =========================================================================================
# Kind 8: argument validation as torch does it (same conditions, same exception types)
# =========================================================================================

X = torch.randn(4, 3)
C3 = torch.ones(3)
BAD_ARGUMENTS = {
    # name: (x, running_mean, running_var, weight, bias, training, eps, fragment in our message)
    "only running_mean, train": (X, C3, None, None, None, True, 1e-5, "running_var None"),
    "only running_var, train": (X, None, C3, None, None, True, 1e-5, "running_mean None"),
    "only running_mean, eval": (X, C3, None, None, None, False, 1e-5, "running_var"),
    "no running stats, eval": (X, None, None, None, None, False, 1e-5, "running_mean"),
    "running_mean of 4": (X, torch.ones(4), torch.ones(4), None, None, True, 1e-5, "not 4"),
    "weight of 4": (X, None, None, torch.ones(4), None, True, 1e-5, "not 4"),
    "bias of 2": (X, None, None, C3, torch.ones(2), True, 1e-5, "not 2"),
    "running_var 2-D": (X, C3, torch.ones(3, 1), None, None, True, 1e-5, "(3, 1)"),
    "float64 input, float32 params": (X.double(), C3, C3, C3, C3, True, 1e-5, "torch.float64"),
    "float32 input, float64 weight": (X, None, None, C3.double(), None, True, 1e-5,
                                      "torch.float64"),
    "float32 input, float16 params": (X, C3.half(), C3.half(), None, None, False, 1e-5,
                                      "torch.float16"),
    "bfloat16 input, float64 stats": (X.bfloat16(), C3.double(), C3.double(), C3, None, True,
                                      1e-5, "torch.float64"),
    "float16 input, float16 weight, float32 stats": (X.half(), C3, C3, C3.half(), None, True,
                                                     1e-5, "torch.float32"),
    "integer input": (torch.ones(4, 3, dtype=torch.long), None, None, None, None, True, 1e-5,
                      "torch.int64"),
    "1-D input": (torch.ones(3), None, None, None, None, True, 1e-5, "1D"),
    "eps 0, train": (X, None, None, None, None, True, 0.0, "got 0.0"),
    "eps -1, eval": (X, C3, C3, None, None, False, -1.0, "got -1.0"),
    "one value per channel": (torch.ones(1, 3), None, None, None, None, True, 1e-5, "[1, 3]"),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS, ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_raise_like_torch(case):
    x, rm, rv, w, b, training, eps, fragment = BAD_ARGUMENTS[case]
    args = [t.clone() if t is not None else None for t in (rm, rv, w, b)]
    with pytest.raises(Exception) as theirs:
        torch.nn.functional.batch_norm(x, *args, training=training, eps=eps)
    with pytest.raises(theirs.type) as ours:
        bnn.batch_norm(x, *args, training=training, eps=eps)
    print(f"torch: {theirs.value!r}\nbnlab: {ours.value!r}")
    assert fragment in str(ours.value)
    if case != "one value per channel":  # checked by the module / nn.batch_norm only
        with pytest.raises(theirs.type):
            F.batch_norm_forward(x, args[2], args[3], args[0], args[1], training=training,
                                 eps=eps)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("module_dtype,input_dtype", [
    (torch.float32, torch.float64), (torch.float64, torch.float32),
    (torch.float16, torch.float32), (torch.float32, torch.float16),
    (torch.float32, torch.bfloat16), (torch.float64, torch.float64)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_dtype_mixes_like_torch(dim, module_dtype, input_dtype, training):
    """PyTorch allows one mix (float16/bfloat16 input, float32 module); all else raises."""
    ours, theirs = make_pair(dim, 3, dtype=module_dtype)
    x = torch.randn(4, 3, *SPATIAL[dim][-1]).to(input_dtype)
    outcomes = []
    for m in (ours, theirs):
        m.train(training)
        try:
            outcomes.append(m(x))
        except Exception as error:  # the type is what is compared
            outcomes.append(error)
    print(outcomes)
    assert type(outcomes[0]) is type(outcomes[1])
    if isinstance(outcomes[1], torch.Tensor):
        assert outcomes[0].dtype == outcomes[1].dtype
        tol = 1e-12 if input_dtype == F64 else 2 * torch.finfo(input_dtype).eps
        assert rel_err(outcomes[0], outcomes[1]) <= tol


@pytest.mark.parametrize("case", ["mixed dtype", "wrong channels"])
def test_manual_engine_validates_like_torch(case):
    layer = ManualBatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2, dtype=F64) if case == "mixed dtype" else torch.randn(4, 2, 2, 2)
    theirs = torch.nn.BatchNorm2d(3)
    with pytest.raises(Exception) as expected:
        theirs(x)
    with pytest.raises(expected.type):
        layer.forward(x, True)


def test_convert_batchnorm_copies_nothing():
    """deepcopy is the way to get a copy; conversion itself never allocates new tensors."""
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    copied = bnn.convert_batchnorm(copy.deepcopy(model))
    assert copied[0].weight is not model[0].weight
    assert torch.equal(copied[0].weight, model[0].weight)
