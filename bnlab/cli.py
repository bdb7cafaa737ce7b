"""The ``bnlab`` command: a thin map from flags onto bnlab's functions.

    bnlab gradcheck                 # the hand-derived backward against autograd, float64
    bnlab bench bn [--json FILE]    # BN forward/backward: PyTorch native vs bnlab eager/fused
    bnlab bench engine              # one All-CNN-C training step: autograd vs manual engine
    bnlab bench train               # images/s: a plain PyTorch loop vs bnlab's trainer
    bnlab compare [--preset quick]  # the post's cases over seeds: runs, summary, report
    bnlab report OUT_DIR            # redraw a comparison's figures and report from its files
    bnlab study q1..q5|all          # the post's five questions, answered by experiment
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

__all__ = ["main"]


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

def cmd_gradcheck(args: argparse.Namespace) -> int:
    from bnlab.bench import format_table
    from bnlab.checks import bn_gradcheck_rows, network_gradcheck_rows

    print("bnlab gradcheck: hand-derived backward vs autograd, float64 "
          "(max relative error, norm-wise)")
    rows = bn_gradcheck_rows(progress=_status(args.quiet), finite_differences=not args.fast)
    rows += network_gradcheck_rows(progress=_status(args.quiet))
    _clear_status()
    table = []
    for r in rows:
        errs = {k: r.errors.get(k) for k in ("dx", "dgamma", "dbeta", "dweights")}
        table.append({
            "check": r.name, "shape": "x".join(map(str, r.shape)),
            **{k: "-" if v is None else f"{v:.1e}" for k, v in errs.items()},
            "finite diff": {None: "-", True: "ok", False: "FAIL"}[r.gradcheck],
            "result": "pass" if r.passed else "FAIL",
        })
    cols = [(k, k, "") for k in ("check", "shape", "dx", "dgamma", "dbeta", "dweights",
                                 "finite diff", "result")]
    print(format_table(table, cols))
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
    print(f"one training step of All-CNN-C, float32, median of {args.rounds} interleaved rounds "
          f"of {args.steps} steps (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print(format_table(rows, TRAIN_COLUMNS))
    _write_json(args.json, {"machine": _machine(), "rows": rows})
    return 0


def cmd_bench_data(args: argparse.Namespace) -> int:
    from bnlab.bench import DATA_COLUMNS, bench_data, format_table

    if args.repeats < 1 or args.batch_size < 1:
        raise _UserError("--repeats and --batch-size must be at least 1")
    rows = bench_data(batch_size=args.batch_size, repeats=args.repeats, threads=args.threads)
    print(f"CIFAR-10 augmentation (pad-4 crop, flip) + normalization, CPU, median of "
          f"{args.repeats} interleaved repeats (torch {torch.__version__})")
    print(format_table(rows, DATA_COLUMNS))
    _write_json(args.json, {"machine": _machine(), "rows": rows})
    return 0

# ---- bnlab compare / report ---------------------------------------------------------------

def cmd_compare(args: argparse.Namespace) -> int:
    from bnlab.compare import command_line, plan_comparison, resume_plan, run_comparison

    if args.resume:
        plan = resume_plan(args.resume)
    else:
        if args.data_dir is not None and not Path(args.data_dir).expanduser().exists():
            raise _UserError(f"--data-dir {args.data_dir} does not exist: pass a folder "
                             "holding cifar-10-batches-py/ (or that folder itself)")
        overrides = {"epochs": args.epochs, "subset": args.subset, "data_dir": args.data_dir,
                     "width": args.width, "lr": args.lr, "batch_size": args.batch_size,
                     "device": args.device}
        plan = plan_comparison(
            args.cases.split(",") if args.cases else None, args.seeds, args.preset, args.out,
            overrides, command_line(sys.argv[1:] if args.argv is None else args.argv),
        )
    summary = run_comparison(plan, quiet=args.quiet)
    if summary.get("diverged"):
        print(f"bnlab compare: {len(summary['diverged'])} run(s) diverged: "
              f"{', '.join(summary['diverged'])} (see their result.json)", file=sys.stderr)
        return 3
    if not args.quiet:
        print(f"report: {plan.out / 'report.html'}")
    return 0


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

    if args.data_dir is not None and not Path(args.data_dir).expanduser().exists():
        raise _UserError(f"--data-dir {args.data_dir} does not exist: pass a folder "
                         "holding cifar-10-batches-py/ (or that folder itself)")
    if args.render:
        out = Path(args.render)
        if not (out / "summary.json").is_file():
            raise _UserError(f"{out} is not a bnlab study folder (no summary.json)")
        if args.name == "all":
            studies.render_report(out)
        else:
            section = studies.study_module(args.name).render(out)
            (out / "section.md").write_text(section)
            studies._write_report(out, f"bnlab study {args.name}", section)
        print(f"wrote {out}/report.md, report.html")
        return 0
    out = Path(args.out or f"runs/study-{args.name}-{args.preset}-"
                          f"{time.strftime('%Y%m%d-%H%M%S')}")
    log = (lambda _: None) if args.quiet else print
    kwargs = {"preset": args.preset, "seeds": args.seeds, "data_dir": args.data_dir,
              "device": args.device, "resume": args.resume, "quiet": args.quiet, "log": log}
    try:
        if args.name == "all":
            studies.run_all(out, **kwargs)
        else:
            studies.run_study(args.name, out, **kwargs)
    except ValueError as error:
        if type(error) is ValueError:  # a bad argument, not a bug deeper down
            raise _UserError(str(error)) from None
        raise
    if not args.quiet:
        print(f"report: {out / 'report.html'}")
    return 0


class _UserError(Exception):
    """An error caused by the user's input: printed as one line, no traceback."""


