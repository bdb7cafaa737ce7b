r"""Hand-written optimizers on (parameter, gradient) pairs: SGD, Adam, AMSGrad.

Both engines use them. The autograd engine passes ``[p.grad for p in params]``
(or nothing: ``step()`` then reads ``p.grad``); the manual engine passes the
gradients its ``backward`` returned, with no autograd anywhere. Every update is
done in place under ``torch.no_grad()``, so ``params`` may be ``nn.Parameter``
objects or plain tensors, float32 or float64, on any device, in any memory
format (state tensors are ``zeros_like`` their parameter and keep its strides).

    >>> import torch
    >>> from bnlab.optim import Adam
    >>> w = torch.ones(3, dtype=torch.float64)
    >>> opt = Adam([w], lr=0.1)
    >>> opt.step([torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)])
    >>> w
    tensor([0.9000, 1.1000, 1.0000], dtype=torch.float64)
    >>> opt.lr = 0.01                 # a schedule sets the learning rate directly
    >>> state = opt.state_dict()      # tensors and plain values: torch.save-able

Notation, per parameter tensor and element-wise unless said otherwise:

    θ        parameter; g_t its gradient at step t = 1, 2, ... (``step_count``)
    η        lr;  λ weight_decay;  μ momentum;  τ dampening
    β1, β2   decay rates of the moment averages;  ε denominator constant
    m_t      first-moment average   (torch's ``exp_avg``)
    v_t      second-moment average  (torch's ``exp_avg_sq``)
    v̂_t      AMSGrad's running maximum of v (``max_exp_avg_sq``); in plain Adam,
             the paper's bias-corrected v_t / (1 − β2^t)

Conventions shared with ``torch.optim`` (so ``SGD`` and ``Adam`` match it step
for step): the step counter starts at t = 1 on the first step, so bias
corrections are 1 − β^t; *coupled* weight decay adds λθ to the gradient before
anything else; *decoupled* weight decay (AdamW, SGDW) first shrinks θ by the
factor (1 − ηλ) with the current η, and leaves the gradient alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["SGD", "AMSGrad", "Adam", "Optimizer"]

AMSGRAD_RULES = ("torch", "reddi", "post")


# ---------------------------------------------------------------------------
# argument checks (same exception types as torch.optim, with the bad value)
# ---------------------------------------------------------------------------


def _check_non_negative(what: str, name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``value >= 0`` (NaN fails too: torch lets NaN through)."""
    if not value >= 0.0:
        raise ValueError(f"Invalid {what}: {value} (expected {name} >= 0)")


def _check_betas(betas: Sequence[float]) -> tuple[float, float]:
    """Return ``betas`` as two floats, each in [0, 1), or raise ``ValueError``."""
    if len(betas) != 2:
        raise ValueError(f"Invalid betas: {tuple(betas)} (expected two values (beta1, beta2))")
    for index, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(
                f"Invalid beta parameter at index {index}: {beta} (expected 0 <= beta < 1)"
            )
    return float(betas[0]), float(betas[1])


def _check_params(params: Iterable[Tensor]) -> list[Tensor]:
    """Return ``params`` as a list of distinct floating-point tensors, or raise."""
    if isinstance(params, Tensor):
        raise TypeError(
            "params must be a sequence of tensors, got a single Tensor: pass [tensor] instead"
        )
    params = list(params)
    if not params:
        raise ValueError("optimizer got an empty parameter list")
    for index, param in enumerate(params):
        if not isinstance(param, Tensor):
            raise TypeError(f"params[{index}] is a {type(param).__name__}, expected a Tensor")
        if not param.is_floating_point():
            raise TypeError(
                f"params[{index}] has dtype {param.dtype}, expected a floating-point tensor"
            )
    if len({id(param) for param in params}) != len(params):
        raise ValueError("some parameters appear more than once in params")
    return params


def _apply_weight_decay(
    param: Tensor, grad: Tensor, lr: float, weight_decay: float, decoupled: bool
) -> Tensor:
    """Apply weight decay λ; return the gradient the update should use.

        coupled:    return g + λθ           (a new tensor: g itself is never modified)
        decoupled:  θ ← (1 − ηλ) θ in place, return g
    """
    if weight_decay == 0:
        return grad
    if decoupled:
        param.mul_(1 - lr * weight_decay)
        return grad
    return grad.add(param, alpha=weight_decay)


