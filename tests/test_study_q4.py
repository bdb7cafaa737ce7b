"""Q4 (internal covariate shift): the measurements, the noise and the verdicts on cases with
a known answer, and the study end to end on tiny generated data (files, figures, the section
drawn from the summary)."""

from __future__ import annotations

import copy
import doctest
import json
from collections import OrderedDict

import pytest
import torch
from torch import nn

from bnlab.data import load_cifar10_dir
from bnlab.evidence.stats import VERDICTS, mean_std, relation
from bnlab.models import AllCNNC
from bnlab.studies import q4
from bnlab.studies.common import SCALES, StudyContext, StudyScale, read_summary
from bnlab.studies.q4 import analysis, plan
from bnlab.studies.q4 import measures as q4_measures
from bnlab.studies.q4.noise import NoiseSpec, injected_bn_noise, noisy_output
from tests.cifar_fixtures import write_cifar10_folder
from tests.study_checks import is_png, section_figures

TINY = StudyScale("tiny", width=0.125, epochs=1, subset=None, batch_size=8, lr=1e-3, seeds=2,
                  budget_s=60.0, description="tests: 40 generated images, 1 epoch",
                  headline_seeds=2, tune_points=2, tune_seeds=1)


def test_the_plan_modules_doctests():
    for module in (plan, q4_measures):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_probes_are_sparse_in_short_runs_and_about_fixed_in_number_in_long_ones():
    assert plan.probe_every(5) == {"percentile": 4, "shift": 8, "smooth": 16}
    every = plan.probe_every(2054)
    assert {k: 2054 // v for k, v in every.items()} == plan.PROBE_POINTS


def test_drift_plan_reaches_2000_sgd_steps_at_standard_scale():
    standard = q4.drift_plan(SCALES["standard"], 5085, 64)
    assert standard.total_steps >= 2000
    assert standard.total_steps == standard.epochs * (5085 // standard.batch_size)
    assert standard.lr == pytest.approx(0.02 * standard.batch_size / 64)
    quick = q4.drift_plan(SCALES["quick"], 1500, 64)
    assert (quick.epochs, quick.min_steps, quick.width) == (5, 0, 0.125)  # as many as fit
    paper = q4.drift_plan(SCALES["paper"], 50000, 128)
    assert paper.total_steps >= 2000 and paper.width == 1.0


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


def test_layer_percentiles_before_and_after_bn():
    torch.manual_seed(0)
    images = torch.randn(16, 3, 32, 32) * 3.0 + 2.0
    with_bn = q4.layer_percentiles(AllCNNC(norm="torch", width=0.125), images, layers=(2,))
    without = q4.layer_percentiles(AllCNNC(norm="none", width=0.125), images, layers=(2,))
    print("BN: before", with_bn["pre_bn"]["2"], "after", with_bn["relu_input"]["2"])
    # without BN the conv output is the ReLU input; with BN, BN standardizes it in between
    assert without["pre_bn"] == without["relu_input"]
    assert with_bn["pre_bn"]["2"] != pytest.approx(with_bn["relu_input"]["2"], abs=0.05)
    p15, _, p85 = with_bn["relu_input"]["2"]
    assert -1.5 < p15 < -0.6 and 0.6 < p85 < 1.5


class _Square(nn.Module):
    """out = w * x with one scalar weight: with L = out^2 / 2 the loss is quadratic in w."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.conv1 = _Scale(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)


def _half_square(out: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out ** 2).sum()


def test_smoothness_along_gradient_of_a_known_quadratic():
    # L(w) = w^2 x^2 / 2 with w = 1, x = 2: g = w x^2 = 4, curvature x^2 = 4. At
    # eta = k * 0.025 for k = 0.5, 1, 2, 4: w' = 1 - 4 eta = 0.95, 0.9, 0.8, 0.6,
    # L(w') = 2 w'^2, so the loss range is 2 (1 - 0.36) = 1.28; the gradient changes by
    # eta g x^2 = 1.6 at most; the gradient's Lipschitz constant along g is x^2 = 4.
    model = _Square(1.0)
    got = q4.smoothness_along_gradient(model, torch.tensor([2.0], dtype=torch.float64), None,
                                       lr=0.025, loss_fn=_half_square)
    print(got)
    assert got["loss_range"] == pytest.approx(1.28, rel=1e-12)
    assert got["grad_change"] == pytest.approx(1.6, rel=1e-12)
    assert got["beta"] == pytest.approx(4.0, rel=1e-12)
    assert got["grad_norm"] == pytest.approx(4.0) and got["grad_change_rel"] == pytest.approx(0.4)
    assert model.conv1.weight.item() == 1.0  # the measured module is not moved
    with pytest.raises(ValueError, match="got lr 0"):
        q4.smoothness_along_gradient(model, torch.ones(1), None, lr=0, loss_fn=_half_square)


def test_smoothness_on_all_cnn_c_with_bn_leaves_it_alone():
    torch.manual_seed(0)
    model = AllCNNC(norm="torch", width=0.125)
    state = copy.deepcopy(model.state_dict())
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8)
    got = q4.smoothness_along_gradient(model, x, y, lr=0.01)
    print(got)
    assert all(v > 0 for v in got.values())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


# ---- the injected noise ------------------------------------------------------------------

def test_noisy_output_draws_a_scale_and_shift_per_channel_in_range():
    spec = NoiseSpec(scale_spread=0.5, shift_spread=1.0)
    g = torch.Generator().manual_seed(0)
    zeros, ones = torch.zeros(4, 64, 3, 3), torch.ones(4, 64, 3, 3)
    shift = noisy_output(zeros, spec, g)           # = b
    g.manual_seed(0)
    both = noisy_output(ones, spec, g)             # = s + b, the same draw
    scale = both - shift
    assert torch.equal(shift, shift[:1, :, :1, :1].expand_as(shift))  # constant per channel
    assert shift.abs().max() <= 1.0 and shift.std() > 0.3
    assert scale.min() >= 0.5 - 1e-6 and scale.max() <= 1.5 + 1e-6 and scale.std() > 0.15
    with pytest.raises(ValueError, match=r"got 1\.0, 0\.5"):
        NoiseSpec(scale_spread=1.0, shift_spread=0.5)


def test_noise_only_while_injected_only_in_training_and_new_every_step(tmp_path):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(8)
    x = torch.randn(4, 8, 5, 5)
    clean = bn(x)
    with injected_bn_noise(NoiseSpec(), seed=1, run_dir=tmp_path / "run"):
        first, second = bn(x), bn(x)
        bn.eval()
        evaluated = bn(x)
    reference = bn(x)  # eval mode, the same running statistics, no hook
    bn.train()
    after = bn(x)
    assert not torch.allclose(first, clean) and not torch.allclose(first, second)
    assert torch.equal(evaluated, reference)  # no noise in evaluation mode
    assert torch.allclose(after, clean, atol=1e-6)  # the hook is gone
    saved = json.loads((tmp_path / "run" / "noise.json").read_text())
    assert saved["scale_spread"] == 0.5 and saved["seed"] == 1


# ---- the verdicts on synthetic measurements ----------------------------------------------

def _curves(drift_scale: float, shift: float, smooth: float, seeds=(0, 1, 2)) -> dict:
    """One network's curves: percentiles that move by ``drift_scale`` spreads, a gradient
    shift of ``shift`` and smoothness measures of ``smooth``, a little different per seed."""
    def series(k: int) -> list[list[float]]:
        move = drift_scale * 2.0 * (1 + 0.02 * k)
        return [[-1.0, 0.0, 1.0], [-1.0 + move, move, 1.0 + move]]
    layers = ("2", "5", "8")
    return {
        "seed_list": list(seeds),
        "pre_bn": {i: [series(k) for k in seeds] for i in layers},
        "relu_input": {i: [series(k) for k in seeds] for i in layers},
        "rel_diff": {i: [[shift * (1 + 0.01 * k)] * 3 for k in seeds] for i in layers},
        "cosine": {i: [[0.9] * 3 for _ in seeds] for i in layers},
        "smooth": {m: [[smooth * (1 + 0.01 * k)] * 3 for k in seeds]
                   for m in ("loss_range", "grad_change", "beta")},
    }


def _accuracies(values: dict[str, list[float]]) -> dict[str, dict[int, float]]:
    return {k: dict(enumerate(v)) for k, v in values.items()}


@pytest.mark.parametrize("bn, noisy, want", [
    # BN's drift a fifth of no BN's, gradient shift 3x, smoothness a tenth; noisy BN = BN
    ((0.1, 0.3, 0.1), (0.80, 0.805, 0.79), {
        "post_distribution_relu_input": "supported", "santurkar_noise": "supported",
        "santurkar_noise_vs_bn": "supported", "santurkar_ics": "supported",
        "santurkar_smoothness_beta": "supported"}),
    # the other way round everywhere: noisy BN below no BN, far below BN
    ((1.0, 0.01, 10.0), (0.55, 0.556, 0.548), {
        "post_distribution_relu_input": "contradicted", "santurkar_noise": "contradicted",
        "santurkar_noise_vs_bn": "contradicted", "santurkar_ics": "contradicted",
        "santurkar_smoothness_beta": "contradicted"}),
])
def test_verdicts_on_synthetic_measurements_with_known_answers(bn, noisy, want):
    drift, shift, smooth = bn
    curves = {"none": _curves(0.5, 0.1, 1.0), "torch": _curves(drift, shift, smooth)}
    summary = analysis.drift_statistics(curves)
    acc = _accuracies({"none": [0.60, 0.61, 0.59], "torch": [0.80, 0.81, 0.795],
                       "noisy": list(noisy)})
    summary["noisy"] = analysis.noisy_statistics(acc, acc)
    got = analysis.verdicts(summary)
    print({k: (v["verdict"], v["difference"]["mean"]) for k, v in got.items()})
    for key, word in want.items():
        assert got[key]["verdict"] == word, key
    assert all(v["verdict"] in VERDICTS for v in got.values())


def test_noisy_bn_level_with_no_bn_is_inconclusive_not_contradicted():
    acc = _accuracies({"none": [0.60, 0.61, 0.59], "torch": [0.80, 0.81, 0.795],
                       "noisy": [0.60, 0.603, 0.598]})
    summary = analysis.drift_statistics({"none": _curves(0.5, 0.1, 1.0),
                                         "torch": _curves(0.1, 0.3, 0.1)})
    summary["noisy"] = analysis.noisy_statistics(acc, acc)
    assert analysis.verdicts(summary)["santurkar_noise"]["verdict"] == "inconclusive"


def test_verdicts_with_one_seed_are_inconclusive():
    curves = {"none": _curves(0.5, 0.1, 1.0, seeds=(0,)),
              "torch": _curves(0.1, 0.3, 0.1, seeds=(0,))}
    summary = analysis.drift_statistics(curves)
    acc = _accuracies({"none": [0.6], "torch": [0.8], "noisy": [0.8]})
    summary["noisy"] = analysis.noisy_statistics(acc, acc)
    assert {v["verdict"] for v in analysis.verdicts(summary).values()} == {"inconclusive"}


# ---- the study end to end ----------------------------------------------------------------

@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10_folder(root, per_batch=8, test=12)  # 40 training, 12 test images
    out = tmp_path_factory.mktemp("q4")
    ctx = StudyContext(out=out, scale=TINY, seeds=2, device="cpu", quiet=True,
                       log=lambda _: None, dataset=load_cifar10_dir(root))
    summary = q4.run(ctx)
    return out, summary, ctx


def _walk_verdicts(value, key=""):
    """Every value under a key named "verdict" (as the acceptance check reads them)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk_verdicts(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _walk_verdicts(v, key)
    elif key == "verdict":
        yield value


def test_study_writes_summary_figures_and_runs(study):
    out, _, _ = study
    stored = read_summary(out)
    for key in ("data", "preset", "seed_list", "layers", "drift", "shift", "smoothness", "curves",
                "verdicts", "noisy", "drift_plan"):
        assert key in stored, key
    assert stored["preset"] == "tiny" and stored["seed_list"] == [0, 1]
    assert stored["drift_plan"]["total_steps"] == 5  # 40 images, batch 8, 1 epoch
    for norm in ("none", "torch"):
        for seed in (0, 1):
            run_dir = out / "runs" / f"drift-{norm}-sgd-s{seed}"
            assert (run_dir / "result.json").is_file() and (run_dir / "probes.jsonl").is_file()
            config = json.loads((run_dir / "config.json").read_text())
            assert config["optimizer"] == "sgd" and config["lr"] == pytest.approx(0.02 * 8 / 64)
        curve = stored["curves"][norm]
        # 5 steps: percentiles every 4 steps, the gradient probes every 8 and 16 (step 0)
        assert curve["relu_input_steps"] == [0, 4] and curve["smooth_steps"] == [0]
        assert len(curve["pre_bn"]["5"]) == 2 and len(curve["pre_bn"]["5"][0]) == 2
        assert len(curve["rel_diff"]["5"][0]) == 1 and len(curve["smooth"]["beta"][0]) == 1
    # the noisy-BN experiment: the headline seeds, BN + noise at BN's tuned rate, noise.json
    noisy = stored["noisy"]
    assert noisy["seed_list"] == [0, 1] and noisy["lr"]["noisy"] == noisy["lr"]["torch"]
    assert noisy["lr"]["torch"] == noisy["tuning"]["torch"]["best"]
    assert noisy["final_test_acc"]["noisy"]["n"] == 2
    noise_runs = sorted((out / "runs").glob("noisy-*"))
    assert len(noise_runs) == 2 and all((r / "noise.json").is_file() for r in noise_runs)
    words = list(_walk_verdicts(stored))
    assert len(words) == 7 and set(words) <= set(VERDICTS)
    for png in ("q4_noisy_bn.png", "q4_percentiles.png", "q4_gradient_shift.png",
                "q4_smoothness.png"):
        assert is_png(out / png)


def test_the_noise_changes_the_run_and_nothing_else_does(study):
    out, _, _ = study
    lr = read_summary(out)["noisy"]["lr"]["torch"]
    plain = out / "runs" / f"torch-adam-lr{lr:.3g}-s0"
    noisy = out / "runs" / f"noisy-adam-lr{lr:.3g}-s0"
    a, b = (json.loads((r / "config.json").read_text()) for r in (plain, noisy))
    assert {k for k in a if a[k] != b[k]} == {"case"}  # same config: the noise is the change
    la, lb = ((r / "metrics.jsonl").read_text().splitlines()[-1] for r in (plain, noisy))
    assert json.loads(la)["train_loss"] != json.loads(lb)["train_loss"]


def test_section_is_drawn_from_the_summary(study):
    out, _, _ = study
    text = q4.render(out)
    assert text.startswith("## Q4")
    figures = section_figures(text)
    assert len(figures) == 4 and all((out / f).is_file() for _, f in figures)
    assert q4.TITLE in text
    s = json.loads((out / "summary.json").read_text())
    for key in ("none", "torch"):
        assert f"{s['drift']['relu_input'][key]['all']['mean']:.2f}" in text
        assert f"{s['shift'][key]['rel_diff']['all']['mean']:.4f}" in text
        assert f"{s['smoothness'][key]['beta']['mean']:.4f}" in text
    assert f"{s['drift']['pre_bn']['torch']['all']['mean']:.2f}" in text
    assert s["data"] in text and "Santurkar" in text and "at full scale" in text
    for entry in s["verdicts"].values():
        assert f"Verdict: {entry['verdict']}." in text


def test_rerun_reuses_the_runs_and_their_probes(study):
    out, summary, ctx = study
    before = (out / "runs" / "drift-torch-sgd-s0" / "probes.jsonl").read_text()
    again = q4.run(ctx)
    assert (out / "runs" / "drift-torch-sgd-s0" / "probes.jsonl").read_text() == before
    stored = json.loads(json.dumps({k: summary[k] for k in ("drift", "noisy", "smoothness")}))
    for key, value in stored.items():
        assert json.loads(json.dumps(again[key])) == value, key


def test_run_without_probes_is_refused(study, tmp_path):
    out, _, ctx = study
    import shutil
    shutil.copytree(out / "runs", tmp_path / "runs")
    (tmp_path / "runs" / "drift-none-sgd-s0" / "probes.jsonl").unlink()
    other = StudyContext(out=tmp_path, scale=TINY, seeds=2, device="cpu", quiet=True,
                         log=lambda _: None, dataset=ctx.dataset)
    with pytest.raises(RuntimeError, match="delete that run folder"):
        q4.run(other)
