"""Time one training step of All-CNN-C in both engines, side by side (``bnlab bench engine``).

Variants, each a full step (forward, loss, backward, optimizer update) on one batch:

    a  autograd, torch.nn.BatchNorm2d,  torch.optim.Adam(amsgrad=True)    the baseline
    b  autograd, bnlab.nn.BatchNorm2d,  torch.optim.Adam(amsgrad=True)
    c  manual engine (bnlab.manual),    bnlab.optim.Adam(amsgrad=True)    no autograd

All three start from the same weights. Machines drift, so the variants are interleaved:
each repetition times every variant once (in a rotating order), and the table reports
medians, images per second and the ratio of each median to variant a's.

Usage::

    >>> import torch
    >>> from bnlab.bench_engine import bench_engine, format_engine_table
    >>> rows = bench_engine(widths=(0.0625,), batch_size=4, steps=1, warmup=0)
    >>> print(format_engine_table(rows))  # doctest: +SKIP
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from bnlab.manual import all_cnn_c, train_step
from bnlab.models import AllCNNC

__all__ = ["VARIANTS", "bench_engine", "format_engine_table"]

VARIANTS: dict[str, str] = {
    "a": "autograd + torch BN + torch Adam(amsgrad)",
    "b": "autograd + bnlab BN + torch Adam(amsgrad)",
    "c": "manual engine + bnlab BN + bnlab AMSGrad",
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autograd_step(
    norm: str, width: float, images: torch.Tensor, labels: torch.Tensor, lr: float, seed: int,
    memory_format: torch.memory_format,
) -> Callable[[], Any]:
    model = AllCNNC(
        norm=norm, width=width, generator=torch.Generator().manual_seed(seed),
        device=images.device, dtype=images.dtype,
    ).to(memory_format=memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, amsgrad=True)
    loss_fn = torch.nn.functional.cross_entropy

    def step() -> Any:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss

    return step


def _manual_step(
    width: float, images: torch.Tensor, labels: torch.Tensor, lr: float, seed: int,
    memory_format: torch.memory_format,
) -> Callable[[], Any]:
    from bnlab.optim import Adam

    network = all_cnn_c(
        bn=True, width=width, generator=torch.Generator().manual_seed(seed),
        device=images.device, dtype=images.dtype, memory_format=memory_format,
    )
    optimizer = Adam(network.parameters(), lr=lr, amsgrad=True)
    return lambda: train_step(network, optimizer, images, labels)


def bench_engine(
    widths: Sequence[float] = (1.0, 0.5),
    batch_size: int = 128,
    steps: int = 5,
    warmup: int = 2,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = True,
    image_size: int = 32,
    variants: Sequence[str] = ("a", "b", "c"),
    lr: float = 1e-3,
    seed: int = 0,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Median time of one training step per variant and width; one row per (width, variant).

    Each row: ``width``, ``variant`` (a/b/c), ``what``, ``batch_size``, ``image_size``,
    ``device``, ``dtype``, ``channels_last``, ``threads``, ``steps``, ``median_s``,
    ``times_s`` (every timed step), ``images_per_s`` and ``ratio_to_a`` (median over
    variant a's median; None when a was not run).

    ``threads`` sets ``torch.set_num_threads`` for the run (restored afterwards). On a
    machine shared with other processes, one thread per process avoids OpenMP barriers
    waiting on a descheduled thread, which slows every kernel launch by milliseconds and
    so penalizes the variants with more, smaller kernels.
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}: choose from {sorted(VARIANTS)}")
    if steps < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(
            f"need steps >= 1, warmup >= 0, batch_size >= 1 (got {steps}, {warmup}, {batch_size})"
        )
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _bench(
            widths, batch_size, steps, warmup, torch.device(device), dtype, channels_last,
            image_size, variants, lr, seed,
        )
    finally:
        torch.set_num_threads(previous_threads)


def _bench(
    widths: Sequence[float], batch_size: int, steps: int, warmup: int, device: torch.device,
    dtype: torch.dtype, channels_last: bool, image_size: int, variants: Sequence[str],
    lr: float, seed: int,
) -> list[dict[str, Any]]:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    rows: list[dict[str, Any]] = []
    for width in widths:
        gen = torch.Generator().manual_seed(seed)
        images = torch.randn(batch_size, 3, image_size, image_size, generator=gen, dtype=dtype)
        images = images.to(device).contiguous(memory_format=memory_format)
        labels = torch.randint(0, 10, (batch_size,), generator=gen).to(device)
        fns: dict[str, Callable[[], Any]] = {}
        for v in variants:
            if v == "c":
                fns[v] = _manual_step(width, images, labels, lr, seed, memory_format)
            else:
                norm = "torch" if v == "a" else "bnlab"
                fns[v] = _autograd_step(norm, width, images, labels, lr, seed, memory_format)
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        times: dict[str, list[float]] = {v: [] for v in fns}
        names = list(fns)
        for rep in range(steps):
            order = names[rep % len(names):] + names[: rep % len(names)]
            for v in order:
                _sync(device)
                start = time.perf_counter()
                fns[v]()
                _sync(device)
                times[v].append(time.perf_counter() - start)
        medians = {v: statistics.median(ts) for v, ts in times.items()}
        for v in names:
            rows.append({
                "width": width,
                "variant": v,
                "what": VARIANTS[v],
                "batch_size": batch_size,
                "image_size": image_size,
                "device": str(device),
                "dtype": str(dtype).removeprefix("torch."),
                "channels_last": channels_last,
                "threads": torch.get_num_threads(),
                "steps": steps,
                "median_s": medians[v],
                "times_s": times[v],
                "images_per_s": batch_size / medians[v],
                "ratio_to_a": medians[v] / medians["a"] if "a" in medians else None,
            })
        del fns
    return rows


def format_engine_table(rows: Sequence[dict[str, Any]]) -> str:
    """An aligned text table of :func:`bench_engine` rows, with a header naming the setup.

    >>> print(format_engine_table([]))
    (no rows)
    """
    if not rows:
        return "(no rows)"
    first = rows[0]
    head = (
        f"All-CNN-C training step (forward + backward + optimizer), batch {first['batch_size']}, "
        f"{first['image_size']}x{first['image_size']}, {first['device']}, {first['dtype']}, "
        f"{'channels_last' if first['channels_last'] else 'contiguous'}, "
        f"{first['threads']} threads, median of {first['steps']} interleaved steps"
    )
    header = ("width", "variant", "median ms", "images/s", "vs a", "what")
    lines = [
        (
            f"{r['width']:g}", r["variant"], f"{1e3 * r['median_s']:.1f}",
            f"{r['images_per_s']:.0f}",
            "-" if r["ratio_to_a"] is None else f"{r['ratio_to_a']:.2f}x", r["what"],
        )
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines, strict=True)]
    fmt = "  ".join(
        f"{{:<{w}}}" if i in (1, 5) else f"{{:>{w}}}" for i, w in enumerate(widths)
    )
    out = [head, fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    out = [line.rstrip() for line in out]
    return "\n".join(out)
