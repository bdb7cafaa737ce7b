"""Q2 (what does BN buy?): the measurements on cases with known answers, divergence
handling, and the whole study end to end on tiny generated data."""

from __future__ import annotations

import json
import math

import pytest

from bnlab.data import load_cifar10_dir
from bnlab.evidence.stats import fmt_pct, mean_std
from bnlab.studies import common, q2, run_study
from tests.cifar_fixtures import write_cifar10_folder
from tests.study_checks import is_png, section_figures

TINY_SCALE = common.StudyScale("tiny", width=0.125, epochs=2, subset=None, batch_size=8,
                               lr=1e-3, seeds=2, budget_s=60.0, description="tests")
TINY_SWEEPS = {"adam": (1e-3, 1e30), "sgd": (1e-2, 1e30)}  # one learning, one diverging each


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10_folder(root, per_batch=8, test=12)  # 40 training, 12 test images
    return load_cifar10_dir(root)


# ---- measurements on known answers ---------------------------------------------------------

def test_thresholds_are_fractions_of_the_way_above_chance():
    assert q2.thresholds_from(0.6) == [0.35, 0.5, 0.6]
    assert q2.thresholds_from(0.1) == []  # at chance: nothing to converge to
    assert q2.thresholds_from(None) == []


def test_first_reaching_counts_epochs_and_training_seconds():
    metrics = [{"epoch": e, "test_acc": acc, "epoch_time_s": 2.0}
               for e, acc in enumerate([0.15, 0.3, 0.28, 0.45], 1)]
    assert q2.first_reaching(metrics, 0.3) == {"epoch": 2, "seconds": 4.0}
    assert q2.first_reaching(metrics, 0.4) == {"epoch": 4, "seconds": 8.0}
    assert q2.first_reaching(metrics, 0.1) == {"epoch": 1, "seconds": 2.0}
    assert q2.first_reaching(metrics, 0.5) is None


@pytest.mark.parametrize(("accs", "low", "high", "decades"), [
    ([0.2, 0.56, 0.6, 0.58, 0.1], 1e-3, 1e-1, 2.0),         # within 0.05: 0.56..0.6
    ([0.2, 0.56, 0.6, 0.3, 0.59], 1e-3, 1e-2, 1.0),          # 0.59 is cut off by 0.3
    ([0.6, 0.6, 0.6, 0.6, 0.6], 1e-4, 1.0, 4.0),             # flat: the whole grid
    ([0.1, 0.1, 0.7, 0.1, 0.1], 1e-2, 1e-2, 0.0),            # a single point
    ([0.5, None, 0.52, 0.51, None], 1e-2, 1e-1, 1.0),        # a missing point breaks it
])
def test_lr_range_width(accs, low, high, decades):
    lrs = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    r = q2.lr_range_width(lrs, accs, tolerance=0.05)
    assert (r["low"], r["high"]) == (low, high)
    assert r["decades"] == pytest.approx(decades)
    assert r["best_acc"] == max(a for a in accs if a is not None)


def test_a_curve_must_be_clearly_above_chance_to_have_usable_learning_rates():
    lrs = [1e-3, 1e-2, 1e-1]
    never = q2.lr_range_width(lrs, [0.11, 0.13, 0.12], tolerance=0.05)
    assert not never["usable"] and never["decades"] is None and never["best_acc"] == 0.13
    # within 0.05 of the best (0.18) would admit 0.14, but 0.14 is not 0.05 above chance
    r = q2.lr_range_width(lrs, [0.14, 0.18, 0.16], tolerance=0.05)
    assert r["usable"] and (r["low"], r["high"]) == (1e-2, 1e-1)


def test_compare_ranges():
    def rng(decades):
        return {"decades": decades, "usable": decades is not None}
    assert q2.compare_ranges(rng(1.5), rng(0.75)) == "wider"
    assert q2.compare_ranges(rng(0.75), rng(1.5)) == "narrower"
    assert q2.compare_ranges(rng(0.75), rng(0.75)) == "equal"
    assert q2.compare_ranges(rng(0.0), rng(None)) == "wider"
    assert q2.compare_ranges(rng(None), rng(0.0)) == "narrower"
    assert q2.compare_ranges(rng(None), rng(None)) == "neither usable"


