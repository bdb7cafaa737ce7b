"""Timing harness behind ``bnlab bench``: side-by-side medians, ratios, tables, JSON.

Machines drift (copy bandwidth on a 2-core CI box moves between 23 and 55 GB/s within
minutes), so every comparison is measured *interleaved in one process*: each repetition
times every variant once, in turn, and ratios are taken between medians.

Usage::

    >>> from bnlab.bench import time_interleaved
    >>> import torch
    >>> x = torch.randn(256, 256)
    >>> med = time_interleaved({"add": lambda: x + x, "mul": lambda: x * x}, repeats=3)
    >>> sorted(med)
    ['add', 'mul']
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from bnlab import kernels
from bnlab import nn as bnn

__all__ = ["BENCH_LAYERS", "BNBenchRow", "bench_bn", "bench_data", "crop_flip_per_image",
           "format_table", "time_interleaved", "validate_bn_paths"]


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int = 10,
    warmup: int = 2,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Median wall time in seconds of each callable, the variants interleaved per repeat."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """Aligned text table; ``columns`` holds (key, header, format spec) triples."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([format(row[k], f) if f else str(row[k]) for k, _, f in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass(frozen=True)
class BNBenchRow:
    """One measurement of ``bnlab bench bn``: times in milliseconds, ratios to native.

    ``layer`` is bnlab's layer timed, ``native`` the closest native PyTorch op it is timed
    against (``torch.nn.BatchNorm2d``, or ``torch.nn.GroupNorm`` for GroupNorm).
    ``bnlab_ms`` is the eager reference (:mod:`bnlab.functional`), ``fused_ms`` the fused
    kernel (:mod:`bnlab.kernels`, BN rows only); a path that was not timed (its outputs
    disagreed with the eager reference, or the kernel is unavailable) has NaN and says why in
    ``note``.
    """

    device: str
    shape: tuple[int, ...]
    memory_format: str
    dtype: str
    pass_: str
    native_ms: float
    bnlab_ms: float
    fused_ms: float = math.nan
    note: str = ""
    layer: str = "BatchNorm2d"
    native: str = "torch.nn.BatchNorm2d"

    @property
    def ratio(self) -> float:
        return self.bnlab_ms / self.native_ms

    @property
    def fused_ratio(self) -> float:
        return self.fused_ms / self.native_ms

    def as_dict(self) -> dict:
        return {
            "device": self.device, "shape": list(self.shape), "memory_format": self.memory_format,
            "dtype": self.dtype, "pass": self.pass_, "native_ms": self.native_ms,
            "bnlab_ms": self.bnlab_ms, "ratio": self.ratio, "fused_ms": self.fused_ms,
            "fused_ratio": self.fused_ratio, "note": self.note, "layer": self.layer,
            "native": self.native,
        }


def _groups(channels: int) -> int:
    """GroupNorm's usual 32 groups (Wu & He 2018), or the largest divisor of C below it."""
    return math.gcd(32, channels)


# layer: (native module, bnlab module, native name), each a function of the channel count.
# Batch Renorm and ghost BN have no native op: they are timed against native BN, the op a
# user would otherwise run (Renorm with the paper's final clips, ghost BN in batches of 32).
BENCH_LAYERS: dict[str, tuple[Callable[[int], torch.nn.Module], Callable[[int], torch.nn.Module],
                              str]] = {
    "BatchNorm2d": (torch.nn.BatchNorm2d, bnn.BatchNorm2d, "torch.nn.BatchNorm2d"),
    "BatchRenorm2d": (torch.nn.BatchNorm2d,
                      lambda c: bnn.BatchRenorm2d(c, rmax=3.0, dmax=5.0),
                      "torch.nn.BatchNorm2d"),
    "GhostBatchNorm2d(32)": (torch.nn.BatchNorm2d,
                             lambda c: bnn.GhostBatchNorm2d(c, virtual_batch_size=32),
                             "torch.nn.BatchNorm2d"),
    "GroupNorm(32)": (lambda c: torch.nn.GroupNorm(_groups(c), c),
                      lambda c: bnn.GroupNorm(_groups(c), c), "torch.nn.GroupNorm"),
}

# the rows of BENCH_LAYERS whose native op computes the very same function as bnlab's layer
SAME_FUNCTION_AS_NATIVE = ("BatchNorm2d", "GroupNorm(32)")


