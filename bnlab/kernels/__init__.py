r"""A fused CPU batch norm: :mod:`bnlab.functional`'s math in two passes over memory.

The eager functions in :mod:`bnlab.functional` are the readable reference; this module
computes the same math with a small C++ extension (``batch_norm.cpp`` beside this file)
and falls back to them wherever the extension does not apply. Each public function has
the signature and return values of the functional entry point of the same name::

    batch_norm_stats(x)                                         -> (shift, mean, var)
    batch_norm_prepare(x, running_mean, running_var, *, training, eps) -> BatchNormSaved
    batch_norm_normalize(x, saved, weight, bias)                -> y
    batch_norm_forward(x, weight, bias, running_mean, running_var, *, training, eps)
                                                                -> (y, saved)
    batch_norm_backward(dy, x, saved, weight)                   -> (dx, dgamma, dbeta)

Shapes: ``x``, ``y``, ``dy``, ``dx`` (N, C, \*S); per-channel tensors (C,); see
:mod:`bnlab.functional` for the legend and :func:`bnlab.functional.batch_norm_backward`
for the derivation of the backward (Ioffe & Szegedy 2015, section 3).

Same numerics as the reference: the corrected two-pass statistics (shift ``K``, then sums
of ``x - K`` and its square; Chan, Golub & LeVeque 1983), per-channel sums accumulated in
``x``'s dtype over short runs (256 values of a row, or 16 rows per channel of channels-last
input) and in float64 across runs and blocks, as the reference's ``torch.sum`` per chunk
and float64 across chunks (float64 throughout where a float32 square would overflow),
float64 per-channel coefficients, and the cancellation guard, here unconditional: the
element-wise passes always use the shifted form ``(x - K) * s + t'`` (one subtraction more
in a pass bound by memory). The forward reads ``x`` twice and writes ``y`` once; the
backward reads ``x`` and ``dy`` twice and writes ``dx`` once. The eager path runs 4-6
PyTorch kernels per direction, each a pass over memory and an OpenMP barrier.

When the fused path runs (:func:`fused_applies`): a CPU tensor of float32 or float64 with
at least one element, in ``torch.contiguous_format`` or with the channel axis innermost
(``channels_last``, ``channels_last_3d``, or (N, C) input), while autograd records nothing
(no ``requires_grad`` input under grad mode: call it inside an ``autograd.Function``, as
``bnlab.nn`` does), outside ``torch.vmap``/functorch transforms, ``torch.compile`` and
``torch.export`` and ``torch.jit.trace`` tracing (plain ``torch.Tensor`` or ``Parameter``
inputs only, no subclasses such as fake tensors), and outside :func:`disabled`. Everything
else (CUDA, MPS, float16/bfloat16 and autocast's bfloat16 activations, strided views, empty
input, double backward) takes the eager path, silently. ``BNLAB_FUSED=0`` switches the
fused path off for the process.

Why a C++ extension (forward+backward of (128, 96, 32, 32) float32 on a 2-core x86 CPU,
against PyTorch's native kernel, as measured when this was chosen):

- ``torch.compile`` of the functional code keeps one source of truth and reaches about
  0.9x native, but compiles for about 40 s in every new process (its cache saves only part
  of that), a cost paid again by every run of a 10-minute main job.
- Triton generates code for GPUs; its interpreter runs kernels on the CPU to test them,
  not to run them fast.
- A C++/OpenMP extension built with ``torch.utils.cpp_extension.load`` compiles once per
  machine and source (about 25 s of CPU time, with the compiler PyTorch extensions use),
  is cached in the PyTorch extensions folder (``$TORCH_EXTENSIONS_DIR`` or
  ``~/.cache/torch_extensions``) under a name that carries a digest of the source and
  flags (two checkouts never rebuild each other's; concurrent first builds wait on one
  lock) and loads in milliseconds afterwards, without a compiler. Threads come from
  ``at::parallel_for`` (OpenMP in PyTorch's CPU builds), vector code from
  ``#pragma omp simd`` with the instruction set PyTorch itself dispatches to on this CPU
  (``torch.backends.cpu.get_cpu_capability()``), so the cached library never uses an
  instruction the CPU lacks. ``bnlab bench bn`` times it beside native and eager. On a
  heavily loaded 2-core AVX2 CPU (three rounds, median and range of fused/native,
  forward+backward, float32): (128, 96, 32, 32) 0.92 (0.84-0.95) contiguous and 0.90
  (0.88-0.97) channels_last, (128, 192, 16, 16) 0.62 (0.45-0.88) and 0.71 (0.48-0.73);
  the eager path was 4.3-5.8x. The forward wins (two passes over memory to native's
  three); the backward makes the same passes as native's and is at par (0.9-1.1x).
  Allocating the 50 MB outputs (page faults on fresh memory) costs as much as the
  passes themselves there, for both kernels alike.

Where the extension cannot be built or loaded (no C++ compiler, no ``ninja``), the first
call prints one line to stderr and every call takes the eager path: never an error.

``bnlab.nn`` runs on these entry points (its ``batch_norm`` and ``BatchNormFunction``), so
every bnlab BN module uses the kernel where it applies. ``with kernels.disabled():`` (or
``BNLAB_FUSED=0`` for a process) keeps a step on the reference: for comparisons that must
be exact between two layers whose math agrees (rounding order differs between the paths)
and for timing the reference.

Usage::

    >>> import torch
    >>> from bnlab import functional as F, kernels
    >>> x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    >>> y, saved = kernels.batch_norm_forward(x, training=True)
    >>> ref, _ = F.batch_norm_forward(x, training=True)
    >>> bool((y - ref).abs().max() < 1e-12)
    True
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from bnlab import functional as F
from bnlab.functional import BatchNormSaved

__all__ = [
    "batch_norm_backward",
    "batch_norm_forward",
    "batch_norm_normalize",
    "batch_norm_prepare",
    "batch_norm_stats",
    "disabled",
    "enabled",
    "fused_applies",
    "fused_status",
    "load",
]

_SOURCE = Path(__file__).with_name("batch_norm.cpp")
_DTYPES = (torch.float32, torch.float64)
# Tensor types whose memory the kernel may read: not subclasses such as fake tensors.
_PLAIN = (torch.Tensor, torch.nn.Parameter)

# Compiler flags per CPU capability PyTorch reports (the instruction sets it dispatches to).
_ARCH_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}

# False inside ``with disabled():`` (per thread and per asyncio task, as a ContextVar).
_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("bnlab_fused", default=True)

# The extension's state in this process: None (not tried yet), True (loaded), or the
# reason it could not be loaded (a string, printed once).
_state: bool | str | None = None


def _cpu_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability()).upper()
    except Exception:  # torch builds without the query: no vector flags
        return "DEFAULT"


def _build_directory(name: str) -> Path:
    """``<extensions root>/<name>_py<X><Y>_torch<version>``: a PyTorch upgrade rebuilds."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    version = torch.__version__.replace("+", "_")
    tag = f"{name}_py{sys.version_info.major}{sys.version_info.minor}_torch{version}"
    return Path(root) / tag


