"""Q5's experiment: the runs, the summary and its verdicts, the figures.
"""

from __future__ import annotations

import json
from typing import Any

from bnlab.config import resolve_device
from bnlab.evidence.stats import (
    interval_verdict,
    mean_std,
    no_worse_verdict,
    paired_difference,
)
from bnlab.studies.common import StudyContext, write_summary
from bnlab.studies.q5.averages import ewa_experiment
from bnlab.studies.q5.figures import (
    _plot_early_accuracy,
    _plot_momentum,
    _plot_precise,
    _plot_running_error,
    _plot_series,
    _plot_startup,
)
from bnlab.studies.q5.plan import (
    BN_MOMENTUM,
    EARLY,
    MIN_EFFECT,
    MIN_ERROR_EFFECT,
    MIN_STEPS,
    MOMENTA,
    POPULATION_IMAGES,
    TEST_IMAGES,
    WINDOW,
    run_epochs,
)
from bnlab.studies.q5.replay import _momentum_key, _Probe, probe_steps
from bnlab.train import prepare_dataset

# ---- the study ---------------------------------------------------------------------------

def run(ctx: StudyContext) -> dict:
    """The averages on their own, then one BN run per seed with the probes; the figures
    and summary.json; returns the summary."""
    dataset = ctx.load_data()
    n_train = ctx.train_images()
    notes: list[str] = []
    batch_size, steps_per_epoch, _ = ctx.schedule(notes)
    epochs, long_enough = run_epochs(ctx.scale.epochs, steps_per_epoch)
    total = epochs * steps_per_epoch
    window = min(WINDOW, total)

    probes: list[dict[int, dict[str, Any]]] = []
    finals: list[dict[str, Any]] = []
    precise: list[dict[int, dict[str, Any]]] = []
    for seed in ctx.seed_list():
        name = f"bn-seed{seed}"
        config = ctx.config(norm="bnlab", bn_momentum=BN_MOMENTUM, seed=seed, case="q5-bn",
                            batch_size=batch_size, epochs=epochs)
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
        points = probe.precise_log.read()
        if any(s not in points for s in probe.precise_steps):
            raise RuntimeError(f"{run_dir} finished without its precise-BN probes (epochs "
                               f"{[s // steps_per_epoch for s in probe.precise_steps]}): delete "
                               "it and run the study again")
        precise.append({s: points[s] for s in probe.precise_steps})

    series = ewa_experiment()
    summary: dict[str, Any] = {
        # seeds as a count: the acceptance walk reads every int under a "seeds" key
        "data": dataset.source, "preset": ctx.scale.name, "seeds": ctx.seeds,
        "seed_list": ctx.seed_list(), "n_seeds": ctx.seeds, "width": ctx.scale.width,
        "epochs": epochs,
        "scale_epochs": ctx.scale.epochs, "min_steps": MIN_STEPS, "long_enough": long_enough,
        "min_effect": MIN_EFFECT, "min_error_effect": MIN_ERROR_EFFECT,
        "train_images": n_train,
        "batch_size": batch_size, "lr": ctx.scale.lr, "steps_per_epoch": steps_per_epoch,
        "total_steps": total, "bn_momentum": BN_MOMENTUM, "window": window,
        "early_steps": min(EARLY, window), "probe_steps": probe_steps(window),
        "population_images": min(POPULATION_IMAGES, n_train),
        "test_images": min(TEST_IMAGES, dataset.num_test), "all_test_images": dataset.num_test,
        "notes": notes, "ewa": series,
    }
    summary.update(_bn_summary(probes, finals, summary))
    summary["precise"] = _precise_summary(precise, ctx.seed_list())
    summary["claims"] = _claims(summary, ctx.seed_list())
    _plot_series(summary, ctx.out / "q5_ewa_series.png")
    _plot_startup(summary, ctx.out / "q5_ewa_startup.png")
    _plot_running_error(summary, ctx.out / "q5_bn_running_error.png")
    _plot_early_accuracy(summary, ctx.out / "q5_bn_early_accuracy.png")
    _plot_momentum(summary, ctx.out / "q5_momentum_accuracy.png")
    _plot_precise(summary, ctx.out / "q5_precise_bn.png")
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
        momenta[key]["acc_raw_per_seed"] = [e["acc_raw"] for e in entries]
        momenta[key]["momentum"] = momentum
        momenta[key]["start_weight"] = (None if momentum is None
                                        else (1 - momentum) ** summary["total_steps"])
    return {
        "bn_curves": curves, "early": early_stats, "first_step": first, "window_end": end,
        "momenta": momenta,
        "final_acc_population": mean_std([f["acc_population"] for f in finals]),
    }




