"""The ``bnlab`` command: a thin map from flags onto bnlab's functions.

    bnlab gradcheck                 # the hand-derived backward against autograd, float64
    bnlab bench bn [--json FILE]    # BN forward/backward: PyTorch native vs bnlab eager/fused
    bnlab bench engine              # one All-CNN-C training step: autograd vs manual engine
    bnlab bench train               # images/s: a plain PyTorch loop vs bnlab's trainer
    bnlab bench distributed         # data-parallel step: 1 vs 2 processes, same global batch
    bnlab compare [--preset quick]  # the post's cases over seeds: runs, summary, report
    bnlab report OUT_DIR            # redraw a comparison's figures and report from its files
    bnlab study q1..q5|all          # the post's five questions, answered by experiment

Errors: every mistake in the command line or the files it names, and every environmental
failure (an unwritable folder, a corrupt run file, a missing device), is printed as one line
on stderr, ``bnlab COMMAND: error: WHAT (what to do)``, with exit status 2 for a command line
that cannot run as given and 1 for a run that failed; ``--debug`` shows the traceback
instead. Ctrl-C exits with 130 and says how to continue.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import torch

from bnlab import __version__, argtypes

__all__ = ["build_parser", "main"]


def _status(quiet: bool = False) -> Callable[[str], None]:
    """A one-line progress printer on stderr (silent when quiet or not a terminal)."""

    def show(text: str) -> None:
        if not quiet and sys.stderr.isatty():
            print(f"\r\033[K  {text} ...", end="", file=sys.stderr, flush=True)

    return show


def _clear_status() -> None:
    if sys.stderr.isatty():
        print("\r\033[K", end="", file=sys.stderr, flush=True)


def _write_json(path: str | None, payload: object) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")


def _machine() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


# ---- bnlab gradcheck -----------------------------------------------------------------------

_GRADCHECK_COLUMNS = (("check", 40), ("shape", 13), ("dx", 8), ("dgamma", 8), ("dbeta", 8),
                      ("dweights", 8), ("finite diff", 11), ("result", 6))


def _gradcheck_line(cells: dict[str, str]) -> str:
    return "  ".join(f"{cells[name]:<{width}}" for name, width in _GRADCHECK_COLUMNS).rstrip()


def cmd_gradcheck(args: argparse.Namespace) -> int:
    from bnlab.checks import CheckRow, bn_gradcheck_rows, network_gradcheck_rows

    print("bnlab gradcheck: hand-derived backward vs autograd, float64 "
          "(max relative error, norm-wise)")
    print(_gradcheck_line({name: name for name, _ in _GRADCHECK_COLUMNS}))
    print(_gradcheck_line({name: "-" * width for name, width in _GRADCHECK_COLUMNS}))

    def print_row(r: CheckRow) -> None:  # each row as soon as it is checked
        _clear_status()
        errs = {k: r.errors.get(k) for k in ("dx", "dgamma", "dbeta", "dweights")}
        print(_gradcheck_line({
            "check": r.name, "shape": "x".join(map(str, r.shape)),
            **{k: "-" if v is None else f"{v:.1e}" for k, v in errs.items()},
            "finite diff": {None: "-", True: "ok", False: "FAIL"}[r.gradcheck],
            "result": "pass" if r.passed else "FAIL",
        }), flush=True)

    rows = bn_gradcheck_rows(progress=_status(args.quiet), finite_differences=not args.fast,
                             on_row=print_row)
    rows += network_gradcheck_rows(progress=_status(args.quiet), on_row=print_row)
    _clear_status()
    failed = [r.name for r in rows if not r.passed]
    tol = rows[0].tolerance
    if failed:
        print(f"FAILED ({len(failed)} of {len(rows)}, tolerance {tol:g}): {', '.join(failed)}")
        return 1
    print(f"all {len(rows)} checks pass (tolerance {tol:g})")
    return 0


# ---- bnlab bench ---------------------------------------------------------------------------

def cmd_bench_bn(args: argparse.Namespace) -> int:
    from bnlab.bench import BN_COLUMNS, bench_bn, format_table

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.cpu_only else [])
    rows = []
    for device in devices:
        rows += bench_bn(device=device, repeats=args.repeats, progress=_status(args.quiet))
    _clear_status()
    print(f"BN, training mode, float32, median of {args.repeats} interleaved repeats "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print(format_table([r.as_dict() for r in rows], BN_COLUMNS))
    for note in dict.fromkeys(r.note for r in rows if r.note):
        print(f"note: {note}")
    _write_json(args.json, {"machine": _machine(), "rows": [r.as_dict() for r in rows]})
    return 0


def cmd_bench_engine(args: argparse.Namespace) -> int:
    from bnlab.bench_engine import bench_engine, format_engine_table

    device = "cuda" if torch.cuda.is_available() and not args.cpu_only else "cpu"
    rows = bench_engine(widths=tuple(args.widths), batch_size=args.batch_size, steps=args.steps,
                        device=device)
    print(format_engine_table(rows))
    _write_json(args.json, {"machine": _machine(), "rows": rows})
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from bnlab.bench import TRAIN_COLUMNS, bench_train, format_table

    device = "cuda" if torch.cuda.is_available() and not args.cpu_only else "cpu"
    rows = bench_train(width=args.width, batch_size=args.batch_size, steps=args.steps,
                       rounds=args.rounds, device=device, progress=_status(False))
    _clear_status()
    from bnlab.precision import resolve_precision

    auto = resolve_precision("auto", device)
    print(f"one training step of All-CNN-C, median of {args.rounds} interleaved rounds "
          f"of {args.steps} steps (torch {torch.__version__}, {torch.get_num_threads()} threads); "
          f"the plain loop is float32, contiguous, default allocator")
    print(format_table(rows, TRAIN_COLUMNS))
    print(f"precision auto here: {auto.name} ({auto.reason})")
    _write_json(args.json, {"machine": _machine(), "rows": rows})
    return 0


def cmd_bench_data(args: argparse.Namespace) -> int:
    from bnlab.bench import DATA_COLUMNS, bench_data, format_table

    rows = bench_data(batch_size=args.batch_size, repeats=args.repeats, threads=args.threads)
    print(f"CIFAR-10 augmentation (pad-4 crop, flip) + normalization, CPU, median of "
          f"{args.repeats} interleaved repeats (torch {torch.__version__})")
    print(format_table(rows, DATA_COLUMNS))
    _write_json(args.json, {"machine": _machine(), "rows": rows})
    return 0


def cmd_bench_distributed(args: argparse.Namespace) -> int:
    from bnlab.bench import format_table
    from bnlab.bench_distributed import DISTRIBUTED_COLUMNS, bench_distributed

    rows = bench_distributed(
        engines=args.engines, nprocs=args.nproc, width=args.width, batch_size=args.batch_size,
        steps=args.steps, rounds=args.rounds, threads=args.threads, progress=_status(False),
    )
    _clear_status()
    print(f"data-parallel All-CNN-C step, 1 vs {args.nproc} processes on one global batch, "
          f"gloo on {os.cpu_count()} CPU cores, median of {args.rounds} alternating rounds of "
          f"{args.steps} steps (torch {torch.__version__}). Processes that share the same "
          f"cores cannot beat one process using them all: this shows the overhead of "
          f"synchronized BN and the gradient all-reduce; a speed-up needs a device per process.")
    print(format_table(rows, DISTRIBUTED_COLUMNS))
    _write_json(args.json, {"machine": _machine(), "rows": rows})
    return 0

# ---- bnlab compare / report ---------------------------------------------------------------

def cmd_compare(args: argparse.Namespace) -> int:
    from bnlab.compare import command_line, plan_comparison, resume_plan, run_comparison

    if _compare_ranks(args):  # --nproc N, or torchrun: each rank runs this function
        return _compare_in_ranks(args)
    if args.resume:
        _check_resume_flags(args)
        plan = resume_plan(args.resume)
    else:
        dataset = _load_data(args.data_dir)  # once, here at the top, passed down
        overrides = {"epochs": args.epochs, "subset": args.subset, "data_dir": args.data_dir,
                     "width": args.width, "lr": args.lr, "batch_size": args.batch_size,
                     "device": args.device, "init": args.init,
                     "final_relu": True if args.final_relu else None,
                     "precision": args.precision}
        plan = plan_comparison(
            args.cases, args.seeds, args.preset or "quick", args.out,
            overrides, command_line(sys.argv[1:] if args.argv is None else args.argv),
            dataset=dataset,
        )
    if args.tensorboard:
        from bnlab.tensorboard import require_tensorboard
        try:
            require_tensorboard()
        except ImportError as error:
            raise _UserError(str(error)) from None
        plan.tensorboard = True
    args.resume_folder = plan.out
    args.resume_command = f"bnlab compare --resume {shlex.quote(str(plan.out))}"
    summary = run_comparison(plan, quiet=args.quiet)
    if summary.get("diverged"):
        print(f"bnlab compare: {len(summary['diverged'])} run(s) diverged: "
              f"{', '.join(summary['diverged'])} (see their result.json)", file=sys.stderr)
        return 3
    if not args.quiet:
        print(f"report: {plan.out / 'report.html'}")
    return 0


def _compare_ranks(args: argparse.Namespace) -> bool:
    """Whether this ``compare`` must first start or join a process group of several ranks."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return False  # already a rank
    return args.nproc > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1