def _extension_name(capability: str, cflags: list[str]) -> str:
    """``bnlab_batch_norm_<capability>_<digest>``: the digest of the source and the flags, so
    that each version of ``batch_norm.cpp`` (two checkouts of bnlab, an upgrade) has its own
    cached library and none rebuilds another's."""
    digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(cflags).encode()).hexdigest()
    return f"bnlab_batch_norm_{capability.lower()}_{digest[:10]}"


def load(verbose: bool = False) -> bool:
    """Build (once per machine) and load the extension; True when the fused path is usable.

    The first call in a process loads the cached library of this exact source, or compiles
    ``batch_norm.cpp`` if there is none (printing one line to stderr, as it takes about a
    minute; concurrent first builds wait on the build folder's lock). A failure prints one
    line to stderr (``bnlab: fused BN kernel unavailable (...)``) and returns False; later
    calls in the process return the same answer without retrying.
    """
    global _state
    if _state is None:
        _state = _try_load(verbose)
        if _state is not True:
            print(f"bnlab: fused BN kernel unavailable ({_state}); using the eager "
                  "functions of bnlab.functional", file=sys.stderr)
    return _state is True


# torch.utils.cpp_extension guards a build with a `lock` file and waits for it forever; a
# build killed mid-way (Ctrl-C, OOM) leaves it behind. A build takes under a minute, so a
# lock older than this is stale and is removed, with a notice.
STALE_LOCK_S = 600.0


