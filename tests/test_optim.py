"""What bnlab.optim promises.

- SGD and Adam (coupled or decoupled weight decay, with or without AMSGrad)
  follow torch.optim step for step: float64, 100 steps of the same random
  gradients, parameters equal to 1e-12 relative (the same operations in the same
  order, so any difference beyond a few rounding errors is a different rule).
- AMSGrad's "reddi" and "post" rules follow plain element-by-element reference
  loops written here, and "post" differs from "reddi" exactly where the sums
  disagree with the element-wise maximum.
- ``lr`` is a live attribute, ``state_dict`` resumes exactly, bad arguments raise
  the exception types torch raises, with the bad value in the message.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from bnlab.optim import SGD, Adam, AMSGrad

T = torch.optim
SHAPES = [(7,), (3, 5), (4, 3, 2, 2)]  # a vector, a matrix, a conv weight (C_out, C_in, kH, kW)
F64 = torch.float64


def make_params(shapes=SHAPES, dtype=F64, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype) for shape in shapes]


def gradient_stream(steps: int, shapes=SHAPES, dtype=F64, seed: int = 1):
    """Each step's gradients: N(0, 1) noise times a per-step scale e^z, z ~ N(0, 1).

    The changing scale makes v rise and fall, so AMSGrad's maximum binds and the
    post's sum comparison takes both branches.
    """
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        scale = math.exp(torch.randn((), generator=gen, dtype=F64).item())
        yield [scale * torch.randn(shape, generator=gen, dtype=F64).to(dtype) for shape in shapes]


def max_relative_error(ours, reference) -> float:
    """max over tensors of max|ours − reference| / max|reference|."""
    return max(
        ((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, reference, strict=True)
    )


def clone_all(tensors) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


# ---------------------------------------------------------------------------
# step for step against torch.optim
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    ours: type
    theirs: type
    shared: dict[str, Any]
    ours_only: dict[str, Any] = field(default_factory=dict)
    theirs_only: dict[str, Any] = field(default_factory=dict)


DECOUPLED = {"decoupled_weight_decay": True}
AMS = {"amsgrad": True}
CASES = [
    Case("sgd", SGD, T.SGD, {"lr": 0.1}),
    Case("sgd_momentum", SGD, T.SGD, {"lr": 0.05, "momentum": 0.9}),
    Case("sgd_dampening", SGD, T.SGD, {"lr": 0.05, "momentum": 0.9, "dampening": 0.3}),
    Case("sgd_nesterov", SGD, T.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    Case("sgd_weight_decay", SGD, T.SGD, {"lr": 0.05, "weight_decay": 0.05}),
    Case("sgd_momentum_wd", SGD, T.SGD, {"lr": 0.05, "momentum": 0.8, "weight_decay": 0.05}),
    Case("sgd_nesterov_wd", SGD, T.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True,
                                         "weight_decay": 0.05}),
    Case("adam", Adam, T.Adam, {"lr": 1e-2}),
    Case("adam_betas_eps", Adam, T.Adam, {"lr": 3e-3, "betas": (0.5, 0.9), "eps": 1e-3}),
    Case("adam_weight_decay", Adam, T.Adam, {"lr": 1e-2, "weight_decay": 0.1}),
    Case("adamw", Adam, T.AdamW, {"lr": 1e-2, "weight_decay": 0.1}, DECOUPLED),
    Case("adam_amsgrad", Adam, T.Adam, {"lr": 1e-2, "betas": (0.9, 0.99), "amsgrad": True}),
    Case("adamw_amsgrad", Adam, T.AdamW, {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True},
         DECOUPLED),
    Case("amsgrad_torch_rule", AMSGrad, T.Adam, {"lr": 1e-2, "betas": (0.9, 0.99)}, {}, AMS),
    Case("amsgrad_torch_rule_wd", AMSGrad, T.Adam, {"lr": 1e-2, "weight_decay": 0.1}, {}, AMS),
]


def run_against_torch(case: Case, steps: int, dtype=F64, memory_format=torch.contiguous_format,
                      lr_schedule=None):
    """Run ours and torch's optimizer on copies of the same params and gradients."""
    ours_params = [p.contiguous(memory_format=memory_format) if p.dim() == 4 else p
                   for p in make_params(dtype=dtype)]
    torch_params = clone_all(ours_params)  # clone() keeps the strides
    ours = case.ours(ours_params, **case.shared, **case.ours_only)
    theirs = case.theirs(torch_params, **case.shared, **case.theirs_only, foreach=False)
    for step, grads in enumerate(gradient_stream(steps, dtype=dtype)):
        if lr_schedule is not None:
            ours.lr = theirs.param_groups[0]["lr"] = lr_schedule(step)
        ours.step(grads)  # ours first: if it wrote into grads, torch would see it and disagree
        for p, g in zip(torch_params, grads, strict=True):
            p.grad = g
        theirs.step()
    return ours, ours_params, torch_params


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_matches_torch_optim_step_for_step(case: Case):
    _, ours, reference = run_against_torch(case, steps=100)
    error = max_relative_error(ours, reference)
    print(f"{case.name}: max relative error after 100 steps {error:.3e}")
    assert error <= 1e-12


