"""SyncBatchNorm and data-parallel pieces that one process can check (no second rank).

The merge of per-rank moments, the split backward (local sums + closed form) against
bnlab's one-process backward, the module's drop-in behaviour when it does not synchronize,
conversions that keep parameter identity, shards, and the gradient all-reduce's buckets on
a one-rank gloo group. The 2-process equalities are in tests/test_distributed.py.
"""

from __future__ import annotations

import datetime
import itertools
import re

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlab import functional as F
from bnlab import functional_sync as FS
from bnlab import kernels
from bnlab.distributed import free_port, local_loss_scale, shard_batches, shard_bounds
from bnlab.nn import BatchNorm2d as BnlabBatchNorm2d
from bnlab.nn import SyncBatchNorm
from bnlab.sync_batchnorm import SyncBatchNormFunction, batchnorm_from_sync, sync_from_batchnorm

DT = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ---------------------------------------------------------------------------------------
# The math: merged moments, split backward
# ---------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 5), min_size=1, max_size=4).filter(lambda s: sum(s) > 1),
       offset=st.sampled_from([0.0, 1e4]))
def test_merged_moments_are_the_whole_batch_statistics(sizes: list[int], offset: float) -> None:
    gen = torch.Generator().manual_seed(sum(sizes) * 7 + len(sizes))
    x = torch.randn(sum(sizes), 3, 2, generator=gen, dtype=DT) + offset
    parts = torch.split(x, sizes)
    count, mean, var = FS.batch_norm_merge_moments(
        torch.stack([FS.batch_norm_local_moments(p) for p in parts])
    )
    centred = x - offset  # exact: the reference sees no cancellation
    exp_mean = centred.mean((0, 2)) + offset
    exp_var = centred.var((0, 2), unbiased=False)
    # Each rank's mean is rounded to u |mu| (u = 1.1e-16); the deviations from it, hence
    # var, carry a relative error of about u |mu| / sigma per rounding: allow 16 of them
    # (and 1e-14 for the sums' own roundings, ~u per addend times a few).
    u = torch.finfo(DT).eps / 2
    tol = 1e-14 + 16 * u * offset / exp_var.sqrt().min().item()
    print(sizes, offset, rel(mean, exp_mean), rel(var, exp_var), tol)
    assert int(count) == x.numel() // 3
    assert ((mean - exp_mean).abs() / exp_var.sqrt()).max().item() <= tol  # in units of sigma
    assert rel(var, exp_var) <= tol


def test_merge_rejects_an_empty_batch_and_bad_shapes() -> None:
    empty = FS.batch_norm_local_moments(torch.empty(0, 3, dtype=DT))
    assert torch.equal(empty, torch.zeros(7, dtype=DT))
    with pytest.raises(ValueError, match="at least one value"):
        FS.batch_norm_merge_moments(torch.stack([empty, empty]))
    with pytest.raises(ValueError, match=r"\(W, 2C \+ 1\)"):
        FS.batch_norm_merge_moments(torch.zeros(2, 6, dtype=DT))


