"""What the studies share: the seed-spread comparison and the verdict it leads to."""

from __future__ import annotations

import json
import time

import pytest

from bnlab.data import load_cifar10_dir
from bnlab.evidence.stats import compare_means, fmt_pct, mean_std, plural, verdict, verdict_phrase
from bnlab.studies import run_all, run_study
from bnlab.studies.common import SCALES, ProbeLog, StudyClock, StudyContext, StudyScale
from tests.cifar_fixtures import write_cifar10_folder

# ---- verdicts ------------------------------------------------------------------------------

def stat(mean, std, n=2):
    return {"mean": mean, "std": std, "n": n}


@pytest.mark.parametrize(("a", "b", "direction"), [
    (stat(0.5, 0.01), stat(0.4, 0.02), "above"),
    (stat(0.4, 0.01), stat(0.5, 0.02), "below"),
    (stat(0.5, 0.06), stat(0.4, 0.05), "within spread"),
    (stat(0.9, 0.0, n=1), stat(0.1, 0.0), "one seed"),
    ({"mean": None, "std": None, "n": 0}, stat(0.1, 0.0), "one seed"),
])
def test_compare_means(a, b, direction):
    assert compare_means(a, b)["direction"] == direction


@pytest.mark.parametrize(("direction", "expected", "result"), [
    ("above", "above", "supported"),
    ("below", "above", "contradicted"),
    ("within spread", "above", "inconclusive"),
    ("below", "below", "supported"),
    ("above", "below", "contradicted"),
    ("one seed", "below", "inconclusive"),
])
def test_verdict(direction, expected, result):
    assert verdict(direction, expected) == result


def test_compare_means_reports_difference_and_spread():
    result = compare_means(stat(0.30, 0.01, n=3), stat(0.20, 0.02, n=3))
    assert result["difference"] == pytest.approx(0.10)
    assert result["spread"] == pytest.approx(0.03)


def test_verdict_phrase():
    assert verdict_phrase("supported") == "The data support it."
    assert verdict_phrase("contradicted") == "The data contradict it."
    assert verdict_phrase("inconclusive") == "Inconclusive at this scale."



def test_probe_log_keeps_the_last_line_of_a_step_and_skips_a_torn_one(tmp_path):
    log = ProbeLog(tmp_path / "probe.jsonl")
    assert log.read() == {}
    log.append({"step": 2, "error": 0.5})
    log.append({"step": 1, "error": 0.9})
    log.append({"step": 2, "error": 0.4})  # replayed after a resume: this one wins
    with open(log.path, "a") as f:
        f.write('{"step": 3, "err')  # a write cut short by a kill
    assert log.read() == {1: {"step": 1, "error": 0.9}, 2: {"step": 2, "error": 0.4}}
    assert list(log.read()) == [1, 2]


def test_fmt_pct_and_plural():
    assert fmt_pct(mean_std([0.60, 0.62])) == "61.0 ± 1.4 %"
    assert fmt_pct(mean_std([])) == "n/a" and fmt_pct(None) == "n/a"
    assert plural(1, "seed") == "1 seed" and plural(3, "seed") == "3 seeds"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"preset": "huge"}, "unknown preset 'huge'"),
    ({"seeds": 0}, "at least 1"),
])
def test_study_all_refuses_a_bad_scale_before_making_anything(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_all(tmp_path / "out", **kwargs)
    with pytest.raises(ValueError, match=message):
        run_study("q5", tmp_path / "one", **kwargs)
    assert not (tmp_path / "out").exists() and not (tmp_path / "one").exists()


def test_study_all_trains_a_run_two_studies_need_once(tmp_path):
    root = tmp_path / "cifar"
    write_cifar10_folder(root, per_batch=8, test=12)  # 40 training, 12 test images
    dataset = load_cifar10_dir(root)
    scale = StudyScale("tiny", width=0.125, epochs=1, subset=None, batch_size=8, lr=1e-3,
                       seeds=1, budget_s=60.0, description="tests")
    shared: dict = {}
    lines: list[str] = []

    def context(name):
        return StudyContext(out=tmp_path / name, scale=scale, seeds=1, device="cpu",
                            quiet=True, log=lines.append, dataset=dataset,
                            finished_runs=shared)

    first, second = context("q1"), context("q2")
    a = first.train_run("bn/seed0", first.config(norm="torch", seed=0))
    b = second.train_run("speed/bn/seed0", second.config(norm="torch", seed=0))
    assert "copied" in lines[-1]
    assert not (a.run_dir / "curves.png").exists()  # a study draws its own figures
    # the very same run: its metrics, epoch times included, byte for byte
    assert (b.run_dir / "metrics.jsonl").read_bytes() == (a.run_dir / "metrics.jsonl").read_bytes()
    assert b.metrics == a.metrics and b.run_dir == tmp_path / "q2" / "runs" / "speed/bn/seed0"
    # another seed, or a run with hooks, is trained for itself
    second.train_run("speed/bn/seed1", second.config(norm="torch", seed=1))
    assert "copied" not in lines[-1]
    second.train_run("probe", second.config(norm="torch", seed=0), on_step=lambda *a: None)
    assert "copied" not in lines[-1]
    assert len(shared) == 2  # seed 0 and seed 1; the hooked run is not offered


@pytest.mark.slow
def test_study_all_end_to_end_on_tiny_data(tmp_path, monkeypatch):
    root = tmp_path / "cifar"
    write_cifar10_folder(root, per_batch=8, test=12)
    # the smallest plan that still sweeps (2 rates) and pairs seeds where a claim needs 2
    monkeypatch.setitem(SCALES, "tiny", StudyScale(
        "tiny", width=0.125, epochs=1, subset=None, batch_size=8, lr=1e-3, seeds=1,
        budget_s=60.0, description="tests", headline_seeds=2, tune_points=2))
    lines: list[str] = []
    summary = run_all(tmp_path / "out", preset="tiny", data_dir=str(root), device="cpu",
                      quiet=True, log=lines.append)
    out = tmp_path / "out"
    assert list(summary["study_time_s"]) == ["q1", "q2", "q3", "q4", "q5"]
    report = (out / "report.md").read_text()
    for name in ("Q1", "Q2", "Q3", "Q4", "Q5"):
        assert f"## {name} " in report
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and 'src="q' not in page  # figures inlined
    assert len(list(out.rglob("*.png"))) >= 8
    # a Q2 run whose config Q1 already trained (the shared learning-rate sweep) is copied,
    # not trained again: exactly those are copied, and there are some
    def configs(study: str) -> dict[str, str]:
        return {p.parent.name: json.dumps(json.loads(p.read_text()), sort_keys=True)
                for p in (out / study / "runs").glob("*/config.json")}

    q1_configs = set(configs("q1").values())
    expected = {name for name, config in configs("q2").items() if config in q1_configs}
    copied = {line.split("] ", 1)[1].split(":", 1)[0] for line in lines
              if line.startswith("[q2]") and "copied" in line}
    assert expected and copied == expected
    # one progress count for the whole job: run numbers go 1, 2, 3, ... across the five studies
    numbers = [int(line.rsplit("(run ", 1)[1].split(",", 1)[0]) for line in lines
               if line.startswith("[q") and "(run " in line]
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) > 5


def test_study_clock_counts_runs_and_says_the_plan():
    clock = StudyClock(budget_s=1800.0, started=time.perf_counter() - 7200.0)  # 2 h ago
    first, second = clock.tick(), clock.tick()
    assert first.startswith("run 1, ") and second.startswith("run 2, ")
    assert "about 30 min for all five studies" in second and " h in" in second
