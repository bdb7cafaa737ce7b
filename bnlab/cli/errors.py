"""The ``bnlab`` command's error boundary: what it refuses before any work, and how every
error that ends a command becomes one line on stderr with an exit status.

:class:`Parser` makes argparse's refusals one line (:class:`UsageError`);
:func:`check_paths` refuses the paths a command would fail on, before any data is read or
folder made; :func:`explain` turns an exception into (exit status, one-line message): 2 for a
command line that cannot run as given, 1 for a run that failed; :func:`interrupted` says how
to continue after Ctrl-C. :class:`UserError` is what the commands raise for a mistake in their
input.
"""

from __future__ import annotations

import argparse
import errno
import json
import tempfile
from pathlib import Path
from typing import NoReturn

import torch

__all__ = ["Parser", "UsageError", "UserError", "check_paths", "explain", "interrupted"]


class UserError(Exception):
    """An error caused by the user's input: printed as one line, no traceback."""


class UsageError(Exception):
    """A command line argparse refused; ``prog`` names the (sub)command."""

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``bnlab compare: error: ... (see ... --help)``.

    ``error`` raises instead of exiting, so :func:`bnlab.cli.main` prints it and returns 2;
    ``--help`` and ``--version`` still exit 0 through argparse.
    """

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)", self.prog)


def check_paths(args: argparse.Namespace) -> None:
    """Refuse the paths a command would fail on, before any data is read or folder made.

    ``--data-dir`` must be an existing folder; ``--out`` must be a folder (or not exist yet)
    inside a folder this process can write to; the folder of ``compare --resume``,
    ``report`` and ``study --render`` must be writable; ``--json FILE`` must be a file name in
    an existing writable folder. Raises ``UserError`` naming the flag, the path and the fix.
    """
    data_dir = getattr(args, "data_dir", None)
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            what = "is a file, not a folder" if path.exists() else "does not exist"
            raise UserError(f"--data-dir {data_dir} {what}: pass a folder holding "
                             "cifar-10-batches-py/ (or that folder itself)")
    # the folder a command writes into: --out (or its default under runs/) for new work,
    # the existing folder for --resume, report and --render
    existing = [getattr(args, name, None) for name in ("resume", "out_dir", "render")]
    existing = [value for value in existing if isinstance(value, str)]
    for value in existing:
        if Path(value).expanduser().is_dir():
            _check_writable_folder(Path(value).expanduser(), "the folder", value)
    if hasattr(args, "out") and not existing:
        value = args.out or "runs/ (the default --out)"
        out = Path(args.out or "runs").expanduser()
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {value} is a file, not a folder: choose another --out")
        _check_writable_folder(_nearest_existing(out), "--out", value)
    if getattr(args, "json", None):
        path = Path(args.json).expanduser()
        if path.is_dir():
            raise UserError(f"--json {args.json} is a folder: name a file, e.g. "
                             f"{Path(args.json) / 'bench.json'}")
        if not path.parent.is_dir():
            what = "is a file" if path.parent.exists() else "does not exist"
            raise UserError(f"--json {args.json}: the folder {path.parent} {what}; "
                             "name a file in an existing folder")
        _check_writable_folder(path.parent, "--json", args.json)


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    return next(p for p in (path, *path.parents) if p.exists())


def _check_writable_folder(folder: Path, flag: str, value: str) -> None:
    """Try to create (and remove) a scratch folder in ``folder``: the one honest test of
    writability (``os.access`` says yes to root on a read-only mount)."""
    if not folder.is_dir():
        raise UserError(f"{flag} {value}: {folder} is a file, not a folder; choose another "
                         f"{flag}")
    try:
        tempfile.TemporaryDirectory(dir=folder, prefix=".bnlab-write-test-").cleanup()
    except OSError as error:
        raise UserError(f"{flag} {value}: cannot write in {folder} ({error.strerror}); "
                         f"choose a folder you can write to") from None


_OS_HINTS: dict[type[OSError], str] = {
    PermissionError: "choose a place you can write to, or fix its permissions",
    NotADirectoryError: "a part of that path is a file, not a folder",
    IsADirectoryError: "it is a folder where a file was expected",
    FileNotFoundError: "it does not exist (moved or deleted while bnlab ran?)",
}


def explain(error: Exception) -> tuple[int, str]:
    """(exit status, one-line message) for an error that ends a command.

    2: the command line cannot run as given (bad value, unknown name, a folder that exists);
    1: the run failed (a corrupt run file, an unwritable or full disk, out of memory, a bug).
    """
    from bnlab.config import ConfigError
    from bnlab.data import DataError, DownloadError
    from bnlab.report import ReportError
    from bnlab.runs import FolderInUseError
    from bnlab.train import DivergenceError

    def first_line(value: object) -> str:
        text = str(value).strip().splitlines()
        return text[0][:400] if text else ""

    if isinstance(error, (UserError, ConfigError, FileExistsError)):
        return 2, first_line(error)
    if isinstance(error, (ReportError, DownloadError, DivergenceError, FolderInUseError)):
        return 1, first_line(error)
    from bnlab.distributed import DistributedRunError
    if isinstance(error, DistributedRunError):  # every rank's fate, on one line
        return 1, str(error).strip().splitlines()[0]
    if isinstance(error, DataError):
        return 2, first_line(error)
    if isinstance(error, json.JSONDecodeError):
        return 1, (f"a JSON file in the folder is corrupt ({first_line(error)}); rerun with "
                   "--debug to see which")
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return 1, ("out of GPU memory: lower --batch-size or --width, or free the GPU "
                   f"({first_line(error)})")
    if isinstance(error, MemoryError) or (
            isinstance(error, RuntimeError) and "can't allocate memory" in str(error)):
        return 1, ("out of memory: lower --batch-size or --width, or close other programs "
                   f"({first_line(error)})")
    if isinstance(error, OSError) and error.filename is not None:
        if error.errno == errno.ENOSPC:
            hint = "the disk is full: free some space or choose another --out"
        else:
            hint = next((h for kind, h in _OS_HINTS.items() if isinstance(error, kind)),
                        "check the path")
        return 1, f"{error.filename}: {error.strerror or first_line(error)} ({hint})"
    if type(error) is ValueError:  # a bad argument caught below the command line
        return 2, first_line(error)
    return 1, (f"unexpected {type(error).__name__}: {first_line(error)} (rerun with --debug "
               "for the traceback, and please report it)")


def interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C prints: how to continue, when there is a folder to continue."""
    folder = getattr(args, "resume_folder", None)
    if folder is None or not Path(folder).exists():
        return "\ninterrupted (nothing to continue)"
    return (f"\ninterrupted: what finished is kept in {folder}; to continue, run:\n"
            f"  {args.resume_command}")
