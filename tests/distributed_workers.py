"""What each rank runs in the distributed tests (module-level, so the launcher can import it).

Every worker builds its inputs from fixed seeds, takes its rank's slice, runs bnlab's
distributed code, and returns plain tensors; the test process computes the one-process
references and compares (tests/test_distributed.py).
"""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

from bnlab.distributed import all_reduce_sum, ddp, local_loss_scale, shard_bounds
from bnlab.sync_batchnorm import SyncBatchNorm

# name: (per-rank sizes, input shape after N, momentum, affine, track_running_stats, offset)
SYNC_CASES: dict[str, tuple[tuple[int, int], tuple[int, ...], float | None, bool, bool, float]] = {
    "4D, ranks of 5 and 3": ((5, 3), (3, 2, 2), 0.1, True, True, 0.0),
    "2D, ranks of 5 and 3, cumulative average": ((5, 3), (4,), None, True, True, 0.0),
    "3D, ranks of 1 and 2": ((1, 2), (2, 3), 0.3, True, True, 0.0),
    "4D, rank 1 empty": ((4, 0), (3, 2, 2), 0.1, True, True, 0.0),
    "4D, rank 0 empty": ((0, 6), (3, 2, 2), 0.1, True, True, 0.0),
    "4D, mean 1e4": ((5, 3), (3, 2, 2), 0.1, True, True, 1e4),
    "4D, no affine, no running stats": ((5, 3), (3, 2, 2), 0.1, False, False, 0.0),
}
SYNC_STEPS = 2
SYNC_STD = 2.0  # the inputs' standard deviation


def sync_case_data(name: str) -> dict[str, torch.Tensor]:
    """The full batches, upstream gradients and affine parameters of one case (float64)."""
    sizes, tail, _, _, _, offset = SYNC_CASES[name]
    gen = torch.Generator().manual_seed(sorted(SYNC_CASES).index(name))
    n, c = sum(sizes), tail[0]
    shape = (SYNC_STEPS, n, *tail)
    return {
        "x": torch.randn(shape, generator=gen, dtype=torch.float64) * SYNC_STD + offset,
        "dy": torch.randn(shape, generator=gen, dtype=torch.float64),
        "weight": torch.rand(c, generator=gen, dtype=torch.float64) + 0.5,
        "bias": torch.randn(c, generator=gen, dtype=torch.float64),
    }


def rank_slice(sizes: tuple[int, ...], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _sync_case(name: str, rank: int) -> dict[str, object]:
    sizes, tail, momentum, affine, track, _ = SYNC_CASES[name]
    data = sync_case_data(name)
    bn = SyncBatchNorm(tail[0], momentum=momentum, affine=affine, track_running_stats=track)
    bn = bn.double()
    if affine:
        with torch.no_grad():
            bn.weight.copy_(data["weight"])
            bn.bias.copy_(data["bias"])
    part = rank_slice(sizes, rank)
    out: dict[str, object] = {"y": [], "dx": [], "dweight": [], "dbias": [], "running": []}
    for step in range(SYNC_STEPS):
        x = data["x"][step, part].clone().requires_grad_(True)
        y = bn(x)
        wrt = [x] + ([bn.weight, bn.bias] if affine else [])
        grads = torch.autograd.grad(y, wrt, data["dy"][step, part], allow_unused=True)
        out["y"].append(y.detach())
        out["dx"].append(grads[0])
        if affine:
            out["dweight"].append(grads[1])
            out["dbias"].append(grads[2])
        if track:
            out["running"].append(
                (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
            )
    bn.eval()
    with torch.no_grad():
        out["eval_y"] = bn(data["x"][0, part])
    return out


def manual_dp_setup(size: int = 9, batch: int = 8, steps: int = 2):
    """The manual-engine data-parallel check's batches and learning rate."""
    gen = torch.Generator().manual_seed(7)
    images = torch.randn(steps, batch, 3, size, size, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 10, (steps, batch), generator=gen)
    return {"images": images, "labels": labels, "lr": 1e-2}


def manual_network(name: str):
    """The manual networks of the data-parallel check, float64, seeded."""
    from bnlab.manual import all_cnn_c
    from bnlab.post.manual_net import GRADIENT_ERRORS, post_net

    gen = torch.Generator().manual_seed(0)
    if name == "all-cnn-c":  # per-channel BN (BatchNorm2d)
        return all_cnn_c(bn=True, width=0.125, dtype=torch.float64, generator=gen)
    # case c's network as the post ran it: per-activation BN, gamma only, its three
    # gradient errors (the summed-loss gradient among them: mean_gradient=False)
    return post_net(bn="activation", width=0.125, image_size=9, dtype=torch.float64,
                    generator=gen, gradient_errors=GRADIENT_ERRORS)


MANUAL_NETWORKS = ("all-cnn-c", "post net, case c")


def _manual_dp(rank: int, world_size: int, sizes: tuple[int, int], name: str) -> dict:
    from bnlab.manual.distributed import (
        broadcast_parameters,
        convert_sync_batchnorm,
        data_parallel_train_step,
    )
    from bnlab.optim import Adam

    setup = manual_dp_setup()
    net = manual_network(name)
    if rank != 0:  # a rank that starts elsewhere: the broadcast must fix it
        with torch.no_grad():
            for tensor in net.parameters():
                tensor.add_(1.0)
    convert_sync_batchnorm(net)
    broadcast_parameters(net)
    opt = Adam(net.parameters(), lr=setup["lr"], amsgrad=True)
    part = rank_slice(sizes, rank)
    losses = []
    for images, labels in zip(setup["images"], setup["labels"], strict=True):
        loss, _ = data_parallel_train_step(
            net, opt, images[part], labels[part], global_batch_size=sum(sizes),
            mean_gradient=net.mean_gradient, bucket_cap_mb=0.01,
        )
        losses.append(float(loss))
    return {"losses": losses, "state": {k: v.clone() for k, v in net.state_dict().items()}}


def ddp_setup():
    """The autograd engine's DDP check: a small conv + BN model and two batches of 8."""
    gen = torch.Generator().manual_seed(3)
    return {
        "images": torch.randn(2, 8, 3, 6, 6, generator=gen, dtype=torch.float64),
        "labels": torch.randint(0, 4, (2, 8), generator=gen),
    }


def ddp_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 5, 3, bias=False), torch.nn.BatchNorm2d(5), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(5, 4),
    ).double()


