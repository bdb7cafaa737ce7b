"""PyTorch's own module test database for BatchNorm, run against bnlab.nn.

``torch.testing._internal.common_modules.module_db`` holds, for ``torch.nn.BatchNorm1d/2d/3d``,
the constructor and forward inputs PyTorch tests its modules with (including the empty
batch), and the inputs that must raise. Each case is run through the checks of PyTorch's
``test_modules.py`` (forward, gradients, running buffers, gradcheck and gradgradcheck,
memory format, non-contiguous input, repr, state dict, pickling, errors) on the torch
module and on bnlab's twin built from the same arguments: every check that passes for
``torch.nn`` must pass for bnlab, with the same values.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import bnlab.nn as bnn

common_modules = pytest.importorskip("torch.testing._internal.common_modules")

TWINS = {torch_cls: ours for torch_cls, ours in bnn._PAIRS}
INFOS = [info for info in common_modules.module_db if info.module_cls in TWINS]
DTYPES = [torch.float32, torch.float64]


def _cases(error_inputs: bool = False):
    cases = []
    for info in INFOS:
        for dtype in DTYPES:
            for training in (True, False):
                func = info.module_error_inputs_func if error_inputs else info.module_inputs_func
                if func is None:
                    continue
                inputs = func(info, device="cpu", dtype=dtype, requires_grad=True,
                              training=training)
                for i, case in enumerate(inputs):
                    desc = getattr(case, "desc", "") or f"case{i}"
                    name = f"{info.name}-{desc}-{str(dtype)[6:]}-{'train' if training else 'eval'}"
                    cases.append(pytest.param(info, dtype, training, case, id=name))
    return cases


def _build(cls, case, dtype, training, seed=0):
    args, kwargs = case.constructor_input.args, case.constructor_input.kwargs
    torch.manual_seed(seed)
    m = cls(*args, **kwargs).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move off the default initialisation so that a mix-up shows
        for p in m.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64) + 0.5)
    return m.train(training)


def _pair(info, dtype, training, case):
    theirs = _build(info.module_cls, case, dtype, training)
    ours = _build(TWINS[info.module_cls], case, dtype, training)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _inputs(case):
    return copy.deepcopy(case.forward_input.args), copy.deepcopy(case.forward_input.kwargs)


def _run(m, case, grad_seed=1):
    """Forward and backward with a fixed upstream gradient; returns what a test compares."""
    args, kwargs = _inputs(case)
    y = m(*args, **kwargs)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    leaves += [p for p in m.parameters() if p.requires_grad]
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=y.dtype)
    grads = torch.autograd.grad(y, leaves, dy, allow_unused=True) if leaves else ()
    buffers = [b.clone() for b in m.buffers()]
    return y.detach(), [g for g in grads if g is not None], buffers


def _tol(dtype):
    return {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 1e-5,
                                                                           "rtol": 1e-4}


def _assert_same(ours, theirs, dtype):
    """Two results of :func:`_run`: values, gradients and buffers agree."""
    (y0, g0, b0), (y1, g1, b1) = ours, theirs
    torch.testing.assert_close(y0, y1, **_tol(dtype))
    assert len(g0) == len(g1)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(a, b, **_tol(dtype))
    for a, b in zip(b0, b1, strict=True):
        torch.testing.assert_close(a, b, **_tol(dtype))


def _passes(check, *args) -> bool:
    """Whether ``check`` passes for torch's module (only those cases bind bnlab)."""
    try:
        check(*args)
    except (Exception, pytest.fail.Exception):  # pytest.raises' failure is a BaseException
        return False
    return True


CASES = _cases()


@pytest.mark.parametrize("info,dtype,training,case", CASES)
def test_forward_backward_and_buffers(info, dtype, training, case):
    """test_forward + test_non_contiguous + test_if_train_and_eval_modes_differ, compared."""
    ours, theirs = _pair(info, dtype, training, case)
    for _ in range(2):  # two steps: buffers feed back into the second
        _assert_same(_run(ours, case), _run(theirs, case), dtype)
    assert ours.training == theirs.training == training


