"""The post's five questions, each answered by an experiment: ``bnlab study q1..q5|all``.

| study | question                                  | module             |
|-------|-------------------------------------------|--------------------|
| q1    | Is BN a regularizer?                      | bnlab.studies.q1   |
| q2    | What does BN buy?                         | bnlab.studies.q2   |
| q3    | What does BN cost?                        | bnlab.studies.q3   |
| q4    | Internal covariate shift                  | bnlab.studies.q4   |
| q5    | Exponentially weighted averages           | bnlab.studies.q5   |

One study writes its folder: ``runs/`` (one run folder per configuration and seed),
``summary.json`` (every number its section states), its figures (PNG), ``section.md``, and
``report.md`` / ``report.html``. ``study all`` puts the five folders side by side and writes
one report that answers the five questions from the measured data.

    >>> from bnlab.studies import STUDIES
    >>> sorted(STUDIES)
    ['q1', 'q2', 'q3', 'q4', 'q5']
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from bnlab import data as bdata
from bnlab.evidence.page import markdown_to_html
from bnlab.runs import ReportError, atomic_write_json, folder_lock, read_json
from bnlab.studies.common import SCALES, StudyClock, StudyContext

__all__ = ["STUDIES", "check_scale", "plan_conflicts", "read_plan", "render_report",
           "render_study", "run_all", "run_study"]

STUDIES: dict[str, str] = {
    "q1": "Is BN a regularizer?",
    "q2": "What does BN buy?",
    "q3": "What does BN cost?",
    "q4": "Internal covariate shift",
    "q5": "Exponentially weighted averages",
}


def study_module(name: str) -> ModuleType:
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}: choose from {', '.join(STUDIES)} or all")
    return importlib.import_module(f"bnlab.studies.{name}")


def check_scale(preset: str, seeds: int | None) -> None:
    """Raise ValueError for an unknown preset or fewer than one seed."""
    if preset not in SCALES:
        raise ValueError(f"unknown preset {preset!r}: choose from {', '.join(SCALES)}")
    if seeds is not None and seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")


PLAN = "study.json"  # what a study folder was started with: study, preset, seeds, data_dir


def read_plan(out: str | Path) -> dict | None:
    """The ``study.json`` of a study folder (None for a folder from before bnlab wrote one).

    Raises :class:`~bnlab.runs.ReportError` naming the file when it is damaged.
    """
    path = Path(out) / PLAN
    if not path.exists():
        return None
    plan = read_json(path, "the study's settings, written when it started")
    if plan.get("preset") not in SCALES or not isinstance(plan.get("study"), str):
        raise ReportError(f"{path}: 'study' and 'preset' are missing or unknown (got "
                          f"{plan.get('study')!r}, {plan.get('preset')!r}); restore the file "
                          "or delete it to resume with the command line's settings")
    return plan


def plan_conflicts(saved: dict | None, requested: dict) -> list[str]:
    """What in ``requested`` (``study``, ``preset``, ``seeds``, ``data_dir``; None: not given)
    would change the study saved in ``saved`` (a ``study.json``), as lines such as
    ``"--seeds 3 (the study has 2)"``; empty when nothing conflicts or nothing was saved."""
    if not saved:
        return []
    conflicts = []
    if requested.get("study") not in (None, saved["study"]):
        conflicts.append(f"study {requested['study']} (the folder holds {saved['study']})")
    for key in ("preset", "seeds", "data_dir"):
        value = requested.get(key)
        if value is not None and value != saved.get(key):
            conflicts.append(f"--{key.replace('_', '-')} {value} (the study has "
                             f"{saved.get(key)})")
    return conflicts


def _prepare_out(out: Path, resume: bool, plan: dict) -> None:
    if out.exists() and not resume and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: bnlab never overwrites results "
                              f"(choose another --out, or --resume it)")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / PLAN).exists():
        atomic_write_json(out / PLAN, plan)


def render_study(name: str, out: str | Path) -> str:
    """Study ``name``'s section from ``out/summary.json``; a summary that is not one of
    this study's (another study's, or cut short) raises :class:`~bnlab.runs.ReportError`
    naming the file."""
    out = Path(out)
    read_json(out / "summary.json", f"is {out} a folder written by 'bnlab study {name}'?")
    try:
        return study_module(name).render(out)
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as error:
        if isinstance(error, ReportError):
            raise
        plan = read_plan(out) or {}
        held = f" (its {PLAN} says {plan['study']})" if plan.get("study") else ""
        raise ReportError(
            f"{out / 'summary.json'} is not a complete {name} summary{held}: "
            f"{type(error).__name__} {error}; resume the study to finish it, or render "
            "the study it belongs to") from error


def run_study(
    name: str,
    out: str | Path,
    *,
    preset: str = "quick",
    seeds: int | None = None,
    data_dir: str | None = None,
    device: str = "auto",
    resume: bool = False,
    quiet: bool = False,
    log: Callable[[str], None] = print,
    dataset=None,
    finished_runs: dict[str, Path] | None = None,
    clock: StudyClock | None = None,
) -> dict:
    """Run study ``name`` into ``out`` and write its section and report; returns its summary.

    ``finished_runs`` and ``clock`` (see :class:`~bnlab.studies.common.StudyContext`) share
    identical runs and one progress count between the studies of one ``bnlab study all``.
    """
    module = study_module(name)
    check_scale(preset, seeds)
    out = Path(out)
    if dataset is None:  # the data is found before any folder is made
        dataset = bdata.load_cifar10(data_dir)
    _prepare_out(out, resume, {"study": name, "preset": preset, "seeds": seeds,
                               "data_dir": data_dir})
    with folder_lock(out, f"running study {name}"):
        return _run_study(module, name, out, preset, seeds, data_dir, device, quiet, log,
                          dataset, finished_runs, clock)


def _run_study(module: ModuleType, name: str, out: Path, preset: str, seeds: int | None,
               data_dir: str | None, device: str, quiet: bool, log: Callable[[str], None],
               dataset: bdata.CIFAR10, finished_runs: dict[str, Path] | None,
               clock: StudyClock | None) -> dict:
    scale = SCALES[preset]
    ctx = StudyContext(out=out, scale=scale, seeds=seeds or scale.seeds, data_dir=data_dir,
                       device=device, quiet=quiet, log=log, dataset=dataset,
                       finished_runs=finished_runs, clock=clock)
    started = time.perf_counter()
    summary = module.run(ctx)
    summary_path = out / "summary.json"
    stored = json.loads(summary_path.read_text())
    stored.setdefault("wall_time_s", time.perf_counter() - started)
    summary_path.write_text(json.dumps(stored, indent=2) + "\n")
    section = module.render(out)
    (out / "section.md").write_text(section)
    _write_report(out, f"bnlab study {name}: {STUDIES[name]}", section)
    return summary


def run_all(
    out: str | Path,
    *,
    preset: str = "quick",
    seeds: int | None = None,
    data_dir: str | None = None,
    device: str = "auto",
    resume: bool = False,
    quiet: bool = False,
    log: Callable[[str], None] = print,
    dataset: bdata.CIFAR10 | None = None,
) -> dict:
    """All five studies into ``out/q1`` ... ``out/q5``, then the combined report.

    ``dataset`` (loaded once by the caller, or here from ``data_dir``) is shared by every
    study.
    """
    check_scale(preset, seeds)  # before any folder is made or data is read
    out = Path(out)
    if dataset is None:
        dataset = bdata.load_cifar10(data_dir)
    _prepare_out(out, resume, {"study": "all", "preset": preset, "seeds": seeds,
                               "data_dir": data_dir})
    with folder_lock(out, "running study all"):
        return _run_all(out, preset, seeds, data_dir, device, quiet, log, dataset)


def _run_all(out: Path, preset: str, seeds: int | None, data_dir: str | None, device: str,
             quiet: bool, log: Callable[[str], None], dataset: bdata.CIFAR10) -> dict:
    started = time.perf_counter()
    times = {}
    finished_runs: dict[str, Path] = {}  # a run two studies need is trained once
    clock = StudyClock(SCALES[preset].budget_s, started=started)  # one count for the five
    for name in STUDIES:
        t0 = time.perf_counter()
        log(f"== study {name}: {STUDIES[name]}")
        run_study(name, out / name, preset=preset, seeds=seeds, data_dir=data_dir,
                  device=device, resume=True, quiet=quiet, log=log, dataset=dataset,
                  finished_runs=finished_runs, clock=clock)
        times[name] = time.perf_counter() - t0
    summary = {"preset": preset, "data": dataset.source, "studies": list(STUDIES),
               "wall_time_s": time.perf_counter() - started, "study_time_s": times}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    render_report(out)
    return summary


def render_report(out: str | Path) -> dict[str, Path]:
    """The combined report.md / report.html of a ``study all`` folder, from its files."""
    out = Path(out)
    top = read_json(out / "summary.json", f"is {out} a folder written by 'bnlab study all'?")
    missing = [key for key in ("data", "preset", "wall_time_s", "studies") if key not in top]
    if missing or top.get("preset") not in SCALES:
        raise ReportError(f"{out / 'summary.json'} is not a complete 'study all' summary "
                          f"(missing {', '.join(missing) or 'a known preset'}): resume the "
                          "study to finish it")
    parts = [
        "# bnlab: the post's five questions, answered by experiment",
        "",
        f"Data: **{top['data']}**. Preset `{top['preset']}`: {SCALES[top['preset']].description}."
        f" Wall time of the whole study: {top['wall_time_s'] / 60:.1f} min. Each section below "
        "is drawn from its study's `summary.json`; numbers are mean ± sample standard "
        "deviation over seeds.",
        "",
    ]
    for name in top["studies"]:
        section = render_study(name, out / name)
        # figures live in the study's folder: point the links there
        section = section.replace("](", f"]({name}/")
        parts += [section, ""]
    markdown = "\n".join(parts)
    return _write_report(out, "bnlab: the post's five questions", markdown)


def _write_report(out: Path, title: str, markdown: str) -> dict[str, Path]:
    md, page = out / "report.md", out / "report.html"
    md.write_text(markdown)
    page.write_text(markdown_to_html(markdown, out, title))
    return {"md": md, "html": page}
