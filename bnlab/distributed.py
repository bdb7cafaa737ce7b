"""Data-parallel plumbing on ``torch.distributed``: process groups, batch shards, a local
launcher, and ``DistributedDataParallel`` for the autograd engine.

bnlab runs on the engine users already have: ``torchrun`` (or :func:`launch`, which does
the same for W processes on this machine) starts one process per rank, each calls
:func:`init_process_group`, takes its shard of every batch (:func:`shard_bounds`), and
trains with synchronized BN (:class:`bnlab.sync_batchnorm.SyncBatchNorm`) and gradients
summed over ranks — by :func:`ddp` (``DistributedDataParallel``) for the autograd engine,
by hand for the manual engine (:mod:`bnlab.manual.distributed`). gloo on CPU, NCCL on CUDA.

Usage::

    >>> from bnlab.distributed import shard_bounds
    >>> [shard_bounds(8, 3, rank) for rank in range(3)]   # a batch of 8 over 3 ranks
    [(0, 3), (3, 6), (6, 8)]
"""

from __future__ import annotations

import datetime
import io
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

__all__ = [
    "DistributedRunError",
    "agree",
    "all_reduce_sum",
    "barrier",
    "ddp",
    "default_backend",
    "free_port",
    "init_process_group",
    "is_lead",
    "launch",
    "local_loss_scale",
    "shard_batches",
    "shard_bounds",
    "world",
]


# ---------------------------------------------------------------------------------------
# Shards: which part of every batch a rank takes
# ---------------------------------------------------------------------------------------