def _compare_in_ranks(args: argparse.Namespace) -> int:
    """``compare`` data-parallel: under torchrun join its group, else launch ``--nproc``
    local processes (gloo on CPU, NCCL on CUDA); every rank runs :func:`cmd_compare`."""
    from bnlab import distributed as bdist
    from bnlab.train import resolve_device

    device = resolve_device(args.device or "auto")
    if "WORLD_SIZE" in os.environ:  # torchrun (or another launcher that sets the env)
        if args.nproc > 1 and args.nproc != int(os.environ["WORLD_SIZE"]):
            raise _UserError(f"--nproc {args.nproc} but the launcher started "
                             f"{os.environ['WORLD_SIZE']} processes: drop --nproc")
        rank, _ = bdist.init_process_group(device=device, timeout_s=_RANK_TIMEOUT_S)
        try:
            return _compare_rank(rank, int(os.environ["WORLD_SIZE"]), args)
        finally:
            import torch.distributed as dist
            dist.destroy_process_group()
    try:
        codes = bdist.launch(_compare_rank, args.nproc, (args,),
                             backend=bdist.default_backend(device), timeout_s=_RANK_TIMEOUT_S,
                             run_timeout_s=float("inf"))
    except bdist.DistributedRunError as error:
        out = args.resume or args.out
        if out is None:
            raise
        raise bdist.DistributedRunError(
            f"{error}; continue with: bnlab compare --resume {shlex.quote(str(out))} "
            f"--nproc {args.nproc}") from None
    return max(codes)