def bench_bn(
    shapes: Sequence[tuple[int, ...]] = ((128, 96, 32, 32), (128, 192, 16, 16)),
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    memory_formats: Sequence[str] = ("contiguous", "channels_last"),
    repeats: int = 15,
    progress: Callable[[str], None] | None = None,
    layers: Sequence[str] = tuple(BENCH_LAYERS),
) -> list[BNBenchRow]:
    """Time training-mode forward, backward and forward+backward: native, eager, fused.

    All paths run as modules under autograd, the way a model uses them (for BN,
    ``torch.nn.BatchNorm2d``, ``bnlab.nn.BatchNorm2d`` on the eager functions (inside
    :func:`bnlab.kernels.disabled`) and the same module as it runs by default, on the fused
    kernel; ``layers`` picks rows of
    :data:`BENCH_LAYERS`: BN, Batch Renorm and ghost BN against native BN, GroupNorm against
    ``torch.nn.GroupNorm``); the backward computes the input, weight and bias gradients from a
    saved graph (``retain_graph=True``). Before timing, every path's output and gradients are
    checked against the eager reference (:func:`validate_bn_paths`); a path that disagrees is
    not timed.
    """
    unknown = [name for name in layers if name not in BENCH_LAYERS]
    if unknown:
        raise ValueError(f"bench_bn: unknown layers {unknown}; choose from {list(BENCH_LAYERS)}")
    rows: list[BNBenchRow] = []
    for shape in shapes:
        for fmt in memory_formats:
            for layer in layers:
                if progress:
                    progress(f"{layer} {tuple(shape)} {fmt}")
                rows += _bench_bn_case(tuple(shape), fmt, device, dtype, repeats, layer)
    return rows


