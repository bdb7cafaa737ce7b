"""Batch normalization and training across 2 processes (gloo on 127.0.0.1) equal one process.

The ranks run tests/distributed_workers.py (all equality checks in one launch, so the
processes start once); the references are computed here, in one process, in float64:

- ``bnlab.SyncBatchNorm`` with rank batches of 5 and 3 (and 1 + 2, 4 + 0, 0 + 6, a mean
  of 1e4) equals ``torch.nn.BatchNorm*d`` with autograd on the concatenated batch:
  outputs, each rank's input gradients, weight/bias gradients (summed over ranks),
  running statistics, to 1e-12 relative;
- the same runs follow ``torch.nn.SyncBatchNorm``'s semantics, written out below from
  its source (its kernels are CUDA-only): weight/bias gradients are per-rank parts,
  evaluation does not synchronize, an empty rank has zero gradients;
- the manual engine's data-parallel step over 2 ranks equals the one-process step on the
  global batch; DDP with bnlab's SyncBatchNorm equals one process on the global batch;
- a rank that is killed ends the run with a clear error on the other, within seconds.

Tolerance 1e-12: each value passes through a few dozen float64 operations (unit roundoff
1.1e-16) whose errors do not cancel systematically; the manual step goes through 9 layers
and an Adam step, about 1e3 operations per value, still under 1e-12 relative.
"""

from __future__ import annotations

import time

import pytest
import torch

from bnlab.distributed import DistributedRunError, launch
from tests import distributed_workers as W

TOL = 1e-12


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error (absolute where the expected value is zero)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def case_tolerance(name: str) -> float:
    """1e-12, or what a float64 BN of input with ``|mu| / sigma = r`` can reach: ``16 u r``.

    The input itself is known to ``u |mu|`` (u = 1.1e-16), a relative error of ``u r`` on
    ``x - mu``; the element-wise passes (``y = x s + t``, ``dx = a dy + b x + c``) each
    round a product of size ``|mu| |s|``, another ``u r`` relative. PyTorch's own BN on
    the raw input is off by 1.5e-12 in dweight for r = 5e3 (measured against the
    centred input); 16 leaves room for the dozen such roundings a value goes through.
    """
    offset = W.SYNC_CASES[name][5]
    return max(TOL, 16 * torch.finfo(torch.float64).eps / 2 * offset / W.SYNC_STD)


def check(what: str, actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    """Print a few element pairs and the error, then assert it (a check that can fail)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = rel_error(actual, expected)
    pairs = list(zip(actual.flatten()[:2].tolist(), expected.flatten()[:2].tolist(), strict=True))
    largest = (actual - expected).abs().max().item() if actual.numel() else 0.0
    print(f"{what}: {pairs} max abs {largest:.1e} rel {err:.1e}")
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:g}"


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    """Both ranks' results of every equality check (one launch of 2 processes)."""
    return launch(W.all_checks, 2, timeout_s=240)


# ---------------------------------------------------------------------------------------
# SyncBatchNorm over 2 ranks == one-process BN on the concatenated batch
# ---------------------------------------------------------------------------------------


def one_process_bn(name: str) -> dict[str, list]:
    """``torch.nn.BatchNorm*d`` with autograd on the whole batch, the same two steps.

    Outputs and gradients are shift-invariant, so they are computed on ``x - offset``
    (exact in float64 for |x - offset| << offset): with a mean of 1e4 the input itself
    carries errors of 1e4 * 1.1e-16 = 1e-12, 5e-13 of its standard deviation of 2, which
    a reference computed on the raw input would add to the comparison. The running
    statistics come from a second module on the raw input.
    """
    _, tail, momentum, affine, track, offset = W.SYNC_CASES[name]
    data = W.sync_case_data(name)
    cls = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm2d}[len(tail)]
    bn, raw = (
        cls(tail[0], momentum=momentum, affine=affine, track_running_stats=track).double()
        for _ in range(2)
    )
    if affine:
        with torch.no_grad():
            bn.weight.copy_(data["weight"])
            bn.bias.copy_(data["bias"])
    out: dict[str, list] = {"y": [], "dx": [], "dweight": [], "dbias": [], "running": []}
    for step in range(W.SYNC_STEPS):
        raw(data["x"][step])
        x = (data["x"][step] - offset).requires_grad_(True)
        y = bn(x)
        wrt = [x] + ([bn.weight, bn.bias] if affine else [])
        grads = torch.autograd.grad(y, wrt, data["dy"][step])
        out["y"].append(y.detach())
        out["dx"].append(grads[0])
        if affine:
            out["dweight"].append(grads[1])
            out["dbias"].append(grads[2])
        if track:
            out["running"].append((raw.running_mean.clone(), raw.running_var.clone()))
    return out