# How long a rank waits in a collective for a rank that stopped answering (a killed rank's
# closed connection is noticed at once).
_RANK_TIMEOUT_S = 300.0


def _compare_rank(rank: int, world_size: int, args: argparse.Namespace) -> int:
    """One rank of a data-parallel ``compare``: rank 0 prints, the others are quiet."""
    if rank > 0:
        args.quiet = True
    return cmd_compare(args)


def _check_resume_flags(args: argparse.Namespace) -> None:
    """Refuse ``compare --resume DIR`` with flags that would change the saved comparison."""
    from bnlab.compare import resume_conflicts
    from bnlab.runs import read_compare

    folder = Path(args.resume)
    if not (folder / "compare.json").is_file():
        raise _UserError(f"cannot resume {folder}: no compare.json there (is it a bnlab "
                         "comparison folder?)")
    requested = {name: getattr(args, name) for name in (
        "cases", "seeds", "preset", "out", "epochs", "subset", "width", "lr", "batch_size",
        "device", "data_dir", "precision")}
    conflicts = resume_conflicts(read_compare(folder, plan=True), requested)
    if conflicts:
        raise _UserError(f"--resume {folder} continues the comparison as it was planned; "
                         f"these flags would change it: {'; '.join(conflicts)}. Drop them, or "
                         "start a new comparison with --out")


def cmd_report(args: argparse.Namespace) -> int:
    from bnlab import report

    out = Path(args.out_dir)
    if not (out / "compare.json").is_file():
        raise _UserError(f"{out} is not a bnlab comparison folder (no compare.json)")
    report.write_report(out)
    print(f"wrote {out}/summary.json, curves.png, report.md, report.html")
    return 0


# ---- bnlab study ---------------------------------------------------------------------------

