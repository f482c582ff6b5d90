"""The HTML of ``report`` and ``history --plots``: one self-contained page beside its PNGs."""

from __future__ import annotations

import html

from pipeline.read.figures import PLOT_PIXELS

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { padding: 0.2em 0.7em; border-bottom: 1px solid #ddd; text-align: left; vertical-align: top; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0.5em; } figcaption { font-size: 0.85em; color: #555; }
img { width: 800px; max-width: 100%; border: 1px solid #eee; }
code, pre { font-size: 0.85em; } pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
"""


def escape(value) -> str:
    return html.escape(str(value))


def table(header: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    """An HTML table; the columns in ``numeric`` right-aligned."""
    head = "".join(f'<th class="n">{escape(h)}</th>' if i in numeric else f"<th>{escape(h)}</th>"
                   for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="n">{escape(v)}</td>' if i in numeric else f"<td>{escape(v)}</td>"
                                    for i, v in enumerate(row)) + "</tr>\n" for row in rows)
    return f"<table><tr>{head}</tr>\n{body}</table>\n"


def figures(items) -> str:
    """``<figure>`` elements for ``(file name, caption)`` pairs, each image linking to its PNG."""
    return "".join(f'<figure><a href="{escape(name)}"><img src="{escape(name)}" alt="{escape(caption)}" '
                   f'width="{PLOT_PIXELS[0]}" height="{PLOT_PIXELS[1]}"></a>'
                   f"<figcaption>{escape(caption)} ({escape(name)})</figcaption></figure>\n" for name, caption in items)


def head(title: str) -> str:
    """The page's start, up to and including ``<body>``."""
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n")
