"""Build notebooks/*.ipynb from their jupytext sources, notebooks/*.py (percent format).

    python tools/build_notebooks.py            # (re)write every .ipynb from its .py
    python tools/build_notebooks.py --check    # exit 1 if a .ipynb differs from its .py

The .py files are the source of truth (reviewable diffs); the .ipynb files are built from
them without outputs, with cell ids numbered in order so that a rebuild of an unchanged
source is byte-identical. ``tests/test_notebooks.py`` fails when the two disagree and
executes every notebook. Needs ``pip install "bnlab[notebooks]"`` (or the test extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jupytext
import nbformat

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def build(source: Path) -> str:
    """The .ipynb text of a percent-format source: no outputs, ids ``cell-0``, ``cell-1``..."""
    notebook = jupytext.read(source, fmt="py:percent")
    for index, cell in enumerate(notebook.cells):
        cell.id = f"cell-{index}"
    nbformat.validate(notebook)
    return nbformat.writes(notebook) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a .ipynb is missing or out of date")
    args = parser.parse_args(argv)
    stale = []
    for source in sorted(NOTEBOOKS.glob("*.py")):
        target = source.with_suffix(".ipynb")
        text = build(source)
        if target.exists() and target.read_text(encoding="utf-8") == text:
            continue
        if args.check:
            stale.append(target.name)
        else:
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target.relative_to(NOTEBOOKS.parent)}")
    if stale:
        print(f"out of date with their .py source: {', '.join(stale)}: run "
              f"python tools/build_notebooks.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
