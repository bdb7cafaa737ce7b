"""``bnlab compare``: every case and seed into one folder, then the summary and report.

    >>> from bnlab.compare import plan_comparison, run_comparison   # doctest: +SKIP
    >>> plan = plan_comparison(["a", "b"], seeds=2, preset="quick", out="runs/ab")
    >>> run_comparison(plan)

Folder layout: ``compare.json`` (the plan: cases, seeds, preset, every run's config, the
data), ``<case>/seed<k>/`` (one run folder each), ``summary.json``, ``curves.png``,
``report.md`` and ``report.html``, and ``init_health.json`` (:mod:`bnlab.init_health`: each
init option's activation scale and dead logits at init, shown in the report). ``--resume``
rebuilds the plan from ``compare.json``: finished runs are skipped and unfinished ones
continue from their last checkpoint. A resumed comparison is the one that was planned: a flag
that would change it (other cases, seeds, epochs, ...) is refused, naming the flag
(:func:`resume_conflicts`); extend a comparison by starting a new one. ``.bnlab.lock`` in the
folder keeps a second process out while one trains.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bnlab import data as bdata
from bnlab import distributed as bdist
from bnlab import report
from bnlab.cases import CASES, PRESETS, case_config, case_definition
from bnlab.config import ConfigError, TrainConfig, resolve_device
from bnlab.init_health import init_health_table
from bnlab.precision import resolve_precision
from bnlab.progress import JobProgress
from bnlab.runs import ReportError, atomic_write_json, check_free, folder_lock, read_compare
from bnlab.train import DivergenceError, train

__all__ = ["ComparisonPlan", "plan_comparison", "resume_conflicts", "resume_plan",
           "run_comparison"]


@dataclass
class ComparisonPlan:
    """Everything a comparison will run, checked before any file is written."""

    out: Path
    preset: str
    cases: list[str]
    seeds: list[int]
    configs: dict[str, dict[int, TrainConfig]]
    dataset: bdata.CIFAR10
    command: str
    resume: bool = False
    tensorboard: bool = False  # an output, not a setting: may be asked on --resume too

    def to_json(self) -> dict:
        return {
            "cases": self.cases, "seeds": self.seeds, "preset": self.preset,
            "case_labels": {c: case_definition(c, self.preset).label for c in self.cases},
            "data": self.configs_data(), "command": self.command,
            "configs": {c: {str(s): cfg.to_json() for s, cfg in by_seed.items()}
                        for c, by_seed in self.configs.items()},
        }

    def configs_data(self) -> str:
        first = next(iter(next(iter(self.configs.values())).values()))
        if first.subset is not None and first.subset < self.dataset.num_train:
            return self.dataset.subset(first.subset, seed=0).source
        return self.dataset.source


def default_out_dir(preset: str) -> Path:
    """runs/compare-<preset>-<date-time>, never an existing folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / f"compare-{preset}-{stamp}"
    k = 1
    while out.exists():
        k += 1
        out = Path("runs") / f"compare-{preset}-{stamp}-{k}"
    return out