def test_reach_verdict():
    def entry(reached, runs, epochs):
        return {"reached": reached, "runs": runs,
                "epochs": mean_std(epochs)}
    fast = {"torch": entry(2, 2, [2, 2]), "none": entry(2, 2, [5, 6])}
    assert q2._reach_verdict(fast)[0] == "supported"
    slow = {"torch": entry(2, 2, [5, 6]), "none": entry(2, 2, [2, 2])}
    assert q2._reach_verdict(slow)[0] == "contradicted"
    only_bn = {"torch": entry(2, 2, [4, 5]), "none": entry(1, 2, [3])}
    assert q2._reach_verdict(only_bn)[0] == "supported"
    close = {"torch": entry(2, 2, [3, 5]), "none": entry(2, 2, [4, 5])}
    assert q2._reach_verdict(close)[0] == "inconclusive"
    assert q2._reach_verdict(None)[0] == "inconclusive"


def test_a_diverging_run_counts_as_chance_and_stays_so_on_resume(tiny_data, tmp_path):
    ctx = common.StudyContext(out=tmp_path, scale=TINY_SCALE, seeds=1, device="cpu",
                              quiet=True, log=lambda _: None, dataset=tiny_data)
    config = ctx.config(norm="none", optimizer="sgd", lr=1e6, epochs=1)
    point = q2.sweep_point(ctx, "diverge", config)
    assert point["diverged"] and point["status"] == "diverged"
    assert point["test_acc"] == q2.CHANCE and "nan" in point["message"]
    again = q2.sweep_point(ctx, "diverge", config)  # the folder's result.json says so
    assert again["diverged"] and again["test_acc"] == q2.CHANCE
    fine = q2.sweep_point(ctx, "fine", ctx.config(norm="torch", lr=1e-3, epochs=1))
    assert not fine["diverged"] and 0.0 <= fine["test_acc"] <= 1.0


# ---- the study end to end ------------------------------------------------------------------

@pytest.fixture(scope="module")
def study(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("q2") / "study"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(common.SCALES, "tiny", TINY_SCALE)
        mp.setattr(q2, "SWEEPS", TINY_SWEEPS)
        summary = run_study("q2", out, preset="tiny", device="cpu", quiet=True,
                            log=lambda _: None, dataset=tiny_data)
    return out, summary


def test_study_writes_its_files(study, tiny_data):
    out, _ = study
    s = json.loads((out / "summary.json").read_text())
    for key in ("data", "preset", "seeds", "settings", "convergence", "lr_sweep", "verdicts",
                "comparisons", "post_claim", "figures", "wall_time_s"):
        assert key in s, key
    assert s["data"] == tiny_data.source and s["preset"] == "tiny" and s["seeds"] == 2
    conv = s["convergence"]
    assert conv["final_test_acc"]["torch"]["n"] == 2 == conv["final_test_acc"]["none"]["n"]
    for row in conv["thresholds"]:
        assert row["none"]["runs"] == 2
    sweep = s["lr_sweep"]
    assert sweep["epochs"] == 1 and sweep["seeds"] == [0]  # epochs // 2, seeds - 1
    assert set(sweep["curves"]) == {"adam/none", "adam/torch", "sgd/none", "sgd/torch"}
    for curve in sweep["curves"].values():
        high = curve["points"][-1]
        assert high["lr"] == 1e30 and high["diverged"] == 1
        assert high["test_acc"]["mean"] == q2.CHANCE
    assert (out / "runs" / "speed" / "bn" / "seed1" / "metrics.jsonl").is_file()
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
    final = s["convergence"]["final_test_acc"]
    assert fmt_pct(final["torch"]) in section and fmt_pct(final["none"]) in section
    assert " ×" in section  # diverged points are marked
    assert any(p in section for p in ("The data support it.", "The data contradict it.",
                                      "Inconclusive at this scale."))
    s["convergence"]["final_test_acc"]["torch"] = {"mean": 0.87654, "std": 0.0321, "n": 2,
                                                   "min": 0.85, "max": 0.9}
    s["lr_sweep"]["curves"]["sgd/torch"]["range"].update(
        {"best_acc": 0.4321, "best_lr": 0.01, "low": 0.01, "high": 0.01, "decades": 0.0,
         "usable": True})
    (out / "summary.json").write_text(json.dumps(s))
    redrawn = q2.render(out)
    assert "87.7 ± 3.2 %" in redrawn
    assert "0.01 – 0.01 (0.00 decades; best 43.2 % at 0.01)" in redrawn
    assert math.isfinite(s["settings"]["lr"]) and f"lr {s['settings']['lr']:g}" in redrawn
