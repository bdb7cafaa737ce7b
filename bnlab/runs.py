"""The run-folder format, read and written in one place (SPEC.md, "Run folders").

A *run folder* (one case, one seed) holds:

- ``config.json``: the TrainConfig and :data:`RUN_INFO_KEYS`, written when the run starts;
- ``metrics.jsonl``: one JSON object per epoch, a line appended as each epoch ends;
- ``checkpoint.pt``: model, optimizer, metrics, config and ``format_version``, replaced
  as each epoch ends;
- ``result.json``: ``status``, ``message``, ``wall_time_s``, written when the run ends;
- ``curves.png``: the run's own curves, drawn when it finished.

A *comparison folder* holds ``compare.json`` and one run folder per case and seed at
``<case>/seed<k>/``. Every file is replaced atomically (write, fsync, rename), so a reader
sees the old file or the new one, never half of one; ``metrics.jsonl`` is appended to, and
its reader skips an incomplete last line (a run killed while writing).

    >>> from bnlab.runs import load_run
    >>> run = load_run("runs/compare-quick/a/seed0")           # doctest: +SKIP
    >>> run.status, run.final["test_acc"]                      # doctest: +SKIP
    ('finished', 0.61)

This module needs no torch except to save and load checkpoints.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CHECKPOINT_FORMAT",
    "RUN_INFO_KEYS",
    "FolderInUseError",
    "MissingFileError",
    "ReportError",
    "Run",
    "append_metrics",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_free",
    "folder_lock",
    "load_checkpoint",
    "load_compare",
    "load_run",
    "read_compare",
    "read_metrics",
    "save_checkpoint",
    "write_metrics",
    "write_result",
]

CONFIG, METRICS, CHECKPOINT, RESULT, CURVES = (
    "config.json", "metrics.jsonl", "checkpoint.pt", "result.json", "curves.png")
COMPARE = "compare.json"
LOCK = ".bnlab.lock"  # held by the process training in a folder (see folder_lock)
CHECKPOINT_FORMAT = 1  # checkpoint.pt's layout; a checkpoint without the key is format 1
# what a run folder's config.json holds beside the TrainConfig: where and with what it ran
RUN_INFO_KEYS = ("data", "bnlab_version", "torch_version", "device", "precision_resolved")
REQUIRED_METRICS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc")


class ReportError(ValueError):
    """A run or comparison folder is malformed; the message names the file and what to do."""


class MissingFileError(ReportError, FileNotFoundError):
    """A file a run or comparison folder must hold is absent; the message names it."""


class FolderInUseError(RuntimeError):
    """Another live process holds the folder's lock; the message names it and its PID."""


# ---- one process per folder --------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _in_use_error(folder: Path, holder: dict | None) -> FolderInUseError | None:
    """The error for a lock ``holder`` (its JSON) of another live process, or None when
    the lock is this process's own or stale."""
    if holder is None:
        return None
    path, pid = folder / LOCK, holder.get("pid")
    if holder.get("host") != socket.gethostname():
        return FolderInUseError(f"{folder} is locked by process {pid} on host "
                                f"{holder.get('host')} ({path}); if that process no longer "
                                f"runs, delete {path}")
    if isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid):
        since = time.strftime("%H:%M:%S", time.localtime(holder.get("started", 0)))
        return FolderInUseError(f"{folder} is in use: process {pid} has been "
                                f"{holder.get('what', 'training')} there since {since} "
                                f"({path}); wait for it to finish, or stop it and run the "
                                "command again")
    return None