def test_gradient_stream_makes_amsgrad_bind():
    """The AMSGrad cases above only prove something if the maximum changes the path."""
    _, plain, _ = run_against_torch(Case("adam", Adam, T.Adam, {"lr": 1e-2}), steps=100)
    _, ams, _ = run_against_torch(CASES[[c.name for c in CASES].index("adam_amsgrad")], 100)
    difference = max_relative_error(ams, plain)
    print(f"AMSGrad vs Adam: max relative difference {difference:.3e}")
    assert difference > 1e-3


def test_float32_channels_last_matches_torch_and_keeps_layout():
    case = Case("adamw_amsgrad", Adam, T.AdamW, {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True},
                DECOUPLED)
    opt, ours, reference = run_against_torch(case, steps=20, dtype=torch.float32,
                                             memory_format=torch.channels_last)
    error = max_relative_error(ours, reference)
    print(f"float32 channels_last: max relative error {error:.3e}")
    # The same float32 operations in the same order: a few roundings at most (eps 1.2e-7).
    assert error <= 1e-6
    assert all(p.dtype == torch.float32 for p in ours)
    assert ours[2].is_contiguous(memory_format=torch.channels_last)
    for name, tensors in opt.state.items():
        assert tensors[2].is_contiguous(memory_format=torch.channels_last), name
        assert tensors[2].dtype == torch.float32, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rule", ["torch", "reddi", "post"])
def test_cuda_matches_cpu(rule: str):
    cpu = make_params()
    cuda = [p.cuda() for p in cpu]
    opt_cpu = AMSGrad(cpu, lr=1e-2, weight_decay=0.01, rule=rule)
    opt_cuda = AMSGrad(cuda, lr=1e-2, weight_decay=0.01, rule=rule)
    for grads in gradient_stream(50):
        opt_cpu.step(grads)
        opt_cuda.step([g.cuda() for g in grads])
    error = max_relative_error([p.cpu() for p in cuda], cpu)
    print(f"CUDA vs CPU, rule {rule}: max relative error {error:.3e}")
    assert error <= 1e-12


def test_sgdw_decoupled_weight_decay_shrinks_first():
    """SGDW = torch's SGD without weight decay, after θ ← (1 − ηλ)θ each step."""
    lr, wd = 0.05, 0.1
    ours_params = make_params()
    reference = clone_all(ours_params)
    ours = SGD(ours_params, lr=lr, momentum=0.9, weight_decay=wd, decoupled_weight_decay=True)
    theirs = T.SGD(reference, lr=lr, momentum=0.9, foreach=False)
    for grads in gradient_stream(100):
        ours.step(grads)
        for p, g in zip(reference, grads, strict=True):
            p.mul_(1 - lr * wd)
            p.grad = g
        theirs.step()
    error = max_relative_error(ours_params, reference)
    print(f"SGDW: max relative error {error:.3e}")
    assert error <= 1e-12


# ---------------------------------------------------------------------------
# AMSGrad's "reddi" and "post" rules against plain reference loops
# ---------------------------------------------------------------------------


