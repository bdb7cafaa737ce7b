"""A comparison's paired differences and the precisions its runs trained in: the numbers in
summary.json's ``paired_differences`` / ``precision``, their Markdown table and the lines
``bnlab compare`` prints when it ends (moved out of :mod:`bnlab.report`, which re-exports them).

Conventions as in :mod:`bnlab.report`: accuracies are fractions in [0, 1]; differences are
printed in percentage points.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bnlab.evidence.stats import interval_verdict, paired_difference
from bnlab.runs import Run

# The smallest difference in final test accuracy (a fraction: 0.01 = 1 point) that counts as
# separating two cases, stated before any run (SPEC.md, "Evidence"): a pair is *supported*
# as different only when the whole 95% interval of its paired difference lies above it.
MIN_EFFECT = 0.01


def _per_seed(case: Mapping[str, Any]) -> dict[Any, float | None]:
    """The final test accuracy of each finished seed of a case (summary.json's values)."""
    return dict(zip(case["averaged_seeds"], case["final_test_acc"]["values"], strict=False))


def _fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _mean_std(stat: Mapping[str, Any], digits: int = 4) -> str:
    if stat["mean"] is None:
        return "—"
    if len([v for v in stat["values"] if v is not None]) < 2:
        return _fmt(stat["mean"], digits)
    return f"{_fmt(stat['mean'], digits)} ± {_fmt(stat['std'], digits)}"


def paired_differences(cases: Mapping[str, Mapping[str, Any]],
                       min_effect: float = MIN_EFFECT) -> list[dict[str, Any]]:
    """Every pair of cases with finished runs, by final test accuracy paired by seed.

    ``cases``: summary.json's ``cases``. Per pair (in the cases' order): ``higher`` and
    ``lower`` (by mean), the :func:`bnlab.evidence.stats.paired_difference` of
    ``higher - lower`` over the seeds both finished (``mean``, ``std``, ``n``, ``low``,
    ``high`` of the 95% Student-t interval, ``values``), ``min_effect``, and ``verdict``
    on the claim "``higher`` beats ``lower`` by more than ``min_effect``"
    (:func:`~bnlab.evidence.stats.interval_verdict`): *supported* when the whole interval
    lies above ``min_effect``, else *inconclusive* (also with fewer than two paired seeds).
    A seed pairs runs that share their data order and augmentation (the same generator
    streams), so the pairing removes the part of the seed noise the cases share.
    """
    names = [n for n in cases if cases[n]["final_test_acc"]["mean"] is not None]
    pairs = []
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            higher, lower = sorted((first, second),
                                   key=lambda n: -cases[n]["final_test_acc"]["mean"])
            d = paired_difference(_per_seed(cases[higher]), _per_seed(cases[lower]))
            pairs.append({"higher": higher, "lower": lower, "metric": "final_test_acc",
                          **{k: d[k] for k in ("mean", "std", "n", "low", "high",
                                               "confidence", "values")},
                          "min_effect": min_effect,
                          "verdict": interval_verdict(d, "above", min_effect)})
    return pairs


def _precisions(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """The precisions the runs trained in and why (config.json's ``precision_resolved``;
    a run from before bnlab recorded it: its requested precision), with their run counts."""
    seen: dict[tuple[str, str], int] = {}
    for run in runs:
        resolved = run.config.get("precision_resolved")
        if resolved:
            key = (str(resolved["name"]), str(resolved["reason"]))
        else:
            key = (str(run.config.get("precision", "fp32")),
                   "as requested (a run from before bnlab recorded the resolved precision)")
        seen[key] = seen.get(key, 0) + 1
    return [{"name": name, "reason": reason, "runs": n} for (name, reason), n in seen.items()]


def precision_sentence(summary: Mapping[str, Any]) -> str:
    """"Precision: bf16 (auto: bfloat16 autocast, because this CPU has AMX-BF16), 9 runs." """
    parts = [f"{p['name']} ({p['reason']}), {p['runs']} run{'s' if p['runs'] != 1 else ''}"
             for p in summary.get("precision") or []]
    return "Precision: " + ("; ".join(parts) if parts else "unknown") + "."


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.2f}"


def differences_table(summary: Mapping[str, Any]) -> str:
    """The Markdown section of summary.json's ``paired_differences`` ("" without pairs)."""
    pairs = summary.get("paired_differences") or []
    if not pairs:
        return ""
    lines = ["| cases | difference (points) | 95% interval (points) | paired seeds | verdict |",
             "|---|---|---|---|---|"]
    for p in pairs:
        interval = ("n/a (one seed)" if p["low"] is None
                    else f"[{_points(p['low'])}, {_points(p['high'])}]")
        lines.append(f"| {p['higher']} − {p['lower']} | {_points(p['mean'])} | {interval} | "
                     f"{p['n']} | {p['verdict']} |")
    effect = 100 * pairs[0]["min_effect"]
    return "\n".join([
        "## Paired differences",
        "Final test accuracy of the higher case minus the lower, paired by seed (runs of "
        "one seed share their data order and augmentation), with the 95% Student-t "
        "interval of the mean difference. Verdict on the claim that the higher case is "
        f"better by more than {effect:g} point(s) (the minimum effect, stated in advance): "
        "*supported* when the whole interval lies above it, else *inconclusive*; with one "
        "seed there is no interval.",
        "",
        *lines,
    ])


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """What ``bnlab compare`` prints when it ends: the precision, each case's final test
    accuracy (mean ± std over seeds) and the paired differences with their verdicts."""
    lines = [precision_sentence(summary)]
    for name, case in summary["cases"].items():
        stat = case["final_test_acc"]
        lines.append(f"  {name}: final test acc {_mean_std(stat)} "
                     f"({case['n_finished']} seed{'s' if case['n_finished'] != 1 else ''})")
    for p in summary.get("paired_differences") or []:
        interval = ("no interval with one seed" if p["low"] is None
                    else f"95% interval [{_points(p['low'])}, {_points(p['high'])}]")
        lines.append(f"  {p['higher']} − {p['lower']}: {_points(p['mean'])} points, "
                     f"{interval}: {p['verdict']}")
    return lines