@pytest.mark.parametrize("name", list(W.SYNC_CASES))
def test_sync_batchnorm_equals_one_process(ranks: list[dict], name: str) -> None:
    sizes, *_ = W.SYNC_CASES[name]
    ref, tol = one_process_bn(name), case_tolerance(name)
    for step in range(W.SYNC_STEPS):
        for rank in range(2):
            got = ranks[rank]["sync"][name]
            part = W.rank_slice(sizes, rank)
            check(f"{name} step {step} rank {rank} y", got["y"][step], ref["y"][step][part], tol)
            check(f"{name} step {step} rank {rank} dx", got["dx"][step], ref["dx"][step][part], tol)
            if ref["running"]:
                mean, var, tracked = got["running"][step]
                check(f"{name} step {step} rank {rank} running_mean", mean,
                      ref["running"][step][0], tol)
                check(f"{name} step {step} rank {rank} running_var", var,
                      ref["running"][step][1], tol)
                assert tracked == step + 1
        for key in ("dweight", "dbias"):
            if ref[key]:
                total = sum(ranks[rank]["sync"][name][key][step] for rank in range(2))
                check(f"{name} step {step} {key} summed over ranks", total, ref[key][step], tol)


# ---------------------------------------------------------------------------------------
# torch.nn.SyncBatchNorm's semantics, written out (torch/nn/modules/_functions.py)
# ---------------------------------------------------------------------------------------


def torch_sync_bn_semantics(name: str) -> list[dict[str, list]]:
    """Per-rank results as ``torch.nn.SyncBatchNorm`` defines them, from its algorithm.

    Forward: each non-empty rank computes (mean, invstd, count); the global mean and
    variance are merged with counts (``batch_norm_gather_stats_with_counts``), the running
    variance takes ``var * M / (M - 1)``. Backward: ``sum_dy`` and ``sum_dy_xmu`` are
    all-reduced; ``grad_input = (dy - sum_dy / M - (x - mu) invstd^2 sum_dy_xmu / M)
    invstd w``; ``grad_weight = sum_dy_xmu_local * invstd`` and ``grad_bias = sum_dy_local``
    stay local (DDP adds them); an empty rank's weight/bias gradients are zero. Evaluation
    normalizes each rank locally: running statistics, or (without them) its own batch.
    """
    sizes, tail, momentum, affine, track, offset = W.SYNC_CASES[name]
    data = W.sync_case_data(name)
    data["x"] = data["x"] - offset  # exact; see one_process_bn
    c = tail[0]
    dims = [0, *range(2, len(tail) + 1)]
    view = (1, c) + (1,) * (len(tail) - 1)
    w = data["weight"] if affine else torch.ones(c, dtype=torch.float64)
    b = data["bias"] if affine else torch.zeros(c, dtype=torch.float64)
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    out = [{"y": [], "dx": [], "dweight": [], "dbias": [], "running": []} for _ in sizes]
    for step in range(W.SYNC_STEPS):
        xs = [data["x"][step, W.rank_slice(sizes, r)] for r in range(2)]
        dys = [data["dy"][step, W.rank_slice(sizes, r)] for r in range(2)]
        stats = [(x.mean(dims), x.var(dims, unbiased=False), x.numel() // c)
                 for x in xs if x.numel()]
        m_total = sum(n for _, _, n in stats)
        mean = sum(n * mu for mu, _, n in stats) / m_total
        var = sum(n * (v + (mu - mean) ** 2) for mu, v, n in stats) / m_total
        invstd = (var + 1e-5).rsqrt()
        factor = momentum if momentum is not None else 1.0 / (step + 1)
        rm = (1 - factor) * rm + factor * (mean + offset)
        rv = (1 - factor) * rv + factor * var * m_total / (m_total - 1)
        sums = [(dy.sum(dims), (dy * (x - mean.view(view))).sum(dims))
                for x, dy in zip(xs, dys, strict=True)]
        sum_dy = sum(s for s, _ in sums)
        sum_dy_xmu = sum(s for _, s in sums)
        for r, (x, dy) in enumerate(zip(xs, dys, strict=True)):
            xmu = x - mean.view(view)
            out[r]["y"].append(xmu * (invstd * w).view(view) + b.view(view))
            out[r]["dx"].append(
                (dy - (sum_dy / m_total).view(view)
                 - xmu * (invstd**2 * sum_dy_xmu / m_total).view(view)) * (invstd * w).view(view)
            )
            out[r]["dweight"].append(sums[r][1] * invstd)
            out[r]["dbias"].append(sums[r][0])
            out[r]["running"].append((rm.clone(), rv.clone()))
    for r in range(2):
        x = data["x"][0, W.rank_slice(sizes, r)]
        if track:
            mu, v = rm - offset, rv
        else:  # eval without running statistics: this rank's own batch, not synchronized
            mu, v = x.mean(dims), x.var(dims, unbiased=False)
        out[r]["eval_y"] = (x - mu.view(view)) * ((v + 1e-5).rsqrt() * w).view(view) + b.view(view)
    return out


@pytest.mark.parametrize("name", list(W.SYNC_CASES))
def test_sync_batchnorm_follows_torch_semantics(ranks: list[dict], name: str) -> None:
    sizes, _, _, affine, track, _ = W.SYNC_CASES[name]
    ref, tol = torch_sync_bn_semantics(name), case_tolerance(name)
    for rank in range(2):
        got = ranks[rank]["sync"][name]
        for step in range(W.SYNC_STEPS):
            for key in ("y", "dx") + (("dweight", "dbias") if affine else ()):
                check(f"{name} rank {rank} step {step} {key}", got[key][step],
                      ref[rank][key][step], tol)
            if track:
                check(f"{name} rank {rank} step {step} running_var", got["running"][step][1],
                      ref[rank]["running"][step][1], tol)
        if sizes[rank] or not track:  # an empty rank's eval output is empty, as in torch
            check(f"{name} rank {rank} eval", got["eval_y"], ref[rank]["eval_y"], tol)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="torch.nn.SyncBatchNorm needs CUDA; "
                    "NCCL needs a GPU per rank")
