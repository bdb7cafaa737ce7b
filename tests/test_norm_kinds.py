"""All-CNN-C with every normalization kind (bn, renorm, ghost, group, none) in both engines.

The trainer builds each kind from one plan (bnlab.plans.all_cnn_c_plan): the same layer
names, the same initial weights, and in float64 the same losses, gradients and running
statistics whichever engine computes them.
"""

from __future__ import annotations

import json

import pytest
import torch

from bnlab import manual, plans
from bnlab import nn as bnn
from bnlab import train as T
from bnlab.cases import case_config
from bnlab.data import load_cifar10_dir
from bnlab.manual import norms as manual_norms
from tests.cifar_fixtures import write_cifar10_folder

# width 0.125: 12 and 24 channels, so GroupNorm's default is gcd(32, C) = 4 and 8 groups;
# ghost batches of 3 in a batch of 8 leave an uneven last one (3 + 3 + 2).
TINY = {"width": 0.125, "epochs": 1, "batch_size": 8, "device": "cpu", "eval_batch_size": 16,
        "lr": 1e-3, "lr_schedule": "constant", "augment": False, "channels_last": False,
        "virtual_batch_size": 3, "renorm_rmax": 1.5, "renorm_dmax": 0.5}

# kind → (TrainConfig fields, the autograd layer class, the manual layer class)
KINDS = {
    "bn": ({"norm": "bnlab", "norm_kind": "bn"}, bnn.BatchNorm2d, manual.BatchNorm2d),
    "renorm": ({"norm": "bnlab", "norm_kind": "renorm"}, bnn.BatchRenorm2d,
               manual_norms.BatchRenorm2d),
    "ghost": ({"norm": "bnlab", "norm_kind": "ghost"}, bnn.GhostBatchNorm2d,
              manual_norms.GhostBatchNorm2d),
    "group": ({"norm": "bnlab", "norm_kind": "group"}, bnn.GroupNorm, manual_norms.GroupNorm),
    "group-torch": ({"norm": "torch", "norm_kind": "group"}, torch.nn.GroupNorm, None),
    "none": ({"norm": "none"}, None, None),
}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10_folder(root, per_batch=8, test=12)  # 40 training, 12 test images
    return load_cifar10_dir(root)


def _config(engine: str, fields: dict, **overrides) -> T.TrainConfig:
    impl = {"optimizer_impl": "bnlab"} if engine == "manual" else {}
    return T.TrainConfig(engine=engine, **{**TINY, **fields, **impl, **overrides}).validate()


def _batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64),
            torch.randint(0, 10, (n,), generator=g))


def _autograd_grads(model: T.Model) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.module.named_parameters()}


def _assert_close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    # float64: the two engines sum in different orders, so rounding differs at ~1e-16
    # relative per operation; a few hundred operations deep stays far below 1e-10.
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    print(f"{name}: max abs err {err:.2e} (scale {scale:.2e})")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "group-torch"])
def test_engines_agree_in_float64(kind):
    """Equal initial weights, then equal losses, gradients and buffers for two steps."""
    fields, autograd_cls, manual_cls = KINDS[kind]
    auto = T.Model(_config("autograd", fields, precision="fp64"), torch.device("cpu"))
    hand = T.Model(_config("manual", fields, precision="fp64"), torch.device("cpu"))
    if autograd_cls is not None:
        assert type(auto.module.bn1) is autograd_cls
        assert type(hand.network.layers["bn1"]) is manual_cls
    else:
        assert not any(name.startswith("bn") for name in auto.module.state_dict())
    start_auto, start_hand = auto.state_dict()["model"], hand.state_dict()["model"]
    assert list(start_auto) == list(start_hand)
    for key in start_auto:
        assert torch.equal(start_auto[key], start_hand[key]), key
    for step in range(2):
        x, y = _batch(seed=step)
        loss_auto, logits_auto = auto.step(x, y)
        loss_hand, logits_hand = hand.step(x, y)
        _assert_close(f"step {step} loss", loss_hand, loss_auto)
        _assert_close(f"step {step} logits", logits_hand, logits_auto)
        grads_hand = hand.network.named_gradients()
        for name, grad in _autograd_grads(auto).items():
            _assert_close(f"step {step} d{name}", grads_hand[name], grad)
        state_hand = hand.state_dict()["model"]
        for name, value in auto.state_dict()["model"].items():
            if value.is_floating_point():
                _assert_close(f"step {step} {name}", state_hand[name], value)
            else:
                assert torch.equal(state_hand[name], value), name
    x, y = _batch(seed=9)
    eval_auto, eval_hand = auto.evaluate(x, y), hand.evaluate(x, y)
    _assert_close("eval loss", eval_hand[0], eval_auto[0])


def test_torch_groupnorm_matches_bnlab_groupnorm():
    """norm 'torch' builds torch.nn.GroupNorm: the same numbers as bnlab's hand-derived one."""
    torch_model = T.Model(_config("autograd", KINDS["group-torch"][0], precision="fp64"),
                          torch.device("cpu"))
    bnlab_model = T.Model(_config("autograd", KINDS["group"][0], precision="fp64"),
                          torch.device("cpu"))
    assert type(torch_model.module.bn1) is torch.nn.GroupNorm
    assert torch_model.module.bn1.num_groups == plans.default_num_groups(12) == 4
    x, y = _batch()
    loss_torch, _ = torch_model.step(x, y)
    loss_bnlab, _ = bnlab_model.step(x, y)
    _assert_close("loss", loss_bnlab, loss_torch)
    grads = _autograd_grads(bnlab_model)
    for name, grad in _autograd_grads(torch_model).items():
        _assert_close(f"d{name}", grads[name], grad)


