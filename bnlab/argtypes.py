"""Argument types of the ``bnlab`` command: each checks one flag's value as argparse reads it.

A type raises :class:`argparse.ArgumentTypeError` with the bad value and what to pass
instead, so a mistake is refused before any data is read or any folder is made:

    >>> positive_int("0")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: expected a whole number of at least 1, got '0'
    >>> device("gpu")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: 'gpu' is not a device: use auto, cpu, cuda, cuda:N or mps
"""

from __future__ import annotations

import argparse
import math

import torch

__all__ = ["comma_list", "device", "nonnegative_int", "positive_float", "positive_int"]

DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"


def _int(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < least:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least {least}, "
                                         f"got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1 (epochs, seeds, batch size, repeats, steps, images)."""
    return _int(text, 1)


def nonnegative_int(text: str) -> int:
    """A whole number >= 0 (where 0 means "keep the default", e.g. ``--threads 0``)."""
    return _int(text, 0)


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rate, width multiplier); rejects nan and inf."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number above 0, got {text!r}")
    return value


def comma_list(text: str) -> list[str]:
    """``"a,b,c"`` -> ``["a", "b", "c"]``; an empty item (``"a,"``, ``""``) is refused."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected comma-separated names such as a,b,c, "
                                         f"got {text!r}")
    return items


def device(text: str) -> str:
    """A device this machine has: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Parsed by :class:`torch.device` and checked against what this machine has (CUDA
    present, the index below ``torch.cuda.device_count()``, MPS available). Returns the
    text unchanged, as the run's config stores it.
    """
    if text == "auto":
        return text
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use {DEVICE_HELP}") from None
    if parsed.type == "cpu":
        return text
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text!r} asked for, but CUDA is not available here (torch {torch.__version__}): "
                f"use cpu or auto")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise argparse.ArgumentTypeError(
                f"{text!r} asked for, but this machine has {count} CUDA device(s): "
                f"use cuda:0 .. cuda:{count - 1}")
        return text
    if parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} asked for, but MPS is not available "
                                             f"here: use cpu or auto")
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: bnlab trains on {DEVICE_HELP}")