# ---- the parser ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnlab",
        description="Batch normalization, understood: hand-derived BN, manual back propagation, "
                    "and experiments on CIFAR-10.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("gradcheck", help="check the hand-derived backward against autograd",
                       description="Runs the float64 checks of bnlab's hand-derived BN backward "
                                   "(and the manual engine's whole network) against autograd and "
                                   "prints a table; exits 1 if any check fails.")
    p.add_argument("--fast", action="store_true", help="skip the finite-difference gradcheck")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_gradcheck)

    bench = sub.add_parser("bench", help="speed benchmarks (bn, engine, train, data)",
                           description="Speed benchmarks, measured side by side in one process.")
    bsub = bench.add_subparsers(dest="bench", required=True, metavar="WHAT")
    p = bsub.add_parser("bn", help="BN forward/backward: PyTorch native vs bnlab (eager, fused)",
                        description="Times training-mode BN forward, backward and both, PyTorch's "
                                    "native kernel vs bnlab's eager functions and its fused CPU "
                                    "kernel, on (128, 96, 32, 32) and (128, 192, 16, 16) float32 "
                                    "in both memory formats (and on CUDA when present). Each "
                                    "path's output and gradients are checked against the eager "
                                    "reference first; a path that disagrees is not timed.")
    p.add_argument("--repeats", type=int, default=15, help="timed repeats (default 15)")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    p.add_argument("--cpu-only", action="store_true", help="skip CUDA even when present")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_bench_bn)

    p = bsub.add_parser("engine", help="one All-CNN-C training step: autograd vs manual engine",
                        description="Times one training step (forward, backward, optimizer) of "
                                    "All-CNN-C: autograd + torch BN, autograd + bnlab BN, and the "
                                    "manual engine, with the ratio to the autograd baseline.")
    p.add_argument("--widths", type=float, nargs="+", default=[1.0, 0.5])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (default 5)")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    p.add_argument("--cpu-only", action="store_true", help="skip CUDA even when present")
    p.set_defaults(func=cmd_bench_engine)

    p = bsub.add_parser("train", help="images/s: a plain PyTorch loop vs bnlab's trainer",
                        description="Images/s of one All-CNN-C training step: a plain PyTorch "
                                    "loop (contiguous, default allocator) beside bnlab's trainer "
                                    "for both engines (channels_last, tuned allocator), measured "
                                    "side by side in one process.")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    p.add_argument("--cpu-only", action="store_true", help="skip CUDA even when present")
    p.set_defaults(func=cmd_bench_train)

    p = bsub.add_parser("data", help="augmentation + normalization: batched vs per-image loop",
                        description="Milliseconds per batch of the training-set augmentation "
                                    "(pad-4 random crop, horizontal flip) and normalization: "
                                    "bnlab's batched gather beside a per-image Python loop that "
                                    "returns the same batch, interleaved in one process.")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=30, help="timed repeats (default 30)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads while timing (default 1; 0 keeps the current number)")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    p.set_defaults(func=cmd_bench_data)
    _add_compare_parsers(sub)
    return parser


def _add_compare_parsers(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--cases", help="comma-separated cases (default: the preset's)")
    p.add_argument("--seeds", type=int, help="number of seeds, 0..N-1 (default: the preset's)")
    p.add_argument("--preset", default="quick",
                   help="quick (default), paper, post or post-quick; see below")
    p.add_argument("--epochs", type=int, help="override the preset's epochs")
    p.add_argument("--subset", type=int, help="train on N images (the same N for every run)")
    p.add_argument("--width", type=float, help="override the preset's width multiplier")
    p.add_argument("--lr", type=float, help="override the preset's learning rate")
    p.add_argument("--batch-size", type=int, help="override the preset's batch size")
    p.add_argument("--device", help="auto (default), cpu, cuda")
    p.add_argument("--data-dir", help="a folder holding cifar-10-batches-py/")
    p.add_argument("--out", help="the comparison folder (default runs/compare-PRESET-TIME); "
                                 "never overwritten")
    p.add_argument("--resume", metavar="OUT_DIR",
                   help="continue an interrupted comparison from its folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no epoch table")
    p.set_defaults(func=cmd_compare, argv=None)

    p = sub.add_parser("report", help="redraw the figures and report of a comparison folder",
                       description="Rewrites summary.json, curves.png, report.md and "
                                   "report.html from the run folders alone (no training).")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.set_defaults(func=cmd_report)

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
    p.add_argument("--preset", default="quick", choices=list(SCALES),
                   help="quick (default) or paper")
    p.add_argument("--seeds", type=int, help="seeds per point (default: the preset's)")
    p.add_argument("--data-dir", help="a folder holding cifar-10-batches-py/")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    p.add_argument("--out", help="the study folder (default runs/study-NAME-PRESET-TIME); "
                                 "never overwritten")
    p.add_argument("--resume", action="store_true",
                   help="continue in an existing --out folder, reusing every finished run")
    p.add_argument("--render", metavar="DIR",
                   help="only redraw the report of an existing study folder (no training)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_study)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bnlab`` console script."""
    args = build_parser().parse_args(argv)
    if argv is not None and hasattr(args, "argv"):
        args.argv = list(argv)
    from bnlab.data import DataError
    from bnlab.train import ConfigError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataError, FileExistsError, _UserError) as error:
        print(f"bnlab {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
