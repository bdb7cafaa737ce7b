"""A healthy no-BN baseline: He's init keeps All-CNN-C's signal alive at init on real images,
PyTorch's default with the paper's final ReLU does not; both engines draw the same weights."""

from __future__ import annotations

import math

import pytest
import torch

from bnlab import data as bdata
from bnlab.init_health import MIN_SCALE_RATIO, init_health, init_health_table
from bnlab.initializers import init_conv_
from bnlab.manual import all_cnn_c
from bnlab.models import AllCNNC
from bnlab.plans import all_cnn_c_plan, initial_parameters

SEEDS = (0, 1, 2)
WIDTH = 0.25


@pytest.fixture(scope="module")
def real_images() -> torch.Tensor:
    """256 training images of the embedded CIFAR-10 sample, normalized as training sees them."""
    sample = bdata.load_embedded_sample()
    return bdata.normalize(sample.train_images[:256], channels_last=False)


def signal_alive(health) -> bool:
    """The issue's criterion: no class logit dead for every image, and the last layer's
    activation scale at least 1/10 of the first's."""
    return health.dead_logit_fraction == 0.0 and health.scales[-1] >= health.scales[0] / 10


@pytest.mark.parametrize("seed", SEEDS)
def test_default_init_keeps_the_no_bn_signal_alive(real_images, seed):
    health = init_health(real_images, norm="none", width=WIDTH, seed=seed)  # the defaults
    print(health.init, health.final_relu, [f"{s:.3f}" for s in health.scales],
          f"dead {health.dead_logit_fraction}")
    assert (health.init, health.final_relu) == ("kaiming", False)
    assert len(health.scales) == 9
    assert signal_alive(health) and health.healthy


@pytest.mark.parametrize("seed", SEEDS)
def test_torch_init_with_the_final_relu_kills_logits(real_images, seed):
    """The criterion can fail: PyTorch's default init and the paper's final ReLU fail it."""
    health = init_health(real_images, norm="none", init="torch", final_relu=True,
                         width=WIDTH, seed=seed)
    print([f"{s:.3f}" for s in health.scales], f"dead {health.dead_logit_fraction}")
    assert not signal_alive(health) and not health.healthy
    assert health.dead_logit_fraction > 0  # logits exactly 0 for all 256 images


def test_dead_logits_count_only_logits_zero_for_every_image():
    # a ReLU on scores of one sign: a network whose conv9 is negative everywhere is all dead
    images = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    health = init_health(images, norm="none", final_relu=True, width=0.125)
    model = AllCNNC(norm="none", width=0.125, final_relu=True,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(images)
    assert health.dead_logit_fraction == (logits == 0).all(0).double().mean().item()
    with pytest.raises(ValueError, match=r"\(3, 12, 12\)"):
        init_health(images[0])


def test_table_rows_cover_the_options_with_and_without_bn():
    rows = init_health_table(width=0.125, n_images=32)
    keys = {(r["norm"], r["init"], r["final_relu"]) for r in rows}
    assert ("none", "kaiming", False) in keys and ("none", "torch", True) in keys
    assert {r["norm"] for r in rows} == {"none", "torch"}
    assert all(len(r["scales"]) == 9 and 0.0 <= r["dead_logit_fraction"] <= 1.0 for r in rows)
    assert all(r["healthy"] == (r["dead_logit_fraction"] == 0 and r["scale_ratio"]
                                >= MIN_SCALE_RATIO) for r in rows)
    with pytest.raises(ValueError, match="n_images"):
        init_health_table(n_images=0)


# ---- the initializer itself and the engines' shared draw ---------------------------------------


def test_kaiming_is_he_normal_with_zero_biases():
    weight, bias = torch.empty(256, 192, 3, 3), torch.full((256,), 7.0)
    init_conv_(weight, bias, "kaiming", torch.Generator().manual_seed(0))
    fan_in = 192 * 9
    std = math.sqrt(2.0 / fan_in)  # He et al. 2015, eq. 10
    print(f"std {weight.std().item():.5f} vs {std:.5f}, mean {weight.mean().item():.2e}")
    # 442,368 draws: the sample std is within 0.5% of sigma (its own std is sigma/sqrt(2n))
    assert abs(weight.std().item() / std - 1) < 5e-3
    assert abs(weight.mean().item()) < 5 * std / math.sqrt(weight.numel())
    assert torch.equal(bias, torch.zeros(256))
    with pytest.raises(ValueError, match="'xavier'"):
        init_conv_(weight, bias, "xavier")


@pytest.mark.parametrize("scheme", ["kaiming", "torch"])
@pytest.mark.parametrize("bn", [True, False])
def test_both_engines_draw_identical_initial_weights(scheme, bn):
    norm = "torch" if bn else "none"
    model = AllCNNC(norm=norm, width=WIDTH, init_scheme=scheme,
                    generator=torch.Generator().manual_seed(4))
    net = all_cnn_c(bn=bn, width=WIDTH, init_scheme=scheme,
                    generator=torch.Generator().manual_seed(4))
    drawn = initial_parameters(all_cnn_c_plan(bn, width=WIDTH), scheme,
                               torch.Generator().manual_seed(4))
    theirs, ours = model.state_dict(), net.state_dict()
    assert drawn and set(drawn) <= set(theirs)
    for key, value in drawn.items():
        assert torch.equal(theirs[key], value) and torch.equal(ours[key], value), key


def test_torch_scheme_is_nn_conv2d_default_from_the_global_seed():
    torch.manual_seed(3)
    model = AllCNNC(norm="none", width=0.125, init_scheme="torch")
    torch.manual_seed(3)
    convs = [torch.nn.Conv2d(**s.args) for s in all_cnn_c_plan(False, width=0.125)
             if s.kind == "conv"]
    mine = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    for a, b in zip(mine, convs, strict=True):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_report_shows_the_table_from_the_folder_alone(tmp_path):
    from bnlab.report import init_health_section
    from bnlab.runs import atomic_write_json

    assert init_health_section(tmp_path) == ""
    rows = init_health_table(width=0.125, n_images=16)
    atomic_write_json(tmp_path / "init_health.json",
                      {"data": "sample", "images": 16, "width": 0.125, "seed": 0, "rows": rows})
    text = init_health_section(tmp_path)
    print(text)
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| BN | init | final ReLU | dead logits | conv1 |")
    assert len(table) == 1 + len(rows)
    assert f"{rows[3]['dead_logit_fraction']:.0%}" in table[4]


def test_the_table_is_computed_once_per_process_and_handed_out_as_copies():
    first = init_health_table(width=0.125, n_images=16)
    first[0]["dead_logit_fraction"] = -1.0  # a caller's edit must not reach the next caller
    second = init_health_table(width=0.125, n_images=16)
    assert second[0]["dead_logit_fraction"] >= 0.0 and second is not first
    assert init_health_table(width=0.125, n_images=8) != second  # other arguments, other rows