def cmd_study(args: argparse.Namespace) -> int:
    import time

    from bnlab import studies

    if args.render:
        out = Path(args.render)
        if not (out / "summary.json").is_file():
            raise _UserError(f"{out} is not a bnlab study folder (no summary.json)")
        if args.name == "all":
            studies.render_report(out)
        else:
            section = studies.render_study(args.name, out)
            (out / "section.md").write_text(section)
            studies._write_report(out, f"bnlab study {args.name}", section)
        print(f"wrote {out}/report.md, report.html")
        return 0
    resume = args.resume is not None
    if resume:
        out = _study_resume_folder(args)
        saved = studies.read_plan(out)
        conflicts = studies.plan_conflicts(saved, {"study": args.name, "preset": args.preset,
                                                   "seeds": args.seeds,
                                                   "data_dir": args.data_dir})
        if conflicts:
            raise _UserError(f"--resume {out} continues the study as it was started; these "
                             f"would change it: {'; '.join(conflicts)}. Drop them, or start "
                             "a new study with --out")
        if saved:  # the saved settings, not the defaults, rule a resumed study
            args.preset, args.seeds = saved["preset"], saved["seeds"]
            args.data_dir = saved.get("data_dir")
    args.preset = args.preset or "quick"
    if not resume:
        out = Path(args.out or f"runs/study-{args.name}-{args.preset}-"
                              f"{time.strftime('%Y%m%d-%H%M%S')}")
    log = (lambda _: None) if args.quiet else print
    try:
        studies.check_scale(args.preset, args.seeds)  # before the data is read
    except ValueError as error:
        raise _UserError(str(error)) from None
    kwargs = {"preset": args.preset, "seeds": args.seeds, "data_dir": args.data_dir,
              "device": args.device, "resume": resume, "quiet": args.quiet, "log": log,
              "dataset": _load_data(args.data_dir)}  # once, here at the top, passed down
    args.resume_folder = out
    args.resume_command = "bnlab " + shlex.join(
        ["study", args.name, "--resume", str(out), "--preset", args.preset]
        + ([] if args.seeds is None else ["--seeds", str(args.seeds)]))
    if args.name == "all":
        studies.run_all(out, **kwargs)
    else:
        studies.run_study(args.name, out, **kwargs)
    if not args.quiet:
        print(f"report: {out / 'report.html'}")
    return 0


def _study_resume_folder(args: argparse.Namespace) -> Path:
    """The folder of ``study NAME --resume DIR`` (or of the older ``--resume --out DIR``)."""
    named = args.resume if isinstance(args.resume, str) else None
    if named and args.out and Path(named) != Path(args.out):
        raise _UserError(f"--resume {named} and --out {args.out} name two folders: "
                         f"use --resume {named} alone")
    folder = named or args.out
    if folder is None:
        raise _UserError(f"--resume needs the study folder: bnlab study {args.name} --resume "
                         "DIR (it never starts a new study)")
    if not Path(folder).is_dir():
        raise _UserError(f"cannot resume {folder}: no such folder (start a new study with "
                         f"--out {folder})")
    return Path(folder)


class _UserError(Exception):
    """An error caused by the user's input: printed as one line, no traceback."""


