"""Aligned text tables and numbers, as ``show``, ``compare`` and ``history`` print them."""

from __future__ import annotations


def aligned(rows: list[list], header: list[str], text_columns: int = 2) -> str:
    """Aligned columns: the first ``text_columns`` to the left, numbers (and their headers)
    to the right, so that each header sits over its digits."""
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]

    def line(values) -> str:
        return "  ".join(str(v).ljust(w) if i < text_columns else str(v).rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    lines = [line(header), "  ".join("-" * w for w in widths)]
    lines += [line(row) for row in rows]
    return "\n".join(lines) + "\n"


def number(value) -> str:
    """Six significant digits; anything that is not a number as it is."""
    try:
        return f"{float(value):.6g}"
    except (TypeError, ValueError):
        return str(value)
