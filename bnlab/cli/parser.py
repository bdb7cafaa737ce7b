"""The ``bnlab`` command line: :func:`build_parser` and one ``_add_*`` per (sub)command,
each mapping flags onto a ``cmd_*`` of :mod:`bnlab.cli.commands`. Every numeric option has a
checking type (:mod:`bnlab.argtypes`), so a bad value is refused as the line is parsed.
"""

from __future__ import annotations

import argparse
import sys

import torch

from bnlab import __version__, argtypes
from bnlab.cli import commands
from bnlab.cli.errors import Parser

__all__ = ["build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    p.set_defaults(func=commands.cmd_gradcheck)


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
    _add_bench_output_flags(p, cpu_only=True, quiet=True)
    p.set_defaults(func=commands.cmd_bench_bn)


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
    _add_bench_output_flags(p, cpu_only=True)
    p.set_defaults(func=commands.cmd_bench_engine)


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
    _add_bench_output_flags(p, cpu_only=True)
    p.set_defaults(func=commands.cmd_bench_train)


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
    _add_bench_output_flags(p)
    p.set_defaults(func=commands.cmd_bench_data)


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
    _add_bench_output_flags(p)
    p.set_defaults(func=commands.cmd_bench_distributed)


def _add_bench_output_flags(p: argparse.ArgumentParser, *, cpu_only: bool = False,
                            quiet: bool = False) -> None:
    """The flags a benchmark ends with: ``--json FILE``, and ``--cpu-only``, ``--quiet`` where
    the benchmark has them."""
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    if cpu_only:
        p.add_argument("--cpu-only", action="store_true", help="skip CUDA even when present")
    if quiet:
        p.add_argument("--quiet", action="store_true", help="no progress line")


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
    p.set_defaults(func=commands.cmd_compare, argv=None)


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    """``bnlab report OUT_DIR``."""
    p = sub.add_parser("report", help="redraw the figures and report of a comparison folder",
                       description="Rewrites summary.json, curves.png, report.md and "
                                   "report.html from the run folders alone (no training).")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.set_defaults(func=commands.cmd_report)


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
                   help="quick (default), standard or paper; see below")
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
    p.set_defaults(func=commands.cmd_study, argv=None)