def shard_bounds(batch_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous shard of a batch of ``batch_size``.

    The shards are disjoint, cover the batch, and differ in size by at most one: the first
    ``batch_size % world_size`` ranks take one example more (``torch.tensor_split``'s rule).
    A rank may get an empty shard when ``batch_size < world_size``. Raises ``ValueError``
    for a negative batch size or a rank outside ``[0, world_size)``.

    >>> shard_bounds(5, 2, 0), shard_bounds(5, 2, 1)
    ((0, 3), (3, 5))
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}"
        )
    if batch_size < 0:
        raise ValueError(f"batch_size must be non-negative, got {batch_size}")
    base, extra = divmod(batch_size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def shard_batches(
    num_examples: int, batch_size: int, seed: int, epoch: int, rank: int, world_size: int
) -> list[Tensor]:
    """This rank's example indices for every batch of one epoch (int64 tensors).

    The epoch's order is a permutation of ``range(num_examples)`` drawn from a generator
    seeded with ``(seed, epoch)`` — the same on every rank, and the order one process
    would use for the whole batch — cut into batches of ``batch_size`` (the last one may
    be short); rank ``rank`` takes its :func:`shard_bounds` part of each. So the shards of
    one batch are disjoint, their concatenation in rank order is the one-process batch, and
    the result depends only on the arguments.

    >>> [b.tolist() for b in shard_batches(6, 4, seed=0, epoch=0, rank=1, world_size=2)]
    [[3, 0], [4]]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_examples, generator=gen)
    shards = []
    for start in range(0, num_examples, batch_size):
        batch = order[start : start + batch_size]
        lo, hi = shard_bounds(len(batch), world_size, rank)
        shards.append(batch[lo:hi])
    return shards


def local_loss_scale(local_batch: int, global_batch: int, world_size: int) -> float:
    """Factor on a rank's *mean* loss so that DDP's gradient average is the global mean's.

    ``DistributedDataParallel`` averages gradients over ranks. With shards of unequal
    size that average of per-shard means is not the mean over the global batch; scaling
    rank r's mean loss by ``n_r * W / N`` makes it so (``(1/W) sum_r (n_r W / N) g_r =
    (1/N) sum_r n_r g_r``), and keeps ``dy`` on the same scale on every rank, which
    synchronized BN's backward needs. Equal shards give 1.

    >>> local_loss_scale(3, 8, 2)
    0.75
    """
    if global_batch < 1 or world_size < 1:
        raise ValueError(
            f"global_batch and world_size must be positive, got {global_batch}, {world_size}"
        )
    return local_batch * world_size / global_batch


def all_reduce_sum(values: Sequence[float] | Tensor, group: Any | None = None) -> Tensor:
    """``values`` summed over the ranks of ``group``, as a float64 tensor (a collective).

    For a trainer's epoch metrics: each rank passes its sums (loss times examples, correct
    predictions, examples), every rank gets the totals, and ``total_loss / total_examples``
    is the global mean. Returned on the CPU; without an initialized process group it is
    ``values`` itself.

    >>> all_reduce_sum([2.0, 3.0]).tolist()   # one process
    [2.0, 3.0]
    """
    total = torch.as_tensor(values, dtype=torch.float64).clone()
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend(group) == "nccl":  # NCCL reduces CUDA tensors only
            total = total.cuda()
        dist.all_reduce(total, dist.ReduceOp.SUM, group=group)
    return total.cpu()


# ---------------------------------------------------------------------------------------
# Process groups
# ---------------------------------------------------------------------------------------


def world(group: Any | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process in ``group``; ``(0, 1)`` without a group.

    >>> world()   # one process
    (0, 1)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def is_lead(group: Any | None = None) -> bool:
    """Whether this process is rank 0, the one that writes files and prints (or alone)."""
    return world(group)[0] == 0


def agree(value: Any, group: Any | None = None) -> Any:
    """Rank 0's ``value`` on every rank (a collective; ``value`` itself on one process).

    For decisions every rank must take alike although each could see the world differently
    (does a folder exist yet, what time is it): ``value`` must be picklable.

    >>> agree("runs/x")
    'runs/x'
    """
    if world(group)[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def barrier(group: Any | None = None) -> None:
    """Wait until every rank of ``group`` has arrived here (nothing on one process)."""
    if world(group)[1] > 1:
        dist.barrier(group=group)


def default_backend(device: torch.device | str) -> str:
    """``"nccl"`` for CUDA devices, ``"gloo"`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (for a local rendezvous)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def init_process_group(
    backend: str | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
    timeout_s: float = 120.0,
    device: torch.device | str = "cpu",
) -> tuple[int, int]:
    """Join the default process group; return ``(rank, world_size)``.

    Without ``rank``/``world_size``/``init_method`` it reads what ``torchrun`` sets
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). ``backend`` defaults to
    :func:`default_backend` of ``device``; on CUDA the process is pinned to GPU
    ``LOCAL_RANK``. ``timeout_s`` bounds how long a collective waits for a rank that
    stopped answering (a dead rank's closed connection is noticed at once). Raises
    ``RuntimeError`` if a group is already initialized.
    """
    if dist.is_initialized():
        raise RuntimeError("init_process_group: a default process group is already initialized")
    backend = backend or default_backend(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank or 0)))
    dist.init_process_group(
        backend, init_method=init_method or "env://", rank=-1 if rank is None else rank,
        world_size=-1 if world_size is None else world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return dist.get_rank(), dist.get_world_size()


# ---------------------------------------------------------------------------------------
# A local launcher (what torchrun does, for tests and benchmarks)
# ---------------------------------------------------------------------------------------


class DistributedRunError(RuntimeError):
    """One or more ranks of a :func:`launch` failed; the message says which and how."""


def _worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout_s: float,
    threads: int,
    fn: Callable[..., Any],
    args: Sequence[Any],
    results: Any,
) -> None:
    torch.set_num_threads(threads)
    try:
        init_process_group(
            backend, rank=rank, world_size=world_size, timeout_s=timeout_s,
            init_method=f"tcp://127.0.0.1:{port}",
        )
        value = fn(rank, world_size, *args)
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException as error:  # reported to the parent, which raises
        text = "".join(traceback.format_exception_only(type(error), error)).strip()
        results.put((rank, "error", text.splitlines()[-1] if text else type(error).__name__))
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(
    fn: Callable[..., Any],
    nprocs: int,
    args: Sequence[Any] = (),
    *,
    backend: str = "gloo",
    timeout_s: float = 60.0,
    threads: int | None = None,
    run_timeout_s: float | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` processes in one process group.

    Each process joins a group on 127.0.0.1 (a free port, ``backend``), sets
    ``threads`` intra-op threads (default: this process's threads shared out, at least
    one), and runs ``fn``; the return values come back in rank order (through
    ``torch.save``, so tensors are fine). ``fn`` must be importable by name (a module-level
    function). Processes come from a fork server that imports torch once, so later
    launches start in well under a second.

    ``timeout_s`` bounds each collective (:func:`init_process_group`) and, unless
    ``run_timeout_s`` is given (``math.inf``: no bound, for long training), the whole run.
    Raises :class:`DistributedRunError` when any rank raises, exits early (killed) or
    has not finished in time; the message names every rank's fate,
    e.g. ``rank 1 exited with code -9 before finishing; rank 0: RuntimeError: Connection
    closed by peer``. The other ranks then stop on their own (a collective with a dead
    peer fails at once, a silent one after ``timeout_s``) or are terminated.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be positive, got {nprocs}")
    threads = threads or max(1, torch.get_num_threads() // nprocs)
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        ctx.set_forkserver_preload(["torch", "torch.distributed", "bnlab.sync_batchnorm"])
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, nprocs, port, backend, timeout_s, threads, fn, tuple(args), results),
        )
        for rank in range(nprocs)
    ]
    for proc in procs:
        proc.start()
    run_timeout_s = timeout_s if run_timeout_s is None else run_timeout_s
    values: dict[int, Any] = {}
    fates: dict[int, str] = {}
    try:
        _collect(procs, results, values, fates, timeout_s, run_timeout_s)
    finally:
        for proc in procs:
            proc.join(timeout=2.0 if not fates else 0.5)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        results.close()
    if fates:
        parts = [f"rank {rank}: {text}" if "exited" not in text and "within" not in text
                 else f"rank {rank} {text}" for rank, text in sorted(fates.items())]
        raise DistributedRunError(
            f"distributed run failed ({len(fates)} of {nprocs} ranks): " + "; ".join(parts)
        )
    return [values[rank] for rank in range(nprocs)]


