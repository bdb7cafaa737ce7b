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

The package: :mod:`~bnlab.cli.errors` (the error boundary), :mod:`~bnlab.cli.commands` (what
each subcommand does), :mod:`~bnlab.cli.parser` (the flags); :func:`main` ties them together.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

from bnlab.cli.commands import clear_status
from bnlab.cli.errors import UsageError, check_paths, explain, interrupted
from bnlab.cli.parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bnlab`` console script (and ``python -m bnlab``).

    Returns the exit status: 0 done, 1 a run failed, 2 the command line cannot run as given,
    3 a comparison with diverged runs, 130 interrupted (Ctrl-C). Errors are one line on
    stderr; ``--debug`` raises them with their traceback instead.
    """
    try:
        args = build_parser().parse_args(argv)
    except UsageError as error:
        print(f"{error.prog}: error: {error}", file=sys.stderr)
        return 2
    if argv is not None and hasattr(args, "argv"):
        args.argv = list(argv)
    name = " ".join(["bnlab", args.command, *([args.bench] if args.command == "bench" else [])])
    saved_format = warnings.formatwarning
    if not getattr(args, "debug", False):  # a warning is one line too, without source lines
        warnings.formatwarning = _one_line_warning
    try:
        check_paths(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        clear_status()
        print(interrupted(args), file=sys.stderr)
        return 130
    except Exception as error:
        if getattr(args, "debug", False):
            raise
        code, message = explain(error)
        print(f"{name}: error: {message}", file=sys.stderr)
        return code
    finally:
        warnings.formatwarning = saved_format


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str,
                      lineno: int, line: str | None = None) -> str:
    return f"bnlab: warning: {message}\n"