def _precise_summary(precise: list[dict[int, dict[str, Any]]], seeds: list[int]
                     ) -> list[dict[str, Any]]:
    """Per precise-BN point (epoch): each accuracy as mean ± std over seeds, and precise
    minus running (augmented and plain) and plain minus augmented, paired by seed."""
    out = []
    for step in precise[0]:
        records = [p[step] for p in precise]
        entry: dict[str, Any] = {"step": step, "epoch": records[0]["epoch"]}
        for key in ("acc_running", "acc_precise_augmented", "acc_precise_plain",
                    "mean_error_running", "var_error_running"):
            entry[key] = mean_std([r[key] for r in records])
        by = {key: dict(zip(seeds, [r[key] for r in records], strict=True))
              for key in ("acc_running", "acc_precise_augmented", "acc_precise_plain")}
        entry["precise_vs_running"] = paired_difference(by["acc_precise_augmented"],
                                                        by["acc_running"])
        entry["plain_vs_running"] = paired_difference(by["acc_precise_plain"],
                                                      by["acc_running"])
        entry["plain_vs_augmented"] = paired_difference(by["acc_precise_plain"],
                                                        by["acc_precise_augmented"])
        out.append(entry)
    return out


def _per_seed_early(s: dict[str, Any], kind: str) -> list[float]:
    """Per seed, the mean of the mean's and the variance's error over the first steps."""
    steps = s["probe_steps"]
    count = len([t for t in steps if t <= s["early_steps"]])
    return [(sum(m[:count]) / count + sum(v[:count]) / count) / 2 for m, v in zip(
        s["bn_curves"][f"mean_error_{kind}"], s["bn_curves"][f"var_error_{kind}"],
        strict=True)]


def _per_seed_early_acc(s: dict[str, Any], kind: str) -> list[float]:
    steps = s["probe_steps"]
    count = len([t for t in steps if t <= s["early_steps"]])
    return [sum(a[:count]) / count for a in s["bn_curves"][f"acc_{kind}"]]


def _claims(s: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """Each claim with its paired difference (95% t interval over seeds), the minimum
    effect it is judged against and its verdict, one of *supported*, *contradicted*,
    *inconclusive*."""
    betas = s["ewa"]["betas"].values()
    tightest = f"{min(s['ewa']['thresholds']):.6g}"
    faster = [b["measured"]["corrected"][tightest] is not None and (
        b["measured"]["raw"][tightest] is None
        or b["measured"]["corrected"][tightest] < b["measured"]["raw"][tightest])
        for b in betas]

    def by_seed(values: list[float]) -> dict[int, float]:
        return dict(zip(seeds, values, strict=True))

    error = paired_difference(by_seed(_per_seed_early(s, "corrected")),
                              by_seed(_per_seed_early(s, "raw")))
    acc = paired_difference(by_seed(_per_seed_early_acc(s, "corrected")),
                            by_seed(_per_seed_early_acc(s, "raw")))
    last = s["precise"][-1]
    own = _momentum_key(s["bn_momentum"])
    momentum_diffs = {}
    for key, m in s["momenta"].items():
        if key != own:
            momentum_diffs[key] = paired_difference(
                by_seed(m["acc_raw_per_seed"]), by_seed(s["momenta"][own]["acc_raw_per_seed"]))
    # PyTorch's default loses nothing that matters against any other momentum: the cost
    # of the default against momentum m is acc(m) - acc(default), per seed
    words = [no_worse_verdict(d, MIN_EFFECT) for d in momentum_diffs.values()]
    default = ("contradicted" if "contradicted" in words else
               "supported" if words and all(w == "supported" for w in words) else
               "inconclusive")
    return {
        "ewa_startup": {
            "claim": "bias correction removes the start-up bias of an exponentially "
                     "weighted average (Ng's lecture, the post's source)",
            "verdict": "supported" if all(faster) else "contradicted",
            "evidence": f"{s['ewa']['replicates']} simulated series per beta"},
        "bias_correction": {
            "claim": "bias correction reduces the error of BN's running statistics in the "
                     "first steps",
            "difference": error, "accuracy_difference": acc,
            "min_effect": MIN_ERROR_EFFECT,
            "verdict": interval_verdict(error, "below", MIN_ERROR_EFFECT)},
        "running_stand_in": {
            "claim": "the moving averages stand in for the data's statistics at test time "
                     "(the post): precise population statistics gain nothing that matters",
            "epoch": last["epoch"], "difference": last["precise_vs_running"],
            "min_effect": MIN_EFFECT,
            "verdict": no_worse_verdict(last["precise_vs_running"], MIN_EFFECT)},
        "default_momentum": {
            "claim": "PyTorch's momentum 0.1 loses nothing that matters against other "
                     "momenta once every setting has forgotten its start",
            "differences": momentum_diffs, "min_effect": MIN_EFFECT,
            "steps": s["total_steps"], "long_enough": s["long_enough"],
            "verdict": default if s["long_enough"] else "inconclusive"},
    }
