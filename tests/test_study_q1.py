"""Q1 (is BN a regularizer?): the measurements on cases with known answers, then the whole
study end to end on tiny generated data."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from bnlab import nn as bnn
from bnlab.data import load_cifar10_dir
from bnlab.evidence.stats import fmt_pct, fmt_pm
from bnlab.models import Dropout
from bnlab.studies import common, q1, run_study
from bnlab.studies.q1 import claims
from bnlab.train import TrainConfig, prepare_dataset, train
from tests.cifar_fixtures import write_cifar10_folder
from tests.study_checks import is_png, section_figures

# one seed (two for the headline arms), a one-point learning-rate sweep: the tuned rate is
# the common one, so the arms share runs and the sweep's runs are copied, not retrained
TINY_SCALE = common.StudyScale("tiny", width=0.125, epochs=1, subset=None, batch_size=8,
                               lr=1e-3, seeds=1, budget_s=60.0, description="tests",
                               headline_seeds=2, tune_points=1, tune_seeds=1)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10_folder(root, per_batch=8, test=12)  # 40 training, 12 test images
    return load_cifar10_dir(root)


# ---- the grouped forward is what separate BN batches give -------------------------------

@pytest.mark.parametrize("bn_class", [nn.BatchNorm2d, bnn.BatchNorm2d], ids=["torch", "bnlab"])
def test_grouped_forward_equals_separate_batches(bn_class):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), bn_class(6), nn.ReLU(), nn.Conv2d(6, 4, 3),
                        bn_class(4), nn.Flatten()).double()
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, bn_class):  # non-trivial gamma and beta
                layer.weight.uniform_(0.5, 2.0)
                layer.bias.uniform_(-1.0, 1.0)
    x = torch.randn(12, 3, 8, 8, dtype=torch.float64)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        grouped = q1.grouped_train_forward(net, x, group_size=4)
    after = {k: v.clone() for k, v in net.state_dict().items()}
    for key in before:  # running statistics (and everything else) untouched
        assert torch.equal(before[key], after[key]), key
    net.train()
    with torch.no_grad():
        separate = torch.cat([net(x[i:i + 4]) for i in range(0, 12, 4)])
    error = (grouped - separate).abs().max().item()
    print(f"grouped vs separate forwards: max abs error {error:.2e}")
    assert error < 1e-12


def test_grouped_forward_refuses_a_ragged_split():
    with pytest.raises(ValueError, match="groups of 4"):
        q1.grouped_train_forward(nn.Sequential(nn.BatchNorm2d(2)), torch.randn(6, 2, 2, 2), 4)


# ---- the noise measure on known answers ----------------------------------------------------

def test_bn_noise_of_one_layer_follows_theory():
    """y = (x - mu_B) / sigma_B on N(0, 1) inputs: var over batch compositions
    ~ (1 + x^2 / 2) / B, so the relative std is sqrt(1.5 / B) and the log-log slope -1/2."""
    net = nn.Sequential(nn.BatchNorm2d(10, affine=False), nn.Flatten())
    x = torch.randn(2048, 10, 1, 1, generator=torch.Generator().manual_seed(1))
    sizes = [8, 16, 32, 64]
    rel = []
    for b in sizes:
        samples = q1.noise_samples(net, x, b, 4, torch.Generator().manual_seed(b))
        assert samples.shape == (4, 2048, 10)
        rel.append(q1.logit_spread(samples, center=False)["relative_std"])
    print("relative std", [f"{r:.3f}" for r in rel], "theory",
          [f"{math.sqrt(1.5 / b):.3f}" for b in sizes])
    for b, r in zip(sizes[1:], rel[1:], strict=True):  # the expansion holds for larger B
        assert r == pytest.approx(math.sqrt(1.5 / b), rel=0.1)
    assert q1.fit_slope(sizes, rel) == pytest.approx(-0.5, abs=0.1)
    assert torch.equal(net[0].running_mean, torch.zeros(10))  # never updated
    assert int(net[0].num_batches_tracked) == 0


def test_a_network_without_bn_or_dropout_has_no_noise():
    net = nn.Sequential(nn.Linear(5, 10))
    x = torch.randn(64, 5)
    spread = q1.logit_spread(q1.noise_samples(net, x, 8, 3, torch.Generator().manual_seed(0)))
    # Only rounding may differ: a GEMM kernel may block a batch of 8 unlike one of 64 (seen on
    # an AMD EPYC: 3e-8), and a 5-term float32 dot product rounds to within 5 u = 3e-7 of the
    # exact value; BN's noise at batch 8 is ~0.4 (test_bn_noise_of_one_layer_follows_theory).
    assert spread["relative_std"] <= 5 * torch.finfo(torch.float32).eps / 2
    assert spread["disagreement"] == 0.0


def test_dropout_noise_is_one_for_half_dropout():
    """Inverted dropout with p = 1/2 on ones: 0 or 2, mean 1, std 1."""
    net = nn.Sequential(Dropout(0.5, generator=torch.Generator().manual_seed(0)))
    samples = q1.noise_samples(net, torch.ones(1000, 10), 8, 4, torch.Generator().manual_seed(0))
    assert q1.logit_spread(samples, center=False)["relative_std"] == pytest.approx(1.0, rel=0.05)


def test_logit_spread_recovers_known_noise():
    g = torch.Generator().manual_seed(0)
    signal = torch.randn(500, 10, generator=g) * 3.0
    noise = 0.3 * torch.randn(6, 500, 10, generator=g)
    spread = q1.logit_spread(signal + noise, center=False)
    rms = signal.pow(2).mean().sqrt().item()
    assert spread["relative_std"] == pytest.approx(0.3 / rms, rel=0.05)
    assert 0.0 < spread["disagreement"] < 0.2
    shifted = signal + noise + torch.randn(6, 500, 1, generator=g) * 100.0  # softmax-invariant
    assert q1.logit_spread(shifted)["relative_std"] == pytest.approx(
        q1.logit_spread(signal + noise)["relative_std"], rel=1e-6)
    with pytest.raises(ValueError, match="draws >= 2"):
        q1.logit_spread(signal[None])


def test_fit_slope():
    assert q1.fit_slope([1, 10, 100], [1.0, 10.0, 100.0]) == pytest.approx(1.0)
    assert q1.fit_slope([4], [1.0]) is None


def test_gap_curves():
    rows = [{"epoch": 1, "train_acc": 0.5, "test_acc": 0.4, "train_loss": 1.2, "test_loss": 1.5},
            {"epoch": 2, "train_acc": 0.7, "test_acc": 0.5, "train_loss": 0.8, "test_loss": 1.4}]
    curves = q1.gap_curves(rows)
    assert curves["epoch"] == [1, 2]
    assert curves["acc_gap"] == pytest.approx([0.1, 0.2])
    assert curves["loss_gap"] == pytest.approx([0.3, 0.6])


def test_eval_mode_train_accuracy_is_the_test_accuracy_when_test_is_train(tiny_data, tmp_path):
    """With the training images as the test set and no augmentation, the run's own last
    test evaluation is an eval-mode pass over its training images: the two must agree."""
    same = dataclasses.replace(tiny_data, test_images=tiny_data.train_images,
                               test_labels=tiny_data.train_labels)
    config = TrainConfig(norm="torch", dropout=True, width=0.125, epochs=2, batch_size=8,
                         augment=False, device="cpu", lr=3e-3)
    result = train(config, tmp_path / "run", dataset=same, progress=False, log=lambda _: None)
    measured = q1.evaluate_on_train_set(result.run_dir, prepare_dataset(config, torch.device(
        "cpu"), same))
    final = result.metrics[-1]
    assert measured["train_acc_eval"] == pytest.approx(final["test_acc"], abs=1e-12)
    assert measured["train_loss_eval"] == pytest.approx(final["test_loss"], rel=1e-5)


# ---- the plan and the claims on known answers -----------------------------------------------

def test_plan_arms_names_runs_by_config_so_equal_rates_share_runs():
    rates = {"none": {"tuned": 1e-3, "common": 1e-3}, "bn": {"tuned": 1e-2, "common": 1e-3}}
    arms = {a.key: a for a in q1.plan_arms(rates, 64, [0, 1, 2], [0, 1, 2, 3, 4])}
    assert set(arms) == {"none@tuned", "bn@tuned", "none@common", "bn@common", "bn_dropout",
                         "ghost8"}
    assert arms["bn@tuned"].seeds == (0, 1, 2, 3, 4) and arms["bn@common"].seeds == (0, 1, 2)
    assert arms["none@tuned"].run_name(0) == arms["none@common"].run_name(0)  # same config
    assert arms["bn@tuned"].run_name(0) != arms["bn@common"].run_name(0)      # other rate
    assert arms["bn_dropout"].lr == arms["ghost8"].lr == 1e-2  # at BN's tuned rate
    assert arms["ghost8"].fields["virtual_batch_size"] == 8
    assert q1.ghost_sizes(64) == [8] and q1.ghost_sizes(8) == [2] and q1.ghost_sizes(2) == []
    without = [a.key for a in q1.plan_arms(rates, 64, [0, 1, 2], [0, 1, 2], ghost=False)]
    assert "ghost8" not in without and "bn_dropout" in without


def test_headline_seeds_follow_the_scale_unless_seeds_are_given(tmp_path):
    scale = dataclasses.replace(TINY_SCALE, seeds=3, headline_seeds=5)
    assert q1.headline_seeds(common.StudyContext(tmp_path, scale, seeds=3)) == [0, 1, 2, 3, 4]
    assert q1.headline_seeds(common.StudyContext(tmp_path, scale, seeds=4)) == [0, 1, 2, 3]


def _arm(key, **per_seed):
    """An arm of summary.json whose runs have the given metric values by seed."""
    seeds = range(len(next(iter(per_seed.values()))))
    return {"key": key, "runs": [{"seed": s, "status": "finished",
                                  **{m: v[s] for m, v in per_seed.items()}} for s in seeds]}


def test_a_gap_claim_is_judged_only_at_equal_fit():
    narrower = _arm("bn", acc_gap_eval=[0.02, 0.03, 0.025], train_acc_eval=[0.70, 0.71, 0.69])
    wider = _arm("none", acc_gap_eval=[0.10, 0.12, 0.11], train_acc_eval=[0.70, 0.70, 0.70])
    claim = claims.gap_claim(narrower, wider, "narrows")
    assert claim["fit"]["equal"] and claim["verdict"] == "supported"
    assert claim["mean"] == pytest.approx(-0.085)
    # the same gaps from a network that fits 20 points less: not comparable
    underfit = _arm("bn", acc_gap_eval=[0.02, 0.03, 0.025], train_acc_eval=[0.50, 0.51, 0.49])
    gated = claims.gap_claim(underfit, wider, "narrows")
    assert not gated["fit"]["equal"] and gated["fit"]["mean"] == pytest.approx(-0.2)
    assert gated["verdict"] == "inconclusive" and gated["ungated_verdict"] == "supported"
    # equal fit and equal gaps: a regularizing effect of 2 points or more is excluded
    same = _arm("bn", acc_gap_eval=[0.101, 0.119, 0.111], train_acc_eval=[0.70, 0.70, 0.71])
    assert claims.gap_claim(same, wider, "narrows")["verdict"] == "contradicted"


def test_noise_ratio_is_the_geometric_mean_with_an_interval():
    rows = [{"seed": s, "bn": {"relative_std": r}, "dropout": {"relative_std": 1.0}}
            for s, r in enumerate([0.5, 0.25, 1.0])]
    ratio = claims.noise_ratio(rows)
    assert ratio["ratio"] == pytest.approx(0.5) and ratio["n"] == 3
    assert ratio["low"] < 0.5 < ratio["high"]


def test_noise_sources_separate_bn_from_dropout_on_one_network():
    """BN (no affine) then half dropout, on N(0, 1) inputs: with the batch composition fixed
    only the masks move the outputs, and with dropout off only the batch mates do."""
    generator = torch.Generator().manual_seed(0)
    drop_generator = torch.Generator()
    net = nn.Sequential(nn.BatchNorm2d(10, affine=False), Dropout(0.5, drop_generator),
                        nn.Flatten())
    x = torch.randn(2048, 10, 1, 1, generator=generator)
    sources = q1.noise_sources(net, x, 32, 4, seed=0, dropout_generator=drop_generator)
    assert sources["bn"]["relative_std"] == pytest.approx(math.sqrt(1.5 / 32), rel=0.15)
    assert sources["dropout"]["relative_std"] == pytest.approx(1.0, rel=0.1)
    assert sources["both"]["relative_std"] > sources["dropout"]["relative_std"]
    assert sources["bn"]["relative_std"] < 0.5 * sources["dropout"]["relative_std"]
    bn_only = nn.Sequential(nn.BatchNorm2d(10, affine=False), nn.Flatten())
    no_dropout = q1.noise_sources(bn_only, x, 32, 3, seed=0, dropout_generator=drop_generator)
    assert no_dropout["dropout"]["relative_std"] < 1e-6  # fixed batches: nothing moves


def test_grouped_forward_can_skip_dropout():
    net = nn.Sequential(Dropout(0.5, torch.Generator().manual_seed(0)), nn.Flatten())
    x = torch.randn(8, 3, 2, 2)
    assert torch.equal(q1.grouped_train_forward(net, x, 4, dropout=False), x.flatten(1))
    assert not torch.equal(q1.grouped_train_forward(net, x, 4), x.flatten(1))


# ---- the study end to end ------------------------------------------------------------------

@pytest.fixture(scope="module")
def study(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("q1") / "study"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(common.SCALES, "tiny", TINY_SCALE)
        summary = run_study("q1", out, preset="tiny", device="cpu", quiet=True,
                            log=lambda _: None, dataset=tiny_data)
    return out, summary


def test_study_writes_its_files(study, tiny_data):
    out, _ = study
    stored = json.loads((out / "summary.json").read_text())
    for key in ("data", "preset", "seeds", "seed_list", "n_seeds", "headline_seeds", "settings",
                "tuning", "arms", "noise", "claims", "verdicts", "post_claim", "literature",
                "figures", "wall_time_s"):
        assert key in stored, key
    assert stored["data"] == tiny_data.source and stored["preset"] == "tiny"
    assert stored["seed_list"] == [0] and stored["seeds"] == 1
    assert stored["headline_seeds"] == [0, 1]
    assert set(stored["arms"]) == {"none@tuned", "bn@tuned", "none@common", "bn@common",
                                   "bn_dropout", "ghost2"}
    for key, arm in stored["arms"].items():
        want = [0, 1] if key.endswith("@tuned") else [0]
        assert [r["seed"] for r in arm["runs"]] == want, key
        assert all(r["status"] == "finished" for r in arm["runs"]), key
        for row in arm["runs"]:
            assert (out / "runs" / row["run"] / "checkpoint.pt").is_file()
    # the sweep's one point is both the tuned and the common rate: the arms share those runs
    assert stored["settings"]["tuned_lr"] == {"none": 1e-3, "bn": 1e-3}
    assert stored["arms"]["bn@common"]["runs"][0]["run"] == \
        stored["arms"]["bn@tuned"]["runs"][0]["run"]
    ghost = stored["arms"]["ghost2"]["fields"]
    assert ghost["norm_kind"] == "ghost" and ghost["virtual_batch_size"] == 2
    noise = stored["noise"]
    assert noise["batch_sizes"] == [4, 8, 16, 32]  # 64.. exceed the 40 images
    assert noise["skipped_batch_sizes"] == [64, 128, 256] and noise["notes"]
    assert noise["pool_images"] == 40
    same = noise["same_network"]
    assert [row["seed"] for row in same["per_seed"]] == [0]
    assert same["dropout"]["relative_std"]["mean"] > 0 and same["bn"]["relative_std"]["mean"] > 0
    for name in stored["figures"].values():
        assert is_png(out / name)
    for name, claim in stored["claims"].items():
        assert claim["verdict"] in ("supported", "contradicted", "inconclusive"), name
        assert stored["verdicts"][name] == claim["verdict"]
    # one seed: no interval, so nothing can be claimed
    assert stored["verdicts"]["gap_common"] == "inconclusive"
    assert stored["verdicts"]["noise_shrinks"] == "inconclusive"
    for name in ("section.md", "report.md", "report.html"):
        assert (out / name).is_file()


def test_section_is_drawn_from_the_summary(study):
    out, _ = study
    section = (out / "section.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert section.startswith("## " + q1.TITLE) and "Q1" in section.splitlines()[0]
    figures = section_figures(section)
    assert {src for _, src in figures} == set(summary["figures"].values())
    for caption, src in figures:
        assert (out / src).is_file() and len(caption) > 40
    bn = summary["arms"]["bn@tuned"]["final"]
    assert fmt_pct(bn["test_acc"]) in section
    assert fmt_pct(bn["acc_gap_eval"]) in section
    first = summary["noise"]["bn_trained"]["relative_std"][0]
    assert fmt_pm(first, 3) in section
    assert fmt_pm(summary["noise"]["same_network"]["dropout"]["relative_std"], 3) in section
    assert any(p in section for p in ("The data support it.", "The data contradict it.",
                                      "Inconclusive at this scale."))
    for claim in summary["claims"].values():  # every claim has its row and verdict
        row = next(line for line in section.splitlines() if line.startswith(
            f"| {claim['claim']} |"))
        assert row.rstrip(" |").endswith(f"**{claim['verdict']}**")
    assert "preset `tiny`" in section and "Ioffe & Szegedy" in section
    # change numbers in summary.json: the section follows them
    summary["arms"]["bn@tuned"]["final"]["test_acc"] = {"mean": 0.98765, "std": 0.01234,
                                                        "n": 2, "min": 0.97, "max": 1.0}
    claim = summary["claims"]["gap_tuned"]
    claim.update({"mean": -0.05, "low": -0.08, "high": -0.03, "verdict": "supported"})
    claim["fit"].update({"mean": 0.0, "low": -0.01, "high": 0.01, "equal": True})
    summary["verdicts"]["gap_tuned"] = "supported"
    (out / "summary.json").write_text(json.dumps(summary))
    redrawn = q1.render(out)
    row = next(line for line in redrawn.splitlines() if line.startswith("| BN, tuned lr |"))
    assert row.split("|")[3].strip() == "98.8 ± 1.2 %"
    row = next(line for line in redrawn.splitlines() if line.startswith(
        f"| {claim['claim']} |"))
    assert "-5.0 [-8.0, -3.0] points" in row and "equal within ±5" in row
    assert row.rstrip(" |").endswith("**supported**")
    assert "BN narrows the generalization gap;" in redrawn
    # a preset without the ghost experiment says so
    summary["settings"]["ghost"] = False
    summary["claims"] = {k: v for k, v in summary["claims"].items() if not k.startswith("ghost")}
    (out / "summary.json").write_text(json.dumps(summary))
    assert "Not run at preset `tiny`" in q1.render(out)


def test_study_resumes_without_training_again(study, tiny_data):
    out, summary = study
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("checkpoint.pt")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(common.SCALES, "tiny", TINY_SCALE)
        again = run_study("q1", out, preset="tiny", device="cpu", quiet=True,
                          log=lambda _: None, dataset=tiny_data, resume=True)
    after = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("checkpoint.pt")}
    assert before == after
    assert again["arms"]["bn@tuned"]["final"]["test_acc"] == \
        summary["arms"]["bn@tuned"]["final"]["test_acc"]
