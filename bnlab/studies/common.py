"""What every study shares: its scale, its folder, its runs, its figures and its section.

A study is a module with ``NAME`` ("q1"), ``TITLE``, and two functions:

    run(ctx: StudyContext) -> dict      trains and measures, writes summary.json and figures
    render(study_dir: Path) -> str      its Markdown section, drawn from summary.json alone

so a report can be redrawn without training again (``bnlab study ... --resume`` reuses every
finished run). Every number a section states is read from the study's ``summary.json``.

    >>> from bnlab.studies.common import SCALES, mean_std
    >>> SCALES["quick"].seeds
    2
    >>> mean_std([0.5, 0.7])["mean"]
    0.6
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import html
import json
import math
import re
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from bnlab import data as bdata
from bnlab.runs import atomic_write_json
from bnlab.train import RunResult, TrainConfig, train

__all__ = [
    "SCALES",
    "ProbeLog",
    "StudyContext",
    "StudyScale",
    "bn_modules",
    "compare_means",
    "fmt_pct",
    "fmt_pm",
    "markdown_body",
    "markdown_to_html",
    "mean_band",
    "mean_std",
    "new_figure",
    "plural",
    "read_summary",
    "save_figure",
    "verdict",
    "verdict_phrase",
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


SCALES: dict[str, StudyScale] = {
    "quick": StudyScale(
        "quick", width=0.25, epochs=6, subset=2000, batch_size=64, lr=2e-3, seeds=2,
        budget_s=1500.0,
        description="a 2-core CPU in under 30 minutes for all five studies: All-CNN-C at width "
        "0.25, 2,000 training images of whatever data is found (the embedded sample "
        "offline), 6 epochs, batch 64, 2 seeds",
    ),
    "paper": StudyScale(
        "paper", width=1.0, epochs=30, subset=None, batch_size=128, lr=1e-3, seeds=3,
        budget_s=12 * 3600.0,
        description="a GPU: All-CNN-C at full width on full CIFAR-10, 30 epochs, batch 128, "
        "3 seeds",
    ),
}


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
        if source is not None and not run_dir.exists():
            self.log(f"[{self.out.name}] {name}: the same run as {source}, copied")
            shutil.copytree(source, run_dir)
        else:
            self.log(f"[{self.out.name}] {name}")
        result = train(config, run_dir, dataset=self.load_data(), resume=run_dir.exists(),
                       progress=not self.quiet, log=(lambda _: None) if self.quiet else self.log,
                       **kwargs)
        if key and self.finished_runs is not None and result.status == "finished":
            self.finished_runs.setdefault(key, run_dir)
        return result

    def seed_list(self) -> list[int]:
        return list(range(self.seeds))


# ---- numbers -----------------------------------------------------------------------------

def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), n, min, max of finite values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return {"mean": None, "std": None, "n": 0, "min": None, "max": None}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "n": len(xs), "min": min(xs), "max": max(xs)}


def fmt_pm(stat: dict[str, Any], digits: int = 3, scale: float = 1.0) -> str:
    """``0.612 ± 0.013`` from a :func:`mean_std` dict (``n/a`` when empty)."""
    if not stat or stat.get("mean") is None:
        return "n/a"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"



def fmt_pct(stat: dict[str, Any] | None, digits: int = 1) -> str:
    """``61.2 ± 1.3 %`` from a :func:`mean_std` dict of fractions (``n/a`` when empty).

    >>> fmt_pct(mean_std([0.60, 0.62]))
    '61.0 ± 1.4 %'
    """
    if not stat or stat.get("mean") is None:
        return "n/a"
    return f"{fmt_pm(stat, digits, 100.0)} %"


def plural(n: int, word: str) -> str:
    """``1 seed``, ``2 seeds``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"

# ---- verdicts ------------------------------------------------------------------------------