def test_sync_batchnorm_equals_torch_syncbatchnorm_on_cuda() -> None:
    ranks = launch(W.torch_and_bnlab_sync_bn_on_cuda, 2, backend="nccl", timeout_s=120)
    names = ["y", "dx", "dweight", "dbias", "running_mean", "running_var"] * W.SYNC_STEPS
    for rank, got in enumerate(ranks):
        for i, (ours, theirs) in enumerate(zip(got["bnlab"], got["torch"], strict=True)):
            check(f"rank {rank} step {i // 6} {names[i]}", ours, theirs)


def test_empty_rank_has_empty_outputs_and_zero_parameter_gradients(ranks: list[dict]) -> None:
    got = ranks[1]["sync"]["4D, rank 1 empty"]
    assert got["y"][0].shape == (0, 3, 2, 2) and got["dx"][0].shape == (0, 3, 2, 2)
    assert torch.equal(got["dweight"][0], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(got["dbias"][0], torch.zeros(3, dtype=torch.float64))


# ---------------------------------------------------------------------------------------
# Data-parallel training: manual engine by hand, autograd engine with DDP
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", W.MANUAL_NETWORKS)
def test_manual_data_parallel_step_equals_one_process(ranks: list[dict], name: str) -> None:
    from bnlab.manual import train_step
    from bnlab.optim import Adam

    setup = W.manual_dp_setup()
    net = W.manual_network(name)
    opt = Adam(net.parameters(), lr=setup["lr"], amsgrad=True)
    losses = []
    for images, labels in zip(setup["images"], setup["labels"], strict=True):
        loss, _ = train_step(net, opt, images, labels, mean_gradient=net.mean_gradient)
        losses.append(float(loss))
    for rank in range(2):
        got = ranks[rank]["manual_dp"][name]
        print(f"rank {rank} losses {got['losses']} one process {losses}")
        check(f"rank {rank} losses", torch.tensor(got["losses"]), torch.tensor(losses))
        for key, value in net.state_dict().items():
            check(f"rank {rank} {key}", got["state"][key], value)


def test_ddp_with_sync_batchnorm_equals_one_process(ranks: list[dict]) -> None:
    model = W.ddp_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    setup = W.ddp_setup()
    for images, labels in zip(setup["images"], setup["labels"], strict=True):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()
    for rank in range(2):
        for key, value in model.state_dict().items():
            check(f"rank {rank} {key}", ranks[rank]["ddp"]["state"][key], value)


def test_metric_sums_reach_every_rank(ranks: list[dict]) -> None:
    for rank in range(2):
        assert ranks[rank]["sums"].tolist() == [3.0, 20.0]


# ---------------------------------------------------------------------------------------
# Failure: a killed rank ends the others with a clear error
# ---------------------------------------------------------------------------------------


def test_killed_rank_ends_the_run_with_a_clear_error() -> None:
    start = time.monotonic()
    with pytest.raises(DistributedRunError) as info:
        launch(W.rank_dies, 2, timeout_s=60)
    elapsed = time.monotonic() - start
    message = str(info.value)
    print(message, f"({elapsed:.1f} s)")
    assert "rank 1 exited with code -9" in message
    assert "rank 0: " in message and "did not finish" not in message  # rank 0 failed itself
    assert elapsed < 60
