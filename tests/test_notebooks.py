"""The notebooks under notebooks/: each .ipynb matches its .py source, and each one runs.

The .py files (jupytext percent format) are the source of truth; the committed .ipynb files
are built from them by ``python tools/build_notebooks.py``. Every notebook is executed
headless with nbclient, from notebooks/ as the working directory (as a reader opens it), with
this checkout's bnlab first on the path; a cell that raises fails the test, and the
notebooks' own cells assert what they show (gradients against autograd, optimizer steps
against torch.optim). Their run time is printed, never asserted (it depends on the machine).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("*.py"))


def _cells(notebook) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


def test_three_notebooks_each_with_its_source() -> None:
    assert len(SOURCES) >= 3, [p.name for p in SOURCES]
    ipynbs = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert [p.stem for p in ipynbs] == [p.stem for p in SOURCES]


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_ipynb_matches_its_source(source: Path) -> None:
    """Editing one and forgetting the other fails here: rebuild with tools/build_notebooks.py."""
    expected = jupytext.read(source, fmt="py:percent")
    actual = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    assert _cells(actual) == _cells(expected), (
        f"{source.with_suffix('.ipynb').name} differs from {source.name}: "
        f"run python tools/build_notebooks.py")
    assert actual.metadata.get("kernelspec", {}).get("name") == "python3"


def test_ipynb_check_detects_an_edit(tmp_path: Path) -> None:
    """The comparison above can fail: an edited source no longer matches its notebook."""
    source = SOURCES[0]
    edited = tmp_path / source.name
    edited.write_text(source.read_text(encoding="utf-8") + "\n# %%\nprint('an edit')\n",
                      encoding="utf-8")
    actual = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    assert _cells(actual) != _cells(jupytext.read(edited, fmt="py:percent"))


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_notebook_executes(source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)  # the kernel imports this checkout's bnlab
    # headless: figures are rendered to PNG outputs (Agg underneath), never to a window
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    started = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the cell that failed
    print(f"{source.stem}: executed in {time.perf_counter() - started:.0f} s")
    errors = [out for cell in notebook.cells if cell.cell_type == "code"
              for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors
    figures = sum("image/png" in out.get("data", {}) for cell in notebook.cells
                  if cell.cell_type == "code" for out in cell.get("outputs", []))
    assert figures >= 2, f"{source.name} drew {figures} figures"
