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

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bnlab import functional as F
from bnlab.nn import BatchNormFunction

__all__ = ["CheckRow", "bn_gradcheck_rows", "max_rel_err"]

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
) -> list[CheckRow]:
    """Check dx, dgamma, dbeta of bnlab's BN against float64 autograd for each shape."""
    rows = []
    for name, shape in (shapes or REPRESENTATIVE_SHAPES).items():
        if progress:
            progress(name)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
        if "channels_last" in name:
            x = x.contiguous(memory_format=torch.channels_last)
        c = shape[1]
        gamma = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
        beta = torch.randn(c, generator=gen, dtype=torch.float64)
        dy = torch.randn(shape, generator=gen, dtype=torch.float64)
        inputs = [t.clone().requires_grad_(True) for t in (x, gamma, beta)]

        def ours(x, g, b):
            return BatchNormFunction.apply(x, g, b, F.batch_norm_prepare(x.detach(), eps=eps))

        grads = torch.autograd.grad(ours(*inputs), inputs, dy)
        refs = torch.autograd.grad(_textbook_bn(*inputs, eps), inputs, dy)
        errors = {
            k: max_rel_err(a, b) for k, a, b in zip(("dx", "dgamma", "dbeta"), grads, refs,
                                                    strict=True)
        }
        ok = None
        if finite_differences:
            small = [t[:4].detach().clone().requires_grad_(True) if i == 0 else t
                     for i, t in enumerate(inputs)]
            ok = all(
                check(f, small, eps=1e-6, atol=1e-8, raise_exception=False)
                for f in (ours, _eval_mode(eps))
                for check in (torch.autograd.gradcheck, torch.autograd.gradgradcheck)
            )
        rows.append(CheckRow(name, tuple(shape), errors, ok))
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


def network_gradcheck_rows(progress: Callable[[str], None] | None = None) -> list[CheckRow]:
    """Whole-network rows: the manual engine's gradients vs autograd on the nn.Module twin.

    All-CNN-C at width 0.125 on a batch of 4 16x16 images, float64: the input gradient and
    every parameter gradient (``dweights`` is the worst of them) of
    :func:`bnlab.manual.check.compare_engines`.
    """
    from bnlab.manual.check import compare_engines

    rows = []
    for name, options in NETWORK_CASES.items():
        if progress:
            progress(name)
        errors = compare_engines(**options)
        grads = [v for k, v in errors.items() if k.startswith("grad ")]
        rows.append(CheckRow(name, (4, 3, 16, 16),
                             {"dx": errors["input"], "dweights": max(grads)}))
    return rows