def test_options_reach_the_layers():
    groups = T.Model(_config("manual", KINDS["group"][0], num_groups=2), torch.device("cpu"))
    assert [layer.num_groups for name, layer in groups.network
            if name.startswith("bn")] == [2] * 8
    renorm = T.Model(_config("autograd", KINDS["renorm"][0], renorm_warmup_steps=7),
                     torch.device("cpu"))
    layer = renorm.module.bn3
    assert (layer.rmax, layer.dmax, layer.warmup_steps) == (1.5, 0.5, 7)
    ghost = T.Model(_config("manual", KINDS["ghost"][0]), torch.device("cpu"))
    assert ghost.network.layers["bn8"].virtual_batch_size == 3


@pytest.mark.parametrize("engine", ["autograd", "manual"])
@pytest.mark.parametrize("kind", ["renorm", "ghost", "group"])
def test_each_kind_trains_and_its_config_round_trips(tiny_data, tmp_path, engine, kind):
    config = _config(engine, KINDS[kind][0], seed=1)
    result = T.train(config, tmp_path / "run", dataset=tiny_data, progress=False,
                     log=lambda _: None)
    assert result.status == "finished" and len(result.metrics) == 1
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["norm_kind"] == kind
    assert (saved["virtual_batch_size"], saved["renorm_rmax"]) == (3, 1.5)
    assert T.TrainConfig.from_json(saved) == config


def test_an_old_config_json_loads_as_bn():
    """config.json written before norm_kind existed: BN, with the options' defaults."""
    old = {k: v for k, v in case_config("b", "quick").to_json().items()
           if k not in ("norm_kind", "num_groups", "virtual_batch_size", "renorm_rmax",
                        "renorm_dmax", "renorm_warmup_steps")}
    config = T.TrainConfig.from_json(old).validate()
    assert (config.norm_kind, config.num_groups, config.virtual_batch_size) == ("bn", None, 32)


@pytest.mark.parametrize("case", ["b-renorm", "b-ghost", "b-group"])
def test_variant_cases(case):
    config = case_config(case, "quick")
    assert config.norm_kind == case.removeprefix("b-")
    assert (config.engine, config.norm, config.optimizer) == ("autograd", "bnlab", "adam")


BAD = {
    "unknown kind": ({"norm": "bnlab", "norm_kind": "layer"}, "norm_kind must be one of"),
    "kind none": ({"norm": "bnlab", "norm_kind": "none"}, "norm 'none'"),
    "kind without a norm": ({"norm": "none", "norm_kind": "group"}, "got norm 'none'"),
    "torch renorm": ({"norm": "torch", "norm_kind": "renorm"}, "torch has no layer"),
    "torch ghost": ({"norm": "torch", "norm_kind": "ghost"}, "torch has no layer"),
    "post net": ({"norm": "bnlab", "norm_kind": "group", "arch": "post"}, "arch 'allcnn'"),
    "bias correction": ({"norm": "bnlab", "norm_kind": "ghost", "bn_bias_correction": True},
                        "norm_kind 'bn'"),
    "groups zero": ({"norm": "bnlab", "norm_kind": "group", "num_groups": 0}, "num_groups"),
    "groups not dividing": ({"norm": "bnlab", "norm_kind": "group", "num_groups": 5},
                            "5 does not divide 12"),
    "virtual batch zero": ({"virtual_batch_size": 0}, "virtual_batch_size"),
    "virtual batch float": ({"virtual_batch_size": 2.5}, "2.5"),
    "rmax": ({"renorm_rmax": 0.5}, "renorm_rmax"),
    "dmax": ({"renorm_dmax": -1.0}, "renorm_dmax"),
    "warmup": ({"renorm_warmup_steps": -3}, "renorm_warmup_steps"),
}


@pytest.mark.parametrize("case", BAD, ids=BAD.keys())
def test_bad_norm_config_is_refused(case):
    fields, message = BAD[case]
    with pytest.raises(T.ConfigError, match=message) as info:
        T.TrainConfig(**{**TINY, **fields}).validate()
    assert "\n" not in str(info.value)


def test_plan_errors():
    with pytest.raises(ValueError, match="'batch'"):
        plans.all_cnn_c_plan(norm="batch")
    with pytest.raises(ValueError, match="virtual_batch_size"):
        plans.all_cnn_c_plan(norm="ghost")
    with pytest.raises(ValueError, match="7 does not divide"):
        plans.all_cnn_c_plan(norm="group", norm_options={"num_groups": 7})
    names = [s.name for s in plans.all_cnn_c_plan(norm="ghost",
                                                  norm_options={"virtual_batch_size": 4})]
    assert names == [s.name for s in plans.all_cnn_c_plan()]
    assert plans.all_cnn_c_plan(norm="none") == plans.all_cnn_c_plan(bn=False)