def plan_comparison(
    cases: list[str] | None,
    seeds: int | None,
    preset: str = "quick",
    out: str | Path | None = None,
    overrides: dict | None = None,
    command: str = "",
    dataset: bdata.CIFAR10 | None = None,
) -> ComparisonPlan:
    """Check every input; raise ConfigError/DataError before any file is made.

    ``dataset``: the data, loaded once by the caller (the CLI); None loads it here from
    ``overrides["data_dir"]`` (the cache, a download, else the embedded sample).
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    cases = list(cases) if cases else list(PRESETS[preset].cases)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ConfigError(f"unknown case(s) {', '.join(unknown)}: choose from {', '.join(CASES)}")
    runs_under = {c: _presets_of(c) for c in cases}
    misplaced = {c: names for c, names in runs_under.items() if preset not in names}
    if misplaced:
        raise ConfigError("; ".join(
            f"case {c} does not run under preset {preset}: use --preset "
            f"{' or '.join(names)}" for c, names in misplaced.items()))
    if len(set(cases)) != len(cases):
        raise ConfigError(f"a case is named twice in {','.join(cases)}: name each case once")
    n_seeds = PRESETS[preset].seeds if seeds is None else seeds
    if n_seeds < 1:
        raise ConfigError(f"seeds must be at least 1, got {n_seeds}")
    overrides = overrides or {}
    epochs = overrides.get("epochs")
    if epochs is not None and epochs < 1:
        raise ConfigError(f"epochs must be at least 1, got {epochs}")
    configs = {c: {s: case_config(c, preset, s, **overrides) for s in range(n_seeds)}
               for c in cases}
    out = Path(out) if out is not None else bdist.agree(default_out_dir(preset))
    if out.exists():
        raise FileExistsError(f"{out} exists: bnlab never overwrites a comparison "
                              f"(use --resume {out} to continue it, or choose another --out)")
    resolve_device(configs[cases[0]][0].device)
    if dataset is None:
        dataset = bdata.load_cifar10(overrides.get("data_dir"))
    _check_fits(configs, dataset)
    return ComparisonPlan(out, preset, cases, list(range(n_seeds)), configs, dataset, command)


def _presets_of(case: str) -> list[str]:
    """The presets whose network ``case`` can be built on (All-CNN-C's variants of BN are
    not the post net's, and the post's per-activation BN is not All-CNN-C's)."""
    def builds(preset: str) -> bool:
        try:
            case_config(case, preset, 0)
        except ConfigError:
            return False
        return True

    return [name for name in PRESETS if builds(name)]


def _check_fits(configs: dict[str, dict[int, TrainConfig]], dataset: bdata.CIFAR10) -> None:
    for by_seed in configs.values():
        for cfg in by_seed.values():
            n = min(cfg.subset or dataset.num_train, dataset.num_train)
            if cfg.batch_size > n:
                raise ConfigError(f"batch size {cfg.batch_size} is larger than the training set "
                                  f"({n} images of {dataset.source})")


def check_resumable(out: Path) -> Path:
    """``out/compare.json``; :class:`ConfigError` when ``out`` is missing or not a
    comparison folder."""
    if not out.exists():
        raise ConfigError(f"cannot resume {out}: no such folder (start a new comparison "
                          f"with --out {out})")
    path = out / "compare.json"
    if not path.is_file():
        raise ConfigError(f"cannot resume {out}: no compare.json there (is it a bnlab "
                          f"comparison folder?)")
    return path


def resume_plan(out: str | Path) -> ComparisonPlan:
    """The plan of an existing comparison folder, from its ``compare.json``.

    Raises :class:`ConfigError` when the folder holds no ``compare.json`` and
    :class:`~bnlab.runs.ReportError` naming the file when it is damaged.
    """
    out = Path(out)
    path = check_resumable(out)
    saved = read_compare(out, plan=True)
    try:
        configs = {c: {int(s): TrainConfig.from_json(saved["configs"][c][str(s)])
                       for s in saved["seeds"]} for c in saved["cases"]}
    except (TypeError, ValueError) as error:
        raise ReportError(f"{path}: a saved config cannot be read ({error}); the file is "
                          "damaged or from another bnlab version") from error
    check_free(out)  # a folder another process trains in is refused before the data loads
    some = next(iter(configs[saved["cases"][0]].values()))
    dataset = bdata.load_cifar10(some.data_dir)
    return ComparisonPlan(out, saved["preset"], saved["cases"], saved["seeds"], configs,
                          dataset, saved.get("command", ""), resume=True)


# the config fields a command line may set, checked against a saved plan on --resume
_PLAN_FIELDS = ("epochs", "subset", "width", "lr", "batch_size", "device", "data_dir",
                "precision")


def resume_conflicts(saved: dict, requested: dict) -> list[str]:
    """The flags of ``requested`` that would change the comparison saved in ``saved``.

    ``saved`` is a ``compare.json`` (as :func:`bnlab.runs.read_compare` returns it);
    ``requested`` maps ``cases``, ``seeds`` (a count), ``preset``, ``out`` and the config
    fields of :data:`_PLAN_FIELDS` to what the command line asked (None: not given). A
    value equal to the saved one is no conflict. Returns lines such as
    ``"--epochs 5 (the comparison has 2)"``, empty when nothing conflicts.
    """
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    conflicts = []
    if requested.get("cases") is not None and list(requested["cases"]) != saved["cases"]:
        conflicts.append(f"--cases {','.join(requested['cases'])} "
                         f"(the comparison has {','.join(saved['cases'])})")
    if requested.get("seeds") is not None and requested["seeds"] != len(saved["seeds"]):
        conflicts.append(f"--seeds {requested['seeds']} (the comparison has "
                         f"{len(saved['seeds'])})")
    if requested.get("preset") is not None and requested["preset"] != saved["preset"]:
        conflicts.append(f"--preset {requested['preset']} (the comparison has "
                         f"{saved['preset']})")
    if requested.get("out") is not None:
        conflicts.append(f"--out {requested['out']} (--resume names the folder)")
    configs = [cfg for by_seed in saved["configs"].values() for cfg in by_seed.values()]
    for name in _PLAN_FIELDS:
        value = requested.get(name)
        if value is None:
            continue
        have = sorted({str(cfg.get(name)) for cfg in configs})
        if name == "device" and value == "auto":
            continue
        if have != [str(value)]:
            held = ("was started without it" if have == ["None"]
                    else f"has {', '.join(have)}")
            conflicts.append(f"{flag(name)} {value} (the comparison {held})")
    return conflicts


def run_comparison(plan: ComparisonPlan, *, quiet: bool = False) -> dict:
    """Run (or continue) every case and seed, then write the summary and the report.

    Returns the summary. A diverged run is reported and the others go on; the caller
    learns of it from ``summary["diverged"]``.

    Data-parallel (every rank of a ``torch.distributed`` group calls this with the same
    plan: ``bnlab compare --nproc N``, ``torchrun``): each run trains on all ranks
    (:func:`bnlab.train.train`); rank 0 alone writes and prints; the others return
    ``{"diverged": [...]}`` without the summary.
    """
    lead = bdist.is_lead()

    def log(text: str) -> None:
        if not quiet and lead:
            print(text, flush=True)

    bdist.barrier()  # every rank has checked the plan before rank 0 makes the folder
    if not lead:
        return _run_plan(plan, log, quiet, lead)
    plan.out.mkdir(parents=True, exist_ok=plan.resume)
    with folder_lock(plan.out, "running a comparison"):
        if not plan.resume:
            atomic_write_json(plan.out / "compare.json", plan.to_json())
        write_init_health(plan)
        return _run_plan(plan, log, quiet, lead)


def _run_plan(plan: ComparisonPlan, log, quiet: bool, lead: bool) -> dict:
    device = resolve_device(next(iter(plan.configs[plan.cases[0]].values())).device)
    dataset = plan.dataset.to(device)
    precision = resolve_precision(next(iter(plan.configs[plan.cases[0]].values())).precision,
                                  device)
    log(f"bnlab compare: cases {','.join(plan.cases)}, {len(plan.seeds)} seed(s), "
        f"preset {plan.preset}, on {plan.configs_data()}, device {device}, precision "
        f"{precision.name} ({precision.reason})")
    diverged = []
    job = JobProgress(len(plan.cases) * len(plan.seeds))
    for index, (case, seed) in enumerate(
            ((c, s) for c in plan.cases for s in plan.seeds), 1):
        cfg = plan.configs[case][seed]
        run_dir = plan.out / case / f"seed{seed}"
        job.start_run(index, job.run_steps if index > 1 else 0)
        log(f"\n== {case_definition(case, plan.preset).label} — seed {seed} "
            f"({job.describe()})")
        writer = None
        if plan.tensorboard and lead:
            from bnlab.tensorboard import TensorBoardLogger
            writer = TensorBoardLogger(run_dir)
        try:
            train(cfg, run_dir, dataset=dataset, resume=bdist.agree(run_dir.exists()),
                  progress=job if not quiet and lead else False, log=log, on_epoch=writer)
        except DivergenceError as error:
            if lead:
                print(f"bnlab: run diverged: {error}", file=sys.stderr)
            diverged.append(f"{case}/seed{seed}")
        finally:
            if writer is not None:
                writer.close()
    if not lead:
        return {"diverged": diverged}
    summary = report.write_report(plan.out)
    log(f"\nwrote {plan.out}/summary.json, curves.png, report.md, report.html")
    for line in report.summary_lines(json.loads(Path(summary["summary"]).read_text())):
        log(line)
    summary = dict(summary)
    summary["diverged"] = diverged
    return summary


INIT_HEALTH_IMAGES = 128  # real images of the embedded sample for init_health.json


def write_init_health(plan: ComparisonPlan) -> None:
    """``init_health.json``: :func:`bnlab.init_health.init_health_table` at the width and
    first seed of the comparison's All-CNN-C runs, on the embedded sample's first
    :data:`INIT_HEALTH_IMAGES` training images (on the CPU, a few seconds at width 0.25).
    Written once per folder; nothing for a comparison of the post net alone."""
    path = plan.out / "init_health.json"
    allcnn = [cfg for by_seed in plan.configs.values() for cfg in by_seed.values()
              if cfg.arch == "allcnn"]
    if path.exists() or not allcnn:
        return
    first = allcnn[0]
    rows = init_health_table(first.width, first.seed, INIT_HEALTH_IMAGES)
    atomic_write_json(path, {"data": bdata.load_embedded_sample().source,
                             "images": INIT_HEALTH_IMAGES, "width": first.width,
                             "seed": first.seed, "rows": rows}, ensure_ascii=False)


def command_line(argv: list[str]) -> str:
    return "bnlab " + " ".join(shlex.quote(a) for a in argv)