def check_free(folder: str | os.PathLike[str]) -> None:
    """Raise :class:`FolderInUseError` when another live process holds ``folder``'s lock
    (see :func:`folder_lock`), before any slow work such as loading the data; take nothing."""
    folder = Path(folder)
    path = folder / LOCK
    in_use = _in_use_error(folder, _read_lock(path) if path.exists() else None)
    if in_use is not None:
        raise in_use


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], what: str = "training") -> Iterator[Path]:
    """Hold ``<folder>/.bnlab.lock`` while training in ``folder``; removed on exit.

    The lock is created with ``O_CREAT | O_EXCL`` (atomic on a local file system) and holds
    ``{"pid", "host", "started", "what"}``. A lock left by a process that no longer runs on
    this host (killed with SIGKILL, a crash) is stale: it is replaced, with a warning. A lock
    of a live process raises :class:`FolderInUseError` naming the folder, the PID and what
    to do. The same process may take the lock of a folder it already holds (a comparison
    folder, then each run folder inside it, are different files).
    """
    folder = Path(folder)
    path = folder / LOCK
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "what": what}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            pid = holder.get("pid") if holder else None
            in_use = _in_use_error(folder, holder)
            if in_use is not None:
                raise in_use from None
            if pid != os.getpid():
                warnings.warn(f"{path}: removed a stale lock of process {pid}, which no longer "
                              "runs", RuntimeWarning, stacklevel=3)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
        break
    else:
        raise FolderInUseError(f"{folder}: could not take its lock {path} (another process "
                               "keeps taking it); run the command again")
    try:
        yield path
    finally:
        holder = _read_lock(path)
        if holder is None or holder.get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


# ---- writing -----------------------------------------------------------------------------------

def atomic_write_bytes(path: str | os.PathLike[str], payload: bytes) -> None:
    """Write, fsync, rename: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], value: object, *,
                      ensure_ascii: bool = True) -> None:
    """``value`` as indented JSON with a final newline, written atomically."""
    atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=ensure_ascii) + "\n")


def write_metrics(run_dir: Path, metrics: list[dict]) -> None:
    """Replace ``metrics.jsonl`` by ``metrics`` (one line each): it mirrors the checkpoint."""
    atomic_write_text(Path(run_dir) / METRICS, "".join(json.dumps(m) + "\n" for m in metrics))


def append_metrics(run_dir: Path, row: dict) -> None:
    """Append one epoch's row to ``metrics.jsonl``."""
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(json.dumps(row) + "\n")


def write_result(run_dir: Path, status: str, message: str, wall_time_s: float) -> None:
    """``result.json``: how the run ended ("finished" or "diverged")."""
    atomic_write_json(Path(run_dir) / RESULT,
                      {"status": status, "message": message, "wall_time_s": wall_time_s})


def atomic_torch_save(path: str | os.PathLike[str], value: object) -> None:
    """``torch.save(value)`` into ``path``, atomically."""
    import torch

    buffer = io.BytesIO()
    torch.save(value, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """``checkpoint.pt`` (``state`` + ``format_version``), written atomically."""
    atomic_torch_save(Path(run_dir) / CHECKPOINT, {**state, "format_version": CHECKPOINT_FORMAT})


def load_checkpoint(run_dir: str | os.PathLike[str], map_location: Any = "cpu") -> dict:
    """The state of a run folder's ``checkpoint.pt`` (tensors only: ``weights_only``).

    Raises FileNotFoundError when there is none, :class:`ReportError` naming the file and
    what to do for one torch cannot read (truncated, overwritten) or a format newer than this
    bnlab reads.
    """
    import torch

    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no {CHECKPOINT} in {run_dir}: not a bnlab run folder, or "
                                f"its first epoch never finished")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise ReportError(
            f"{path} is corrupt ({type(error).__name__}: {str(error).splitlines()[0][:120]}): "
            f"delete it to restart this run from epoch 1, or restore it from a copy"
        ) from error
    if not isinstance(state, dict):
        raise ReportError(f"{path} is not a bnlab checkpoint (a {type(state).__name__}): "
                          "delete it to restart this run from epoch 1")
    version = state.get("format_version", 1)
    if version > CHECKPOINT_FORMAT:
        raise ReportError(f"{path} has checkpoint format {version}; this bnlab reads up to "
                          f"{CHECKPOINT_FORMAT}: update bnlab")
    if "metrics" not in state:
        raise ReportError(f"{path} is not a bnlab checkpoint (no metrics in it): delete it to "
                          "restart this run from epoch 1")
    return state