def compare_means(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Is mean(a) above, below or within the seed spread of mean(b)?

    ``a``, ``b``: :func:`mean_std` dicts. The difference counts when it exceeds the sum of
    the two sample standard deviations (the ±1 std error bars do not overlap) and both have
    at least two values (with one seed there is no spread to compare with). Returns
    ``difference`` (a - b), ``spread`` (std_a + std_b) and ``direction``: ``"above"``,
    ``"below"``, ``"within spread"`` or ``"one seed"`` (also when a mean is missing).

    >>> compare_means({"mean": 0.5, "std": 0.01, "n": 2}, {"mean": 0.4, "std": 0.02, "n": 2})
    {'difference': 0.09999999999999998, 'spread': 0.03, 'direction': 'above'}
    """
    if not a or not b or a.get("mean") is None or b.get("mean") is None:
        return {"difference": None, "spread": None, "direction": "one seed"}
    difference = a["mean"] - b["mean"]
    spread = a["std"] + b["std"]
    if min(a["n"], b["n"]) < 2:
        direction = "one seed"
    elif abs(difference) > spread:
        direction = "above" if difference > 0 else "below"
    else:
        direction = "within spread"
    return {"difference": difference, "spread": spread, "direction": direction}


def verdict(direction: str, expected: str) -> str:
    """"supported" when ``direction`` (of :func:`compare_means`) is the ``expected`` one
    ("above"/"below"), "contradicted" when it is the opposite, else (within the spread, or
    one seed) "inconclusive".

    >>> verdict("above", "above"), verdict("below", "above"), verdict("one seed", "above")
    ('supported', 'contradicted', 'inconclusive')
    """
    opposite = {"above": "below", "below": "above"}
    if direction == expected:
        return "supported"
    if direction == opposite.get(expected):
        return "contradicted"
    return "inconclusive"


def verdict_phrase(code: str) -> str:
    """The section's sentence for a :func:`verdict` code.

    >>> verdict_phrase("contradicted")
    'The data contradict it.'
    """
    return {"supported": "The data support it.",
            "contradicted": "The data contradict it."}.get(code, "Inconclusive at this scale.")



# ---- networks ----------------------------------------------------------------------------

def bn_modules(module: nn.Module) -> list[_NormBase]:
    """The BN layers of ``module`` in forward order (``torch.nn`` and ``bnlab.nn`` alike)."""
    return [m for m in module.modules() if isinstance(m, _NormBase)]

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


def read_summary(study_dir: Path) -> dict[str, Any]:
    return json.loads((Path(study_dir) / "summary.json").read_text())


def save_figure(fig, path: Path) -> Path:
    """Save a matplotlib figure as PNG (dpi 110) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path



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


# ---- figures -----------------------------------------------------------------------------

def new_figure(rows: int, cols: int, size: tuple[float, float]):
    """A matplotlib ``Figure`` (no pyplot state) and its ``rows x cols`` axes array."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def mean_band(ax, steps: Sequence[int], runs: Sequence[Sequence[float]], color, label: str,
              style: str = "-", band: str = "std", marker: str | None = None) -> None:
    """Mean over seeds (``runs``: one row per seed) as a line; a band of mean ± std
    (``band="std"``) or of the range over seeds (``"range"``, for log axes); no band for
    one seed."""
    t = torch.tensor(runs, dtype=torch.float64)
    mean = t.mean(0)
    ax.plot(steps, mean.tolist(), style, color=color, lw=1.5, label=label, marker=marker,
            ms=3)
    if t.shape[0] > 1:
        low, high = ((t.min(0).values, t.max(0).values) if band == "range"
                     else (mean - t.std(0), mean + t.std(0)))
        ax.fill_between(steps, low.tolist(), high.tolist(), color=color, alpha=0.2, lw=0)

# ---- Markdown → self-contained HTML -------------------------------------------------------

_CSS = """body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;
line-height:1.45;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}img{max-width:100%}
figure{margin:1em 0}figcaption{font-size:.92em;color:#444}code{background:#f5f5f5;padding:0 .2em}
h1,h2,h3{line-height:1.2}.contradicts{color:#a00}"""


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"(?<![*\w])\*([^*]+)\*(?!\w)", r"<em>\1</em>", text)


def markdown_to_html(markdown: str, base_dir: Path, title: str) -> str:
    """The small Markdown the studies write (headings, paragraphs, lists, pipe tables,
    ``![caption](file.png)`` figures, emphasis, code) as one self-contained HTML page:
    figures inlined as base64 data URIs, CSS inline, nothing loaded from elsewhere.

        >>> page = markdown_to_html("# Q1\\n\\nBN **helps**.", Path("."), "t")
        >>> "<h1>Q1</h1>" in page and "<strong>helps</strong>" in page
        True
    """
    body = markdown_body(markdown, base_dir)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
            f"{body}\n</body></html>\n")


def markdown_body(markdown: str, base_dir: Path) -> str:
    """The HTML body of :func:`markdown_to_html` (no page around it)."""
    out: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        if m := re.match(r"^(#{1,4}) (.*)$", line):
            level = len(m.group(1))
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
            i += 1
        elif m := re.match(r"^!\[(.*)\]\((.*)\)\s*$", line):
            caption, src = m.group(1), m.group(2)
            png = (Path(base_dir) / src).read_bytes()
            data = base64.b64encode(png).decode("ascii")
            out.append(f'<figure><img alt="{html.escape(caption)}" '
                       f'src="data:image/png;base64,{data}"><figcaption>{_inline(caption)}'
                       "</figcaption></figure>")
            i += 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                    rows.append(cells)
                i += 1
            head = "".join(f"<th>{_inline(c)}</th>" for c in rows[0])
            body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>"
                           for r in rows[1:])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif re.match(r"^\s*[-*] ", line):
            items = []
            while i < len(lines) and re.match(r"^\s*[-*] ", lines[i]):
                item = re.sub(r"^\s*[-*] ", "", lines[i])
                items.append(f"<li>{_inline(item)}</li>")
                i += 1
            out.append(f"<ul>{''.join(items)}</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(
                    r"^(#{1,4} |!\[|\||\s*[-*] )", lines[i]):
                para.append(lines[i])
                i += 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(out)