class _UsageError(Exception):
    """A command line argparse refused; ``prog`` names the (sub)command."""

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``bnlab compare: error: ... (see ... --help)``.

    ``error`` raises instead of exiting, so :func:`main` prints it and returns 2; ``--help``
    and ``--version`` still exit 0 through argparse.
    """

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see {self.prog} --help)", self.prog)


# ---- the error boundary --------------------------------------------------------------------

def _check_paths(args: argparse.Namespace) -> None:
    """Refuse the paths a command would fail on, before any data is read or folder made.

    ``--data-dir`` must be an existing folder; ``--out`` must be a folder (or not exist yet)
    inside a folder this process can write to; the folder of ``compare --resume``,
    ``report`` and ``study --render`` must be writable; ``--json FILE`` must be a file name in
    an existing writable folder. Raises ``_UserError`` naming the flag, the path and the fix.
    """
    data_dir = getattr(args, "data_dir", None)
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            what = "is a file, not a folder" if path.exists() else "does not exist"
            raise _UserError(f"--data-dir {data_dir} {what}: pass a folder holding "
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
            raise _UserError(f"--out {value} is a file, not a folder: choose another --out")
        _check_writable_folder(_nearest_existing(out), "--out", value)
    if getattr(args, "json", None):
        path = Path(args.json).expanduser()
        if path.is_dir():
            raise _UserError(f"--json {args.json} is a folder: name a file, e.g. "
                             f"{Path(args.json) / 'bench.json'}")
        if not path.parent.is_dir():
            what = "is a file" if path.parent.exists() else "does not exist"
            raise _UserError(f"--json {args.json}: the folder {path.parent} {what}; "
                             "name a file in an existing folder")
        _check_writable_folder(path.parent, "--json", args.json)


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    return next(p for p in (path, *path.parents) if p.exists())


def _check_writable_folder(folder: Path, flag: str, value: str) -> None:
    """Try to create (and remove) a scratch folder in ``folder``: the one honest test of
    writability (``os.access`` says yes to root on a read-only mount)."""
    if not folder.is_dir():
        raise _UserError(f"{flag} {value}: {folder} is a file, not a folder; choose another "
                         f"{flag}")
    try:
        tempfile.TemporaryDirectory(dir=folder, prefix=".bnlab-write-test-").cleanup()
    except OSError as error:
        raise _UserError(f"{flag} {value}: cannot write in {folder} ({error.strerror}); "
                         f"choose a folder you can write to") from None


_OS_HINTS: dict[type[OSError], str] = {
    PermissionError: "choose a place you can write to, or fix its permissions",
    NotADirectoryError: "a part of that path is a file, not a folder",
    IsADirectoryError: "it is a folder where a file was expected",
    FileNotFoundError: "it does not exist (moved or deleted while bnlab ran?)",
}


def _explain(error: Exception) -> tuple[int, str]:
    """(exit status, one-line message) for an error that ends a command.

    2: the command line cannot run as given (bad value, unknown name, a folder that exists);
    1: the run failed (a corrupt run file, an unwritable or full disk, out of memory, a bug).
    """
    import json as _json

    from bnlab.data import DataError, DownloadError
    from bnlab.report import ReportError
    from bnlab.runs import FolderInUseError
    from bnlab.train import ConfigError, DivergenceError

    def first_line(value: object) -> str:
        text = str(value).strip().splitlines()
        return text[0][:400] if text else ""

    if isinstance(error, (_UserError, ConfigError, FileExistsError)):
        return 2, first_line(error)
    if isinstance(error, (ReportError, DownloadError, DivergenceError, FolderInUseError)):
        return 1, first_line(error)
    from bnlab.distributed import DistributedRunError
    if isinstance(error, DistributedRunError):  # every rank's fate, on one line
        return 1, str(error).strip().splitlines()[0]
    if isinstance(error, DataError):
        return 2, first_line(error)
    if isinstance(error, _json.JSONDecodeError):
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


def _interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C prints: how to continue, when there is a folder to continue."""
    folder = getattr(args, "resume_folder", None)
    if folder is None or not Path(folder).exists():
        return "\ninterrupted (nothing to continue)"
    return (f"\ninterrupted: what finished is kept in {folder}; to continue, run:\n"
            f"  {args.resume_command}")
def _load_data(data_dir: str | None):
    """The data set every run of the command shares, loaded once (bnlab.data's order)."""
    from bnlab.data import load_cifar10

    if data_dir is not None and not Path(data_dir).expanduser().exists():
        raise _UserError(f"--data-dir {data_dir} does not exist: pass a folder "
                         "holding cifar-10-batches-py/ (or that folder itself)")
    return load_cifar10(data_dir)


# ---- the parser ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bnlab",
        description="Batch normalization, understood: hand-derived BN, manual back propagation, "
                    "and experiments on CIFAR-10.",
    )
    parser.add_argument("--version", action="version",
                        version=f"bnlab {__version__} (torch {torch.__version__}, "
                                f"Python {sys.version.split()[0]})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_gradcheck_parser(sub)
    _add_bench_parsers(sub)
    _add_compare_parsers(sub)
    _add_debug_flag(parser)
    return parser


def _add_gradcheck_parser(sub: argparse._SubParsersAction) -> None:
    """``bnlab gradcheck``."""
    p = sub.add_parser("gradcheck", help="check the hand-derived backward against autograd",
                       description="Runs the float64 checks of bnlab's hand-derived BN backward "
                                   "(and the manual engine's whole network) against autograd and "
                                   "prints a table; exits 1 if any check fails.")
    p.add_argument("--fast", action="store_true", help="skip the finite-difference gradcheck")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_gradcheck)


