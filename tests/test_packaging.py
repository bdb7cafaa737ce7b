"""The conventions a Python package is expected to keep: one version, ``--version``,
``python -m bnlab``, a typed marker, a licence in the wheel, and an sdist whose tests run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import bnlab

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

# what a source tree may hold that is no part of the package (build outputs, caches, runs)
NOT_SOURCE = ("*.egg-info", "build", "dist", "runs", "out", "data", "__pycache__", ".*")


def test_one_version_source() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "bnlab.__version__"}
    assert project["project"]["license"] == "MIT"  # an SPDX expression (PEP 639)
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_version_and_python_m() -> None:
    done = subprocess.run([sys.executable, "-m", "bnlab", "--version"], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"bnlab {bnlab.__version__} (torch ")
    done = subprocess.run([sys.executable, "-m", "bnlab"], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "COMMAND" in done.stderr and "Traceback" not in done.stderr


def test_py_typed_marker_is_package_data() -> None:
    assert (ROOT / "bnlab" / "py.typed").is_file()


@pytest.mark.slow
def test_sdist_and_wheel(tmp_path: Path) -> None:
    """``python -m build`` (sdist, then the wheel from the sdist) on a copy of the source;
    the sdist holds the tests and what they import, and they are collected from it."""
    pytest.importorskip("build", reason="the sdist check needs `pip install build` (in [test])")
    import shutil

    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    dist = tmp_path / "dist"
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir",
                           str(dist), str(source)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    version = bnlab.__version__
    sdist, wheel = dist / f"bnlab-{version}.tar.gz", dist / f"bnlab-{version}-py3-none-any.whl"

    with tarfile.open(sdist) as archive:
        prefix = f"bnlab-{version}/"
        in_sdist = {name.removeprefix(prefix) for name in archive.getnames()}
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        archive.extractall(tmp_path, **safe)
    expected = {"LICENSE", "README.md", "pyproject.toml", "bnlab/py.typed"}
    for pattern in ("bnlab/**/*.py", "bnlab/assets/*", "tests/*.py", "tools/*.py"):
        expected |= {str(p.relative_to(ROOT)) for p in ROOT.glob(pattern)
                     if "__pycache__" not in p.parts}
    missing = sorted(expected - in_sdist)
    print(f"sdist: {len(in_sdist)} entries; missing: {missing}")
    assert not missing
    assert not [name for name in in_sdist if name.endswith(".pyc")]

    with zipfile.ZipFile(wheel) as archive:
        in_wheel = set(archive.namelist())
        metadata = archive.read(f"bnlab-{version}.dist-info/METADATA").decode()
    assert {f"bnlab-{version}.dist-info/licenses/LICENSE", "bnlab/py.typed",
            "bnlab/__main__.py", "bnlab/assets/cifar10_sample.npz.xz"} <= in_wheel
    assert not [name for name in in_wheel if name.startswith("tests/")]
    assert "License-Expression: MIT" in metadata and f"Version: {version}" in metadata

    # the unpacked sdist's tests import its own bnlab and are all collected
    unpacked = tmp_path / f"bnlab-{version}"
    collect = ("import sys, pytest, bnlab; print('bnlab from', bnlab.__file__); "
               "sys.exit(pytest.main(['--collect-only', '-p', 'no:cacheprovider']))")
    done = subprocess.run([sys.executable, "-c", collect], cwd=unpacked,
                          env={**os.environ, "PYTHONPATH": str(unpacked)}, capture_output=True,
                          text=True, timeout=600)
    print(done.stdout[:200], done.stdout[-200:])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"bnlab from {unpacked / 'bnlab' / '__init__.py'}" in done.stdout
    assert re.search(r"\n\d+ tests collected in ", done.stdout)