def reference_amsgrad(params, grad_steps, lr, betas, eps, rule, weight_decay=0.0):
    """Reddi's or the post's AMSGrad on Python floats, one element at a time.

    Returns the final parameters and how often the post's rule replaced v̂ or kept it.
    """
    beta1, beta2 = betas
    theta = [p.flatten().tolist() for p in params]
    m = [[0.0] * len(t) for t in theta]
    v = [[0.0] * len(t) for t in theta]
    v_hat = [[0.0] * len(t) for t in theta]
    replaced = kept = 0
    for grads in grad_steps:
        for k, grad in enumerate(grads):
            flat = grad.flatten().tolist()
            g = [gj + weight_decay * tj for gj, tj in zip(flat, theta[k], strict=True)]
            for j in range(len(g)):
                m[k][j] = beta1 * m[k][j] + (1 - beta1) * g[j]
                v[k][j] = beta2 * v[k][j] + (1 - beta2) * g[j] ** 2
            if rule == "reddi":
                v_hat[k] = [max(a, b) for a, b in zip(v_hat[k], v[k], strict=True)]
            elif sum(v[k]) > sum(v_hat[k]):  # "post": one comparison per tensor
                v_hat[k], replaced = list(v[k]), replaced + 1
            else:
                kept += 1
            for j in range(len(g)):
                theta[k][j] -= lr * m[k][j] / (math.sqrt(v_hat[k][j]) + eps)
    shapes = [p.shape for p in params]
    final = [torch.tensor(t, dtype=F64).reshape(s) for t, s in zip(theta, shapes, strict=True)]
    return final, replaced, kept


