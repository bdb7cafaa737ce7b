"""The ``bnlab`` command: a thin map from flags onto bnlab's functions.

    bnlab gradcheck                 # the hand-derived backward against autograd, float64
    bnlab bench bn [--json FILE]    # BN forward/backward: PyTorch native vs bnlab
    bnlab bench engine              # one All-CNN-C training step: autograd vs manual engine
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

    bench = sub.add_parser("bench", help="speed benchmarks (bn, engine)",
                           description="Speed benchmarks, measured side by side in one process.")
    bsub = bench.add_subparsers(dest="bench", required=True, metavar="WHAT")
    p = bsub.add_parser("bn", help="BN forward/backward: PyTorch native vs bnlab",
                        description="Times training-mode BN forward, backward and both, PyTorch's "
                                    "native kernel vs bnlab, on (128, 96, 32, 32) and "
                                    "(128, 192, 16, 16) float32 in both memory formats (and on "
                                    "CUDA when present).")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bnlab`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