def _collect(
    procs: list[Any],
    results: Any,
    values: dict[int, Any],
    fates: dict[int, str],
    timeout_s: float,
    run_timeout_s: float,
) -> None:
    """Wait for every rank of :func:`launch`: its return value into ``values``, or its fate.

    A rank's fate (into ``fates``, rank -> text) is the error it reported, its exit
    before reporting, no report within ``run_timeout_s``, or no report within ``timeout_s``
    of another rank's failure. Fills both dicts in place, so that the caller's cleanup
    sees what was gathered even when this is interrupted.
    """
    nprocs = len(procs)
    seen_dead: dict[int, float] = {}
    deadline = time.monotonic() + run_timeout_s
    failed_at: float | None = None
    while len(values) + len(fates) < nprocs:
        try:
            rank, status, payload = results.get(timeout=0.1)
        except queue.Empty:
            now = time.monotonic()
            for rank, proc in enumerate(procs):
                if rank in values or rank in fates or proc.exitcode is None:
                    continue
                # a report sent just before exiting may still be in the pipe: wait 1 s
                if now - seen_dead.setdefault(rank, now) > 1.0:
                    fates[rank] = f"exited with code {proc.exitcode} before finishing"
            if now > deadline:
                _give_fate(fates, values, nprocs, f"did not finish within {run_timeout_s:g} s")
            # a rank failed: the others get timeout_s to notice, then are stopped
            failed_at = failed_at or (now if fates else None)
            if failed_at is not None and now - failed_at > timeout_s:
                _give_fate(fates, values, nprocs,
                           f"did not finish within {timeout_s:g} s of another rank's failure")
            continue
        if status == "ok":
            values[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        else:
            fates[rank] = payload


def _give_fate(fates: dict[int, str], values: dict[int, Any], nprocs: int, text: str) -> None:
    """``fates[rank] = text`` for every rank that has neither a value nor a fate yet."""
    for rank in range(nprocs):
        if rank not in values and rank not in fates:
            fates[rank] = text


# ---------------------------------------------------------------------------------------
# The autograd engine: DistributedDataParallel
# ---------------------------------------------------------------------------------------


def ddp(
    model: torch.nn.Module,
    *,
    sync_bn: Literal["bnlab", "torch", "none"] = "bnlab",
    process_group: Any | None = None,
    **ddp_kwargs: Any,
) -> torch.nn.parallel.DistributedDataParallel:
    """``model`` with synchronized BN, wrapped in ``DistributedDataParallel``.

    ``sync_bn="bnlab"`` replaces every BN layer by :class:`bnlab.sync_batchnorm.SyncBatchNorm`
    (CPU and CUDA, bnlab's hand-derived math); ``"torch"`` by ``torch.nn.SyncBatchNorm``
    (CUDA only); ``"none"`` keeps per-rank BN (each rank normalizes its own shard, which
    is *not* the one-process computation). Parameters keep their identity. On CUDA the
    model must already be on this rank's GPU; ``device_ids`` defaults to it.
    ``ddp_kwargs`` go to ``DistributedDataParallel``. DDP broadcasts rank 0's parameters
    and buffers when it is built and averages gradients over ranks: pair it with
    :func:`local_loss_scale` when shards differ in size.
    """
    from bnlab.sync_batchnorm import SyncBatchNorm

    if sync_bn == "bnlab":
        model = SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    elif sync_bn == "torch":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    elif sync_bn != "none":
        raise ValueError(f"sync_bn must be 'bnlab', 'torch' or 'none', got {sync_bn!r}")
    first = next(model.parameters(), None)
    if first is not None and first.device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [first.device.index])
    return torch.nn.parallel.DistributedDataParallel(
        model, process_group=process_group, **ddp_kwargs
    )