def _remove_stale_lock(build: Path) -> None:
    lock = build / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        print(f"bnlab: removing a stale build lock {lock} ({age / 60:.0f} min old: an earlier "
              "build was interrupted)", file=sys.stderr)
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def _try_load(verbose: bool) -> bool | str:
    if os.environ.get("BNLAB_FUSED", "1") == "0":
        return "BNLAB_FUSED=0"
    compiler = os.environ.get("CXX", "c++")  # the compiler torch.utils.cpp_extension calls
    try:
        capability = _cpu_capability()
        cflags = ["-O3", "-fopenmp-simd", *_ARCH_FLAGS.get(capability, [])]
        name = _extension_name(capability, cflags)
        build = _build_directory(name)
        library = build / f"{name}.so"
        _remove_stale_lock(build)
        if library.exists() and not (build / "lock").exists():  # built, no build running
            torch.ops.load_library(str(library))
        else:
            if shutil.which(compiler) is None:
                return f"no C++ compiler: {compiler} not found"
            from torch.utils import cpp_extension

            build.mkdir(parents=True, exist_ok=True)
            if not library.exists():
                print(f"bnlab: compiling the fused BN kernel into {build} (once per "
                      "machine, about a minute)", file=sys.stderr)
            cpp_extension.load(
                name=name,
                sources=[str(_SOURCE)],
                extra_cflags=cflags,
                build_directory=str(build),
                is_python_module=False,
                verbose=verbose,
            )
        torch.ops.bnlab_fused.stats  # noqa: B018 (raises if the library did not register)
    except Exception as err:  # no compiler, no ninja, a build error: fall back, never fail
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"{type(err).__name__}: {first[:200]}"
    return True


def fused_status() -> str:
    """One line for reports: ``"fused C++ kernel"`` or why the eager path is used."""
    if load():
        return f"fused C++ kernel ({_cpu_capability()})"
    return f"eager (fused kernel unavailable: {_state})"


def enabled() -> bool:
    """False inside :func:`disabled`; True otherwise (whether or not the kernel loads)."""
    return _enabled.get()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within this block every entry point takes the eager path of :mod:`bnlab.functional`.

    For comparisons that must be exact (two layers whose math is the same up to the order
    of rounding, such as Batch Renorm with ``rmax=1, dmax=0`` against BN) and for timing
    the eager reference. ``bnlab.nn`` records the choice when the forward runs, so the
    backward of a forward run inside the block is eager too, wherever it runs. Nests;
    per thread (a ``contextvars.ContextVar``). ``BNLAB_FUSED=0`` does the same for a whole
    process.

    >>> with disabled():
    ...     enabled()
    False
    """
    token = _enabled.set(False)
    try:
        yield
    finally:
        _enabled.reset(token)


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    fn = getattr(compiler, "is_compiling", None)
    return bool(fn()) if fn is not None else False


def _is_transformed(t: Tensor) -> bool:
    """Whether ``t`` is wrapped by a functorch transform (``torch.vmap``, ``torch.func``)."""
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(t)) if check is not None else False


def _channels_last(x: Tensor) -> bool | None:
    """True: channel axis innermost; False: contiguous; None: any other layout."""
    if x.is_contiguous():
        return x.dim() == 2  # (N, C): each row holds all channels, the channels-last walk
    if x.dim() > 2 and x.movedim(1, -1).is_contiguous():
        return True
    return None


def fused_applies(x: Tensor, *others: Tensor | None) -> bool:
    """Whether the fused kernel handles ``x`` (and ``others``, e.g. ``dy``) in this call.

    See the module docstring for the conditions. Builds/loads the extension on first use.
    """
    if not _enabled.get() or _is_compiling() or torch.jit.is_tracing():
        return False
    if type(x) not in _PLAIN or x.device.type != "cpu" or x.dtype not in _DTYPES:
        return False
    if x.dim() < 2 or x.numel() == 0 or _channels_last(x) is None:
        return False
    tensors = [x, *(t for t in others if t is not None)]
    for t in tensors[1:]:
        if type(t) not in _PLAIN or t.device != x.device or t.dtype != x.dtype:
            return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if any(_is_transformed(t) for t in tensors):
        return False
    return load()


# ---------------------------------------------------------------------------------------
# The entry points: same signatures and results as bnlab.functional's.
# ---------------------------------------------------------------------------------------


def batch_norm_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`bnlab.functional.batch_norm_stats`, fused: ``(shift, mean, var)``, each (C,).

    ``shift`` (K) is the mean of the first batch items (at least 256 values per channel
    where the batch has them) rounded to ``x.dtype``; ``mean`` and the biased ``var`` are
    float64. One pass over ``x`` (plus the few items for K).
    """
    if not fused_applies(x):
        return F.batch_norm_stats(x)
    return torch.ops.bnlab_fused.stats(x, bool(_channels_last(x)))


