"""Which floating-point precision a run trains in, and why: ``auto``, ``fp32``, ``bf16``, ``fp64``.

``precision="auto"`` trains in bfloat16 autocast where the device does bfloat16 fast and in
float32 elsewhere:

- CUDA: ``torch.cuda.is_bf16_supported`` without emulation (compute capability 8.0+);
- CPU: AMX-BF16 tiles or AVX512-BF16 instructions, as PyTorch reports them
  (``torch.cpu.get_capabilities()``; on older PyTorch ``torch.cpu._is_amx_tile_supported`` /
  ``_is_avx512_bf16_supported``; failing both, oneDNN's
  ``torch.ops.mkldnn._is_mkldnn_bf16_supported``). Without them oneDNN emulates bfloat16
  through float32 and autocast is slower than float32, so ``auto`` stays in float32.

``fp32`` and ``fp64`` train every tensor in that dtype; ``bf16`` asks for bfloat16 autocast
whatever the device (on a CPU without the instructions it runs, emulated and slowly; the
reason says so). In every precision the parameters, their gradients and the optimizer state
stay float32 (float64 for ``fp64``): autocast casts copies for the matrix products
(convolutions, linear layers) and keeps the rest, BN statistics and the loss in float32
(tested in ``tests/test_precision.py``). The manual engine does the same by hand
(:meth:`bnlab.manual.layers.Conv2d.forward` with ``compute_dtype``).

Usage::

    >>> from bnlab.precision import resolve_precision
    >>> p = resolve_precision("fp32", "cpu")
    >>> p.name, p.param_dtype, p.autocast_dtype
    ('fp32', torch.float32, None)
    >>> with p.autocast():
    ...     pass
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

__all__ = ["PRECISIONS", "Precision", "cpu_bf16_support", "cuda_bf16_support",
           "resolve_precision"]

PRECISIONS = ("auto", "fp32", "bf16", "fp64")


@dataclass(frozen=True)
class Precision:
    """A resolved precision: what to train in on ``device_type`` and why.

    ``name`` is ``fp32``, ``bf16`` or ``fp64`` (never ``auto``); ``requested`` is what was
    asked for; ``param_dtype`` is the dtype of parameters, gradients and optimizer state
    (and of the model's float tensors); ``autocast_dtype`` is ``torch.bfloat16`` when the
    forward runs under autocast, else None; ``reason`` is one line for summaries and reports.
    """

    name: str
    requested: str
    device_type: str
    param_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    reason: str

    @property
    def autocast_enabled(self) -> bool:
        return self.autocast_dtype is not None

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` for this precision (a no-op context when it is off)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def as_dict(self) -> dict:
        """JSON-ready fields (dtypes as strings) for ``config.json`` and summaries."""
        return {"name": self.name, "requested": self.requested, "device_type": self.device_type,
                "param_dtype": str(self.param_dtype).replace("torch.", ""),
                "autocast_dtype": (None if self.autocast_dtype is None
                                   else str(self.autocast_dtype).replace("torch.", "")),
                "reason": self.reason}


def _cpu_flags() -> dict[str, bool] | None:
    """``{"amx_bf16": ..., "avx512_bf16": ...}`` from PyTorch's CPU probes, or None."""
    get = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.8
    if get is not None:
        try:
            caps = get()
            return {"amx_bf16": bool(caps.get("amx_bf16", False)),
                    "avx512_bf16": bool(caps.get("avx512_bf16", False))}
        except Exception:
            pass
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch 2.3 .. 2.7
    avx = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if amx is not None and avx is not None:
        try:
            return {"amx_bf16": bool(amx()), "avx512_bf16": bool(avx())}
        except Exception:
            pass
    return None


def cpu_bf16_support() -> tuple[bool, str]:
    """Whether this CPU does bfloat16 matrix products in hardware, and what it has.

    >>> fast, what = cpu_bf16_support()
    >>> isinstance(fast, bool) and isinstance(what, str)
    True
    """
    flags = _cpu_flags()
    if flags is not None:
        if flags["amx_bf16"]:
            return True, "this CPU has AMX-BF16"
        if flags["avx512_bf16"]:
            return True, "this CPU has AVX512-BF16"
        return False, ("this CPU has neither AMX-BF16 nor AVX512-BF16, so oneDNN would emulate "
                       "bfloat16")
    try:  # older PyTorch: oneDNN's own answer (true from AVX-512 on, a looser test)
        if bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return True, "oneDNN reports bfloat16 support"
    except Exception:
        return False, "PyTorch cannot tell this CPU's bfloat16 support"
    return False, "oneDNN reports no bfloat16 support"


def cuda_bf16_support() -> tuple[bool, str]:
    """Whether the current CUDA device does bfloat16 natively (not emulated), and which."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    name = torch.cuda.get_device_name()
    try:
        fast = bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.5: no emulation to exclude
        fast = bool(torch.cuda.is_bf16_supported())
    return fast, f"{name} {'supports' if fast else 'lacks native'} bfloat16"


def resolve_precision(precision: str, device: torch.device | str) -> Precision:
    """Resolve ``precision`` (``auto``, ``fp32``, ``bf16`` or ``fp64``) on ``device``.

    Raises ``ValueError`` for an unknown name, and for ``bf16`` on a device type where
    bnlab does not use autocast (anything but ``cpu`` and ``cuda``).

    >>> resolve_precision("fp64", "cpu").param_dtype
    torch.float64
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device_type = torch.device(device).type
    if precision == "fp64":
        return Precision("fp64", precision, device_type, torch.float64, None,
                         "fp64 requested: every tensor in float64")
    if precision == "fp32":
        return Precision("fp32", precision, device_type, torch.float32, None,
                         "fp32 requested: every tensor in float32")
    if device_type == "cuda":
        fast, what = cuda_bf16_support()
    elif device_type == "cpu":
        fast, what = cpu_bf16_support()
    else:
        if precision == "bf16":
            raise ValueError(f"precision='bf16' uses autocast on cpu or cuda, got device "
                             f"{device_type!r}: pass precision='fp32' or 'auto'")
        fast, what = False, f"bnlab uses no autocast on {device_type}"
    if precision == "bf16":
        note = "" if fast else ", emulated and slower than float32 here"
        return Precision("bf16", precision, device_type, torch.float32, torch.bfloat16,
                         f"bf16 requested: bfloat16 autocast{note}, because {what}")
    if fast:
        return Precision("bf16", precision, device_type, torch.float32, torch.bfloat16,
                         f"auto: bfloat16 autocast, because {what}")
    return Precision("fp32", precision, device_type, torch.float32, None,
                     f"auto: float32, because {what}")

