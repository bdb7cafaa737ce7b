"""What every study shares: its scale, its folder, its runs, its figures and its section.

A study is a module with ``NAME`` ("q1"), ``TITLE``, and two functions:

    run(ctx: StudyContext) -> dict      trains and measures, writes summary.json and figures
    render(study_dir: Path) -> str      its Markdown section, drawn from summary.json alone

so a report can be redrawn without training again (``bnlab study ... --resume`` reuses every
finished run). Every number a section states is read from the study's ``summary.json``.

Numbers, verdicts, figures and the HTML page come from :mod:`bnlab.evidence`.

    >>> from bnlab.studies.common import SCALES
    >>> SCALES["quick"].seeds
    3
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bnlab import data as bdata
from bnlab.config import TrainConfig
from bnlab.progress import format_duration
from bnlab.runs import atomic_write_json, read_json
from bnlab.train import RunResult, train

__all__ = [
    "SCALES",
    "ProbeLog",
    "StudyClock",
    "StudyContext",
    "StudyScale",
    "note_lines",
    "read_summary",
    "write_summary",
]


@dataclass(frozen=True)
class StudyScale:
    """How big the studies' experiments are. Each study derives its runs from these.

    ``width``, ``epochs``, ``subset`` (training images, None = all) and ``batch_size`` are
    the defaults of a study's training runs; ``seeds`` is how many seeds each point gets;
    ``budget_s`` is what the whole ``bnlab study all`` should take on the reference machine
    (a 2-core CPU for quick), which each study divides among its runs.
    """

    name: str
    width: float
    epochs: int
    subset: int | None
    batch_size: int
    lr: float
    seeds: int
    budget_s: float
    description: str
    headline_seeds: int = 3  # seeds of a headline claim (SPEC "Evidence": 5 at standard scale)
    tune_points: int = 5     # learning rates per sweep of bnlab.studies.tuning (1/3 decade apart)
    tune_seeds: int = 1      # seeds per point of that sweep (a choice, not a claim)


SCALES: dict[str, StudyScale] = {
    "quick": StudyScale(
        "quick", width=0.25, epochs=5, subset=1500, batch_size=64, lr=2e-3, seeds=3,
        budget_s=1800.0, headline_seeds=3, tune_points=5, tune_seeds=1,
        description="a 2-core CPU in about 30 minutes for all five studies: All-CNN-C at width "
        "0.25, 1,500 training images of whatever data is found (the embedded sample "
        "offline), 5 epochs, batch 64, 3 seeds; small enough that an answer may be "
        "inconclusive",
    ),
    "standard": StudyScale(
        "standard", width=0.5, epochs=12, subset=None, batch_size=64, lr=1e-3, seeds=3,
        budget_s=5400.0, headline_seeds=5, tune_points=7, tune_seeds=2,
        description="a 2-core CPU with bfloat16 (AMX or AVX-512-BF16) in about 90 minutes for "
        "all five studies: All-CNN-C at width 0.5 on every training image found (the whole "
        "embedded sample offline), 12 epochs, batch 64, 3 seeds (5 for headline claims)",
    ),
    "paper": StudyScale(
        "paper", width=1.0, epochs=30, subset=None, batch_size=128, lr=1e-3, seeds=3,
        budget_s=12 * 3600.0, headline_seeds=5, tune_points=7, tune_seeds=3,
        description="a GPU: All-CNN-C at full width on full CIFAR-10, 30 epochs, batch 128, "
        "3 seeds (5 for headline claims)",
    ),
}


@dataclass
class StudyClock:
    """Where a study job stands, for its progress lines: how many runs it has started and
    how long it has taken so far, against the preset's planned time (``budget_s``, measured
    on the reference machine, so it is a plan, not a promise). ``bnlab study all`` passes one
    clock to all five studies.
    """

    budget_s: float
    runs: int = 0
    started: float = field(default_factory=time.perf_counter)

    def tick(self) -> str:
        """Count one more run; return "run N, T in; the preset plans about B ..."."""
        self.runs += 1
        spent = time.perf_counter() - self.started
        return (f"run {self.runs}, {format_duration(spent)} in; the preset plans about "
                f"{format_duration(self.budget_s)} for all five studies on a 2-core CPU")


@dataclass
class StudyContext:
    """One study's place and means: its folder, scale, seeds, data and log.

    ``train_run(name, config)`` trains one run into ``<out>/runs/<name>`` (reusing it when
    it finished before, so ``--resume`` costs nothing); ``dataset`` is loaded once and
    shared by every run of the study. ``finished_runs`` (config → run folder), when
    ``bnlab study all`` passes one dict to every study, lets a study copy a run another
    study already trained with the identical config instead of training it again.
    """

    out: Path
    scale: StudyScale
    seeds: int
    data_dir: str | None = None
    device: str = "auto"
    quiet: bool = False
    log: Callable[[str], None] = print
    dataset: bdata.CIFAR10 | None = None
    finished_runs: dict[str, Path] | None = None
    started: float = field(default_factory=time.perf_counter)
    clock: StudyClock | None = None  # None: a clock of this study alone

    def load_data(self) -> bdata.CIFAR10:
        if self.dataset is None:
            self.dataset = bdata.load_cifar10(self.data_dir)
        return self.dataset

    def train_images(self) -> int:
        """How many training images a run at this scale uses (the subset, or all there are)."""
        dataset = self.load_data()
        return min(self.scale.subset or dataset.num_train, dataset.num_train)

    def batch_size(self, notes: list[str]) -> int:
        """The scale's batch size, clamped to the training images (saying so in ``notes``)."""
        n_train = self.train_images()
        if self.scale.batch_size <= n_train:
            return self.scale.batch_size
        notes.append(f"batch size {self.scale.batch_size} exceeds the {n_train} training "
                     f"images: {n_train} used")
        return n_train

    def config(self, **fields: Any) -> TrainConfig:
        """A validated config at this scale; ``fields`` override the scale's defaults."""
        base = {"width": self.scale.width, "epochs": self.scale.epochs,
                "subset": self.scale.subset, "batch_size": self.scale.batch_size,
                "lr": self.scale.lr, "lr_schedule": "cosine", "augment": True,
                "device": self.device, "data_dir": self.data_dir}
        return TrainConfig(**{**base, **fields}).validate()

    def train_run(self, name: str, config: TrainConfig, **kwargs: Any) -> RunResult:
        """Train (or reuse, when finished) ``<out>/runs/<name>``."""
        run_dir = self.out / "runs" / name
        # a run with hooks (kwargs such as on_step) writes more than its folder: never shared
        key = json.dumps(config.to_json(), sort_keys=True) if not kwargs else None
        source = (self.finished_runs or {}).get(key) if key else None
        if self.clock is None:
            self.clock = StudyClock(self.scale.budget_s, started=self.started)
        where = self.clock.tick()
        if source is not None and not run_dir.exists():
            self.log(f"[{self.out.name}] {name}: the same run as {source}, copied ({where})")
            shutil.copytree(source, run_dir)
        else:
            self.log(f"[{self.out.name}] {name} ({where})")
        # no per-run curves.png: a study draws its own figures from its summary
        result = train(config, run_dir, dataset=self.load_data(), resume=run_dir.exists(),
                       progress=not self.quiet, log=(lambda _: None) if self.quiet else self.log,
                       plot=False, **kwargs)
        if key and self.finished_runs is not None and result.status == "finished":
            self.finished_runs.setdefault(key, run_dir)
        return result

    def schedule(self, notes: list[str]) -> tuple[int, int, int]:
        """(batch size, steps per epoch, total steps) of a run at this scale; a clamped
        batch size is said in ``notes``."""
        batch_size = self.batch_size(notes)
        steps_per_epoch = self.train_images() // batch_size
        return batch_size, steps_per_epoch, self.scale.epochs * steps_per_epoch

    def seed_list(self) -> list[int]:
        return list(range(self.seeds))