def _ddp(rank: int, world_size: int, sizes: tuple[int, int]) -> dict[str, object]:
    model = ddp(ddp_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    setup = ddp_setup()
    part = rank_slice(sizes, rank)
    for images, labels in zip(setup["images"], setup["labels"], strict=True):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(images[part]), labels[part])
        (loss * local_loss_scale(sizes[rank], sum(sizes), world_size)).backward()
        opt.step()
    return {"state": {k: v.clone() for k, v in model.module.state_dict().items()}}


def all_checks(rank: int, world_size: int) -> dict[str, object]:
    """Every equality check's per-rank results, in one launch (processes start once)."""
    assert shard_bounds(8, world_size, rank) == ((0, 4), (4, 8))[rank]
    return {
        "sums": all_reduce_sum([rank + 1.0, 10.0]),
        "sync": {name: _sync_case(name, rank) for name in SYNC_CASES},
        "manual_dp": {name: _manual_dp(rank, world_size, (5, 3), name) for name in MANUAL_NETWORKS},
        "ddp": _ddp(rank, world_size, (5, 3)),
    }


def rank_dies(rank: int, world_size: int) -> None:
    """Rank 1 is killed (SIGKILL) after the first step; rank 0 keeps training."""
    bn = SyncBatchNorm(3).double()
    for step in range(1000):
        x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
        bn(x).sum().backward()
        if rank == 1 and step == 0:
            os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()


def torch_and_bnlab_sync_bn_on_cuda(rank: int, world_size: int) -> dict[str, list]:
    """torch.nn.SyncBatchNorm (CUDA kernels) and bnlab's on the same split (NCCL, GPU r)."""
    name = "4D, ranks of 5 and 3"
    sizes, tail, momentum, *_ = SYNC_CASES[name]
    data = sync_case_data(name)
    part = rank_slice(sizes, rank)
    out: dict[str, list] = {}
    for label, cls in (("torch", torch.nn.SyncBatchNorm), ("bnlab", SyncBatchNorm)):
        bn = cls(tail[0], momentum=momentum).to(f"cuda:{rank}", torch.float64)
        with torch.no_grad():
            bn.weight.copy_(data["weight"])
            bn.bias.copy_(data["bias"])
        results = []
        for step in range(SYNC_STEPS):
            x = data["x"][step, part].to(bn.weight.device).requires_grad_(True)
            y = bn(x)
            grads = torch.autograd.grad(y, (x, bn.weight, bn.bias),
                                        data["dy"][step, part].to(x.device))
            results += [y.detach().cpu(), *(g.cpu() for g in grads),
                        bn.running_mean.cpu(), bn.running_var.cpu()]
        out[label] = results
    return out


# --- the trainer, data-parallel (tests/test_distributed_train.py) --------------------------


def compare_rank(rank: int, world_size: int, cases: list[str], out: str, overrides: dict) -> dict:
    """One rank of ``bnlab compare`` through its Python API: plan, then run every case."""
    from bnlab.compare import plan_comparison, run_comparison

    plan = plan_comparison(cases, 1, "quick", out, overrides)
    return run_comparison(plan, quiet=True)


def build_model_rank(rank: int, world_size: int, config_fields: dict) -> str:
    """Build the trainer's model inside a process group (its data-parallel checks)."""
    from bnlab.train import Model, TrainConfig

    model = Model(TrainConfig(**config_fields), torch.device("cpu"))
    return type(model.forward).__name__ if hasattr(model, "forward") else "manual"


def train_rank(rank: int, world_size: int, config_fields: dict, run_dir: str) -> str:
    """One rank of :func:`bnlab.train.train`; a divergence is returned, not raised."""
    from bnlab.train import DivergenceError, TrainConfig, train

    try:
        train(TrainConfig(**config_fields), run_dir, progress=False, log=lambda text: None)
    except DivergenceError as error:
        return f"DivergenceError: {error}"
    return "finished"