def _same_value(saved: Any, current: Any) -> bool:
    """Equality that treats a saved list and a current tuple (betas) alike."""
    if isinstance(saved, list | tuple) and isinstance(current, list | tuple):
        return tuple(saved) == tuple(current)
    return saved == current


# ---------------------------------------------------------------------------
# base class
# ---------------------------------------------------------------------------


class Optimizer:
    """Base class: owns ``params``, ``lr``, ``step_count`` and ``state``.

    ``state`` maps a name (torch's: ``momentum_buffer``, ``exp_avg``, ...) to one
    tensor per parameter, in the order of ``params``. A subclass lists its
    hyperparameters (other than ``lr``) in ``_hyperparameter_names``, creates its
    state in ``__init__`` with ``_add_state`` and implements ``_update``, the
    update of one parameter at step ``self.step_count``.

    One ``step_count`` serves all parameters. torch keeps a ``step`` per
    parameter; the two agree because every ``step`` here updates every
    parameter (a gradient of ``None`` is an error, not a skip).
    """

    _hyperparameter_names: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Tensor], lr: float) -> None:
        _check_non_negative("learning rate", "lr", lr)
        self.params = _check_params(params)
        self.lr = float(lr)
        self.step_count = 0
        self.state: dict[str, list[Tensor]] = {}

    def _add_state(self, name: str) -> None:
        """Create ``state[name]``: one zero tensor per parameter, same strides."""
        self.state[name] = [
            torch.zeros_like(param, memory_format=torch.preserve_format) for param in self.params
        ]

    def _update(self, index: int, param: Tensor, grad: Tensor) -> None:
        raise NotImplementedError

    def hyperparameters(self) -> dict[str, Any]:
        """The fixed settings (everything but ``lr``), e.g. ``{"momentum": 0.9, ...}``."""
        return {name: getattr(self, name) for name in self._hyperparameter_names}

    def _check_grads(self, grads: Sequence[Tensor | None] | None) -> list[Tensor]:
        """Return ``grads`` as a list matching ``params`` one to one, or raise ``ValueError``."""
        if grads is None:
            grads = [param.grad for param in self.params]
        grads = list(grads)
        if len(grads) != len(self.params):
            raise ValueError(
                f"step() got {len(grads)} gradients for {len(self.params)} parameters"
            )
        for index, (param, grad) in enumerate(zip(self.params, grads, strict=True)):
            if grad is None:
                raise ValueError(
                    f"grads[{index}] is None: params[{index}] has no gradient; leave a "
                    "parameter that gets no gradient out of the optimizer's params"
                )
            if grad.shape != param.shape:
                raise ValueError(
                    f"grads[{index}] has shape {tuple(grad.shape)} but params[{index}] "
                    f"has shape {tuple(param.shape)}"
                )
            if grad.dtype != param.dtype or grad.device != param.device:
                raise ValueError(
                    f"grads[{index}] is {grad.dtype} on {grad.device} but params[{index}] "
                    f"is {param.dtype} on {param.device}"
                )
        return grads

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor] | None = None) -> None:
        """Advance ``step_count`` to t and update every parameter in place.

        ``grads`` holds one tensor per parameter, in the order and shapes of
        ``params``; ``None`` reads ``param.grad``. The gradients are not modified.

            >>> opt = SGD([w := torch.zeros(2)], lr=0.5)
            >>> opt.step([torch.tensor([1.0, -2.0])])
            >>> w
            tensor([-0.5000,  1.0000])
        """
        grads = self._check_grads(grads)
        self.step_count += 1
        for index, (param, grad) in enumerate(zip(self.params, grads, strict=True)):
            self._update(index, param, grad)

    def state_dict(self) -> dict[str, Any]:
        """A snapshot for resuming: plain values and cloned tensors only.

        It survives ``torch.save`` / ``torch.load(weights_only=True)``:

            {"type": "Adam", "hyperparameters": {"betas": (0.9, 0.999), ...},
             "lr": 0.001, "step_count": 120,
             "state": {"exp_avg": [tensor, ...], "exp_avg_sq": [tensor, ...]}}
        """
        return {
            "type": type(self).__name__,
            "hyperparameters": self.hyperparameters(),
            "lr": self.lr,
            "step_count": self.step_count,
            "state": {name: [t.detach().clone() for t in ts] for name, ts in self.state.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``lr``, ``step_count`` and the state tensors from ``state_dict``.

        The optimizer must have been built like the saved one: the same class,
        hyperparameters and parameter shapes, otherwise ``ValueError`` says what
        differs. (``lr`` is restored rather than checked: a schedule changes it.)
        Tensors are copied into the existing state, so they keep this optimizer's
        devices, dtypes and memory formats. Nothing changes if a check fails.
        """
        if state_dict.get("type") != type(self).__name__:
            raise ValueError(
                f"state_dict is from a {state_dict.get('type')} optimizer, "
                f"cannot load it into {type(self).__name__}"
            )
        saved = state_dict["hyperparameters"]
        for name, value in self.hyperparameters().items():
            if name not in saved or not _same_value(saved[name], value):
                raise ValueError(
                    f"state_dict was saved with {name}={saved.get(name)!r} but this "
                    f"optimizer has {name}={value!r}: build it with the saved settings"
                )
        state = state_dict["state"]
        if set(state) != set(self.state):
            raise ValueError(
                f"state_dict holds state {sorted(state)}, expected {sorted(self.state)}"
            )
        for name, tensors in state.items():
            if len(tensors) != len(self.params):
                raise ValueError(
                    f"state_dict holds {len(tensors)} {name!r} tensors "
                    f"for {len(self.params)} parameters"
                )
            for index, (ours, theirs) in enumerate(zip(self.state[name], tensors, strict=True)):
                if ours.shape != theirs.shape:
                    raise ValueError(
                        f"state_dict {name}[{index}] has shape {tuple(theirs.shape)}, "
                        f"expected {tuple(ours.shape)}"
                    )
        with torch.no_grad():
            for name, tensors in state.items():
                for ours, theirs in zip(self.state[name], tensors, strict=True):
                    ours.copy_(theirs)
        self.lr = float(state_dict["lr"])
        self.step_count = int(state_dict["step_count"])

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return (
            f"{type(self).__name__}(lr={self.lr!r}, {settings}; "
            f"{len(self.params)} params, step_count={self.step_count})"
        )


# ---------------------------------------------------------------------------
# SGD
# ---------------------------------------------------------------------------


class SGD(Optimizer):
    r"""Stochastic gradient descent with momentum; ``torch.optim.SGD`` step for step.

    At step t, with d_t the gradient the update uses:

        d_t = g_t + λ θ_{t-1}                      coupled weight decay (torch's)
        b_1 = d_1                                  momentum buffer (μ > 0): no
        b_t = μ b_{t-1} + (1 − τ) d_t              dampening on the first step
        u_t = d_t + μ b_t    nesterov
              b_t            momentum, not nesterov
              d_t            μ = 0
        θ_t = θ_{t-1} − η u_t

    ``decoupled_weight_decay=True`` is SGDW (Loshchilov & Hutter, 2019): the
    parameter shrinks first, θ_{t-1} ← (1 − ηλ) θ_{t-1}, and d_t = g_t. torch has
    no such option; with λ = 0 both variants are ``torch.optim.SGD``.

        >>> w = torch.ones(2)
        >>> opt = SGD([w], lr=0.1, momentum=0.9)
        >>> opt.step([torch.ones(2)]); opt.step([torch.ones(2)])   # b = 1, then 1.9
        >>> w
        tensor([0.7100, 0.7100])
    """

    _hyperparameter_names = (
        "momentum",
        "dampening",
        "nesterov",
        "weight_decay",
        "decoupled_weight_decay",
    )

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
    ) -> None:
        _check_non_negative("momentum value", "momentum", momentum)
        _check_non_negative("weight_decay value", "weight_decay", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(
                "Nesterov momentum requires a momentum and zero dampening "
                f"(got momentum={momentum}, dampening={dampening})"
            )
        super().__init__(params, lr)
        self.momentum = float(momentum)
        self.dampening = float(dampening)
        self.nesterov = bool(nesterov)
        self.weight_decay = float(weight_decay)
        self.decoupled_weight_decay = bool(decoupled_weight_decay)
        if self.momentum != 0:
            self._add_state("momentum_buffer")

    def _update(self, index: int, param: Tensor, grad: Tensor) -> None:
        grad = _apply_weight_decay(
            param, grad, self.lr, self.weight_decay, self.decoupled_weight_decay
        )  # d_t
        if self.momentum != 0:
            buffer = self.state["momentum_buffer"][index]
            if self.step_count == 1:
                buffer.copy_(grad)  # b_1 = d_1
            else:
                buffer.mul_(self.momentum).add_(grad, alpha=1 - self.dampening)  # b_t
            grad = grad.add(buffer, alpha=self.momentum) if self.nesterov else buffer  # u_t
        param.add_(grad, alpha=-self.lr)  # θ_t


# ---------------------------------------------------------------------------
# Adam and AMSGrad
# ---------------------------------------------------------------------------


class Adam(Optimizer):
    r"""Adam (Kingma & Ba, 2015); ``torch.optim.Adam`` / ``AdamW`` step for step.

    At step t (t = 1 on the first step):

        g_t ← g_t + λ θ_{t-1}                       coupled weight decay: torch.optim.Adam
        θ_{t-1} ← (1 − ηλ) θ_{t-1}                  decoupled: torch.optim.AdamW
        m_t = β1 m_{t-1} + (1 − β1) g_t
        v_t = β2 v_{t-1} + (1 − β2) g_t²
        θ_t = θ_{t-1} − η / (1 − β1^t) · m_t / (√v_t / √(1 − β2^t) + ε)

    i.e. θ −= η m̂ / (√v̂ + ε) with m̂ = m / (1 − β1^t), v̂ = v / (1 − β2^t); ε is
    added to the *corrected* √v̂, as in the paper and in torch.

    ``amsgrad=True`` uses torch's AMSGrad: it keeps the element-wise maximum of
    the *uncorrected* second moment and corrects it with the *current* t,

        v̂max_t = max(v̂max_{t-1}, v_t)              (v̂max_0 = 0)
        θ_t = θ_{t-1} − η / (1 − β1^t) · m_t / (√v̂max_t / √(1 − β2^t) + ε)

    so a maximum reached at step s < t is divided by √(1 − β2^t), not by its own
    √(1 − β2^s). ``AMSGrad`` offers the paper's rule and the post's rule too.

        >>> w = torch.zeros(2, dtype=torch.float64)
        >>> opt = Adam([w], lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)  # AdamW
        >>> for _ in range(3):
        ...     opt.step([torch.tensor([2.0, -0.5], dtype=torch.float64)])
        >>> w       # a constant gradient moves θ by η · sign(g) each step
        tensor([-0.0300,  0.0300], dtype=torch.float64)
    """

    _hyperparameter_names = ("betas", "eps", "weight_decay", "decoupled_weight_decay", "amsgrad")

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-3,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        amsgrad: bool = False,
    ) -> None:
        _check_non_negative("epsilon value", "eps", eps)
        _check_non_negative("weight_decay value", "weight_decay", weight_decay)
        self.betas = _check_betas(betas)
        super().__init__(params, lr)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.decoupled_weight_decay = bool(decoupled_weight_decay)
        self.amsgrad = bool(amsgrad)
        self._add_state("exp_avg")
        self._add_state("exp_avg_sq")
        if self.amsgrad:
            self._add_state("max_exp_avg_sq")

    def _bias_corrections(self) -> tuple[float, float]:
        """(1 − β1^t, 1 − β2^t) at t = ``step_count``."""
        beta1, beta2 = self.betas
        return 1 - beta1**self.step_count, 1 - beta2**self.step_count

    def _second_moment(self, index: int, exp_avg_sq: Tensor) -> Tensor:
        """The second moment the update divides by: v_t, or v̂max_t = max(v̂max_{t-1}, v_t)."""
        if not self.amsgrad:
            return exp_avg_sq
        max_exp_avg_sq = self.state["max_exp_avg_sq"][index]
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        return max_exp_avg_sq

    def _update(self, index: int, param: Tensor, grad: Tensor) -> None:
        grad = _apply_weight_decay(
            param, grad, self.lr, self.weight_decay, self.decoupled_weight_decay
        )
        beta1, beta2 = self.betas
        exp_avg = self.state["exp_avg"][index]
        exp_avg_sq = self.state["exp_avg_sq"][index]
        exp_avg.lerp_(grad, 1 - beta1)  # m_t
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v_t
        second_moment = self._second_moment(index, exp_avg_sq)  # v_t or v̂_t
        bias_correction1, bias_correction2 = self._bias_corrections()
        denom = (second_moment.sqrt() / bias_correction2**0.5).add_(self.eps)
        param.addcdiv_(exp_avg, denom, value=-self.lr / bias_correction1)  # θ_t


class AMSGrad(Adam):
    r"""AMSGrad (Reddi, Kale & Kumar, 2018) under one of three rules.

    All three share the moments, with weight decay applied first as in ``Adam``:

        m_t = β1 m_{t-1} + (1 − β1) g_t,    v_t = β2 v_{t-1} + (1 − β2) g_t²,    v̂_0 = 0

    and differ in v̂_t and in bias correction:

        rule     v̂_t                                    update: θ_t = θ_{t-1} − ...
        -------  -------------------------------------  -------------------------------------
        "torch"  max(v̂_{t-1}, v_t), element-wise        η/(1 − β1^t) · m_t / (√v̂_t/√(1 − β2^t) + ε)
        "reddi"  max(v̂_{t-1}, v_t), element-wise        η · m_t / (√v̂_t + ε)
        "post"   v_t if Σv_t > Σv̂_{t-1} else v̂_{t-1}    η · m_t / (√v̂_t + ε)

    - ``"torch"`` is ``torch.optim.Adam(amsgrad=True)`` (= ``Adam(amsgrad=True)``):
      Adam's bias corrections, with the max taken over the uncorrected v.
    - ``"reddi"`` is the paper's Algorithm 2 with constant β1 and η and an ε in
      the denominator: no bias correction. (The paper's η_t = η/√t is a schedule:
      set ``lr`` each step.)
    - ``"post"`` is what the blog post's case c ran, per parameter tensor: ONE
      comparison of the whole-tensor sums Σ (over all elements of that tensor)
      per step, and v̂ takes all of v_t or keeps all of v̂_{t-1}; so an element of
      v̂ can decrease, unlike an element-wise max. A tie keeps v̂_{t-1}. No bias
      correction. The comparison stays on the device (no host sync).

        >>> w = torch.zeros(2, dtype=torch.float64)
        >>> opt = AMSGrad([w], lr=0.1, betas=(0.0, 0.5), rule="post")
        >>> opt.step([torch.tensor([2.0, 0.0], dtype=torch.float64)])  # v = [2, 0], Σ 2 > 0
        >>> opt.step([torch.tensor([0.0, 1.5], dtype=torch.float64)])  # v = [1, 1.125], Σ 2.125 > 2
        >>> opt.state["max_exp_avg_sq"][0]           # all of v_t; "reddi" would hold [2, 1.125]
        tensor([1.0000, 1.1250], dtype=torch.float64)
    """

    _hyperparameter_names = (*Adam._hyperparameter_names, "rule")

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-3,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        rule: str = "torch",
    ) -> None:
        if rule not in AMSGRAD_RULES:
            raise ValueError(f"Unknown AMSGrad rule: {rule!r} (expected one of {AMSGRAD_RULES})")
        self.rule = rule
        super().__init__(params, lr, betas, eps, weight_decay, decoupled_weight_decay, True)

    def _bias_corrections(self) -> tuple[float, float]:
        """Adam's (1 − β1^t, 1 − β2^t) for rule "torch"; (1, 1), i.e. none, otherwise."""
        if self.rule == "torch":
            return super()._bias_corrections()
        return 1.0, 1.0

    def _second_moment(self, index: int, exp_avg_sq: Tensor) -> Tensor:
        """v̂_t: element-wise max ("torch", "reddi"), or the post's whole-tensor choice."""
        if self.rule != "post":
            return super()._second_moment(index, exp_avg_sq)
        max_exp_avg_sq = self.state["max_exp_avg_sq"][index]
        larger = exp_avg_sq.sum() > max_exp_avg_sq.sum()  # one 0-d bool tensor
        max_exp_avg_sq.copy_(torch.where(larger, exp_avg_sq, max_exp_avg_sq))
        return max_exp_avg_sq
