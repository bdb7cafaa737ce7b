"""Q4 (internal covariate shift): the measurements on cases with a known answer, and the
study end to end on tiny generated data (files, figures, the section drawn from the summary)."""

from __future__ import annotations

import copy
import json
from collections import OrderedDict

import pytest
import torch
from torch import nn

from bnlab.data import load_cifar10_dir
from bnlab.evidence.stats import mean_std, relation
from bnlab.models import AllCNNC
from bnlab.studies import q4
from bnlab.studies.common import StudyContext, StudyScale, read_summary
from tests.cifar_fixtures import write_cifar10_folder
from tests.study_checks import is_png, section_figures

TINY = StudyScale("tiny", width=0.125, epochs=1, subset=None, batch_size=8, lr=1e-3, seeds=1,
                  budget_s=60.0, description="tests: 40 generated images, 1 epoch")


# ---- channel_percentiles -----------------------------------------------------------------

def test_channel_percentiles_match_torch_quantile_per_channel():
    x = torch.randn(6, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    got = q4.channel_percentiles(x, (15, 50, 85))
    flat = x.transpose(0, 1).reshape(3, -1)
    want = torch.quantile(flat, torch.tensor([0.15, 0.5, 0.85]), dim=1).mean(1)
    print("got", got, "want", want.tolist())
    assert got == pytest.approx(want.tolist(), rel=1e-6, abs=1e-6)


def test_channel_percentiles_of_known_channels():
    # channel 0 holds 0..100, channel 1 holds 100..200: the 15th percentiles are 15 and 115
    x = torch.stack([torch.arange(101.0), torch.arange(100.0, 201.0)]).view(1, 2, 101, 1)
    assert q4.channel_percentiles(x, (15, 50, 85)) == pytest.approx([65.0, 100.0, 135.0])


def test_channel_percentiles_on_a_fixed_sample_of_positions():
    x = torch.randn(64, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    exact = q4.channel_percentiles(x)
    sampled = q4.channel_percentiles(x, max_values=16384)
    print("exact", exact, "sampled", sampled)
    # sampling error of a percentile from 16384 normal values: ~0.012; 4 channels averaged
    assert sampled == pytest.approx(exact, abs=0.03)
    assert sampled == q4.channel_percentiles(x, max_values=16384)  # the same positions
    assert sampled != exact


# ---- percentile_drift and compare --------------------------------------------------------

def test_percentile_drift():
    still = [[-1.0, 0.0, 1.0]] * 5
    assert q4.percentile_drift(still) == 0.0
    moved = [[-1.0, 0.0, 1.0], [1.0, 2.0, 3.0]]  # moves by its own width (2)
    assert q4.percentile_drift(moved) == pytest.approx(1.0)
    widened = [[-1.0, 0.0, 1.0], [-3.0, 0.0, 3.0]]  # mean spread 4, largest move 2
    assert q4.percentile_drift(widened) == pytest.approx(0.5)


@pytest.mark.parametrize("a, b, want", [
    ([1.0, 1.1], [2.0, 2.1], "lower"),
    ([2.0, 2.1], [1.0, 1.1], "higher"),
    ([1.0, 2.0], [1.2, 2.2], "within"),
    ([1.0], [2.0], "undetermined"),
])
def test_compare(a, b, want):
    assert relation(mean_std(a), mean_std(b)) == want


# ---- gradient_shift ----------------------------------------------------------------------

class _Scale(nn.Module):
    """y = w * x with a scalar weight, named like a conv so gradient_shift finds it."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([w], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x


def _two_layer(w1: float, w2: float) -> nn.Sequential:
    return nn.Sequential(OrderedDict(conv1=_Scale(w1), conv2=_Scale(w2)))


def _linear_loss(out: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
    return out.sum()


def test_gradient_shift_of_a_known_two_layer_product_sgd():
    # L = w2 * w1 * x: G2 = w1 x; SGD moves w1 by -lr * w2 x, so G2' = (w1 - lr w2 x) x and
    # ||G2 - G2'|| / ||G2|| = lr |w2 x| / |w1|.
    w1, w2, x, lr = 2.0, 3.0, 0.5, 0.1
    model = _two_layer(w1, w2)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    got = q4.gradient_shift(model, opt, torch.tensor([x], dtype=torch.float64), None,
                            layers=(1, 2), loss_fn=_linear_loss)
    want = lr * abs(w2 * x) / abs(w1)
    print("rel_diff", got["2"]["rel_diff"], "want", want)
    assert got["2"]["rel_diff"] == pytest.approx(want, rel=1e-12)
    assert got["2"]["cosine"] == pytest.approx(1.0)
    assert got["1"] == {"rel_diff": 0.0, "cosine": pytest.approx(1.0)}  # nothing before it


def test_gradient_shift_applies_adams_own_update():
    # Adam's first step moves w1 by -lr * g / (|g| + eps) ~ -lr * sign(g): rel = lr / |w1|.
    # A plain SGD step of the same lr would give lr * |w2 x| / |w1| = 15x this.
    w1, w2, x, lr = 2.0, 3.0, 10.0, 0.01
    model = _two_layer(w1, w2)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    got = q4.gradient_shift(model, opt, torch.tensor([x], dtype=torch.float64), None,
                            layers=(2,), loss_fn=_linear_loss)
    print("rel_diff", got["2"]["rel_diff"], "want", lr / w1)
    assert got["2"]["rel_diff"] == pytest.approx(lr / w1, rel=1e-6)


def test_gradient_shift_sign_flip_gives_negative_cosine():
    # lr large enough that w1 - lr * w2 * x changes sign: G2' points the other way
    model = _two_layer(1.0, 1.0)
    opt = torch.optim.SGD(model.parameters(), lr=3.0)
    got = q4.gradient_shift(model, opt, torch.tensor([1.0], dtype=torch.float64), None,
                            layers=(2,), loss_fn=_linear_loss)
    assert got["2"]["cosine"] == pytest.approx(-1.0)
    assert got["2"]["rel_diff"] == pytest.approx(3.0)  # |1 - (1 - 3)| / 1


def test_gradient_shift_leaves_the_model_and_optimizer_alone():
    torch.manual_seed(0)
    model = AllCNNC(norm="torch", width=0.125)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    TFloss = nn.functional.cross_entropy
    TFloss(model(x), y).backward()
    opt.step()
    state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    got = q4.gradient_shift(model, opt, x, y, layers=(2, 5, 8))
    assert set(got) == {"2", "5", "8"}
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    for index, moments in opt.state_dict()["state"].items():
        for key, value in moments.items():
            assert torch.equal(value, opt_state["state"][index][key])
    assert all(0 < got[k]["rel_diff"] < 10 and -1 <= got[k]["cosine"] <= 1 for k in got)


def test_relu_input_percentiles_restore_bn_buffers_and_see_bn_output():
    torch.manual_seed(0)
    model = AllCNNC(norm="torch", width=0.125)
    buffers = copy.deepcopy({k: v for k, v in model.state_dict().items() if "running" in k
                             or "num_batches" in k})
    images = torch.randn(16, 3, 32, 32)
    got = q4.relu_input_percentiles(model, images, layers=(2, 8))
    for key, value in buffers.items():
        assert torch.equal(model.state_dict()[key], value), key
    # fresh BN (gamma 1, beta 0) in training mode: each channel is standardized, so the
    # median is near 0 and the 15th/85th percentiles near -1/+1 (normal-ish)
    p15, p50, p85 = got["2"]
    print("relu2 input percentiles", got["2"])
    assert -1.5 < p15 < -0.6 and abs(p50) < 0.3 and 0.6 < p85 < 1.5


# ---- the study end to end ----------------------------------------------------------------

@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10_folder(root, per_batch=8, test=12)  # 40 training, 12 test images
    out = tmp_path_factory.mktemp("q4")
    ctx = StudyContext(out=out, scale=TINY, seeds=1, device="cpu", quiet=True,
                       log=lambda _: None, dataset=load_cifar10_dir(root))
    summary = q4.run(ctx)
    return out, summary, ctx


def test_study_writes_summary_figures_and_runs(study):
    out, _, _ = study
    stored = read_summary(out)
    for key in ("data", "preset", "seeds", "layers", "drift", "shift", "curves", "verdicts",
                "final_test_acc", "total_steps"):
        assert key in stored, key
    assert stored["preset"] == "tiny" and stored["seeds"] == 1
    assert stored["total_steps"] == 5  # 40 images, batch 8, 1 epoch
    for norm in ("none", "torch"):
        run_dir = out / "runs" / f"{norm}-seed0"
        assert (run_dir / "result.json").is_file() and (run_dir / "probes.jsonl").is_file()
        assert stored["curves"][norm]["percentile_steps"] == [0, 1, 2, 3, 4, 5]
        assert len(stored["curves"][norm]["rel_diff"]["5"][0]) == 6
    # one seed: no spread, so every verdict is inconclusive
    assert stored["verdicts"]["post_distribution"] == "inconclusive"
    for png in ("q4_percentiles.png", "q4_gradient_shift.png"):
        assert is_png(out / png)


def test_section_is_drawn_from_the_summary(study):
    out, _, _ = study
    text = q4.render(out)
    assert text.startswith("## Q4")
    figures = section_figures(text)
    assert len(figures) == 2 and all((out / f).is_file() for _, f in figures)
    assert q4.TITLE in text
    s = json.loads((out / "summary.json").read_text())
    for key in ("none", "torch"):
        assert f"{s['drift'][key]['all']['mean']:.2f}" in text
        assert f"{s['shift'][key]['rel_diff']['all']['mean']:.4f}" in text
    assert s["data"] in text
    assert "Inconclusive at this scale" in text


def test_rerun_reuses_the_runs_and_their_probes(study):
    out, summary, ctx = study
    before = (out / "runs" / "torch-seed0" / "probes.jsonl").read_text()
    again = q4.run(ctx)
    assert (out / "runs" / "torch-seed0" / "probes.jsonl").read_text() == before
    assert again["drift"] == json.loads(json.dumps(summary["drift"]))


def test_run_without_probes_is_refused(study, tmp_path):
    out, _, ctx = study
    import shutil
    shutil.copytree(out / "runs", tmp_path / "runs")
    (tmp_path / "runs" / "none-seed0" / "probes.jsonl").unlink()
    other = StudyContext(out=tmp_path, scale=TINY, seeds=1, device="cpu", quiet=True,
                         log=lambda _: None, dataset=ctx.dataset)
    with pytest.raises(RuntimeError, match="delete that run folder"):
        q4.run(other)
