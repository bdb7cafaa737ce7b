"""Markdown → one self-contained HTML page: the only way bnlab writes HTML.

Every report is written once, in Markdown (``report.md``, ``section.md``), and turned into
``report.html`` here, through markdown-it-py (CommonMark plus pipe tables): figures written
as ``![caption](file.png)`` on a line of their own become ``<figure>`` elements with the PNG
inlined as a base64 data URI, the stylesheet is inline, and nothing is loaded from
elsewhere, so the page can be mailed or archived as one file.

    >>> page = markdown_to_html("# Q1\\n\\nBN **helps**.", Path("."), "t")
    >>> "<h1>Q1</h1>" in page and "<strong>helps</strong>" in page
    True
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

__all__ = ["CSS", "markdown_body", "markdown_to_html"]

CSS = """body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;
line-height:1.45;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}img{max-width:100%}
figure{margin:1em 0}figcaption{font-size:.92em;color:#444}code{background:#f5f5f5;padding:0 .2em}
h1,h2,h3{line-height:1.2}"""


def _parser(base_dir: Path):
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")

    def lone_images(state) -> None:
        """A paragraph holding one image is a figure: drop the <p> around it."""
        tokens = state.tokens
        for i in range(1, len(tokens) - 1):
            children = tokens[i].children or []
            if (tokens[i - 1].type == "paragraph_open" and tokens[i].type == "inline"
                    and len(children) == 1 and children[0].type == "image"):
                tokens[i - 1].hidden = tokens[i + 1].hidden = True
                children[0].meta["figure"] = True

    def image(renderer, tokens, idx, options, env) -> str:
        token = tokens[idx]
        caption = renderer.renderInline(token.children or [], options, env)
        src = str(token.attrGet("src") or "")
        data = base64.b64encode((Path(base_dir) / src).read_bytes()).decode("ascii")
        img = f'<img alt="{html.escape(token.content)}" src="data:image/png;base64,{data}">'
        if token.meta.get("figure"):
            return f"<figure>{img}<figcaption>{caption}</figcaption></figure>\n"
        return img

    md.core.ruler.push("bnlab_figures", lone_images)
    md.add_render_rule("image", image)
    return md


def markdown_body(markdown: str, base_dir: str | Path) -> str:
    """The HTML of ``markdown`` (no page around it); images are read from ``base_dir``.

    Raises FileNotFoundError naming an image that is not there.
    """
    return _parser(Path(base_dir)).render(markdown)


def markdown_to_html(markdown: str, base_dir: str | Path, title: str) -> str:
    """``markdown`` as one self-contained HTML page titled ``title`` (images inlined)."""
    body = markdown_body(markdown, base_dir)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
            f"{body}\n</body></html>\n")
