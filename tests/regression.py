"""The upper half's behaviour, pinned: `bnlab compare` and one study on tiny generated data.

Issue 14 moved the upper half (train, report, studies, the post) into new modules; these two
commands must give the same metrics and summary numbers before and after. The golden file
``tests/golden/upper_half.json`` was written by the code *before* that change:

    python -m tests.regression tests/golden/upper_half.json      # from the repository root

Regenerated once since, on purpose: issue 17 made He's init without a final ReLU
All-CNN-C's default, which changes every All-CNN-C run's numbers.

What is pinned: every run folder's ``metrics.jsonl`` with the timing fields left out (they
measure the machine, not the code), and every number of ``summary.json`` whose key does not
name a time or a speed, as JSON text (so a float must match to the last bit).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import torch

from tests.cifar_fixtures import write_cifar10_folder

TIMING_KEYS = frozenset({"epoch_time_s", "eval_time_s", "images_per_s"})
_TIMING = re.compile(r"time|per_s|seconds|speed")

COMPARE_ARGS = ["--cases", "a,b,c", "--epochs", "2", "--subset", "32", "--width", "0.125",
                "--batch-size", "8", "--device", "cpu", "--quiet"]


def tiny_cifar(root: Path) -> Path:
    """40 training and 12 test images in the official format, always the same ones."""
    write_cifar10_folder(root, per_batch=8, test=12, seed=14)
    return root


def run_compare(data_root: Path, out: Path) -> Path:
    """``bnlab compare --cases a,b,c --epochs 2 ...`` on the tiny data, through the CLI."""
    from bnlab.cli import main

    code = main(["compare", *COMPARE_ARGS, "--data-dir", str(data_root), "--out", str(out)])
    if code != 0:
        raise RuntimeError(f"bnlab compare exited {code}")
    return out


def run_study_q1(data_root: Path, out: Path) -> Path:
    """``bnlab study q1`` at a tiny scale (two seeds, one epoch) on the tiny data."""
    from bnlab.studies import common, run_study

    tiny = common.StudyScale("tiny", width=0.125, epochs=1, subset=None, batch_size=8,
                             lr=1e-3, seeds=2, budget_s=60.0, description="regression")
    saved = dict(common.SCALES)
    common.SCALES["tiny"] = tiny
    try:
        run_study("q1", out, preset="tiny", device="cpu", quiet=True, log=lambda _: None,
                  data_dir=str(data_root))
    finally:
        common.SCALES.clear()
        common.SCALES.update(saved)
    return out


def _numbers(value: Any, prefix: str = "") -> dict[str, Any]:
    """The numeric leaves of a JSON value by path, leaving out times and speeds."""
    out: dict[str, Any] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            if not _TIMING.search(str(key)):
                out.update(_numbers(item, f"{prefix}/{key}"))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out.update(_numbers(item, f"{prefix}/{i}"))
    elif (isinstance(value, (int, float)) and not isinstance(value, bool)) or value is None:
        out[prefix] = value
    return out


def fingerprint(folder: Path) -> dict[str, Any]:
    """Metrics of every run (timing fields left out) and the numbers of ``summary.json``."""
    folder = Path(folder)
    metrics = {}
    for path in sorted(folder.rglob("metrics.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        metrics[path.parent.relative_to(folder).as_posix()] = [
            json.dumps({k: v for k, v in row.items() if k not in TIMING_KEYS}) for row in rows]
    summary = json.loads((folder / "summary.json").read_text())
    return {"metrics": metrics, "summary": _numbers(summary)}


def main(argv: list[str]) -> int:
    import tempfile

    torch.set_num_threads(1)
    golden = Path(argv[0])
    with tempfile.TemporaryDirectory() as tmp:
        root = tiny_cifar(Path(tmp) / "cifar")
        result = {
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "compare": fingerprint(run_compare(root, Path(tmp) / "compare")),
            "study_q1": fingerprint(run_study_q1(root, Path(tmp) / "q1")),
        }
    golden.parent.mkdir(parents=True, exist_ok=True)
    golden.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {golden}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