# ---- files -------------------------------------------------------------------------------

def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _clean(value.tolist())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _clean(dataclasses.asdict(value))
    return value


def write_summary(study_dir: Path, summary: dict[str, Any]) -> Path:
    """Write ``summary.json`` (NaN and inf as null), atomically."""
    path = Path(study_dir) / "summary.json"
    atomic_write_json(path, _clean(summary))
    return path


def note_lines(notes: list[str]) -> list[str]:
    """A section's notes as Markdown lines: a paragraph ``Note: ....`` each."""
    return [line for note in notes for line in ("", f"Note: {note}.")]


def read_summary(study_dir: Path) -> dict[str, Any]:
    """A study folder's ``summary.json``; :class:`~bnlab.runs.ReportError` naming it when it is
    absent or not a JSON object."""
    return read_json(Path(study_dir) / "summary.json", "the study writes it when it ends")


class ProbeLog:
    """Measurements taken during one training run: one JSON object per line, keyed by
    ``step``. A resumed run replays the steps after its last checkpoint, so the last line
    of a step wins when read.

    >>> log = ProbeLog(Path(tmp) / "probe.jsonl")            # doctest: +SKIP
    >>> log.append({"step": 3, "error": 0.1}); log.read()    # doctest: +SKIP
    {3: {'step': 3, 'error': 0.1}}
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> dict[int, dict[str, Any]]:
        records: dict[int, dict[str, Any]] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    if line.strip():
                        record = json.loads(line)
                        records[int(record["step"])] = record
        return dict(sorted(records.items()))