def _add_bench_parsers(sub: argparse._SubParsersAction) -> None:
    """``bnlab bench WHAT``: one subcommand per benchmark."""
    bench = sub.add_parser("bench", help="speed benchmarks (bn, engine, train, data, distributed)",
                           description="Speed benchmarks, measured side by side in one process.")
    bsub = bench.add_subparsers(dest="bench", required=True, metavar="WHAT")
    _add_bench_bn_parser(bsub)
    _add_bench_engine_parser(bsub)
    _add_bench_train_parser(bsub)
    _add_bench_data_parser(bsub)
    _add_bench_distributed_parser(bsub)


def _add_bench_bn_parser(bsub: argparse._SubParsersAction) -> None:
    """``bnlab bench bn``."""
    p = bsub.add_parser("bn", help="BN forward/backward: PyTorch native vs bnlab (eager, fused)",
                        description="Times training-mode BN forward, backward and both, PyTorch's "
                                    "native kernel vs bnlab's eager functions and its fused CPU "
                                    "kernel, on (128, 96, 32, 32) and (128, 192, 16, 16) float32 "
                                    "in both memory formats (and on CUDA when present). Each "
                                    "path's output and gradients are checked against the eager "
                                    "reference first; a path that disagrees is not timed.")
    p.add_argument("--repeats", type=argtypes.positive_int, default=15,
                   help="timed repeats (default 15)")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    p.add_argument("--cpu-only", action="store_true", help="skip CUDA even when present")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_bench_bn)


def _add_bench_engine_parser(bsub: argparse._SubParsersAction) -> None:
    """``bnlab bench engine``."""
    p = bsub.add_parser("engine", help="one All-CNN-C training step: autograd vs manual engine",
                        description="Times one training step (forward, backward, optimizer) of "
                                    "All-CNN-C: autograd + torch BN, autograd + bnlab BN, and the "
                                    "manual engine, with the ratio to the autograd baseline.")
    p.add_argument("--widths", type=argtypes.positive_float, nargs="+", default=[1.0, 0.5])
    p.add_argument("--batch-size", type=argtypes.positive_int, default=128)
    p.add_argument("--steps", type=argtypes.positive_int, default=5,
                   help="timed steps per variant (default 5)")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    p.add_argument("--cpu-only", action="store_true", help="skip CUDA even when present")
    p.set_defaults(func=cmd_bench_engine)


def _add_bench_train_parser(bsub: argparse._SubParsersAction) -> None:
    """``bnlab bench train``."""
    p = bsub.add_parser("train", help="images/s: a plain PyTorch loop vs bnlab's trainer",
                        description="Images/s of one All-CNN-C training step: a plain PyTorch "
                                    "loop (float32, contiguous, default allocator) beside "
                                    "bnlab's trainer for both engines in fp32 and bf16 "
                                    "(channels_last, tuned allocator) and in fp32 contiguous, "
                                    "measured side by side in one process.")
    p.add_argument("--width", type=argtypes.positive_float, default=1.0)
    p.add_argument("--batch-size", type=argtypes.positive_int, default=128)
    p.add_argument("--steps", type=argtypes.positive_int, default=4,
                   help="steps per variant per round")
    p.add_argument("--rounds", type=argtypes.positive_int, default=3,
                   help="interleaved rounds (median)")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    p.add_argument("--cpu-only", action="store_true", help="skip CUDA even when present")
    p.set_defaults(func=cmd_bench_train)


def _add_bench_data_parser(bsub: argparse._SubParsersAction) -> None:
    """``bnlab bench data``."""
    p = bsub.add_parser("data", help="augmentation + normalization: batched vs per-image loop",
                        description="Milliseconds per batch of the training-set augmentation "
                                    "(pad-4 random crop, horizontal flip) and normalization: "
                                    "bnlab's batched gather beside a per-image Python loop that "
                                    "returns the same batch, interleaved in one process.")
    p.add_argument("--batch-size", type=argtypes.positive_int, default=128)
    p.add_argument("--repeats", type=argtypes.positive_int, default=30,
                   help="timed repeats (default 30)")
    p.add_argument("--threads", type=argtypes.nonnegative_int, default=1,
                   help="torch threads while timing (default 1; 0 keeps the current number)")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    p.set_defaults(func=cmd_bench_data)


