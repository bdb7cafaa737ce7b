"""Numerical checks behind ``bnlab gradcheck``: the hand-derived backward against autograd.

Each row compares bnlab's closed-form gradients with autograd differentiating the textbook
float64 formula, and also runs ``torch.autograd.gradcheck`` and ``gradgradcheck`` (finite
differences of the gradients and of the backward itself, the double backward) on the
autograd Function, in training and in evaluation mode.

    >>> rows = bn_gradcheck_rows(shapes={"(N, C)": (6, 3)})
    >>> rows[0].passed
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from bnlab import functional as F
from bnlab.nn import BatchNormFunction

__all__ = [
    "CheckRow",
    "bn_gradcheck_rows",
    "max_rel_err",
    "textbook_batch_renorm",
    "textbook_ghost_batch_norm",
    "textbook_group_norm",
    "variant_gradcheck_rows",
]

# float64 carries 53 bits (1.1e-16); the closed form and autograd take different paths
# through sums of m terms, so they agree to ~1e-15 relative in practice. 1e-10 leaves a
# wide margin for bad conditioning while still catching any wrong term (errors >= 1e-3).
TOLERANCE = 1e-10

REPRESENTATIVE_SHAPES: dict[str, tuple[int, ...]] = {
    "BatchNorm1d (N, C)": (16, 8),
    "BatchNorm1d (N, C, L)": (8, 4, 10),
    "BatchNorm2d (N, C, H, W)": (8, 6, 5, 5),
    "BatchNorm2d channels_last": (8, 6, 5, 5),
    "BatchNorm3d (N, C, D, H, W)": (4, 3, 3, 4, 4),
}


# Finite differences run in PyTorch's fast mode ("Fast gradcheck and gradgradcheck" in the
# torch.autograd docs: the analytic and numerical Jacobians are compared through random
# projections u^T J v, a few passes instead of one per input element), on a corner of each
# input: this many images, and at most this many positions per spatial axis. The analytic
# comparisons against autograd use the whole shape. The test suite runs the full
# element-by-element gradcheck and gradgradcheck (tests/test_dropin.py, test_functional.py).
FD_BATCH, FD_SPATIAL = 4, 3
FD_BATCH_GRADGRAD, FD_SPATIAL_GRADGRAD = 3, 2


def finite_difference_input(x: torch.Tensor, batch: int = FD_BATCH,
                            spatial: int = FD_SPATIAL) -> torch.Tensor:
    """A corner of ``x`` (N, C, *spatial) for finite differences: the first ``batch`` images,
    the first ``spatial`` positions per spatial axis, in ``x``'s memory format, as a fresh
    leaf that requires grad."""
    corner = x[(slice(0, batch), slice(None), *[slice(0, spatial)] * (x.dim() - 2))].detach()
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        corner = corner.contiguous(memory_format=torch.channels_last)
    else:
        corner = corner.contiguous()
    return corner.requires_grad_(True)


@dataclass
class CheckRow:
    """One line of the ``bnlab gradcheck`` table: max relative errors per gradient."""

    name: str
    shape: tuple[int, ...]
    errors: dict[str, float]
    gradcheck: bool | None = None  # gradcheck and gradgradcheck, train and eval; None: skipped
    tolerance: float = TOLERANCE
    notes: list[str] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        return max(self.errors.values())

    @property
    def passed(self) -> bool:
        return self.max_error <= self.tolerance and self.gradcheck is not False


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference over the largest reference magnitude (norm-wise)."""
    ours, ref = ours.detach().double(), ref.detach().double()
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def _random_case(
    shape: tuple[int, ...], seed: int, channels_last: bool
) -> tuple[torch.Generator, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           list[torch.Tensor]]:
    """One gradient check's float64 input, drawn in this order from a generator seeded ``seed``.

    ``x`` (``shape``, N(0.5, 2^2), channels_last when asked), ``gamma`` (C,) in [0.5, 1.5),
    ``beta`` (C,) and ``dy`` (``shape``) standard normal. Returns the generator (for what is
    drawn next), ``x, gamma, beta, dy`` and fresh leaf copies of ``(x, gamma, beta)`` that
    require grad.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    gamma = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    beta = torch.randn(c, generator=gen, dtype=torch.float64)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    inputs = [t.clone().requires_grad_(True) for t in (x, gamma, beta)]
    return gen, x, gamma, beta, dy, inputs


def _grad_errors(grads: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> dict[str, float]:
    """``{"dx", "dgamma", "dbeta"}`` -> :func:`max_rel_err` of ours against the reference."""
    return {k: max_rel_err(a, b)
            for k, a, b in zip(("dx", "dgamma", "dbeta"), grads, refs, strict=True)}


def _textbook_bn(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float):
    dims = F.reduce_dims(x)
    shape = (1, -1, *[1] * (x.dim() - 2))
    mu = x.mean(dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dims, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * gamma.view(shape) + beta.view(shape)


def bn_gradcheck_rows(
    shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    eps: float = 1e-5,
    finite_differences: bool = True,
    progress: Callable[[str], None] | None = None,
    variants: bool | None = None,
    on_row: Callable[[CheckRow], None] | None = None,
) -> list[CheckRow]:
    """Check dx, dgamma, dbeta of bnlab's BN against float64 autograd for each shape.

    With ``finite_differences``, ``gradcheck`` (on :func:`finite_difference_input`'s corner)
    and ``gradgradcheck`` (on a smaller corner) run in training and evaluation mode.
    ``on_row`` is called with each row as it is finished (``bnlab gradcheck`` prints it).

    ``variants`` adds the rows of :func:`variant_gradcheck_rows` (Batch Renorm, ghost BN,
    GroupNorm, both engines); by default they are added when ``shapes`` is not given.
    """
    rows = []
    for name, shape in (shapes or REPRESENTATIVE_SHAPES).items():
        if progress:
            progress(name)
        _, _, _, _, dy, inputs = _random_case(shape, seed, "channels_last" in name)

        def ours(x, g, b):
            return BatchNormFunction.apply(x, g, b, F.batch_norm_prepare(x.detach(), eps=eps))

        grads = torch.autograd.grad(ours(*inputs), inputs, dy)
        refs = torch.autograd.grad(_textbook_bn(*inputs, eps), inputs, dy)
        errors = _grad_errors(grads, refs)
        ok = None
        if finite_differences:
            small = [finite_difference_input(inputs[0]), *inputs[1:]]
            tiny = [finite_difference_input(inputs[0], FD_BATCH_GRADGRAD, FD_SPATIAL_GRADGRAD),
                    *inputs[1:]]
            ok = all(
                check(f, args, eps=1e-6, atol=1e-8, raise_exception=False, fast_mode=True)
                for f in (ours, _eval_mode(eps))
                for check, args in ((torch.autograd.gradcheck, small),
                                    (torch.autograd.gradgradcheck, tiny))
            )
        row = CheckRow(name, tuple(shape), errors, ok)
        rows.append(row)
        if on_row:
            on_row(row)
    if variants or (variants is None and shapes is None):
        rows += variant_gradcheck_rows(seed, eps, finite_differences, progress, on_row)
    return rows


# ---- the BN variants: textbook float64 forwards that autograd differentiates -------------


def textbook_batch_renorm(
    x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, running_mean: torch.Tensor,
    running_var: torch.Tensor, eps: float, rmax: float, dmax: float,
) -> torch.Tensor:
    """Ioffe 2017, Algorithm 1's training output in plain tensor ops, r and d detached."""
    dims = F.reduce_dims(x)
    shape = (1, -1, *[1] * (x.dim() - 2))
    mu = x.mean(dims, keepdim=True)
    sigma_b = torch.sqrt(((x - mu) ** 2).mean(dims, keepdim=True) + eps)
    sigma = torch.sqrt(running_var.view(shape) + eps)
    r = (sigma_b / sigma).clamp(1 / rmax, rmax).detach()
    d = ((mu - running_mean.view(shape)) / sigma).clamp(-dmax, dmax).detach()
    return ((x - mu) / sigma_b * r + d) * gamma.view(shape) + beta.view(shape)


def textbook_ghost_batch_norm(
    x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float,
    virtual_batch_size: int,
) -> torch.Tensor:
    """Hoffer et al. 2017's ghost BN: textbook BN of each slice of ``virtual_batch_size``."""
    return torch.cat([_textbook_bn(xk, gamma, beta, eps)
                      for xk in x.split(virtual_batch_size)])


def textbook_group_norm(
    x: torch.Tensor, num_groups: int, gamma: torch.Tensor, beta: torch.Tensor, eps: float,
) -> torch.Tensor:
    """Wu & He 2018, Figure 3's GroupNorm in plain tensor ops (per sample and group)."""
    n = x.shape[0]
    xg = x.reshape(n, num_groups, -1)
    mu = xg.mean(-1, keepdim=True)
    var = ((xg - mu) ** 2).mean(-1, keepdim=True)
    shape = (1, -1, *[1] * (x.dim() - 2))
    x_hat = ((xg - mu) / torch.sqrt(var + eps)).reshape(x.shape)
    return x_hat * gamma.view(shape) + beta.view(shape)


# name: (layer, shape, channels_last, options). Renorm's running statistics are drawn so
# that some channels' clips bind and others' do not; for the finite-difference check they
# are moved far off, where both clips bind and r, d are truly constant (elsewhere they
# depend on x, which the stop-gradient ignores by design).
VARIANT_CASES: dict[str, tuple[str, tuple[int, ...], bool, dict]] = {
    "BatchRenorm1d (N, C)": ("renorm", (16, 8), False, {"rmax": 1.5, "dmax": 0.5}),
    "BatchRenorm2d (N, C, H, W)": ("renorm", (8, 6, 5, 5), False, {"rmax": 1.5, "dmax": 0.5}),
    "BatchRenorm2d channels_last": ("renorm", (8, 6, 5, 5), True, {"rmax": 1.5, "dmax": 0.5}),
    "BatchRenorm3d (N, C, D, H, W)": ("renorm", (4, 3, 3, 4, 4), False,
                                      {"rmax": 1.5, "dmax": 0.5}),
    "GhostBatchNorm2d (B 3 of N 8)": ("ghost", (8, 6, 5, 5), False, {"virtual_batch_size": 3}),
    "GhostBatchNorm2d channels_last": ("ghost", (8, 6, 5, 5), True, {"virtual_batch_size": 4}),
    "GroupNorm (N, C, L), G 3": ("group", (4, 6, 7), False, {"num_groups": 3}),
    "GroupNorm (N, C, H, W), G 2": ("group", (4, 6, 5, 5), False, {"num_groups": 2}),
    "GroupNorm channels_last, G 6": ("group", (4, 6, 5, 5), True, {"num_groups": 6}),
    "manual BatchRenorm2d": ("renorm", (8, 6, 5, 5), True, {"rmax": 1.5, "dmax": 0.5,
                                                           "manual": True}),
    "manual GhostBatchNorm2d": ("ghost", (8, 6, 5, 5), True, {"virtual_batch_size": 3,
                                                             "manual": True}),
    "manual GroupNorm": ("group", (4, 6, 5, 5), True, {"num_groups": 3, "manual": True}),
}


def _variant_functions(layer: str, options: dict, c: int, eps: float, far: bool,
                       gen: torch.Generator):
    """(ours, reference): functions of (x, gamma, beta) for one variant case."""
    from bnlab.variants import ghost, groupnorm, renorm

    if layer == "renorm":
        rmax, dmax = options["rmax"], options["dmax"]
        running_mean = torch.randn(c, generator=gen, dtype=torch.float64) * 0.6 + 0.5
        running_var = torch.rand(c, generator=gen, dtype=torch.float64) * 6 + 1.0
        if far:
            running_mean, running_var = running_mean + 100.0, running_var * 100.0

        def ours(x, g, b):
            saved = renorm.batch_renorm_stats(x.detach(), running_mean, running_var,
                                              rmax=rmax, dmax=dmax, eps=eps)
            return renorm.BatchRenormFunction.apply(x, g, b, saved)

        def ref(x, g, b):
            return textbook_batch_renorm(x, g, b, running_mean, running_var, eps, rmax, dmax)

        return ours, ref
    if layer == "ghost":
        size = options["virtual_batch_size"]

        def ours(x, g, b):
            saved = ghost.ghost_batch_norm_stats(x.detach(), size, eps=eps)
            return ghost.GhostBatchNormFunction.apply(x, g, b, saved, size)

        return ours, lambda x, g, b: textbook_ghost_batch_norm(x, g, b, eps, size)
    groups = options["num_groups"]
    return (lambda x, g, b: groupnorm.GroupNormFunction.apply(x, g, b, groups, eps),
            lambda x, g, b: textbook_group_norm(x, groups, g, b, eps))


def _manual_grads(layer: str, options: dict, x, gamma, beta, dy, eps: float,
                  gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """dx, dgamma, dbeta of the manual engine's layer (renorm: the same running stats)."""
    from bnlab.manual import norms

    c = x.shape[1]
    if layer == "renorm":
        m = norms.BatchRenorm2d(c, eps, rmax=options["rmax"], dmax=options["dmax"],
                                dtype=torch.float64)
        m.buffers["running_mean"].copy_(torch.randn(c, generator=gen, dtype=torch.float64)
                                        * 0.6 + 0.5)
        m.buffers["running_var"].copy_(torch.rand(c, generator=gen, dtype=torch.float64) * 6
                                       + 1.0)
    elif layer == "ghost":
        m = norms.GhostBatchNorm2d(c, eps, virtual_batch_size=options["virtual_batch_size"],
                                   dtype=torch.float64)
    else:
        m = norms.GroupNorm(options["num_groups"], c, eps, dtype=torch.float64)
    m.params["weight"].copy_(gamma)
    m.params["bias"].copy_(beta)
    m.forward(x, training=True)
    dx = m.backward(dy)
    return dx, m.grads["weight"], m.grads["bias"]


def variant_gradcheck_rows(
    seed: int = 0,
    eps: float = 1e-5,
    finite_differences: bool = True,
    progress: Callable[[str], None] | None = None,
    on_row: Callable[[CheckRow], None] | None = None,
) -> list[CheckRow]:
    """Rows for Batch Renorm, ghost BN and GroupNorm (training mode), both engines.

    Each compares dx, dgamma, dbeta of bnlab's hand-derived backward (the autograd
    Function, or the manual layer for the ``manual`` rows) with autograd through the
    textbook float64 forward (:func:`textbook_batch_renorm`, :func:`textbook_ghost_batch_norm`,
    :func:`textbook_group_norm`), and runs ``torch.autograd.gradcheck`` on the Function.
    """
    rows = []
    for name, (layer, shape, channels_last, options) in VARIANT_CASES.items():
        if progress:
            progress(name)
        gen, x, gamma, beta, dy, inputs = _random_case(shape, seed, channels_last)
        c = shape[1]
        state = gen.get_state()
        ours, ref = _variant_functions(layer, options, c, eps, False, gen)
        refs = torch.autograd.grad(ref(*inputs), inputs, dy)
        if options.get("manual"):
            grads = _manual_grads(layer, options, x, gamma, beta, dy, eps,
                                  torch.Generator().set_state(state))
        else:
            grads = torch.autograd.grad(ours(*inputs), inputs, dy)
        errors = _grad_errors(grads, refs)
        ok = None
        if finite_differences and not options.get("manual"):
            far, _ = _variant_functions(layer, options, c, eps, True,
                                        torch.Generator().set_state(state))
            small = [finite_difference_input(x), *inputs[1:]]
            ok = torch.autograd.gradcheck(far, small, eps=1e-6, atol=1e-8,
                                          raise_exception=False, fast_mode=True)
        row = CheckRow(name, tuple(shape), errors, ok)
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def _eval_mode(eps: float) -> Callable[..., torch.Tensor]:
    """BN in evaluation mode with fixed running statistics (mean 0.3, variance 1.7)."""

    def f(x: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        rm = torch.full((c,), 0.3, dtype=x.dtype)
        rv = torch.full((c,), 1.7, dtype=x.dtype)
        saved = F.batch_norm_prepare(x.detach(), rm, rv, training=False, eps=eps)
        return BatchNormFunction.apply(x, g, b, saved)

    return f


NETWORK_CASES: dict[str, dict] = {
    "All-CNN-C whole network, BN, train": {"norm": "torch", "training": True},
    "All-CNN-C whole network, BN, eval": {"norm": "torch", "training": False},
    "All-CNN-C whole network, no BN, dropout": {"norm": "none", "dropout": True},
}


def network_gradcheck_rows(progress: Callable[[str], None] | None = None,
                           on_row: Callable[[CheckRow], None] | None = None) -> list[CheckRow]:
    """Whole-network rows: the manual engine's gradients vs autograd on the nn.Module twin.

    All-CNN-C at width 0.125 on a batch of 4 16x16 images, float64: the input gradient and
    every parameter gradient (``dweights`` is the worst of them) of
    :func:`bnlab.check_engines.compare_engines`.
    """
    from bnlab.check_engines import compare_engines

    rows = []
    for name, options in NETWORK_CASES.items():
        if progress:
            progress(name)
        errors = compare_engines(**options)
        grads = [v for k, v in errors.items() if k.startswith("grad ")]
        row = CheckRow(name, (4, 3, 16, 16), {"dx": errors["input"], "dweights": max(grads)})
        rows.append(row)
        if on_row:
            on_row(row)
    return rows