# ---- reading -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """One run folder, as read from disk.

    Attributes:
        path: the run folder.
        config: ``config.json`` (the run's TrainConfig and ``data``, versions, device).
        metrics: one dict per finished epoch, sorted by ``epoch`` (1-based).
        result: ``result.json`` (``status``, ``message``, ``wall_time_s``), or None while the
            run has not ended (still training, or killed).
        notes: what was tolerated while reading (a truncated last line, duplicate epochs).
    """

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    result: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        """``"finished"``, ``"diverged"`` (from result.json) or ``"in progress"`` (none yet)."""
        return "in progress" if self.result is None else str(self.result["status"])

    @property
    def case(self) -> str:
        """The case name from config.json, e.g. ``"a"``."""
        return str(self.config.get("case", "?"))

    @property
    def seed(self) -> int | None:
        """The seed from config.json."""
        return self.config.get("seed")

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's metrics ({} before the first epoch ended)."""
        return self.metrics[-1] if self.metrics else {}


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; :class:`MissingFileError` / :class:`ReportError` naming
    the file and ``what`` it is for otherwise."""
    if not path.is_file():
        raise MissingFileError(f"{path} not found: {what}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ReportError(f"{path} is not valid JSON ({error}); {what}") from error
    if not isinstance(value, dict):
        raise ReportError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _parse_metric_line(path: Path, number: int, line: str) -> dict[str, Any]:
    value = json.loads(line)  # JSONDecodeError is handled by the caller
    if not isinstance(value, dict):
        raise ReportError(f"{path} line {number}: expected a JSON object, got {line[:80]!r}")
    missing = [key for key in REQUIRED_METRICS if key not in value]
    if missing:
        raise ReportError(
            f"{path} line {number}: missing {', '.join(missing)} "
            f"(every epoch needs {', '.join(REQUIRED_METRICS)})"
        )
    return value


def read_metrics(path: str | os.PathLike[str],
                 notes: list[str] | None = None) -> list[dict[str, Any]]:
    """Epoch dicts from ``metrics.jsonl`` sorted by epoch ([] when the file is absent).

    An unreadable *last* line is skipped with a warning (and a line in ``notes``); an
    unreadable line before it, or one missing a required key, raises :class:`ReportError`.
    An epoch written twice (a resumed run) keeps its last row.
    """
    path = Path(path)
    notes = [] if notes is None else notes
    if not path.exists():
        return []
    lines = [(n, s) for n, s in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
    lines = [(n, s) for n, s in lines if s.strip()]
    by_epoch: dict[int, dict[str, Any]] = {}
    for index, (number, line) in enumerate(lines):
        try:
            record = _parse_metric_line(path, number, line)
        except json.JSONDecodeError as error:
            if index < len(lines) - 1:
                raise ReportError(
                    f"{path} line {number} is not valid JSON ({error}): {line[:80]!r}. "
                    "Only the last line may be incomplete (a run killed while writing): "
                    "repair or delete that line, then run the command again."
                ) from error
            note = f"{path} line {number} is incomplete (run killed while writing?); skipped"
            warnings.warn(note, RuntimeWarning, stacklevel=3)
            notes.append(note)
            continue
        epoch = int(record["epoch"])
        if epoch in by_epoch:
            notes.append(f"{path}: epoch {epoch} appears twice (resumed run?); kept the last")
        by_epoch[epoch] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def read_result(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``result.json`` (status checked), or None while the run has not ended."""
    result_path = Path(run_dir) / RESULT
    if not result_path.exists():
        return None
    what = ("the trainer writes it when the run ends; rerun or delete it to see the run "
            "as unfinished")
    result = read_json(result_path, what)
    if result.get("status") not in ("finished", "diverged"):
        raise ReportError(
            f"{result_path}: status must be 'finished' or 'diverged', got {result.get('status')!r}"
        )
    return result


def load_run(path: str | os.PathLike[str]) -> Run:
    """Read one run folder.

    ``config.json`` must exist. ``metrics.jsonl`` may be absent only while the run has not
    finished its first epoch (no ``result.json``, or a run that diverged in epoch 1).
    Raises :class:`MissingFileError` / :class:`ReportError` naming the file otherwise.

        >>> run = load_run("runs/compare-quick/a/seed0")   # doctest: +SKIP
        >>> [m["test_acc"] for m in run.metrics]           # doctest: +SKIP
    """
    folder = Path(path)
    if not folder.is_dir():
        raise MissingFileError(f"run folder {folder} not found (expected config.json inside)")
    config = read_json(folder / CONFIG, "every run folder needs its config.json")
    result = read_result(folder)
    notes: list[str] = []
    metrics_path = folder / METRICS
    if metrics_path.is_file():
        metrics = read_metrics(metrics_path, notes)
    elif result is None or result["status"] == "diverged":
        metrics = []
    else:
        raise MissingFileError(
            f"{metrics_path} not found, but {folder / RESULT} says the run finished: "
            "the folder is incomplete (copied partly?); rerun the case or restore the file"
        )
    return Run(folder, config, metrics, result, notes)


def read_compare(compare_dir: str | os.PathLike[str], *,
                 plan: bool = False) -> dict[str, Any]:
    """A comparison folder's ``compare.json``, checked: ``cases`` and ``seeds`` non-empty
    lists; with ``plan=True`` (to resume it) also ``preset`` a string and ``configs`` one
    object per case and seed.

    Raises :class:`MissingFileError` / :class:`ReportError` naming the file and the key.
    """
    folder = Path(compare_dir)
    path = folder / COMPARE
    compare = read_json(path, "the comparison's plan, written by 'bnlab compare': restore "
                              "it from a copy")
    for key in ("cases", "seeds"):
        if not isinstance(compare.get(key), list) or not compare[key]:
            raise ReportError(f"{path}: '{key}' must be a non-empty list (got "
                              f"{compare.get(key)!r}); the file is damaged: restore it")
    if not all(isinstance(s, int) for s in compare["seeds"]):
        raise ReportError(f"{path}: 'seeds' must be integers, got {compare['seeds']!r}")
    if not plan:
        return compare
    if not isinstance(compare.get("preset"), str):
        raise ReportError(f"{path}: 'preset' must be a name, got {compare.get('preset')!r}; "
                          "the file is damaged: restore it")
    configs = compare.get("configs")
    for case in compare["cases"]:
        by_seed = configs.get(str(case)) if isinstance(configs, dict) else None
        if not isinstance(by_seed, dict) or any(
                not isinstance(by_seed.get(str(s)), dict) for s in compare["seeds"]):
            raise ReportError(f"{path}: 'configs' lacks case {case!r} for seeds "
                              f"{compare['seeds']}; the file is damaged: restore it")
    return compare


def load_compare(
    compare_dir: str | os.PathLike[str],
) -> tuple[dict[str, Any], dict[str, list[Run]], list[str]]:
    """Read ``compare.json`` and every run folder it lists.

    Returns ``(compare, runs_by_case, missing)``: runs in the order of ``compare["cases"]``
    and ``compare["seeds"]``; ``missing`` names the ``<case>/seed<k>`` folders not started.
    """
    folder = Path(compare_dir)
    compare = read_compare(folder)
    runs_by_case: dict[str, list[Run]] = {}
    missing: list[str] = []
    for case in compare["cases"]:
        runs_by_case[case] = []
        for seed in compare["seeds"]:
            run_dir = folder / str(case) / f"seed{seed}"
            if (run_dir / CONFIG).exists():
                runs_by_case[case].append(load_run(run_dir))
            else:
                missing.append(f"{case}/seed{seed}")
    return compare, runs_by_case, missing