def _add_bench_distributed_parser(bsub: argparse._SubParsersAction) -> None:
    """``bnlab bench distributed``."""
    p = bsub.add_parser("distributed", help="data-parallel step time: 1 vs N processes",
                        description="Step time of data-parallel All-CNN-C training (synchronized "
                                    "BN, gradients summed over ranks) on 1 and on N processes "
                                    "with the same global batch, gloo on this CPU; the runs "
                                    "alternate and medians are compared.")
    p.add_argument("--nproc", type=argtypes.positive_int, default=2,
                   help="processes to compare with 1 (default 2)")
    p.add_argument("--engines", nargs="+", choices=["manual", "autograd"],
                   default=["manual", "autograd"])
    p.add_argument("--width", type=argtypes.positive_float, default=0.5)
    p.add_argument("--batch-size", type=argtypes.positive_int, default=128,
                   help="global batch (default 128)")
    p.add_argument("--steps", type=argtypes.positive_int, default=3,
                   help="timed steps per launch (default 3)")
    p.add_argument("--rounds", type=argtypes.positive_int, default=3,
                   help="alternating rounds (median)")
    p.add_argument("--threads", type=argtypes.positive_int, default=None,
                   help="threads per process (default: the cores shared out)")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    p.set_defaults(func=cmd_bench_distributed)


def _add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug`` on every (sub)command, before or after the command's name."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, show the full traceback (for bug reports)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_debug_flag(child)


def _add_compare_parsers(sub: argparse._SubParsersAction) -> None:
    """``bnlab compare``, ``bnlab report`` and ``bnlab study``."""
    _add_compare_parser(sub)
    _add_report_parser(sub)
    _add_study_parser(sub)


def _add_compare_parser(sub: argparse._SubParsersAction) -> None:
    """``bnlab compare``: the cases, the preset and its overrides, data, output, resume."""
    from bnlab.cases import CASES, PRESETS

    presets = "\n".join(f"  {name:<7} {p.description}" for name, p in PRESETS.items())
    cases = "\n".join(f"  {name:<9} {c.label}" for name, c in CASES.items())
    p = sub.add_parser(
        "compare", help="train the post's cases over several seeds and write a report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Trains every case for every seed into one folder (one run folder each), "
                    "then writes summary.json, curves.png, report.md and report.html.",
        epilog=f"cases:\n{cases}\n\npresets:\n{presets}\n\n"
               "Data: --data-dir if given; else the cache (~/.cache/bnlab) if it holds "
               "CIFAR-10; else a download if the network answers; else the CIFAR-10 sample "
               "embedded in bnlab (5085 train / 1017 test images), with a notice.",
    )
    p.add_argument("--cases", type=argtypes.comma_list,
                   help="comma-separated cases (default: the preset's)")
    p.add_argument("--seeds", type=argtypes.positive_int,
                   help="number of seeds, 0..N-1 (default: the preset's)")
    p.add_argument("--preset",
                   help="quick (default), smoke, paper, post or post-quick; see below")
    p.add_argument("--epochs", type=argtypes.positive_int, help="override the preset's epochs")
    p.add_argument("--subset", type=argtypes.positive_int,
                   help="train on N images (the same N for every run)")
    p.add_argument("--width", type=argtypes.positive_float,
                   help="override the preset's width multiplier")
    p.add_argument("--lr", type=argtypes.positive_float,
                   help="override the preset's learning rate")
    p.add_argument("--batch-size", type=argtypes.positive_int,
                   help="override the preset's batch size")
    p.add_argument("--device", type=argtypes.device,
                   help=f"{argtypes.DEVICE_HELP} (default: the preset's, auto)")
    p.add_argument("--init", choices=["kaiming", "torch", "post"],
                   help="conv init: He's normal (All-CNN-C's default), PyTorch's default, "
                        "or the post's N(0, 0.05²) (see bnlab.initializers)")
    p.add_argument("--final-relu", action="store_true",
                   help="All-CNN-C: a ReLU on the class scores, as in the paper's table")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp64"],
                   help="auto (default): bfloat16 autocast where the device has it fast (CUDA "
                        "with bf16, CPUs with AMX or AVX512-BF16), else float32; bf16 "
                        "anywhere (emulated, slow, on other CPUs); see bnlab.precision")
    p.add_argument("--data-dir", help="a folder holding cifar-10-batches-py/")
    p.add_argument("--out", help="the comparison folder (default runs/compare-PRESET-TIME); "
                                 "never overwritten")
    p.add_argument("--resume", metavar="OUT_DIR",
                   help="continue an interrupted comparison from its folder, as it was "
                        "planned: flags that would change it (--cases, --seeds, --epochs, "
                        "...) are refused; to extend a comparison, start a new one")
    p.add_argument("--nproc", type=argtypes.positive_int, default=1,
                   help="data-parallel over N processes on this machine, each a disjoint "
                        "part of every batch (the same global batch; gloo on CPU, one GPU "
                        "each with NCCL); or launch with torchrun --nproc_per_node N -m "
                        "bnlab compare ... (default 1)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard events into each run folder (per-epoch losses, "
                        "accuracies, learning rate, images/s; BN running statistics, gamma "
                        "and beta as histograms); needs pip install 'bnlab[tensorboard]'")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no epoch table")
    p.set_defaults(func=cmd_compare, argv=None)


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    """``bnlab report OUT_DIR``."""
    p = sub.add_parser("report", help="redraw the figures and report of a comparison folder",
                       description="Rewrites summary.json, curves.png, report.md and "
                                   "report.html from the run folders alone (no training).")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.set_defaults(func=cmd_report)


