"""The comparison report separates cases by paired differences (paired by seed) with a 95%
interval and a verdict word, and says which precision the runs trained in and why.

Fake comparison folders come from tests/test_report.py's writer; every expected number is
recomputed here with numpy and scipy, independently of bnlab.evidence.stats.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from bnlab.evidence.stats import VERDICTS
from bnlab.report import MIN_EFFECT, summarize, summary_lines, write_report
from tests.test_report import make_compare


def _expected(written, higher: str, lower: str) -> tuple[float, float, float]:
    """Mean paired difference and its 95% t-interval, from the written metrics."""
    d = np.array([h[-1]["test_acc"] - lo[-1]["test_acc"]
                  for h, lo in zip(written[higher], written[lower], strict=True)])
    half = sps.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def test_every_pair_is_a_paired_difference_with_an_interval_and_a_verdict(tmp_path):
    written = make_compare(tmp_path, seeds=(0, 1, 2), skills={"a": 0.60, "b": 0.90,
                                                                "c": 0.895})
    summary = summarize(tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    pairs = {(p["higher"], p["lower"]): p for p in summary["paired_differences"]}
    finals = {c: np.mean([r[-1]["test_acc"] for r in runs]) for c, runs in written.items()}
    order = sorted(finals, key=finals.get, reverse=True)
    assert order[-1] == "a" and len(pairs) == 3
    for (higher, lower), pair in pairs.items():
        assert finals[higher] >= finals[lower]
        mean, low, high = _expected(written, higher, lower)
        print(f"{higher} - {lower}: {mean:+.4f} [{low:+.4f}, {high:+.4f}] {pair['verdict']}")
        assert pair["n"] == 3 and pair["min_effect"] == MIN_EFFECT
        assert pair["mean"] == pytest.approx(mean, abs=1e-12)
        assert (pair["low"], pair["high"]) == pytest.approx((low, high), abs=1e-12)
        assert pair["verdict"] in VERDICTS
        assert pair["verdict"] == ("supported" if low > MIN_EFFECT else "inconclusive")
    # 0.3 apart with noise 0.01: separated; 0.005 apart: not
    assert pairs[(order[0], "a")]["verdict"] == "supported"
    assert pairs[(order[0], order[1])]["verdict"] == "inconclusive"
    markdown = write_report(tmp_path)["markdown"].read_text()
    assert "## Paired differences" in markdown
    head = markdown.index("## Paired differences")
    assert markdown.index("## Results per case") < head < markdown.index("## Curves")
    for (higher, lower), pair in pairs.items():
        assert (f"| {higher} − {lower} | {100 * pair['mean']:+.2f} | "
                f"[{100 * pair['low']:+.2f}, {100 * pair['high']:+.2f}] | 3 | "
                f"{pair['verdict']} |") in markdown


def test_one_seed_has_no_interval_and_no_verdict_but_inconclusive(tmp_path):
    make_compare(tmp_path, seeds=(0,))
    summary = summarize(tmp_path)
    for pair in summary["paired_differences"]:
        assert pair["n"] == 1 and pair["low"] is None and pair["verdict"] == "inconclusive"
    assert "n/a (one seed)" in write_report(tmp_path)["markdown"].read_text()


def test_pairs_use_only_the_seeds_both_cases_finished(tmp_path):
    written = make_compare(tmp_path, cases=("a", "b"), seeds=(0, 1, 2),
                           skills={"a": 0.6, "b": 0.8})
    result = tmp_path / "a" / "seed2" / "result.json"
    result.write_text(json.dumps({"status": "diverged", "message": "nan", "wall_time_s": 1}))
    (pair,) = summarize(tmp_path)["paired_differences"]
    expected = [written["b"][s][-1]["test_acc"] - written["a"][s][-1]["test_acc"]
                for s in (0, 1)]
    assert pair["n"] == 2 and pair["values"] == pytest.approx(expected)


def _set_precision(folder, resolved: dict | None) -> None:
    for config_path in folder.glob("*/seed*/config.json"):
        config = json.loads(config_path.read_text())
        if resolved is None:
            config["precision"] = "fp32"
        else:
            config.update(precision=resolved["requested"], precision_resolved=resolved)
        config_path.write_text(json.dumps(config))


BF16 = {"name": "bf16", "requested": "auto", "device_type": "cpu", "param_dtype": "float32",
        "autocast_dtype": "bfloat16",
        "reason": "auto: bfloat16 autocast, because this CPU has AMX-BF16"}


def test_the_report_and_the_printed_summary_say_which_precision_ran_and_why(tmp_path):
    make_compare(tmp_path, seeds=(0, 1, 2))
    _set_precision(tmp_path, BF16)
    summary = summarize(tmp_path)
    assert summary["precision"] == [{"name": "bf16", "reason": BF16["reason"], "runs": 9}]
    sentence = "Precision: bf16 (auto: bfloat16 autocast, because this CPU has AMX-BF16), 9 runs."
    assert sentence in write_report(tmp_path)["markdown"].read_text()
    lines = summary_lines(summary)
    print("\n".join(lines))
    assert lines[0] == sentence
    for name, case in summary["cases"].items():
        acc = case["final_test_acc"]
        assert any(line.strip().startswith(f"{name}: final test acc {acc['mean']:.4f} ± "
                                           f"{acc['std']:.4f} (3 seeds)") for line in lines)
    for pair in summary["paired_differences"]:
        assert any(f"{pair['higher']} − {pair['lower']}: {100 * pair['mean']:+.2f} points"
                   in line and line.endswith(pair["verdict"]) for line in lines)


def test_runs_from_before_the_resolved_precision_say_what_they_asked_for(tmp_path):
    make_compare(tmp_path, cases=("a", "b"), seeds=(0,))
    _set_precision(tmp_path, None)
    (entry,) = summarize(tmp_path)["precision"]
    assert entry["name"] == "fp32" and entry["runs"] == 2
    assert "before bnlab recorded" in entry["reason"]