def batch_norm_prepare(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    *,
    training: bool = True,
    eps: float = 1e-5,
) -> BatchNormSaved:
    """:func:`bnlab.functional.batch_norm_prepare` with fused batch statistics."""
    if not training or not fused_applies(x):
        return F.batch_norm_prepare(x, running_mean, running_var, training=training, eps=eps)
    if eps <= 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    shift, mean, var = torch.ops.bnlab_fused.stats(x, bool(_channels_last(x)))
    return BatchNormSaved(shift, mean, var, (var + eps).rsqrt(), True)


def _affine(weight: Tensor | None, bias: Tensor | None, x: Tensor) -> tuple[Tensor, Tensor]:
    c = x.shape[1]
    w = torch.ones(c, dtype=torch.float64) if weight is None else weight.detach()
    b = torch.zeros(c, dtype=torch.float64) if bias is None else bias.detach()
    return w, b


def batch_norm_normalize(
    x: Tensor, saved: BatchNormSaved, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """:func:`bnlab.functional.batch_norm_normalize`, fused: ``y`` like ``x`` (one pass)."""
    if not fused_applies(x, weight, bias) or saved.invstd.device != x.device:
        return F.batch_norm_normalize(x, saved, weight, bias)
    w, b = _affine(weight, bias, x)
    return torch.ops.bnlab_fused.normalize(
        x, saved.shift, saved.mean, saved.invstd, w, b, bool(_channels_last(x))
    )


def batch_norm_forward(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    *,
    training: bool = True,
    eps: float = 1e-5,
) -> tuple[Tensor, BatchNormSaved]:
    """:func:`bnlab.functional.batch_norm_forward`, fused: ``(y, saved)``."""
    saved = batch_norm_prepare(x, running_mean, running_var, training=training, eps=eps)
    return batch_norm_normalize(x, saved, weight, bias), saved


def batch_norm_backward(
    dy: Tensor, x: Tensor, saved: BatchNormSaved, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`bnlab.functional.batch_norm_backward`, fused: ``(dx, dgamma, dbeta)``.

    The derivation is the reference's docstring; the kernel computes ``dbeta = sum(dy)``
    (term 1), ``dgamma = sum(dy * (x - mu)) * invstd`` (term 2) in one pass, and
    ``dx = a * dy + b * (x - K) + c`` in a second. ``dy`` in another memory layout than
    ``x`` is copied into ``x``'s first.
    """
    if not fused_applies(x, dy, weight) or saved.invstd.device != x.device:
        return F.batch_norm_backward(dy, x, saved, weight)
    if dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)
    w, _ = _affine(weight, None, x)
    dx, dgamma, dbeta = torch.ops.bnlab_fused.backward(
        dy, x, saved.shift, saved.mean, saved.invstd, w, saved.training,
        bool(_channels_last(x)),
    )
    pdt = x.dtype if weight is None else weight.dtype
    return dx, dgamma.to(pdt), dbeta.to(pdt)