@pytest.mark.parametrize("shape", [(7, 3), (5, 4, 3, 3), (3, 2, 2, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_split_backward_equals_one_process_backward(shape: tuple[int, ...], dtype) -> None:
    gen = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(shape, generator=gen, dtype=DT) * 3 + 2).to(dtype)
    dy = torch.randn(shape, generator=gen, dtype=DT).to(dtype)
    weight = (torch.rand(shape[1], generator=gen, dtype=DT) + 0.5).to(dtype)
    saved = F.batch_norm_prepare(x, training=True, eps=1e-5)
    dx, dgamma, dbeta = F.batch_norm_backward(dy, x, saved, weight)
    sum_dy, sum_dy_xmu = FS.batch_norm_backward_reduce(dy, x, saved)
    count = x.numel() // x.shape[1]
    dx2 = FS.batch_norm_backward_elemt(dy, x, saved, weight, sum_dy, sum_dy_xmu, count)
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    print(shape, dtype, rel(dx2, dx), rel(sum_dy_xmu * saved.invstd, dgamma.double()))
    assert rel(dx2.double(), dx.double()) <= tol
    assert rel(sum_dy.to(dtype).double(), dbeta.double()) <= tol
    assert rel((sum_dy_xmu * saved.invstd).to(dtype).double(), dgamma.double()) <= tol


# ---------------------------------------------------------------------------------------
# The module, where it does not synchronize: a drop-in BatchNorm
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track", [True, False])
def test_unsynchronized_module_matches_torch_batchnorm(momentum, track) -> None:
    ours = SyncBatchNorm(3, momentum=momentum, track_running_stats=track).double()
    theirs = torch.nn.BatchNorm2d(3, momentum=momentum, track_running_stats=track).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5, generator=gen)
        theirs.weight.copy_(ours.weight)
    for mode in ("train", "train", "eval"):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        x = torch.randn(4, 3, 2, 2, generator=gen, dtype=DT, requires_grad=True)
        dy = torch.randn(4, 3, 2, 2, generator=gen, dtype=DT)
        y1, y2 = ours(x), theirs(x)
        g1 = torch.autograd.grad(y1, (x, ours.weight, ours.bias), dy)
        g2 = torch.autograd.grad(y2, (x, theirs.weight, theirs.bias), dy)
        assert rel(y1, y2) <= 1e-14
        for a, b in zip(g1, g2, strict=True):
            assert rel(a, b) <= 1e-13
        for k, v in theirs.state_dict().items():
            assert rel(ours.state_dict()[k].double(), v.double()) <= 1e-14, k


def test_local_backward_is_autograd_in_float64() -> None:
    x = torch.randn(6, 2, 3, dtype=DT, requires_grad=True)
    w = torch.rand(2, dtype=DT, requires_grad=True)
    b = torch.randn(2, dtype=DT, requires_grad=True)

    def fn(x, w, b):
        saved = F.batch_norm_prepare(x.detach(), training=True, eps=1e-5)
        # the statistics depend on x, so compare the whole map through a fresh prepare
        return SyncBatchNormFunction.apply(x, w, b, saved, x.numel() // 2, None)

    ref = torch.nn.functional.batch_norm(x, None, None, w, b, training=True)
    dy = torch.randn_like(ref)
    g1 = torch.autograd.grad(fn(x, w, b), (x, w, b), dy)
    g2 = torch.autograd.grad(ref, (x, w, b), dy)
    for a, e in zip(g1, g2, strict=True):
        print(rel(a, e))
        assert rel(a, e) <= 1e-13


def test_state_dict_and_repr_match_torch_syncbatchnorm() -> None:
    ours, theirs = SyncBatchNorm(5, eps=1e-3, momentum=None), torch.nn.SyncBatchNorm(5, 1e-3, None)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    assert isinstance(ours, torch.nn.modules.batchnorm._BatchNorm)


@pytest.mark.parametrize("make_input, error, text", [
    (lambda: torch.randn(4), ValueError, "expected at least 2D input (got 1D input)"),
    (lambda: torch.randn(4, 0, 2), ValueError, "number of input channels should be non-zero"),
    (lambda: torch.randn(4, 2, 2), RuntimeError, "should contain 2 elements not 3"),
    (lambda: torch.randn(1, 3), ValueError, "Expected more than 1 value per channel"),
])
def test_errors(make_input, error, text) -> None:
    with pytest.raises(error, match=re.escape(text)):
        SyncBatchNorm(3)(make_input())


# ---------------------------------------------------------------------------------------
# Conversions keep identity
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bn_class", [torch.nn.BatchNorm2d, BnlabBatchNorm2d])
def test_convert_keeps_parameter_and_buffer_identity(bn_class) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), bn_class(4, momentum=0.3, eps=1e-3))
    model[1].eval()
    before = {id(t) for t in [*model.parameters(), *model.buffers()]}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    converted = SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted is model and type(model[1]) is SyncBatchNorm
    assert {id(t) for t in [*model.parameters(), *model.buffers()]} == before
    assert opt.param_groups[0]["params"][2] is model[1].weight
    assert (model[1].momentum, model[1].eps, model[1].training) == (0.3, 1e-3, False)
    back = batchnorm_from_sync(model[1], bn_class)
    assert type(back) is bn_class and back.weight is model[1].weight
    assert back.running_var is model[1].running_var and not back.training
    with pytest.raises(TypeError, match="got Conv2d"):
        sync_from_batchnorm(model[0])


def test_bias_correction_carries_over_and_matches_bnlab_batchnorm() -> None:
    ours = BnlabBatchNorm2d(3, bias_correction=True).double()
    for _ in range(3):
        ours(torch.randn(4, 3, 2, 2, dtype=DT))
    sync = sync_from_batchnorm(ours)
    assert sync.bias_correction and "bias_correction=True" in repr(sync)
    ours.eval()
    sync.eval()
    x = torch.randn(4, 3, 2, 2, dtype=DT)
    with kernels.disabled():  # both on bnlab.functional: the same math, exactly
        assert torch.equal(sync(x), ours(x))
    assert not torch.equal(sync(x), torch.nn.functional.batch_norm(
        x, sync.running_mean, sync.running_var, sync.weight, sync.bias))  # it is corrected
    assert batchnorm_from_sync(sync, BnlabBatchNorm2d).bias_correction
    with pytest.raises(TypeError):
        batchnorm_from_sync(sync, torch.nn.BatchNorm2d)  # PyTorch's has no such option


def test_manual_convert_keeps_tensors_and_equals_plain_layer_without_a_group() -> None:
    from bnlab.manual import all_cnn_c
    from bnlab.manual.distributed import SyncBatchNorm2d, convert_sync_batchnorm

    plain = all_cnn_c(bn=True, width=0.125, dtype=DT, generator=torch.Generator().manual_seed(0))
    net = all_cnn_c(bn=True, width=0.125, dtype=DT, generator=torch.Generator().manual_seed(0))
    tensors = {k: id(v) for k, v in net.state_dict().items()}
    convert_sync_batchnorm(net)
    assert type(net["bn1"]) is SyncBatchNorm2d
    assert {k: id(v) for k, v in net.state_dict().items()} == tensors
    x = torch.randn(4, 3, 9, 9, dtype=DT)
    y1, y2 = net.forward(x), plain.forward(x)
    assert torch.equal(y1, y2)
    d1, d2 = net.backward(torch.ones_like(y1)), plain.backward(torch.ones_like(y2))
    assert torch.equal(d1, d2)


