"""Behaviour pinned across refactors: `bnlab compare --cases a,b,c` and `bnlab study q1` on
tiny generated data give the metrics and summary numbers the golden file holds (written by
the code before issue 14's re-layering; see tests/regression.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests import regression

GOLDEN = json.loads((Path(__file__).parent / "golden" / "upper_half.json").read_text())
# The golden floats are bit-exact on the torch and CPU kind that wrote them; another torch or
# CPU (its vector ISA picks other kernels) may round differently, which two short epochs keep
# far below this.
EXACT = (torch.__version__ == GOLDEN["torch"]
         and torch.backends.cpu.get_cpu_capability() == GOLDEN.get("cpu_capability"))
REL = 0.0 if EXACT else 1e-3


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return regression.tiny_cifar(tmp_path_factory.mktemp("cifar"))


def _assert_same(measured: dict, golden: dict) -> None:
    assert sorted(measured["metrics"]) == sorted(golden["metrics"])
    for run, rows in golden["metrics"].items():
        got = measured["metrics"][run]
        assert len(got) == len(rows), run
        for a, b in zip(got, rows, strict=True):
            if EXACT:
                assert a == b, (run, a, b)
            else:
                assert json.loads(a) == pytest.approx(json.loads(b), rel=REL), run
    assert sorted(measured["summary"]) == sorted(golden["summary"])
    for key, value in golden["summary"].items():
        assert measured["summary"][key] == pytest.approx(value, rel=REL, nan_ok=True), key


def test_compare_matches_the_golden_run(tiny_root, tmp_path):
    measured = regression.fingerprint(regression.run_compare(tiny_root, tmp_path / "cmp"))
    _assert_same(measured, GOLDEN["compare"])


def test_study_q1_matches_the_golden_run(tiny_root, tmp_path):
    measured = regression.fingerprint(regression.run_study_q1(tiny_root, tmp_path / "q1"))
    _assert_same(measured, GOLDEN["study_q1"])