def _add_study_parser(sub: argparse._SubParsersAction) -> None:
    """``bnlab study NAME``."""
    from bnlab.studies import STUDIES
    from bnlab.studies.common import SCALES

    listing = "\n".join(f"  {name}  {title}" for name, title in STUDIES.items())
    scales = "\n".join(f"  {name:<6} {s.description}" for name, s in SCALES.items())
    p = sub.add_parser(
        "study", help="answer one of the post's five questions (or all) by experiment",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Runs a study into its own folder (runs/, summary.json, figures, "
                    "section.md, report.md, report.html); 'all' runs the five and writes one "
                    "report answering them from the measured data.",
        epilog=f"studies:\n{listing}\n  all Q1-Q5 and one report\n\npresets:\n{scales}",
    )
    p.add_argument("name", choices=[*STUDIES, "all"], metavar="{q1,q2,q3,q4,q5,all}")
    p.add_argument("--preset", choices=list(SCALES),
                   help="quick (default) or paper")
    p.add_argument("--seeds", type=argtypes.positive_int,
                   help="seeds per point (default: the preset's)")
    p.add_argument("--data-dir", help="a folder holding cifar-10-batches-py/")
    p.add_argument("--device", default="auto", type=argtypes.device,
                   help=f"{argtypes.DEVICE_HELP} (default auto: CUDA when present)")
    p.add_argument("--out", help="the study folder (default runs/study-NAME-PRESET-TIME); "
                                 "never overwritten")
    p.add_argument("--resume", metavar="DIR", nargs="?", const=True,
                   help="continue the study in folder DIR as it was started, reusing every "
                        "finished run (--preset, --seeds or --data-dir that would change it "
                        "are refused); never starts a new study")
    p.add_argument("--render", metavar="DIR",
                   help="only redraw the report of an existing study folder (no training)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_study, argv=None)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bnlab`` console script (and ``python -m bnlab``).

    Returns the exit status: 0 done, 1 a run failed, 2 the command line cannot run as given,
    3 a comparison with diverged runs, 130 interrupted (Ctrl-C). Errors are one line on
    stderr; ``--debug`` raises them with their traceback instead.
    """
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as error:
        print(f"{error.prog}: error: {error}", file=sys.stderr)
        return 2
    if argv is not None and hasattr(args, "argv"):
        args.argv = list(argv)
    name = " ".join(["bnlab", args.command, *([args.bench] if args.command == "bench" else [])])
    try:
        _check_paths(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _clear_status()
        print(_interrupted(args), file=sys.stderr)
        return 130
    except Exception as error:
        if getattr(args, "debug", False):
            raise
        code, message = _explain(error)
        print(f"{name}: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
