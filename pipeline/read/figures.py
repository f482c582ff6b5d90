"""What every plot of ``report`` and ``history --plots`` shares: size, style, colours, saving.

Every plot is an 800 x 450 pixel PNG (``PLOT_PIXELS``), drawn with matplotlib's
object-oriented API on the Agg canvas (no pyplot, no display, the user's backend and style
untouched). With a baseline run a plot overlays the two: the run in solid lines, the baseline
dashed (``runs``). matplotlib is imported when a plot is drawn (deliberately lazy): the views
that draw live beside the accessors of ``pipeline.load``, which must not need it.
"""

from __future__ import annotations

import functools
import re

import numpy as np

PLOT_INCHES = (8.0, 4.5)
PLOT_DPI = 100
PLOT_PIXELS = (800, 450)  # width, height of every PNG
RUN_COLOR, BASELINE_COLOR = "#1f77b4", "#d62728"
# Blocks of H drawn side by side (per-block spectra): matplotlib's ten default colours, and how
# many blocks one plot shows before it becomes unreadable.
BLOCK_COLORS = tuple(f"C{k}" for k in range(10))
SHOWN_BLOCKS = 10
BINS = 60


def default_style(plot):
    """Draws with matplotlib's default style, not the user's matplotlibrc: sizes and fonts are
    part of the report (a ``savefig.bbox: tight`` there would change the pixel size)."""

    @functools.wraps(plot)
    def wrapper(*args, **kwargs):
        import matplotlib.style  # lazy: see the module's docstring

        with matplotlib.style.context("default"):
            return plot(*args, **kwargs)

    return wrapper


def new_figure():
    """An empty 800 x 450 pixel matplotlib ``Figure`` (no pyplot)."""
    from matplotlib.figure import Figure  # lazy: see the module's docstring

    return Figure(figsize=PLOT_INCHES, dpi=PLOT_DPI, layout="constrained")


@default_style
def save(figure, path: str) -> None:
    figure.savefig(path, dpi=PLOT_DPI, format="png", metadata={"Software": "hessian-pipeline"})


def label(run) -> str:
    """A run in a legend: its job's name and run id."""
    return f"{run.name} {run.run_id}"


def runs(run, baseline) -> list[tuple]:
    """``(run, line style, legend prefix)``: the run solid, the baseline dashed."""
    out = [(run, "-", "")]
    if baseline is not None:
        out.append((baseline, "--", "baseline "))
    return out


def slug(text: str) -> str:
    """``text`` as a file name part."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "variable"


def fmt(value, digits: int = 6) -> str:
    """A value in a report: integers with thousands separators, floats to ``digits`` digits."""
    if isinstance(value, (bool, np.bool_)) or value is None:
        return str(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    try:
        return f"{float(value):.{digits}g}"
    except (TypeError, ValueError):
        return str(value)