class _EagerBatchNorm2d(bnn.BatchNorm2d):
    """``bnlab.nn.BatchNorm2d`` on the eager reference alone (:func:`bnlab.kernels.disabled`
    around the forward, which holds for its backward too): the bench's eager column."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        with kernels.disabled():
            return super().forward(input)


# Largest error allowed, relative to the largest magnitude of the reference tensor, for a path
# to count as agreeing with the eager reference: 2**-13 in float32 (11 of 24 bits) and 1e-10
# in float64. Rounding differences stay far below it; a wrong term of the backward is O(1).
_AGREE_RTOL = {torch.float32: 2.0**-13, torch.float64: 1e-10}


def validate_bn_paths(
    mods: dict[str, torch.nn.Module], x: torch.Tensor, dy: torch.Tensor, reference: str
) -> dict[str, str]:
    """Compare each module's ``y``, ``dx``, ``dgamma``, ``dbeta`` with ``mods[reference]``.

    Returns name → ``""`` when it agrees, else a one-line reason naming the tensor and its
    relative error (max |a - b| / max |b|); the reference itself maps to ``""``.
    """
    results = {}
    for name, mod in mods.items():
        y = mod(x)
        grads = torch.autograd.grad(y, (x, mod.weight, mod.bias), dy)
        results[name] = tuple(t.detach() for t in (y, *grads))
    rtol = _AGREE_RTOL.get(x.dtype, 2.0**-7)
    verdicts = {}
    for name, outs in results.items():
        verdicts[name] = ""
        for label, a, b in zip(("y", "dx", "dgamma", "dbeta"), outs, results[reference],
                               strict=True):
            err = float((a.double() - b.double()).abs().max() / b.double().abs().max())
            if not err <= rtol:
                verdicts[name] = f"{name} {label} disagrees with {reference} (rel. err {err:.1e})"
                break
    return verdicts


def _bench_bn_case(
    shape: tuple[int, ...], fmt: str, device: str, dtype: torch.dtype, repeats: int,
    layer: str = "BatchNorm2d",
) -> list[BNBenchRow]:
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=dtype).to(device, memory_format=mf)
    x.requires_grad_(True)
    dy = torch.randn(shape, generator=gen, dtype=dtype).to(device, memory_format=mf)
    make_native, make_bnlab, native_name = BENCH_LAYERS[layer]
    mods: dict[str, torch.nn.Module] = {
        "native": make_native(shape[1]).to(device, dtype),
        "bnlab": make_bnlab(shape[1]).to(device, dtype),
    }
    note = ""
    if layer == "BatchNorm2d":  # the fused kernel is BN's: bnlab.nn runs it where it applies
        mods["bnlab"] = _EagerBatchNorm2d(shape[1]).to(device, dtype)
        if kernels.fused_applies(x.detach()):
            mods["fused"] = bnn.BatchNorm2d(shape[1]).to(device, dtype)
        else:
            note = "fused: " + kernels.fused_status() if device == "cpu" else "fused: CPU only"
    with torch.no_grad():  # distinct gamma and beta, the same in every path
        for mod in mods.values():
            mod.weight.copy_(torch.linspace(0.5, 1.5, shape[1]))
            mod.bias.copy_(torch.linspace(-1.0, 1.0, shape[1]))
    # Renorm and ghost BN are timed against the closest native op, not the same function:
    # there only the paths that must compute the same numbers are checked.
    same = mods if layer in SAME_FUNCTION_AS_NATIVE else {k: m for k, m in mods.items()
                                                          if k != "native"}
    for name, why in validate_bn_paths(same, x, dy, reference="bnlab").items():
        if why:
            del mods[name]
            note = "; ".join(filter(None, [note, why + ": not timed"]))
    outs = {k: m(x) for k, m in mods.items()}

    def forward(k: str) -> Callable[[], object]:
        return lambda: mods[k](x)

    def backward(k: str) -> Callable[[], object]:
        wrt = (x, mods[k].weight, mods[k].bias)  # all three gradients, as in training
        return lambda: torch.autograd.grad(outs[k], wrt, dy, retain_graph=True)

    def forward_backward(k: str) -> Callable[[], object]:
        wrt = (x, mods[k].weight, mods[k].bias)
        return lambda: torch.autograd.grad(mods[k](x), wrt, dy)

    rows = []
    for name, make in (
        ("forward", forward), ("backward", backward), ("forward+backward", forward_backward)
    ):
        med = time_interleaved({k: make(k) for k in mods}, repeats=repeats, device=device)
        ms = {k: med.get(k, math.nan) * 1e3 for k in ("native", "bnlab", "fused")}
        rows.append(BNBenchRow(
            str(device), shape, fmt, str(dtype).replace("torch.", ""), name,
            ms["native"], ms["bnlab"], ms["fused"], note, layer, native_name,
        ))
    return rows


BN_COLUMNS = [
    ("layer", "layer", ""), ("native", "vs native", ""), ("device", "device", ""),
    ("shape", "shape", ""), ("memory_format", "format", ""),
    ("pass", "pass", ""), ("native_ms", "native ms", ".2f"), ("bnlab_ms", "eager ms", ".2f"),
    ("fused_ms", "fused ms", ".2f"), ("ratio", "eager/native", ".2f"),
    ("fused_ratio", "fused/native", ".2f"),
]


def bench_train(
    width: float = 1.0,
    batch_size: int = 128,
    steps: int = 4,
    rounds: int = 3,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
    precisions: Sequence[str] = ("fp32", "bf16"),
) -> list[dict]:
    """Images/s of a plain PyTorch training loop vs bnlab's trainer, both engines.

    The plain loop is what a user writes first: ``AllCNNC(norm="torch")`` in float32 and the
    default (contiguous) memory format, ``torch.optim.Adam(amsgrad=True)``, ``zero_grad``,
    ``backward``, ``step``, under glibc's default allocator. bnlab's trainer step
    (:class:`bnlab.train.Model`) runs with the allocator tuned
    (:func:`bnlab.progress.cpu_allocator_tuned`), for the autograd engine (torch BN) and the
    manual engine (bnlab BN, bnlab AMSGrad), in each of ``precisions`` (``bf16``: autocast,
    by hand in the manual engine; on a CPU without AMX/AVX512-BF16 it is emulated and slow),
    channels_last; plus the autograd engine in float32 and contiguous memory, which
    separates what the memory format and the allocator give. All see the same fixed batch;
    the variants take turns, ``steps`` steps each per round, and the median round counts.

    Returns one row per variant: ``variant``, ``precision`` (with ``precision_reason``),
    ``memory_format``, ``width``, ``batch_size``, ``device``, ``step_ms``, ``images_per_s``
    and ``speedup`` (plain loop's step time / the variant's).
    """
    from bnlab.config import TrainConfig
    from bnlab.engines import Model
    from bnlab.models import AllCNNC
    from bnlab.progress import cpu_allocator_tuned

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (batch_size,), generator=gen).to(device)

    plain = AllCNNC(norm="torch", width=width).to(device)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3, amsgrad=True)

    def plain_step() -> None:
        plain_opt.zero_grad()
        torch.nn.functional.cross_entropy(plain(x), y).backward()
        plain_opt.step()

    common = {"width": width, "batch_size": batch_size, "device": device,
              "optimizer": "amsgrad"}
    engines = {"autograd": {"engine": "autograd", "norm": "torch"},
               "manual": {"engine": "manual", "norm": "bnlab", "optimizer_impl": "bnlab"}}
    # name -> (config fields, memory format of the batch)
    plans: dict[str, tuple[dict, torch.memory_format]] = {
        "bnlab trainer, autograd, fp32, contiguous": (
            {**engines["autograd"], "precision": "fp32", "channels_last": False},
            torch.contiguous_format)}
    for precision in precisions:
        for engine, fields in engines.items():
            plans[f"bnlab trainer, {engine}, {precision}, channels_last"] = (
                {**fields, "precision": precision}, torch.channels_last)
    variants: dict[str, tuple[Callable[[], object], bool]] = {
        "plain PyTorch loop": (plain_step, False)}
    rows = {"plain PyTorch loop": {"precision": "fp32", "precision_reason": "plain float32",
                                   "memory_format": "contiguous"}}
    for name, (fields, memory_format) in plans.items():
        model = Model(TrainConfig(**common, **fields), torch.device(device))
        xc = x.contiguous(memory_format=memory_format)
        variants[name] = ((lambda m=model, xc=xc: m.step(xc, y)), True)
        rows[name] = {"precision": model.precision.name,
                      "precision_reason": model.precision.reason,
                      "memory_format": str(memory_format).replace("torch.", "").replace(
                          "_format", "")}

    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds + 1):  # round 0 warms up
        for name, (step, tuned) in variants.items():
            if progress:
                progress(f"train {name} round {r}/{rounds}")
            with cpu_allocator_tuned(tuned and torch.device(device).type == "cpu"):
                step()
                _sync(device)
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                _sync(device)
                if r:
                    times[name].append((time.perf_counter() - start) / steps)
    base = statistics.median(times["plain PyTorch loop"])
    return [{"variant": name, **rows[name], "width": width, "batch_size": batch_size,
             "device": device, "step_ms": statistics.median(ts) * 1e3,
             "images_per_s": batch_size / statistics.median(ts),
             "speedup": base / statistics.median(ts)} for name, ts in times.items()]


def crop_flip_per_image(images: torch.Tensor, generator: torch.Generator,
                        padding: int = 4) -> torch.Tensor:
    """The obvious implementation of :func:`bnlab.data.random_crop_flip`: a Python loop,
    one pad, slice and flip per image. It draws the same random numbers in the same order,
    so from the same generator state it returns exactly the same batch (a test checks).

    >>> g = torch.Generator().manual_seed(0)
    >>> crop_flip_per_image(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), g).shape
    torch.Size([2, 3, 32, 32])
    """
    n, _, h, w = images.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator)
    mirror = torch.randint(0, 2, (n,), generator=generator).bool()
    out = torch.empty_like(images)
    for i in range(n):
        padded = torch.nn.functional.pad(images[i], (padding,) * 4)
        top, left = int(offsets[0, i]), int(offsets[1, i])
        window = padded[:, top:top + h, left:left + w]
        out[i] = window.flip(-1) if mirror[i] else window
    return out


def bench_data(batch_size: int = 128, repeats: int = 30,
               threads: int | None = 1) -> list[dict]:
    """Milliseconds per batch of CIFAR-10 augmentation (pad-4 random crop, flip) and
    normalization to float32: bnlab's batched ``gather`` against the per-image loop
    (:func:`crop_flip_per_image`), interleaved in one process. ``threads=1`` (default) times
    them single-threaded, as the trainer's data work competes with nothing then."""
    from bnlab import data

    images = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    fns = {"bnlab, batched gather": lambda: data.normalize(data.random_crop_flip(images, g)),
           "per-image loop": lambda: data.normalize(crop_flip_per_image(images, g))}
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        med = time_interleaved(fns, repeats=repeats)
    finally:
        torch.set_num_threads(saved)
    base = med["per-image loop"]
    return [{"variant": name, "batch_size": batch_size, "threads": threads or saved,
             "batch_ms": t * 1e3, "images_per_s": batch_size / t, "speedup": base / t}
            for name, t in med.items()]


DATA_COLUMNS = [
    ("variant", "variant", ""), ("batch_size", "batch", ""), ("threads", "threads", ""),
    ("batch_ms", "ms / batch", ".3f"), ("images_per_s", "img/s", ".0f"),
    ("speedup", "vs loop", ".1f"),
]

TRAIN_COLUMNS = [
    ("variant", "variant", ""), ("precision", "precision", ""),
    ("memory_format", "memory format", ""), ("width", "width", ""), ("batch_size", "batch", ""),
    ("step_ms", "step ms", ".1f"), ("images_per_s", "img/s", ".1f"),
    ("speedup", "vs plain", ".2f"),
]
