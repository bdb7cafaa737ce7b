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
from bnlab.studies.common import SCALES, StudyContext

__all__ = ["STUDIES", "check_scale", "render_report", "run_all", "run_study"]

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


def _prepare_out(out: Path, resume: bool) -> None:
    if out.exists() and not resume and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: bnlab never overwrites results "
                              f"(choose another --out, or --resume it)")
    out.mkdir(parents=True, exist_ok=True)


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
) -> dict:
    """Run study ``name`` into ``out`` and write its section and report; returns its summary.

    ``finished_runs`` (see :class:`~bnlab.studies.common.StudyContext`) shares identical
    runs between the studies of one ``bnlab study all``.
    """
    module = study_module(name)
    check_scale(preset, seeds)
    out = Path(out)
    _prepare_out(out, resume)
    scale = SCALES[preset]
    ctx = StudyContext(out=out, scale=scale, seeds=seeds or scale.seeds, data_dir=data_dir,
                       device=device, quiet=quiet, log=log, dataset=dataset,
                       finished_runs=finished_runs)
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
    _prepare_out(out, resume)
    if dataset is None:
        dataset = bdata.load_cifar10(data_dir)
    started = time.perf_counter()
    times = {}
    finished_runs: dict[str, Path] = {}  # a run two studies need is trained once
    for name in STUDIES:
        t0 = time.perf_counter()
        log(f"== study {name}: {STUDIES[name]}")
        run_study(name, out / name, preset=preset, seeds=seeds, data_dir=data_dir,
                  device=device, resume=True, quiet=quiet, log=log, dataset=dataset,
                  finished_runs=finished_runs)
        times[name] = time.perf_counter() - t0
    summary = {"preset": preset, "data": dataset.source, "studies": list(STUDIES),
               "wall_time_s": time.perf_counter() - started, "study_time_s": times}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    render_report(out)
    return summary


def render_report(out: str | Path) -> dict[str, Path]:
    """The combined report.md / report.html of a ``study all`` folder, from its files."""
    out = Path(out)
    top = json.loads((out / "summary.json").read_text())
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
        section = study_module(name).render(out / name)
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
