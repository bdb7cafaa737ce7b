"""precise_bn: every BN layer's running statistics become the exact statistics of its input
over the given batches (BN's unbiased-variance convention), for both engines."""

from __future__ import annotations

import copy

import pytest
import torch

import bnlab.manual as manual
import bnlab.nn as bnn
from bnlab.variants.precise import PooledStats, precise_bn


def data_set(seed: int = 0, n: int = 37, channels: int = 3) -> torch.Tensor:
    """A small data set whose channels have different means and spreads."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.5, 2.0, 5.0][:channels]).view(1, -1, 1, 1)
    shift = torch.tensor([-3.0, 0.0, 100.0][:channels]).view(1, -1, 1, 1)
    return torch.randn(n, channels, 4, 4, generator=gen, dtype=torch.float64) * scale + shift


def uneven_batches(x: torch.Tensor) -> list[torch.Tensor]:
    """Batches of different sizes covering ``x`` once (sizes 5, 11, 2, 16, 3)."""
    sizes = [5, 11, 2, 16, x.shape[0] - 34]
    return list(x.split(sizes))


def exact(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The data set's per-channel mean and unbiased variance."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(1), flat.var(1, unbiased=True)


@pytest.mark.parametrize("layer", [torch.nn.BatchNorm2d, bnn.BatchNorm2d,
                                   lambda c, **kw: bnn.GhostBatchNorm2d(
                                       c, virtual_batch_size=4, **kw),
                                   lambda c, **kw: bnn.BatchRenorm2d(c, **kw)],
                         ids=["torch", "bnlab", "ghost", "renorm"])
def test_covering_batches_give_the_data_sets_statistics(layer):
    x = data_set()
    model = torch.nn.Sequential(layer(3, dtype=torch.float64))
    model.eval()
    for b in uneven_batches(x):  # some training first: the buffers hold something else
        model.train()(b)
    model.eval()
    tracked = int(model[0].num_batches_tracked)
    assert precise_bn(model, uneven_batches(x)) == 5
    mean, var = exact(x)
    print("mean", model[0].running_mean.tolist(), mean.tolist())
    print("var ", model[0].running_var.tolist(), var.tolist())
    assert torch.allclose(model[0].running_mean, mean, rtol=1e-13, atol=0)
    assert torch.allclose(model[0].running_var, var, rtol=1e-13, atol=0)
    assert int(model[0].num_batches_tracked) == tracked  # left as it was
    assert not model.training  # mode restored


def test_not_a_moving_average_of_batch_variances():
    """The spread of the batch means counts (fvcore/swa_utils average per-batch variances)."""
    x = data_set(1)
    x[:10] += 3.0  # batches with different means
    ours = torch.nn.Sequential(torch.nn.BatchNorm2d(3, dtype=torch.float64))
    theirs = copy.deepcopy(ours)
    precise_bn(ours, x.split(10))
    torch.optim.swa_utils.update_bn([b for b in x.split(10)], theirs)
    mean, var = exact(x)
    assert torch.allclose(ours[0].running_mean, mean, rtol=1e-13, atol=0)
    assert torch.allclose(ours[0].running_var, var, rtol=1e-13, atol=0)
    assert (theirs[0].running_var < var * 0.99).any()


@pytest.mark.parametrize("engine", ["autograd", "manual"])
def test_layers_deep_in_a_network(engine):
    """The second BN sees the first's training-mode output, each batch by its own
    statistics: the reference collects those inputs and takes their exact statistics."""
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)
    torch_model = torch.nn.Sequential(
        torch.nn.BatchNorm2d(3, dtype=torch.float64), torch.nn.ReLU(), conv,
        torch.nn.BatchNorm2d(4, dtype=torch.float64))
    x = data_set(3)
    batches = uneven_batches(x)
    # reference: inputs of the last BN in the training-mode forward, collected by hand
    inputs = []
    with torch.no_grad():
        for b in batches:
            h = torch.relu(torch.nn.functional.batch_norm(b, None, None, training=True))
            inputs.append(conv(h))
    mean, var = exact(torch.cat(inputs))
    if engine == "autograd":
        model = torch_model
        assert precise_bn(model, [(b, torch.zeros(len(b))) for b in batches]) == 5
        bn_first, bn_last = model[0], model[3]
    else:
        model = manual.Sequential([
            ("bn1", manual.BatchNorm2d(3, dtype=torch.float64)), ("relu", manual.ReLU()),
            ("conv", manual.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)),
            ("bn2", manual.BatchNorm2d(4, dtype=torch.float64))])
        model["conv"].params["weight"].copy_(conv.weight.detach())
        model["conv"].params["bias"].copy_(conv.bias.detach())
        model.eval()
        assert precise_bn(model, [(b, torch.zeros(len(b))) for b in batches]) == 5
        assert model.training is False
        bn_first = type("L", (), {"running_mean": model["bn1"].buffers["running_mean"],
                                  "running_var": model["bn1"].buffers["running_var"]})
        bn_last = type("L", (), {"running_mean": model["bn2"].buffers["running_mean"],
                                 "running_var": model["bn2"].buffers["running_var"]})
    first_mean, first_var = exact(x)
    assert torch.allclose(bn_first.running_mean, first_mean, rtol=1e-13, atol=0)
    assert torch.allclose(bn_first.running_var, first_var, rtol=1e-13, atol=0)
    assert torch.allclose(bn_last.running_mean, mean, rtol=1e-12, atol=1e-14)
    assert torch.allclose(bn_last.running_var, var, rtol=1e-12, atol=0)


@pytest.mark.parametrize("layer", ["bn", "ghost", "renorm", "per-activation"])
def test_manual_engine_layers(layer):
    x = data_set(4)
    make = {
        "bn": lambda: manual.BatchNorm2d(3, dtype=torch.float64),
        "ghost": lambda: manual.GhostBatchNorm2d(3, virtual_batch_size=3, dtype=torch.float64),
        "renorm": lambda: manual.BatchRenorm2d(3, dtype=torch.float64),
        "per-activation": lambda: manual.PerActivationBatchNorm(3, 4, 4, dtype=torch.float64),
    }[layer]
    net = manual.Sequential([("bn", make())])
    tracked = int(net["bn"].buffers["num_batches_tracked"])
    assert precise_bn(net, uneven_batches(x)) == 5
    if layer == "per-activation":  # every (c, h, w) position is a feature of N values
        flat = x.reshape(x.shape[0], -1)
        mean, var = flat.mean(0), flat.var(0, unbiased=True)
    else:
        mean, var = exact(x)
    assert torch.allclose(net["bn"].buffers["running_mean"], mean, rtol=1e-13, atol=1e-13)
    assert torch.allclose(net["bn"].buffers["running_var"], var, rtol=1e-13, atol=0)
    assert int(net["bn"].buffers["num_batches_tracked"]) == tracked
    assert net["bn"].forward.__func__ is type(net["bn"]).forward  # unpatched


def test_float32_buffers_and_num_batches():
    x = data_set(5).float()
    model = torch.nn.Sequential(bnn.BatchNorm2d(3))
    assert precise_bn(model, uneven_batches(x), num_batches=2) == 2
    mean, var = exact(x[:16].double())
    assert model[0].running_mean.dtype == torch.float32
    assert torch.allclose(model[0].running_mean.double(), mean, rtol=1e-6, atol=1e-6)
    assert torch.allclose(model[0].running_var.double(), var, rtol=1e-5, atol=0)


def test_other_buffers_and_layers_untouched():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.InstanceNorm2d(
        3, track_running_stats=True), torch.nn.BatchNorm2d(3))
    before = copy.deepcopy(model.state_dict())
    precise_bn(model, [data_set(6).float()])
    after = model.state_dict()
    for k, v in before.items():
        changed = not torch.equal(after[k], v)
        assert changed == (k in ("2.running_mean", "2.running_var")), k


def test_errors():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="num_batches must be positive or None, got 0"):
        precise_bn(model, [data_set().float()], num_batches=0)
    with pytest.raises(ValueError, match="no batches were given"):
        precise_bn(model, [])
    assert torch.equal(model[0].running_var, torch.ones(3))  # nothing changed
    assert precise_bn(torch.nn.Sequential(torch.nn.ReLU()), [torch.ones(2, 3)]) == 0


def test_pooled_stats_merge_is_exact():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(50, 2, generator=gen, dtype=torch.float64) * 3 + 7
    s = PooledStats()
    for part in x.split([1, 7, 30, 12]):
        s.add(part)
    assert torch.allclose(s.mean, x.mean(0), rtol=1e-15, atol=0)
    assert torch.allclose(s.var(), x.var(0, unbiased=True), rtol=1e-14, atol=0)
    assert torch.allclose(s.var(unbiased=False), x.var(0, unbiased=False), rtol=1e-14, atol=0)
