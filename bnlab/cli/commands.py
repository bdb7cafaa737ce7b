"""The ``bnlab`` subcommands: each ``cmd_*`` maps its parsed flags onto bnlab's functions,
prints what a person reads and returns the exit status (see :mod:`bnlab.cli`).

    cmd_gradcheck        bnlab gradcheck
    cmd_bench_*          bnlab bench bn | engine | train | data | distributed
    cmd_compare          bnlab compare (one process, --nproc N, or a torchrun rank)
    cmd_report           bnlab report
    cmd_study            bnlab study

A mistake in the input is raised as :class:`~bnlab.cli.errors.UserError`; the error boundary
in :func:`bnlab.cli.main` prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from bnlab.cli.errors import UserError

__all__ = ["clear_status", "cmd_bench_bn", "cmd_bench_data", "cmd_bench_distributed",
           "cmd_bench_engine", "cmd_bench_train", "cmd_compare", "cmd_gradcheck", "cmd_report",
           "cmd_study", "status"]


def status(quiet: bool = False) -> Callable[[str], None]:
    """A one-line progress printer on stderr (silent when quiet or not a terminal)."""

    def show(text: str) -> None:
        if not quiet and sys.stderr.isatty():
            print(f"\r\033[K  {text} ...", end="", file=sys.stderr, flush=True)

    return show


def clear_status() -> None:
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
        clear_status()
        errs = {k: r.errors.get(k) for k in ("dx", "dgamma", "dbeta", "dweights")}
        print(_gradcheck_line({
            "check": r.name, "shape": "x".join(map(str, r.shape)),
            **{k: "-" if v is None else f"{v:.1e}" for k, v in errs.items()},
            "finite diff": {None: "-", True: "ok", False: "FAIL"}[r.gradcheck],
            "result": "pass" if r.passed else "FAIL",
        }), flush=True)

    rows = bn_gradcheck_rows(progress=status(args.quiet), finite_differences=not args.fast,
                             on_row=print_row)
    rows += network_gradcheck_rows(progress=status(args.quiet), on_row=print_row)
    clear_status()
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
        rows += bench_bn(device=device, repeats=args.repeats, progress=status(args.quiet))
    clear_status()
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
                       rounds=args.rounds, device=device, progress=status(False))
    clear_status()
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
        steps=args.steps, rounds=args.rounds, threads=args.threads, progress=status(False),
    )
    clear_status()
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
        _check_data_dir(args.data_dir)
        overrides = {"epochs": args.epochs, "subset": args.subset, "data_dir": args.data_dir,
                     "width": args.width, "lr": args.lr, "batch_size": args.batch_size,
                     "device": args.device, "init": args.init,
                     "final_relu": True if args.final_relu else None,
                     "precision": args.precision}
        plan = plan_comparison(
            args.cases, args.seeds, args.preset or "quick", args.out,
            overrides, command_line(sys.argv[1:] if args.argv is None else args.argv),
        )  # it checks the cases, preset and folder, then loads the data once for every run
    if args.tensorboard:
        from bnlab.tensorboard import require_tensorboard
        try:
            require_tensorboard()
        except ImportError as error:
            raise UserError(str(error)) from None
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
    from bnlab.config import resolve_device

    device = resolve_device(args.device or "auto")
    if "WORLD_SIZE" in os.environ:  # torchrun (or another launcher that sets the env)
        if args.nproc > 1 and args.nproc != int(os.environ["WORLD_SIZE"]):
            raise UserError(f"--nproc {args.nproc} but the launcher started "
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
    from bnlab.compare import check_resumable, resume_conflicts
    from bnlab.runs import read_compare

    folder = Path(args.resume)
    check_resumable(folder)
    requested = {name: getattr(args, name) for name in (
        "cases", "seeds", "preset", "out", "epochs", "subset", "width", "lr", "batch_size",
        "device", "data_dir", "precision")}
    conflicts = resume_conflicts(read_compare(folder, plan=True), requested)
    if conflicts:
        raise UserError(f"--resume {folder} continues the comparison as it was planned; "
                         f"these flags would change it: {'; '.join(conflicts)}. Drop them, or "
                         "start a new comparison with --out")


def cmd_report(args: argparse.Namespace) -> int:
    from bnlab import report

    out = Path(args.out_dir)
    if not (out / "compare.json").is_file():
        raise UserError(f"{out} is not a bnlab comparison folder (no compare.json)")
    report.write_report(out)
    print(f"wrote {out}/summary.json, curves.png, report.md, report.html")
    return 0


# ---- bnlab study ---------------------------------------------------------------------------

def cmd_study(args: argparse.Namespace) -> int:
    import time

    from bnlab import studies

    if args.render:
        out = Path(args.render)
        if (out / "compare.json").exists():
            raise UserError(f"{out} is a comparison, not a study: redraw it with "
                             f"bnlab report {out}")
        if not (out / "summary.json").is_file():
            raise UserError(f"{out} is not a bnlab study folder (no summary.json)")
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
            raise UserError(f"--resume {out} continues the study as it was started; these "
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
        raise UserError(str(error)) from None
    if not resume and out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty: bnlab never overwrites results "
                         f"(choose another --out, or --resume {out})")
    if resume:
        from bnlab.runs import check_free

        check_free(out)  # another process's study is refused before the data loads
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
        raise UserError(f"--resume {named} and --out {args.out} name two folders: "
                         f"use --resume {named} alone")
    folder = named or args.out
    if folder is None:
        raise UserError(f"--resume needs the study folder: bnlab study {args.name} --resume "
                         "DIR (it never starts a new study)")
    if not Path(folder).is_dir():
        raise UserError(f"cannot resume {folder}: no such folder (start a new study with "
                         f"--out {folder})")
    from bnlab.studies import PLAN

    folder = Path(folder)
    if (folder / "compare.json").exists():
        raise UserError(f"cannot resume {folder} as a study: it is a comparison (continue it "
                         f"with bnlab compare --resume {folder})")
    if not (folder / PLAN).exists() and not (folder / "runs").is_dir():
        raise UserError(f"cannot resume {folder}: it is not a study folder (no {PLAN}); "
                         f"start a new study with --out DIR")
    return folder


def _check_data_dir(data_dir: str | None) -> None:
    if data_dir is not None and not Path(data_dir).expanduser().exists():
        raise UserError(f"--data-dir {data_dir} does not exist: pass a folder "
                         "holding cifar-10-batches-py/ (or that folder itself)")


def _load_data(data_dir: str | None):
    """The data set every run of the command shares, loaded once (bnlab.data's order)."""
    from bnlab.data import load_cifar10

    _check_data_dir(data_dir)
    return load_cifar10(data_dir)
