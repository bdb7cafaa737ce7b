"""Q2 (what does BN buy?): the measurements on cases with known answers, the plan per
scale, the verdicts on synthetic sweeps with known answers, and the whole study end to end
on tiny generated data."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random

import pytest

from bnlab import runs
from bnlab.data import load_cifar10_dir
from bnlab.evidence.stats import VERDICTS
from bnlab.studies import common, q2, run_study
from bnlab.studies.q2 import experiment as q2_experiment
from bnlab.train import RunResult
from tests.cifar_fixtures import write_cifar10_folder
from tests.study_checks import is_png, section_figures

TINY_SCALE = common.StudyScale("tiny", width=0.125, epochs=2, subset=None, batch_size=8,
                               lr=1e-3, seeds=2, budget_s=60.0, description="tests")
TINY_GRIDS = {"adam": (1e-4, 1e-3, 1e30), "sgd": (1e-3, 1e-2, 1e30)}  # the last diverges


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10_folder(root, per_batch=8, test=12)  # 40 training, 12 test images
    return load_cifar10_dir(root)


# ---- the usable range, interpolated -----------------------------------------------------

LRS = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]


def test_usable_range_interpolates_in_log_lr():
    # best 0.5, floor 0.1 + 0.8 * 0.4 = 0.42; left: 0.26 -> 0.5 crosses at 2/3 of a decade
    # after 1e-4; right: 0.5 -> 0.34 crosses half a decade after 1e-2
    r = q2.usable_range(LRS, [0.1, 0.26, 0.5, 0.34, 0.1])
    assert r["floor"] == pytest.approx(0.42) and r["best_lr"] == 1e-2
    assert math.log10(r["low"]) == pytest.approx(-3 + 2 / 3)
    assert math.log10(r["high"]) == pytest.approx(-1.5)
    assert r["decades"] == pytest.approx(0.5 + 1 / 3)
    assert not r["censored_low"] and not r["censored_high"] and r["usable"]


def test_usable_range_moves_continuously_not_by_grid_steps():
    widths = [q2.usable_range(LRS, [0.1, 0.1, 0.5, a, 0.1])["decades"]
              for a in (0.2, 0.3, 0.4, 0.45)]
    assert all(b > a for a, b in itertools.pairwise(widths))  # grows with the neighbour
    assert all(0.0 < w < 1.0 for w in widths[:3])              # never a whole grid step


@pytest.mark.parametrize(("accs", "decades", "censored"), [
    ([0.6, 0.6, 0.6, 0.6, 0.6], 4.0, (True, True)),    # flat: the whole grid, a lower bound
    ([0.6, 0.55, 0.1, 0.1, 0.1], None, (True, False)),  # best at the low end: censored there
    ([0.1, 0.1, 0.5, 0.1, 0.1], 0.2 + 0.2, (False, False)),  # a peak: 0.2 decade either side
    ([0.5, None, 0.52, 0.51, None], 1.0, (False, False)),  # a missing point ends the range
])
def test_usable_range_edges(accs, decades, censored):
    r = q2.usable_range(LRS, accs)
    assert (r["censored_low"], r["censored_high"]) == censored
    if decades is not None:
        assert r["decades"] == pytest.approx(decades)


def test_a_curve_that_never_learned_has_no_usable_rate():
    r = q2.usable_range(LRS, [0.1, 0.1, 0.1, 0.05, 0.1])
    assert not r["usable"] and r["decades"] == 0.0 and r["best_acc"] == 0.1


@pytest.mark.parametrize(("lrs", "accs"), [([1e-3, 1e-2], [0.5]), ([], []),
                                           ([1e-2, 1e-3], [0.5, 0.5]), ([0.0, 1.0], [0.5, 0.5])])
def test_usable_range_rejects_bad_input(lrs, accs):
    with pytest.raises(ValueError, match="usable_range"):
        q2.usable_range(lrs, accs)


# ---- convergence ---------------------------------------------------------------------------

def test_mean_train_loss_is_the_mean_over_the_run_and_none_for_an_unfinished_run():
    rows = [{"train_loss": v} for v in (2.0, 1.0, 0.6)]
    assert q2.mean_train_loss(rows, 3) == pytest.approx(1.2)
    assert q2.mean_train_loss(rows[:2], 3) is None  # diverged after two epochs
    assert q2.mean_train_loss([{"train_loss": float("nan")}], 1) is None


def test_steps_to_loss_interpolates_between_epoch_ends():
    rows = [{"train_loss": v} for v in (2.0, 1.0, 0.6)]
    assert q2.steps_to_loss(rows, 10, 1.5) == pytest.approx(15.0)
    assert q2.steps_to_loss(rows, 10, 0.8) == pytest.approx(25.0)
    assert q2.steps_to_loss(rows, 10, 2.5) == 10.0   # already there after the first epoch
    assert q2.steps_to_loss(rows, 10, 0.5) is None


def test_a_censored_width_cannot_carry_a_verdict_it_only_bounds():
    wider = {"low": 0.5, "high": 1.0}
    narrower = {"low": -1.0, "high": -0.5}
    assert q2.range_verdict(wider, False, False, 0.25) == "supported"
    assert q2.range_verdict(wider, True, False, 0.25) == "supported"  # BN's is even wider
    assert q2.range_verdict(wider, False, True, 0.25) == "inconclusive"
    assert q2.range_verdict(narrower, False, True, 0.25) == "contradicted"
    assert q2.range_verdict(narrower, True, False, 0.25) == "inconclusive"
    assert q2.range_verdict({"low": 0.1, "high": 1.0}, False, False, 0.25) == "inconclusive"


# ---- the plan ------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["quick", "standard", "paper"])
def test_every_preset_sweeps_both_optimizers_at_full_length_a_third_of_a_decade_apart(preset):
    scale = common.SCALES[preset]
    plan = q2.sweep_plan(scale)
    assert plan.epochs == scale.epochs and scale.seeds >= 3
    for optimizer in ("adam", "sgd"):
        grid = plan.grid(optimizer)
        assert len(grid) == plan.points >= 5
        steps = [math.log10(b / a) for a, b in itertools.pairwise(grid)]
        assert all(s == pytest.approx(1 / 3) for s in steps)
        assert plan.common_rate(optimizer) == pytest.approx(plan.centers[optimizer])
    assert plan.common_rate("adam") == pytest.approx(scale.lr)  # the other studies' rate


def test_standard_gives_the_best_rates_five_seeds(tmp_path):
    ctx = common.StudyContext(out=tmp_path, scale=common.SCALES["standard"], seeds=3)
    assert q2.headline_seeds(ctx) == [0, 1, 2, 3, 4]
    quick = common.StudyContext(out=tmp_path, scale=common.SCALES["quick"], seeds=3)
    assert q2.headline_seeds(quick) == [0, 1, 2]


def test_another_scale_sweeps_at_its_own_run_size():
    plan = q2.sweep_plan(TINY_SCALE)
    assert plan.fields() == {"width": 0.125, "subset": None, "batch_size": 8, "epochs": 2}
    assert plan.common_rate("adam") == TINY_SCALE.lr


# ---- verdicts on synthetic sweeps with known answers -----------------------------------------

def _fake_sweep(bn_better: bool):
    """A train_run that writes a run folder from a formula: accuracy a bump in log10(lr)
    (BN's 1.5 decades wide and 10 points higher when ``bn_better``, else the same as
    no-BN's), training loss falling per epoch (faster with BN when ``bn_better``) and lowest
    at the bump's top, and a little noise by seed (without ``bn_better`` the two networks' runs
    are the same: no difference)."""
    def train_run(self, name, config, **kwargs):
        # noise by rate and seed, the same for both networks: paired by seed, as the runs are
        rng = random.Random(f"{config.optimizer}-{config.lr}-{config.seed}")
        center = math.log10(self.scale.lr if config.optimizer == "adam" else q2.plan.SGD_CENTER)
        bn = config.norm == "torch" and bn_better
        width, peak = (1.5, 0.6) if bn else (0.5, 0.5)
        x = (math.log10(config.lr) - center) / width
        acc = 0.1 + (peak - 0.1) * math.exp(-x * x) + rng.gauss(0, 0.005)
        rate = 0.6 if bn else 0.3
        metrics = [{"epoch": e, "train_loss": 2.3 * math.exp(-rate * e) + (peak - acc)
                    + rng.gauss(0, 0.005),
                    "train_acc": acc, "test_loss": 1.0, "test_acc": acc, "epoch_time_s": 1.0}
                   for e in range(1, config.epochs + 1)]
        run_dir = self.out / "runs" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        runs.write_metrics(run_dir, metrics)
        return RunResult(run_dir, metrics)
    return train_run


@pytest.mark.parametrize("bn_better", [True, False])
def test_a_true_difference_is_supported_and_none_is_contradicted(bn_better, tiny_data,
                                                                 tmp_path, monkeypatch):
    # Without a difference the paired differences are exactly 0 (the same runs): the
    # interval [0, 0] lies wholly short of each claim's minimum effect, which rules that
    # effect out (evidence.stats.interval_verdict): contradicted, not merely inconclusive.
    scale = dataclasses.replace(TINY_SCALE, name="synthetic", epochs=4, seeds=3)
    monkeypatch.setattr(common.StudyContext, "train_run", _fake_sweep(bn_better))
    plan = dataclasses.replace(q2.sweep_plan(scale), points=7)  # 2 decades
    monkeypatch.setattr(q2_experiment, "sweep_plan", lambda _: plan)
    ctx = common.StudyContext(out=tmp_path, scale=scale, seeds=3, quiet=True,
                              log=lambda _: None, dataset=tiny_data)
    summary = q2.run(ctx)
    for optimizer in ("adam", "sgd"):
        claims = summary["optimizers"][optimizer]["claims"]
        verdicts = {key: claim["verdict"] for key, claim in claims.items()}
        expected = "supported" if bn_better else "contradicted"
        assert verdicts == dict.fromkeys(claims, expected), (optimizer, verdicts)
        curves = summary["optimizers"][optimizer]["curves"]
        if bn_better:  # the bump's widths: floor at 80% of the gain, exp(-x^2) = 0.8
            half = math.sqrt(-math.log(0.8))
            assert curves["torch"]["range"]["decades"] == pytest.approx(2 * 1.5 * half, rel=0.2)
            assert curves["none"]["range"]["decades"] == pytest.approx(2 * 0.5 * half, rel=0.3)


# ---- divergence in the shared sweep ----------------------------------------------------------

def test_a_diverging_rate_is_recorded_by_the_sweep_and_stays_so_on_resume(tiny_data, tmp_path):
    from bnlab.studies.tuning import tune_lr

    ctx = common.StudyContext(out=tmp_path, scale=TINY_SCALE, seeds=1, device="cpu",
                              quiet=True, log=lambda _: None, dataset=tiny_data)
    for _ in range(2):  # the second time from the folders' result.json
        tuned = tune_lr(ctx, norm="none", optimizer="sgd", grid=[1e-2, 1e6], seeds=1,
                        epochs=1)
        assert tuned.diverged == {1e-2: [], 1e6: [0]} and tuned.best == 1e-2
        assert tuned.losses[1e6][0] == math.inf and tuned.test_acc[1e6][0] is None
        assert len(tuned.metrics(1e-2, 0)) == 1 and tuned.metrics(1e6, 0) == []


# ---- the study end to end ------------------------------------------------------------------

@pytest.fixture(scope="module")
def study(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("q2") / "study"
    plan = dataclasses.replace(q2.sweep_plan(TINY_SCALE), grids=TINY_GRIDS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(common.SCALES, "tiny", TINY_SCALE)
        mp.setattr(q2_experiment, "sweep_plan", lambda _: plan)
        summary = run_study("q2", out, preset="tiny", device="cpu", quiet=True,
                            log=lambda _: None, dataset=tiny_data)
    return out, summary


def test_study_writes_its_files(study, tiny_data):
    out, _ = study
    s = json.loads((out / "summary.json").read_text())
    for key in ("data", "preset", "seeds", "seed_list", "headline_seeds", "settings", "optimizers",
                "post_claim", "figures", "wall_time_s"):
        assert key in s, key
    assert s["data"] == tiny_data.source and s["preset"] == "tiny"
    assert s["seed_list"] == [0, 1] and s["seeds"] == 2
    assert s["headline_seeds"] == [0, 1, 2]  # the scale's headline_seeds (3) at the best rates
    assert set(s["optimizers"]) == {"adam", "sgd"}
    for optimizer, result in s["optimizers"].items():
        assert result["grid"] == list(TINY_GRIDS[optimizer])
        assert result["common_rate"] == TINY_GRIDS[optimizer][1]
        for norm in ("none", "torch"):
            curve = result["curves"][norm]
            high = curve["points"][-1]
            assert high["diverged"] == 2 and high["test_acc"]["mean"] == q2.CHANCE
            assert curve["best_lr"] != 1e30  # a diverged rate is never the best
            best = result["loss_curves"]["best"][norm]
            assert best["seed_list"] == [0, 1, 2] and best["lr"] == curve["best_lr"]
            assert best["steps"] == [5, 10]  # 40 images / batch 8, two epochs
            assert all(m["n"] == 3 for m in best["train_loss"])
        for claim in result["claims"].values():
            assert claim["verdict"] in VERDICTS
    for name in s["figures"].values():
        assert is_png(out / name)
    for name in ("section.md", "report.md", "report.html"):
        assert (out / name).is_file()


def test_section_is_drawn_from_the_summary(study):
    out, _ = study
    section = (out / "section.md").read_text()
    s = json.loads((out / "summary.json").read_text())
    assert section.startswith("## " + q2.TITLE) and "Q2" in section.splitlines()[0]
    figures = section_figures(section)
    assert {src for _, src in figures} == set(s["figures"].values())
    for caption, src in figures:
        assert (out / src).is_file() and len(caption) > 40
    assert " ×" in section and "Ioffe & Szegedy" in section and "`tiny`" in section
    claim = s["optimizers"]["sgd"]["claims"]["wider_range"]
    claim["difference"].update({"mean": 0.4321, "low": 0.1234, "high": 0.7654})
    claim["verdict"] = "contradicted"
    s["optimizers"]["adam"]["curves"]["torch"]["range"].update(
        {"usable": True, "low": 0.001, "high": 0.01, "decades": 1.0, "censored_low": False,
         "censored_high": True})
    (out / "summary.json").write_text(json.dumps(s))
    redrawn = q2.render(out)
    assert "+0.43 [+0.12, +0.77] decades" in redrawn and "*contradicted*" in redrawn
    assert "0.001 – ≥ 0.01: 1.00 decades" in redrawn
