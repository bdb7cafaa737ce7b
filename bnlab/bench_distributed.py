"""Step time of data-parallel training on 1 vs W processes, same global batch (``bnlab bench``).

Each variant is a launch of W processes on this machine (:func:`bnlab.distributed.launch`,
gloo; each process gets ``cores // W`` intra-op threads, so W processes never use more
cores than one). Every rank trains All-CNN-C on its shard of one fixed global batch with
synchronized BN and gradients summed over ranks — the manual engine by hand
(:func:`bnlab.manual.distributed.data_parallel_train_step`), the autograd engine through
``DistributedDataParallel`` (:func:`bnlab.distributed.ddp`) — and times ``steps`` steps
between two barriers, after one warm-up step; the slowest rank's time counts. Launches
alternate (1, W, 1, W, ...) for ``rounds`` rounds and the medians are compared.

On a machine whose W processes share the same few cores (a 2-core CPU), this measures
the *overhead* of data parallelism — the per-layer collectives of synchronized BN, the
gradient all-reduce, smaller per-process kernels — not a speed-up: the speed-up comes
from W devices (GPUs, or CPU sockets) each doing 1/W of the work.

Usage::

    >>> from bnlab.bench_distributed import bench_distributed
    >>> rows = bench_distributed(width=0.0625, batch_size=8, image_size=9, steps=1,
    ...                          rounds=1)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from bnlab.distributed import launch, shard_bounds

__all__ = ["DISTRIBUTED_COLUMNS", "bench_distributed"]


def _rank_step_seconds(
    rank: int, world_size: int, engine: str, width: float, batch_size: int, image_size: int,
    steps: int,
) -> float:
    """One rank's seconds per step (the maximum over ranks, on every rank)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
    labels = torch.randint(0, 10, (batch_size,), generator=gen)
    lo, hi = shard_bounds(batch_size, world_size, rank)
    x = images[lo:hi].contiguous(memory_format=torch.channels_last)
    y = labels[lo:hi]
    if engine == "manual":
        from bnlab.manual import all_cnn_c
        from bnlab.manual.distributed import (
            broadcast_parameters,
            convert_sync_batchnorm,
            data_parallel_train_step,
        )
        from bnlab.optim import Adam

        net = convert_sync_batchnorm(
            all_cnn_c(bn=True, width=width, generator=torch.Generator().manual_seed(0),
                      memory_format=torch.channels_last)
        )
        broadcast_parameters(net)
        opt = Adam(net.parameters(), lr=1e-3, amsgrad=True)

        def step() -> None:
            data_parallel_train_step(net, opt, x, y, global_batch_size=batch_size)
    elif engine == "autograd":
        from bnlab.distributed import ddp, local_loss_scale
        from bnlab.models import AllCNNC

        model = AllCNNC(norm="torch", width=width, generator=torch.Generator().manual_seed(0))
        model = ddp(model.to(memory_format=torch.channels_last))
        opt_t = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)
        scale = local_loss_scale(hi - lo, batch_size, world_size)

        def step() -> None:
            opt_t.zero_grad(set_to_none=True)
            (torch.nn.functional.cross_entropy(model(x), y) * scale).backward()
            opt_t.step()
    else:
        raise ValueError(f"engine must be 'manual' or 'autograd', got {engine!r}")
    step()  # warm-up
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    dist.barrier()
    elapsed = torch.tensor([(time.perf_counter() - start) / steps], dtype=torch.float64)
    dist.all_reduce(elapsed, dist.ReduceOp.MAX)
    return float(elapsed)


def bench_distributed(
    engines: Sequence[str] = ("manual", "autograd"),
    nprocs: int = 2,
    width: float = 0.5,
    batch_size: int = 128,
    image_size: int = 32,
    steps: int = 3,
    rounds: int = 3,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Median step time of 1 and ``nprocs`` processes on one global batch, per engine.

    Rows: ``engine``, ``processes``, ``threads`` (per process), ``batch_size`` (global),
    ``step_ms``, ``images_per_s`` and ``vs_1`` (1-process time / this time: above 1 is a
    speed-up). ``threads`` fixes the intra-op threads of every process (default: the
    cores shared out, ``cores // processes``). CPU only (gloo); each launch starts its
    processes from a fork server, and that start-up is not timed. Raises ``ValueError``
    for a batch smaller than ``nprocs``.
    """
    if batch_size < nprocs:
        raise ValueError(f"batch_size {batch_size} must be at least nprocs = {nprocs}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    rows = []
    for engine in engines:
        times: dict[int, list[float]] = {1: [], nprocs: []}
        for r in range(rounds):
            for world in times:
                if progress:
                    progress(f"distributed {engine} {world} process(es), round {r + 1}/{rounds}")
                args = (engine, width, batch_size, image_size, steps)
                per_process = threads or max(1, cores // world)
                times[world].append(
                    launch(_rank_step_seconds, world, args, threads=per_process, timeout_s=600)[0]
                )
        base = statistics.median(times[1])
        for world, ts in times.items():
            med = statistics.median(ts)
            rows.append({
                "engine": engine, "processes": world, "threads": threads or max(1, cores // world),
                "batch_size": batch_size, "width": width, "step_ms": med * 1e3,
                "images_per_s": batch_size / med, "vs_1": base / med,
            })
    return rows


DISTRIBUTED_COLUMNS = [
    ("engine", "engine", ""), ("processes", "processes", ""), ("threads", "threads each", ""),
    ("batch_size", "global batch", ""), ("width", "width", ""), ("step_ms", "step ms", ".1f"),
    ("images_per_s", "img/s", ".1f"), ("vs_1", "vs 1 process", ".2f"),
]