@pytest.mark.parametrize("info,dtype,training,case", CASES)
def test_memory_format_and_non_contiguous(info, dtype, training, case):
    ours, theirs = _pair(info, dtype, training, case)
    (x,), _ = _inputs(case)
    layouts = {"transposed": lambda t: t.transpose(0, -1).contiguous().transpose(0, -1)}
    if x.dim() == 4:
        layouts["channels_last"] = lambda t: t.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        layouts["channels_last_3d"] = lambda t: t.contiguous(
            memory_format=torch.channels_last_3d)
    for name, layout in layouts.items():
        xs = layout(x.detach()).requires_grad_(True)
        ys = [m(xs) for m in (ours, theirs)]
        torch.testing.assert_close(ys[0], ys[1], **_tol(dtype), msg=name)
        formats = {2: [], 3: [], 4: [torch.channels_last], 5: [torch.channels_last_3d]}
        for fmt in [torch.contiguous_format, *formats[ys[1].dim()]]:
            assert ys[0].is_contiguous(memory_format=fmt) == ys[1].is_contiguous(
                memory_format=fmt), (name, fmt)


@pytest.mark.parametrize("info,dtype,training,case",
                         [c for c in CASES if c.values[1] == torch.float64])
def test_gradcheck_and_gradgradcheck(info, dtype, training, case):
    """test_grad / test_gradgrad (fast mode: random projections), where torch's pass."""
    ours, theirs = _pair(info, dtype, training, case)
    (x,), _ = _inputs(case)

    def check(m, checker):
        params = {n: p.detach().clone().requires_grad_(True) for n, p in m.named_parameters()}
        names = list(params)

        def f(x, *flat):
            return torch.func.functional_call(m, dict(zip(names, flat, strict=True)), (x,))

        assert checker(f, (x.detach().requires_grad_(True), *params.values()), eps=1e-6,
                       atol=1e-6, check_batched_grad=False, fast_mode=True)

    checkers = [torch.autograd.gradcheck] + (
        [torch.autograd.gradgradcheck] if info.supports_gradgrad else [])
    for checker in checkers:
        if _passes(check, copy.deepcopy(theirs), checker):
            check(ours, checker)


@pytest.mark.parametrize("info,dtype,training,case", CASES)
def test_repr_state_dict_pickle_and_to(info, dtype, training, case):
    """test_repr, test_save_load (pickle), test_to and test_factory_kwargs, compared."""
    ours, theirs = _pair(info, dtype, training, case)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    reloaded = pickle.loads(pickle.dumps(ours))
    for m in (loaded, reloaded):
        assert type(m) is type(ours) and m.training == ours.training
        _assert_same(_run(m, case), _run(copy.deepcopy(ours), case), dtype)
    other = torch.float64 if dtype == torch.float32 else torch.float32
    assert [t.dtype for t in ours.to(other).state_dict().values()] == [
        t.dtype for t in theirs.to(other).state_dict().values()]
    args, kwargs = case.constructor_input.args, case.constructor_input.kwargs
    built = TWINS[info.module_cls](*args, **kwargs, device="cpu", dtype=dtype)
    reference = info.module_cls(*args, **kwargs, device="cpu", dtype=dtype)
    assert [(n, t.dtype, t.device) for n, t in built.state_dict().items()] == [
        (n, t.dtype, t.device) for n, t in reference.state_dict().items()]


ERROR_CASES = _cases(error_inputs=True)


@pytest.mark.parametrize("info,dtype,training,case", ERROR_CASES)
def test_error_inputs(info, dtype, training, case):
    """test_errors: where torch raises the database's error, bnlab raises it too."""
    module_input = case.module_error_input
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs

    def run(cls):
        m = cls(*args, **kwargs).to(dtype).train(training)
        fargs = copy.deepcopy(module_input.forward_input.args)
        with pytest.raises(case.error_type, match=case.error_regex):
            m(*fargs)

    if not _passes(run, info.module_cls):
        pytest.skip(f"torch itself does not raise {case.error_type.__name__} here")
    run(TWINS[info.module_cls])


def test_the_database_is_there():
    """The suite above is not vacuous: three modules, the empty batch among the inputs."""
    assert {info.module_cls for info in INFOS} == set(TWINS)
    assert any("zero_batch" in c.id for c in CASES)
    assert len(CASES) >= 3 * 2 * 2 * 5 and ERROR_CASES