TINY = [(3,), (2, 2)]
RULE_CASES = [  # (name, rule, settings)
    ("reddi", "reddi", {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8}),
    ("reddi_wd", "reddi", {"lr": 1e-2, "betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.1}),
    ("post", "post", {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8}),
    ("post_beta2_0.9", "post", {"lr": 3e-4, "betas": (0.9, 0.9), "eps": 1e-8}),
    ("post_wd", "post", {"lr": 1e-2, "betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.1}),
]


@pytest.mark.parametrize(("name", "rule", "settings"), RULE_CASES, ids=[c[0] for c in RULE_CASES])
def test_amsgrad_rule_matches_reference(name: str, rule: str, settings: dict[str, Any]):
    start = make_params(TINY)
    grad_steps = list(gradient_stream(40, TINY))
    params = clone_all(start)
    opt = AMSGrad(params, rule=rule, **settings)
    for grads in grad_steps:
        opt.step(grads)
    reference, replaced, kept = reference_amsgrad(start, grad_steps, rule=rule, **settings)
    error = max_relative_error(params, reference)
    print(f"{name}: max relative error {error:.3e}")
    assert error <= 1e-12
    if rule == "post":  # the data must exercise both branches of the comparison
        print(f"the post's v̂ took v_t {replaced} times and kept v̂_(t-1) {kept} times")
        assert replaced > 0 and kept > 0


def test_post_rule_differs_from_reddi_when_sums_disagree_with_the_max():
    """Two elements, β1 = 0 (so m = g) and β2 = 1/2, values worked out by hand.

    step  g           v = v/2 + g²/2     Σv      post v̂ (Σv > Σv̂?)          reddi v̂ = max
    1     [2, 0]      [2, 0]             2       [2, 0]       (2 > 0)          [2, 0]
    2     [0, 1.5]    [1, 1.125]         2.125   [1, 1.125]   (2.125 > 2)      [2, 1.125]
    3     [0.5, 0]    [0.625, 0.5625]    1.1875  [1, 1.125]   (kept)           [2, 1.125]
    """
    lr, eps = 0.1, 1e-8
    grad_steps = [[torch.tensor(g, dtype=F64)] for g in ([2, 0], [0, 1.5], [0.5, 0])]
    expected_v_hat = {
        "post": [[2, 0], [1, 1.125], [1, 1.125]],
        "reddi": [[2, 0], [2, 1.125], [2, 1.125]],
    }
    final = {}
    for rule, v_hats in expected_v_hat.items():
        params = [torch.zeros(2, dtype=F64)]
        opt = AMSGrad(params, lr=lr, betas=(0.0, 0.5), eps=eps, rule=rule)
        for grads, v_hat in zip(grad_steps, v_hats, strict=True):
            opt.step(grads)
            assert opt.state["max_exp_avg_sq"][0].tolist() == v_hat, (rule, opt.step_count)
        final[rule] = params[0]
    # θ0 moves at steps 1 and 3 (m0 = 2, then 0.5); θ1 at step 2 only (m1 = 1.5), the same in both.
    theta1 = -lr * 1.5 / (math.sqrt(1.125) + eps)
    expected = {
        "post": [-lr * 2 / (math.sqrt(2) + eps) - lr * 0.5 / (1 + eps), theta1],
        "reddi": [-lr * 2 / (math.sqrt(2) + eps) - lr * 0.5 / (math.sqrt(2) + eps), theta1],
    }
    for rule, theta in final.items():
        print(rule, theta.tolist(), "expected", expected[rule])
        assert torch.allclose(theta, torch.tensor(expected[rule], dtype=F64), rtol=1e-14, atol=0)
    assert final["post"][0] < final["reddi"][0]  # the post's v̂0 fell from 2 to 1: a bigger step



def test_post_rule_keeps_v_hat_on_a_tie():
    """Σv_t = Σv̂_{t-1} with v_t ≠ v̂_{t-1}: the post compares with ">", so v̂ is kept.

    β2 = 1/2: step 1, g = [2, 0] gives v = v̂ = [2, 0]; step 2, g = [1, 1] gives
    v = [1 + 1/2, 1/2] = [1.5, 0.5], whose sum 2 ties with Σv̂ = 2.
    """
    opt = AMSGrad([torch.zeros(2, dtype=F64)], lr=0.1, betas=(0.0, 0.5), eps=1.0, rule="post")
    opt.step([torch.tensor([2.0, 0.0], dtype=F64)])
    opt.step([torch.tensor([1.0, 1.0], dtype=F64)])
    assert opt.state["exp_avg_sq"][0].tolist() == [1.5, 0.5]
    assert opt.state["max_exp_avg_sq"][0].tolist() == [2.0, 0.0]

# ---------------------------------------------------------------------------
# lr, gradients from p.grad, state_dict
# ---------------------------------------------------------------------------


def test_lr_change_takes_effect_immediately():
    params = make_params()
    opt = SGD(params, lr=0.1)
    before = clone_all(params)
    grads = next(gradient_stream(1))
    opt.lr = 0.25
    opt.step(grads)
    for p, b, g in zip(params, before, grads, strict=True):
        torch.testing.assert_close(p, b - 0.25 * g, rtol=1e-15, atol=1e-15)
    opt.lr = 0.0
    frozen = clone_all(params)
    opt.step(grads)
    assert all(torch.equal(p, f) for p, f in zip(params, frozen, strict=True))


SCHEDULE_CASES = [c for c in CASES if c.name in ("sgd_nesterov_wd", "adamw_amsgrad")]


@pytest.mark.parametrize("case", SCHEDULE_CASES, ids=[c.name for c in SCHEDULE_CASES])
def test_lr_schedule_matches_torch(case: Case):
    """Changing lr every step, as a schedule does, follows torch's param_groups lr."""
    _, ours, reference = run_against_torch(case, steps=60,
                                           lr_schedule=lambda t: 1e-2 / (1 + 0.1 * t))
    error = max_relative_error(ours, reference)
    print(f"{case.name} with a schedule: max relative error {error:.3e}")
    assert error <= 1e-12


def test_step_without_grads_reads_param_grad():
    weights = [torch.nn.Parameter(p) for p in make_params()]
    plain = [p.detach().clone() for p in weights]
    opt, opt_plain = Adam(weights, lr=0.1), Adam(plain, lr=0.1)
    sum((w**2).sum() for w in weights).backward()
    opt.step()
    opt_plain.step([2 * p for p in plain])  # d/dθ Σθ² = 2θ
    assert all(torch.equal(w.detach(), p) for w, p in zip(weights, plain, strict=True))


RESUME_CASES = [  # (name, factory)
    ("sgd", lambda p: SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("adamw_amsgrad", lambda p: Adam(p, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True,
                                     amsgrad=True)),
    ("amsgrad_reddi", lambda p: AMSGrad(p, lr=1e-2, rule="reddi")),
    ("amsgrad_post", lambda p: AMSGrad(p, lr=1e-2, betas=(0.9, 0.9), rule="post")),
]


@pytest.mark.parametrize(("name", "factory"), RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_state_dict_resume_equals_never_stopping(name, factory):
    grad_steps = list(gradient_stream(60))
    # never stopping; lr halved at step 20 as a schedule would
    straight = make_params()
    opt = factory(straight)
    for step, grads in enumerate(grad_steps):
        if step == 20:
            opt.lr /= 2
        opt.step(grads)
    # stop after 30 steps, save, load into fresh objects, continue
    first = make_params()
    opt = factory(first)
    for step, grads in enumerate(grad_steps[:30]):
        if step == 20:
            opt.lr /= 2
        opt.step(grads)
    buffer = io.BytesIO()
    torch.save({"params": first, "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = clone_all(checkpoint["params"])
    opt = factory(resumed)
    opt.load_state_dict(checkpoint["optimizer"])
    assert opt.step_count == 30
    for grads in grad_steps[30:]:
        opt.step(grads)
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight, strict=True))


def test_load_state_dict_rejects_a_different_optimizer():
    saved = Adam(make_params(), lr=1e-3, betas=(0.9, 0.99)).state_dict()
    with pytest.raises(ValueError, match="betas"):
        Adam(make_params(), lr=1e-3).load_state_dict(saved)
    with pytest.raises(ValueError, match="Adam"):
        SGD(make_params(), lr=1e-3, momentum=0.9).load_state_dict(saved)
    with pytest.raises(ValueError, match=r"\(3, 5\)"):
        Adam(make_params([(7,), (5, 3), (4, 3, 2, 2)]), lr=1e-3, betas=(0.9, 0.99)).load_state_dict(
            saved
        )


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------

W = [torch.zeros(3)]
BAD_ARGUMENTS = [  # (name, ours, torch's counterpart or None, kwargs, error, text in message)
    ("sgd_lr", SGD, T.SGD, {"lr": -0.1}, ValueError, "-0.1"),
    ("sgd_lr_nan", SGD, None, {"lr": float("nan")}, ValueError, "nan"),  # torch accepts NaN
    ("sgd_momentum", SGD, T.SGD, {"lr": 0.1, "momentum": -0.5}, ValueError, "-0.5"),
    ("sgd_weight_decay", SGD, T.SGD, {"lr": 0.1, "weight_decay": -1e-4}, ValueError, "-0.0001"),
    ("sgd_nesterov_no_momentum", SGD, T.SGD, {"lr": 0.1, "nesterov": True}, ValueError, "Nesterov"),
    ("sgd_nesterov_dampening", SGD, T.SGD,
     {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True}, ValueError, "dampening=0.1"),
    ("adam_lr", Adam, T.Adam, {"lr": -1e-3}, ValueError, "-0.001"),
    ("adam_eps", Adam, T.Adam, {"eps": -1e-8}, ValueError, "-1e-08"),
    ("adam_beta1", Adam, T.Adam, {"betas": (1.0, 0.999)}, ValueError, "index 0: 1.0"),
    ("adam_beta2", Adam, T.Adam, {"betas": (0.9, -0.1)}, ValueError, "index 1: -0.1"),
    ("adam_weight_decay", Adam, T.Adam, {"weight_decay": -0.1}, ValueError, "-0.1"),
    ("amsgrad_beta2", AMSGrad, None, {"betas": (0.9, 1.5)}, ValueError, "index 1: 1.5"),
    ("amsgrad_rule", AMSGrad, None, {"rule": "adam"}, ValueError, "'adam'"),
]


@pytest.mark.parametrize(("name", "ours", "theirs", "kwargs", "error", "text"), BAD_ARGUMENTS,
                         ids=[c[0] for c in BAD_ARGUMENTS])
def test_bad_arguments_raise_like_torch(name, ours, theirs, kwargs, error, text):
    with pytest.raises(error) as raised:
        ours(W, **kwargs)
    print(f"{name}: {raised.value}")
    assert text in str(raised.value)
    if theirs is not None:
        with pytest.raises(error):
            theirs(W, **kwargs)


def test_bad_params_raise():
    with pytest.raises(ValueError, match="empty"):
        SGD([], lr=0.1)
    with pytest.raises(TypeError, match="single Tensor"):
        SGD(torch.zeros(3), lr=0.1)
    with pytest.raises(TypeError, match=r"params\[1\].*int64"):
        Adam([torch.zeros(3), torch.zeros(3, dtype=torch.int64)])
    w = torch.zeros(3)
    with pytest.raises(ValueError, match="more than once"):
        Adam([w, w])


def test_step_with_wrong_grads_raises_and_changes_nothing():
    params = make_params()
    opt = Adam(params, lr=0.1)
    grads = next(gradient_stream(1))
    with pytest.raises(ValueError, match="2 gradients for 3 parameters"):
        opt.step(grads[:2])
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \(5, 3\).*params\[1\].*\(3, 5\)"):
        opt.step([grads[0], grads[1].T, grads[2]])
    with pytest.raises(ValueError, match=r"grads\[0\] is torch.float32"):
        opt.step([grads[0].float(), grads[1], grads[2]])
    with pytest.raises(ValueError, match=r"grads\[2\] is None"):
        opt.step([grads[0], grads[1], None])
    with pytest.raises(ValueError, match=r"grads\[0\] is None"):
        opt.step()  # plain tensors have no .grad
    assert opt.step_count == 0
    assert all(torch.equal(p, q) for p, q in zip(params, make_params(), strict=True))