# ---------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------


@given(batch=st.integers(0, 50), world=st.integers(1, 8))
def test_shards_are_disjoint_near_equal_and_cover_the_batch(batch: int, world: int) -> None:
    bounds = [shard_bounds(batch, world, r) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == batch
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_shard_bounds_rejects_bad_ranks() -> None:
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        shard_bounds(8, 2, 2)


def test_seeded_shards_of_every_batch() -> None:
    per_rank = [shard_batches(23, 8, seed=5, epoch=2, rank=r, world_size=3) for r in range(3)]
    assert per_rank[0][0].tolist() == shard_batches(23, 8, 5, 2, 0, 3)[0].tolist()  # pure
    batches = [torch.cat([per_rank[r][b] for r in range(3)]) for b in range(3)]
    assert [len(b) for b in batches] == [8, 8, 7]
    assert sorted(torch.cat(batches).tolist()) == list(range(23))  # disjoint, all covered
    other = shard_batches(23, 8, seed=5, epoch=3, rank=0, world_size=3)
    assert other[0].tolist() != per_rank[0][0].tolist()  # a new order each epoch


def test_local_loss_scale_makes_the_average_of_ranks_the_global_mean() -> None:
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    sizes = (5, 3)
    parts = torch.split(losses, sizes)
    averaged = sum(local_loss_scale(len(p), 8, 2) * p.mean() for p in parts) / 2
    assert torch.isclose(averaged, losses.mean())
    assert local_loss_scale(4, 8, 2) == 1.0


# ---------------------------------------------------------------------------------------
# A one-rank process group: buckets, and the data-parallel step as the one-process step
# ---------------------------------------------------------------------------------------


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=30))
    yield
    dist.destroy_process_group()


def test_all_reduce_gradients_keeps_values_shapes_and_order(one_rank_group) -> None:
    from bnlab.manual.distributed import all_reduce_gradients

    grads = [torch.randn(4, 3, 2, 2).contiguous(memory_format=torch.channels_last),
             torch.randn(5, dtype=DT), torch.randn(7), torch.randn(3, 3)]
    for cap in (1e-6, 1e-4, 25.0):  # one tensor per bucket, mixed, all in one
        out = all_reduce_gradients(grads, bucket_cap_mb=cap)
        assert [g.shape for g in out] == [g.shape for g in grads]
        for a, b in zip(out, grads, strict=True):
            assert torch.equal(a, b) and a.dtype == b.dtype


def test_data_parallel_step_on_one_rank_is_the_train_step(one_rank_group) -> None:
    from bnlab.manual import all_cnn_c, train_step
    from bnlab.manual.distributed import convert_sync_batchnorm, data_parallel_train_step
    from bnlab.optim import Adam

    nets = [all_cnn_c(bn=True, width=0.125, dtype=DT, generator=torch.Generator().manual_seed(0))
            for _ in range(2)]
    convert_sync_batchnorm(nets[1])
    opts = [Adam(n.parameters(), lr=1e-2, amsgrad=True) for n in nets]
    x, y = torch.randn(6, 3, 9, 9, dtype=DT), torch.randint(0, 10, (6,))
    loss1, _ = train_step(nets[0], opts[0], x, y)
    loss2, _ = data_parallel_train_step(nets[1], opts[1], x, y, global_batch_size=6)
    assert rel(loss2, loss1) <= 1e-15
    for k, v in nets[0].state_dict().items():
        assert rel(nets[1].state_dict()[k].double(), v.double()) <= 1e-13, k
    with pytest.raises(ValueError, match="at least one example per rank, got 0"):
        data_parallel_train_step(nets[1], opts[1], x[:0], y[:0], global_batch_size=6)


@pytest.mark.parametrize("start", ["torch", "bnlab"])
def test_convert_batchnorm_to_sync_and_back_keeps_identity(start: str) -> None:
    import bnlab.nn as bnn

    bn_cls = torch.nn.BatchNorm2d if start == "torch" else bnn.BatchNorm2d
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), bn_cls(4, momentum=0.3, eps=1e-3))
    model[1].running_mean.add_(1.0)
    model.eval()
    tensors = [id(t) for t in (*model.parameters(), *model.buffers())]
    sync = bnn.convert_batchnorm(model, to="sync")
    assert sync is model and type(model[1]) is bnn.SyncBatchNorm
    assert (model[1].momentum, model[1].eps, model[1].training) == (0.3, 1e-3, False)
    assert [id(t) for t in (*model.parameters(), *model.buffers())] == tensors
    back = bnn.convert_batchnorm(model, to=start)
    assert type(back[1]) is bn_cls and (back[1].momentum, back[1].eps) == (0.3, 1e-3)
    assert [id(t) for t in (*back.parameters(), *back.buffers())] == tensors
    assert back[1].running_mean.eq(1.0).all()
