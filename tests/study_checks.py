"""Checks every study's end-to-end test makes of its files: PNG figures, figure lines."""

from __future__ import annotations

import re
from pathlib import Path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURE_LINE = re.compile(r"^!\[(.+)\]\((.+)\)$", flags=re.M)


def is_png(path: Path) -> bool:
    """The file starts with the PNG signature."""
    return Path(path).read_bytes()[:8] == PNG_MAGIC


def section_figures(section: str) -> list[tuple[str, str]]:
    """(caption, file) of every ``![caption](file)`` line of a Markdown section."""
    return FIGURE_LINE.findall(section)
