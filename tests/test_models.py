"""All-CNN-C as the paper's Table 2 describes it, in both engines, with the same weights."""

from __future__ import annotations

import pytest
import torch

from bnlab import nn as bnn
from bnlab.manual import MIN_INPUT_SIZE, all_cnn_c, all_cnn_c_plan
from bnlab.models import AllCNNC, Dropout
from tests.helpers import single_thread  # noqa: F401 (an autouse fixture)


def convs(model: torch.nn.Module) -> list[torch.nn.Conv2d]:
    return [m for m in model if isinstance(m, torch.nn.Conv2d)]


def test_architecture_is_table_2_model_c():
    model = AllCNNC(norm="none", final_relu=True)
    got = [
        (c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0])
        for c in convs(model)
    ]
    assert got == [
        (3, 96, 3, 1, 1), (96, 96, 3, 1, 1), (96, 96, 3, 2, 1),
        (96, 192, 3, 1, 1), (192, 192, 3, 1, 1), (192, 192, 3, 2, 1),
        (192, 192, 3, 1, 0), (192, 192, 1, 1, 0), (192, 10, 1, 1, 0),
    ]
    # ReLU after every conv, the last one included; then global average pooling
    names = [n for n, _ in model.named_children()]
    assert [n for n in names if n.startswith("relu")] == [f"relu{i}" for i in range(1, 10)]
    assert names[-4:] == ["conv9", "relu9", "pool", "flatten"]
    # 1,369,738 parameters (weights 1,368,000 + biases 1,738)
    assert sum(p.numel() for p in model.parameters()) == 1_369_738
    # bnlab's default leaves the class scores unrectified (no dead logits), nothing else
    default = [n for n, _ in AllCNNC(norm="none").named_children()]
    assert default == [n for n in names if n != "relu9"]


def test_final_map_is_6x6_for_32x32_input():
    model = AllCNNC(norm="torch", width=0.125)
    seen = {}

    def record(module, inputs, output) -> None:
        seen["shape"] = inputs[0].shape

    model.pool.register_forward_hook(record)
    out = model(torch.randn(2, 3, 32, 32))
    assert seen["shape"] == (2, 10, 6, 6) and out.shape == (2, 10)


def test_smallest_input():
    model = AllCNNC(width=0.125)
    assert model(torch.randn(1, 3, MIN_INPUT_SIZE, MIN_INPUT_SIZE)).shape == (1, 10)
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 3, MIN_INPUT_SIZE - 1, MIN_INPUT_SIZE - 1))


@pytest.mark.parametrize(
    "norm, bn_type",
    [("torch", torch.nn.BatchNorm2d), ("bnlab", bnn.BatchNorm2d), ("manual", bnn.BatchNorm2d)],
)
def test_norm_choice_and_conv_bias(norm, bn_type):
    model = AllCNNC(norm=norm, width=0.5)
    bns = [m for m in model if isinstance(m, torch.nn.modules.batchnorm._NormBase)]
    assert len(bns) == 8 and all(type(b) is bn_type for b in bns)
    # conv bias only where no BN follows: conv9 alone
    assert [c.bias is not None for c in convs(model)] == [False] * 8 + [True]
    names = [n for n, _ in model.named_children()]
    for i in range(1, 9):
        assert names.index(f"bn{i}") == names.index(f"conv{i}") + 1
        assert names.index(f"relu{i}") == names.index(f"bn{i}") + 1
    plain = AllCNNC(norm="none", width=0.5)
    assert all(c.bias is not None for c in convs(plain))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._NormBase) for m in plain)


def test_width_rounds_channel_counts():
    for width, small, big in ((0.5, 48, 96), (0.125, 12, 24), (0.3, 29, 58), (2.0, 192, 384)):
        outs = [c.out_channels for c in convs(AllCNNC(width=width))]
        assert outs == [small] * 3 + [big] * 5 + [10], width
    assert convs(AllCNNC(width=0.25, num_classes=100))[-1].out_channels == 100


def test_dropout_placement():
    plan = all_cnn_c_plan(bn=True, dropout=True)
    names = [s.name for s in plan]
    assert names[0] == "drop1" and plan[0].args["p"] == 0.2
    assert names.index("drop2") == names.index("relu3") + 1
    assert names.index("drop3") == names.index("relu6") + 1
    assert [s.args["p"] for s in plan if s.kind == "dropout"] == [0.2, 0.5, 0.5]
    model = AllCNNC(dropout=True, width=0.125)
    assert [m.p for m in model if isinstance(m, Dropout)] == [0.2, 0.5, 0.5]
    model.eval()
    x = torch.randn(2, 3, 12, 12)
    assert torch.equal(model(x), model(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="norm must be one of"):
        AllCNNC(norm="batch")
    with pytest.raises(ValueError, match="width must be positive"):
        AllCNNC(width=0)
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.5)


@pytest.mark.parametrize("bn", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_seed_same_weights_in_both_engines(bn, dtype):
    norm = "torch" if bn else "none"
    torch.manual_seed(123)
    model = AllCNNC(norm=norm, width=0.25, dtype=dtype)
    torch.manual_seed(123)
    net = all_cnn_c(bn=bn, width=0.25, dtype=dtype)
    theirs, ours = model.state_dict(), net.state_dict()
    assert list(theirs) == list(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
    # a generator gives the same weights too, whatever the global RNG does meanwhile
    model = AllCNNC(norm=norm, width=0.25, dtype=dtype, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(0)
    net = all_cnn_c(bn=bn, width=0.25, dtype=dtype, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in net.state_dict().items())


def test_same_outputs_in_both_engines_channels_last_float32():
    gen = torch.Generator().manual_seed(1)
    model = AllCNNC(norm="bnlab", dropout=True, width=0.25, generator=gen,
                    dropout_generator=torch.Generator().manual_seed(3))
    net = all_cnn_c(bn=True, dropout=True, width=0.25,
                    dropout_generator=torch.Generator().manual_seed(3))
    net.load_state_dict(model.state_dict())
    model.to(memory_format=torch.channels_last)
    net.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 16, 16, generator=gen).contiguous(memory_format=torch.channels_last)
    expected = model(x)
    with torch.no_grad():
        got = net.forward(x)
    # float32: ~1e-7 relative per operation, a few hundred accumulated terms per output
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)
