"""Q5's experiment: the runs, the summary and its verdicts, the figures.
"""

from __future__ import annotations

import json
from typing import Any

from bnlab.evidence.stats import mean_std, relation
from bnlab.studies.common import StudyContext, write_summary
from bnlab.studies.q5.averages import ewa_experiment
from bnlab.studies.q5.figures import (
    _plot_early_accuracy,
    _plot_momentum,
    _plot_running_error,
    _plot_series,
    _plot_startup,
)
from bnlab.studies.q5.plan import (
    BN_MOMENTUM,
    EARLY,
    MOMENTA,
    POPULATION_IMAGES,
    TEST_IMAGES,
    WINDOW,
)
from bnlab.studies.q5.replay import _momentum_key, _Probe, probe_steps
from bnlab.train import prepare_dataset, resolve_device

# ---- the study ---------------------------------------------------------------------------

def run(ctx: StudyContext) -> dict:
    """The averages on their own, then one BN run per seed with the probes; the figures
    and summary.json; returns the summary."""
    dataset = ctx.load_data()
    n_train = ctx.train_images()
    notes: list[str] = []
    batch_size, steps_per_epoch, total = ctx.schedule(notes)
    window = min(WINDOW, total)

    probes: list[dict[int, dict[str, Any]]] = []
    finals: list[dict[str, Any]] = []
    for seed in ctx.seed_list():
        name = f"bn-seed{seed}"
        config = ctx.config(norm="bnlab", bn_momentum=BN_MOMENTUM, seed=seed, case="q5-bn",
                            batch_size=batch_size)
        run_dir = ctx.out / "runs" / name
        data = prepare_dataset(config, resolve_device(config.device), dataset)
        probe = _Probe(config, data, run_dir, steps_per_epoch, window)
        ctx.train_run(name, config, on_step=probe)
        records = probe.log.read()
        missing = [s for s in probe.probe_steps if s not in records]
        final_path = run_dir / "final.json"
        if missing or not final_path.exists():
            raise RuntimeError(f"{run_dir} finished without the Q5 probes (steps {missing[:5]}"
                               f" missing, or no final.json): delete it and run the study "
                               "again")
        probes.append({s: records[s] for s in probe.probe_steps})
        finals.append(json.loads(final_path.read_text()))

    series = ewa_experiment()
    summary: dict[str, Any] = {
        "data": dataset.source, "preset": ctx.scale.name, "seeds": ctx.seeds,
        "width": ctx.scale.width, "epochs": ctx.scale.epochs, "train_images": n_train,
        "batch_size": batch_size, "lr": ctx.scale.lr, "steps_per_epoch": steps_per_epoch,
        "total_steps": total, "bn_momentum": BN_MOMENTUM, "window": window,
        "early_steps": min(EARLY, window), "probe_steps": probe_steps(window),
        "population_images": min(POPULATION_IMAGES, n_train),
        "test_images": min(TEST_IMAGES, dataset.num_test), "all_test_images": dataset.num_test,
        "notes": notes, "ewa": series,
    }
    summary.update(_bn_summary(probes, finals, summary))
    summary["verdicts"] = _verdicts(summary)
    _plot_series(summary, ctx.out / "q5_ewa_series.png")
    _plot_startup(summary, ctx.out / "q5_ewa_startup.png")
    _plot_running_error(summary, ctx.out / "q5_bn_running_error.png")
    _plot_early_accuracy(summary, ctx.out / "q5_bn_early_accuracy.png")
    _plot_momentum(summary, ctx.out / "q5_momentum_accuracy.png")
    write_summary(ctx.out, summary)
    return summary


_CURVES = ("mean_error_raw", "mean_error_corrected", "var_error_raw", "var_error_corrected",
           "acc_raw", "acc_corrected", "acc_population")


def _bn_summary(probes: list[dict[int, dict[str, Any]]], finals: list[dict[str, Any]],
                summary: dict[str, Any]) -> dict[str, Any]:
    """Curves per seed; means over the first steps, at the window's end and after training,
    as mean ± std over seeds."""
    steps = summary["probe_steps"]
    early = [s for s in steps if s <= summary["early_steps"]]
    curves = {key: [[p[s][key] for s in steps] for p in probes] for key in _CURVES}
    early_stats = {key: mean_std([sum(p[s][key] for s in early) / len(early) for p in probes])
                   for key in _CURVES}
    first = {key: mean_std([p[steps[0]][key] for p in probes]) for key in _CURVES}
    end = {key: mean_std([p[steps[-1]][key] for p in probes]) for key in _CURVES}
    momenta = {}
    for momentum in MOMENTA:
        key = _momentum_key(momentum)
        entries = [f["momenta"][key] for f in finals]
        momenta[key] = {k: mean_std([e[k] for e in entries]) for k in entries[0]}
        momenta[key]["momentum"] = momentum
        momenta[key]["start_weight"] = (None if momentum is None
                                        else (1 - momentum) ** summary["total_steps"])
    return {
        "bn_curves": curves, "early": early_stats, "first_step": first, "window_end": end,
        "momenta": momenta,
        "final_acc_population": mean_std([f["acc_population"] for f in finals]),
    }




def _verdicts(s: dict[str, Any]) -> dict[str, str]:
    """Each claim against the numbers: "support", "contradict" or "inconclusive"."""
    betas = s["ewa"]["betas"].values()
    tightest = f"{min(s['ewa']['thresholds']):.6g}"
    faster = [b["measured"]["corrected"][tightest] is not None and (
        b["measured"]["raw"][tightest] is None
        or b["measured"]["corrected"][tightest] < b["measured"]["raw"][tightest])
        for b in betas]
    early = s["early"]
    early_error = relation(_early_error(s, "corrected"), _early_error(s, "raw"))
    early_acc = relation(early["acc_corrected"], early["acc_raw"])
    own = s["momenta"][_momentum_key(s["bn_momentum"])]
    stand_in = relation(own["acc_raw"], s["final_acc_population"])
    return {
        "ewa_startup": "support" if all(faster) else "contradict",
        "early_error_comparison": early_error,
        "early_acc_comparison": early_acc,
        "stand_in_comparison": stand_in,
        "bias_correction": {"lower": "support", "higher": "contradict"}.get(
            early_error, "inconclusive"),
        "running_stand_in": {"within": "support", "higher": "support",
                             "lower": "contradict"}.get(stand_in, "inconclusive"),
    }


def _early_error(s: dict[str, Any], kind: str) -> dict[str, Any]:
    """Per seed, the mean of the mean's and the variance's error over the first steps."""
    steps = s["probe_steps"]
    count = len([t for t in steps if t <= s["early_steps"]])
    per_seed = [(sum(m[:count]) / count + sum(v[:count]) / count) / 2 for m, v in zip(
        s["bn_curves"][f"mean_error_{kind}"], s["bn_curves"][f"var_error_{kind}"],
        strict=True)]
    return mean_std(per_seed)
