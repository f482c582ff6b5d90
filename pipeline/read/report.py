"""``report RUN_DIR``: PNG plots of a run and one HTML page that shows them with its tables.

Every plot is an 800 x 450 pixel PNG (``PLOT_PIXELS``), drawn with matplotlib's
object-oriented API on the Agg canvas (no pyplot, no display, the user's backend and style
untouched); ``index.html`` references each PNG by its file name, so the folder is the report
and works wherever it is copied. With a baseline run every plot overlays the two: the run in
solid lines, the baseline dashed.

The plots, each a function that returns a matplotlib ``Figure`` (for notebooks):

- ``plot_diagonals``: per variable, histograms of ``log10 |d|`` for the Hessian, GGN and
  Fisher diagonals ``d``. Signs are kept apart, never folded: positive entries are counted
  above the axis, negative ones (by magnitude) below it, and exact zeros (which have no
  logarithm) are counted in the legend.
- ``plot_variables``: the mean ``|d|`` of each variable (from ``summary.parquet``), log scale.
- ``plot_eigenvalues``: the top eigenvalues by rank; the error bar is the residual
  ``r = |Hv - theta v|``, which bounds the distance to an eigenvalue of ``H``
  (``min_i |lambda_i - theta| <= r`` for a unit ``v`` and a symmetric ``H``).
- ``plot_spectrum``: the spectral density from the SLQ nodes and weights, smoothed with a
  Gaussian of width ``sigma`` (``pipeline.spectrum.slq.density``) and drawn on a log scale
  as in Ghorbani, Krishnan, Xiao 2019.
- ``plot_blocks``: per block of H (``blocks: variable | layer``), the rank-1 eigenvalue and the
  trace, the baseline's beside them: per-layer sharpness and its drift.
- ``plot_trace``: every trace estimate the run holds, with 1 and 2 standard errors: the
  ``trace`` quantity, the sum of the exact Hessian diagonal, and the SLQ estimate
  ``P * mean_r sum_j w_rj theta_rj`` (a Hutchinson estimate with one probe per SLQ run).

Cost: reading the run's tables and about 0.1 s per plot; no TensorFlow, no Ray.
"""

from __future__ import annotations

import functools
import html
import json
import os
import re
from dataclasses import dataclass, field

import matplotlib.style
import numpy as np
from matplotlib.colors import SymLogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from pipeline.blocks import ALL
from pipeline.errors import InputError
from pipeline.quantities.registry import UNITS
from pipeline.read.run import Run, load
from pipeline.storage.publish import published_run_around
from pipeline.spectrum.slq import density

PLOT_INCHES = (8.0, 4.5)
PLOT_DPI = 100
PLOT_PIXELS = (800, 450)  # width, height of every PNG
# The curvature diagonals, with each unit's label, colour and line width (the gradient has no label).
DIAGONALS = tuple((unit.name, unit.label) for unit in UNITS.values() if unit.label)
COLORS = {unit.name: unit.color for unit in UNITS.values() if unit.label}
# Line widths: the Hessian drawn wider, under the others (for a last linear layer it equals the
# GGN exactly).
WIDTHS = {unit.name: unit.line_width for unit in UNITS.values() if unit.label}
RUN_COLOR, BASELINE_COLOR = "#1f77b4", "#d62728"
# Blocks of H drawn side by side (per-block spectra): matplotlib's ten default colours, and how
# many blocks one plot shows before it becomes unreadable.
BLOCK_COLORS = tuple(f"C{k}" for k in range(10))
SHOWN_BLOCKS = 10
BINS = 60
# The spectral density is drawn down to this fraction of its peak: below it the Gaussian
# tails of the smoothing, not the spectrum, would fill the log scale.
DENSITY_FLOOR = 1e-7


# ------------------------------------------------------------------------------ helpers
def _default_style(plot):
    """Draws with matplotlib's default style, not the user's matplotlibrc: sizes and fonts are
    part of the report (a ``savefig.bbox: tight`` there would change the pixel size)."""

    @functools.wraps(plot)
    def wrapper(*args, **kwargs):
        with matplotlib.style.context("default"):
            return plot(*args, **kwargs)

    return wrapper


def _figure():
    return Figure(figsize=PLOT_INCHES, dpi=PLOT_DPI, layout="constrained")


@_default_style
def _save(figure, path: str) -> None:
    figure.savefig(path, dpi=PLOT_DPI, format="png", metadata={"Software": "hessian-pipeline"})


def _label(run: Run) -> str:
    return f"{run.name} {run.run_id}"


def _runs(run: Run, baseline: Run | None) -> list[tuple[Run, str, str]]:
    """``(run, line style, legend prefix)``: the run solid, the baseline dashed."""
    out = [(run, "-", "")]
    if baseline is not None:
        out.append((baseline, "--", "baseline "))
    return out


def _values(run: Run, column: str, variable: str | None) -> np.ndarray | None:
    if not run.has("diagonals") or column not in run.quantities():
        return None
    if variable is None:
        return run.diagonals[column].to_numpy(np.float64)
    arrays = run.arrays(column)
    return arrays[variable].reshape(-1) if variable in arrays else None


def _which(run: Run) -> str:
    """The ``which`` of the run's eigenvalues (largest, smallest or magnitude)."""
    return ((run.manifest.get("job") or {}).get("quantities") or {}).get("eigenvalues", {}).get("which", "largest")


def _comparable(run: Run, baseline: Run | None) -> Run | None:
    """The baseline, when its eigenvalues are the same end of the spectrum as the run's."""
    return baseline if baseline is not None and _which(baseline) == _which(run) else None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "variable"


def _fmt(value, digits: int = 6) -> str:
    if isinstance(value, (bool, np.bool_)) or value is None:
        return str(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    try:
        return f"{float(value):.{digits}g}"
    except (TypeError, ValueError):
        return str(value)


# ------------------------------------------------------------------------------ plots
@_default_style
def plot_diagonals(run: Run, variable: str | None = None, baseline: Run | None = None):
    """Histograms of ``log10 |d|`` per diagonal quantity of one variable (``None``: all).

    Positive entries are counted above the axis, negative ones below it; zeros in the
    legend. With hutchinson or mc standard errors, the legend also counts the entries within
    two standard errors of zero (indistinguishable from zero at that precision).
    """
    figure = _figure()
    ax = figure.add_subplot()
    series = []
    for source, style, prefix in _runs(run, baseline):
        for column, name in DIAGONALS:
            values = _values(source, column, variable)
            if values is not None:
                stderr = _values(source, f"{column}_stderr", variable)
                series.append((source, style, prefix, column, name, values, stderr))
    if not series:
        raise InputError(f"run {run.run_id} has no Hessian, GGN or Fisher diagonal to plot")
    magnitudes = np.concatenate([np.abs(v[np.isfinite(v) & (v != 0)]) for *_, v, _ in series])
    if magnitudes.size:
        low, high = np.log10(magnitudes.min()), np.log10(magnitudes.max())
    else:
        low, high = -1.0, 1.0
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    edges = 10.0 ** np.linspace(low, high, BINS + 1)
    edges[0], edges[-1] = edges[0] * 0.999, edges[-1] * 1.001  # keep the extremes inside
    top = bottom = 0.0
    for source, style, prefix, column, name, values, stderr in series:
        finite = values[np.isfinite(values)]
        positive = np.histogram(finite[finite > 0], edges)[0]
        negative = np.histogram(-finite[finite < 0], edges)[0]
        zeros = int(np.sum(finite == 0))
        text = f"{prefix}{name}: {int(positive.sum()):,} positive, {int(negative.sum()):,} negative"
        if zeros:
            text += f", {zeros:,} zero"
        if stderr is not None and np.isfinite(stderr).any():
            noisy = int(np.sum(np.abs(values) <= 2 * stderr))
            text += f"; {noisy:,} within 2 s.e. of 0"
        color = COLORS[column]
        ax.stairs(positive, edges, color=color, linestyle=style, linewidth=WIDTHS[column], label=text)
        if negative.any():
            ax.stairs(-negative, edges, color=color, linestyle=style, linewidth=WIDTHS[column])
        top, bottom = max(top, positive.max()), max(bottom, negative.max())
    ax.set_xscale("log")
    ax.axhline(0, color="black", linewidth=0.8)
    # Room above the bars for the legend (about 4.5% of the height per line).
    below = bottom * 1.08
    legend = min(0.6, 0.05 + 0.045 * len(series))
    ax.set_ylim(-below, (top + below) / (1 - legend) - below + 1)
    ax.yaxis.set_major_locator(_integer_locator())
    ax.yaxis.set_major_formatter(_absolute_count_formatter())
    ax.set_xlabel("|diagonal entry| (log scale)")
    ax.set_ylabel("entries per bin" + ("  (negative below 0)" if bottom else ""))
    shape = dict(run.variables).get(variable) if variable else (run.parameters,)
    where = variable if variable else "all parameters"
    ax.set_title(f"{where} {tuple(shape) if shape else ''}: diagonals of H, GGN, Fisher", fontsize=11)
    if bottom:
        ax.text(0.005, 0.98, "positive entries", transform=ax.transAxes, va="top", fontsize=8, color="0.3")
        ax.text(0.005, 0.02, "negative entries, by magnitude", transform=ax.transAxes, va="bottom", fontsize=8,
                color="0.3")
    else:
        ax.text(0.005, 0.98, "every entry >= 0", transform=ax.transAxes, va="top", fontsize=8, color="0.3")
    ax.legend(fontsize=7.5, loc="upper right", framealpha=0.85)
    return figure


def _integer_locator():
    return MaxNLocator(integer=True)


def _absolute_count_formatter():
    return FuncFormatter(lambda value, _: f"{abs(value):,.0f}")


@_default_style
def plot_variables(run: Run, baseline: Run | None = None):
    """Mean ``|d|`` of each variable for the Hessian, GGN and Fisher diagonals (log scale)."""
    if not run.has("summary"):
        raise InputError(f"run {run.run_id} has no summary.parquet")
    names = [name for name, _ in run.variables]
    position = {name: k for k, name in enumerate(names)}
    figure = _figure()
    ax = figure.add_subplot()
    drawn = False
    for source, style, prefix in _runs(run, baseline):
        if not source.has("summary"):
            continue
        summary = source.summary
        for column, name in DIAGONALS:
            rows = summary[(summary["quantity"] == column) & (summary["variable"].isin(position))]
            if rows.empty:
                continue
            x = rows["variable"].map(position).to_numpy()
            order = np.argsort(x)
            y = rows["abs_mean"].to_numpy(np.float64)[order]
            ax.plot(x[order], np.where(y > 0, y, np.nan), marker="o" if not prefix else "s", markersize=5,
                    linestyle=style, linewidth=0.8, color=COLORS[column], label=f"{prefix}{name}")
            drawn = True
    if not drawn:
        raise InputError(f"run {run.run_id} has no Hessian, GGN or Fisher diagonal to plot")
    ax.set_yscale("log")
    ax.set_ylabel("mean |diagonal entry| (log scale)")
    ax.set_title("per variable: mean |diagonal| of H, GGN, Fisher", fontsize=11)
    if len(names) <= 24:
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    else:
        ax.set_xlabel(f"variable (1 to {len(names)}, in parameter order)")
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=2 if baseline is not None else 1)
    return figure


def hessian_blocks(run: Run) -> list[str]:
    """The blocks of ``hessian.parquet``, in the order published."""
    return run.blocks("hessian") if run.has("hessian") else []


def hessian_spectrum(run: Run, block: str) -> tuple[np.ndarray, np.ndarray]:
    """A block of ``hessian.parquet`` and its eigenvalues (``numpy.linalg.eigvalsh``, ascending)."""
    matrix = run.hessian(block)
    return matrix, np.linalg.eigvalsh(matrix)


#: A heat map shows at most this many cells a side: a larger block is pooled (k x k parameters per
#: cell, the entry of largest magnitude, sign kept), since drawing 2,080 rows into ~270 pixels
#: drops most of them and reads as noise.
HEAT_CELLS = 208


def pooled(matrix: np.ndarray, cells: int = HEAT_CELLS) -> tuple[np.ndarray, int]:
    """``(matrix pooled to at most cells x cells, k)``: each cell the largest-magnitude entry (its
    sign kept) of a ``k x k`` tile; ``k = 1`` for a block of at most ``cells`` parameters."""
    size = matrix.shape[0]
    k = max(1, -(-size // cells))
    if k == 1:
        return matrix, 1
    padded = np.zeros((-(-size // k) * k,) * 2)
    padded[:size, :size] = matrix
    n = padded.shape[0] // k
    tiles = padded.reshape(n, k, n, k).transpose(0, 2, 1, 3).reshape(n, n, k * k)
    return np.take_along_axis(tiles, np.abs(tiles).argmax(axis=2)[..., None], axis=2)[..., 0], k


@_default_style
def plot_hessian(run: Run, block: str = "__all__", spectrum: tuple[np.ndarray, np.ndarray] | None = None):
    """One dense Hessian block: a heat map on a symmetric log colour scale (linear below 1e-4 of
    its largest entry, so that signs and orders of magnitude both show), pooled to at most
    ``HEAT_CELLS`` cells a side (``pooled``), with the block's variables marked by lines and
    named on the axis; and the histogram of its eigenvalues. ``spectrum``:
    ``hessian_spectrum(run, block)`` when the caller has it already (an eigendecomposition of a
    10,000-parameter block takes minutes)."""
    matrix, eigenvalues = spectrum if spectrum is not None else hessian_spectrum(run, block)
    size = matrix.shape[0]
    scale = max(float(np.abs(matrix).max()), 1e-300)
    cells, k = pooled(matrix)
    figure = _figure()
    heat, counts = figure.subplots(1, 2, width_ratios=[1.25, 1.0])
    extent = (-0.5, size - 0.5, size - 0.5, -0.5)  # axes in parameters, whatever the pooling
    image = heat.imshow(cells, cmap="RdBu_r", interpolation="nearest", extent=extent,
                        norm=SymLogNorm(linthresh=1e-4 * scale, vmin=-scale, vmax=scale))
    ticks = [sign * scale * 10.0 ** -power for sign in (-1, 1) for power in (0, 2, 4)] + [0.0]
    figure.colorbar(image, ax=heat, shrink=0.85, ticks=sorted(ticks), format="%.0e")
    names = run.block("hessian", block)["variable"].tolist()  # each row's variable, in block order
    bounds = [i for i in range(1, len(names)) if names[i] != names[i - 1]]
    for edge in bounds:
        heat.axhline(edge - 0.5, color="#333333", linewidth=0.6)
        heat.axvline(edge - 0.5, color="#333333", linewidth=0.6)
    starts = [0, *bounds]
    if 1 < len(starts) <= 12:
        middles = [(a + b) / 2 for a, b in zip(starts, [*bounds, size])]
        heat.set_yticks(middles, [names[a] for a in starts], fontsize=6)
    pooling = f", {k} x {k} per cell (largest |entry|)" if k > 1 else ""
    heat.set_title(f"H of {block} ({size:,} x {size:,}{pooling})", fontsize=8)
    heat.set_xlabel("parameter (block order; lines: variables)", fontsize=8)
    counts.hist(eigenvalues, bins=min(BINS, max(10, size // 2)), color=RUN_COLOR)
    counts.set_yscale("log")
    counts.set_xlabel("eigenvalue")
    counts.set_ylabel("count")
    counts.set_title(f"eigenvalues: {eigenvalues[0]:.3g} to {eigenvalues[-1]:.3g}, trace {eigenvalues.sum():.4g}",
                     fontsize=9)
    return figure


def factor_spectra(run: Run) -> list[tuple[str, str, np.ndarray]]:
    """``(layer, factor, eigenvalues descending)`` of every published factor: ``A`` of
    ``layer_inputs.parquet`` (named "inputs"), then ``A`` and ``S`` of ``kfac.parquet``, per layer
    in model order (``numpy.linalg.eigvalsh``)."""
    out = []
    if run.has("layer_inputs"):
        out += [(layer, "inputs", np.linalg.eigvalsh(run.layer_inputs(layer))[::-1])
                for layer in run.blocks("layer_inputs")]
    if run.has("kfac"):
        for layer in run.blocks("kfac"):
            a, s = run.kfac(layer)
            out += [(layer, "A", np.linalg.eigvalsh(a)[::-1]), (layer, "S", np.linalg.eigvalsh(s)[::-1])]
    return out


@_default_style
def plot_factor_spectra(spectra: list[tuple[str, str, np.ndarray]]):
    """The eigenvalues of each factor by rank, one line per (layer, factor), log scale (the
    factors are positive semi-definite; an eigenvalue at or below 1e-14 of its factor's largest
    is drawn at that floor): how fast each layer's input and output-gradient spectra decay."""
    figure = _figure()
    axes = figure.subplots()
    for number, (layer, factor, values) in enumerate(spectra):
        top = max(float(values[0]) if values.size else 0.0, 1e-300)
        axes.plot(np.arange(1, values.size + 1), np.maximum(values, 1e-14 * top), marker=".", linewidth=1.2,
                  linestyle="-" if factor != "S" else "--", label=f"{layer} {factor}",
                  color=f"C{number % 10}")
    axes.set_yscale("log")
    axes.set_xlabel("rank")
    axes.set_ylabel("eigenvalue")
    axes.set_title("Kronecker factors: eigenvalues by rank (A solid, S dashed)", fontsize=9)
    axes.legend(fontsize=7, ncol=2)
    return figure


@_default_style
def plot_eigenvalues(run: Run, baseline: Run | None = None, block: str = ALL):
    """Top eigenvalues of one block of H (all of it by default) by rank; error bars are the
    residuals ``|Hv - theta v|``."""
    figure = _figure()
    ax = figure.add_subplot()
    values = []
    for offset, (source, style, prefix) in enumerate(_runs(run, _comparable(run, baseline))):
        if not source.has("eigenvalues") or block not in source.blocks("eigenvalues"):
            continue
        frame = source.block("eigenvalues", block).sort_values("rank")
        rank = frame["rank"].to_numpy() + 0.12 * offset
        eigen = frame["eigenvalue"].to_numpy(np.float64)
        residual = frame["residual"].to_numpy(np.float64)
        which = source.manifest.get("job", {}).get("quantities", {}).get("eigenvalues", {}).get("which", "")
        color = BASELINE_COLOR if prefix else RUN_COLOR
        ax.errorbar(rank, eigen, yerr=residual, fmt="o" if not prefix else "s", linestyle=style, linewidth=0.8,
                    color=color, capsize=4, markersize=5,
                    label=f"{prefix}{_label(source)} ({which}); largest residual {residual.max():.2g}")
        for x, y in zip(rank, eigen):  # the run's labels left of its points, the baseline's right
            ax.annotate(f"{y:.4g}", (x, y), textcoords="offset points", xytext=(7, 3) if prefix else (-7, -10),
                        ha="left" if prefix else "right", fontsize=7, color=color)
        values.append(eigen)
    if not values:
        raise InputError(f"run {run.run_id} has no eigenvalues of block {block!r}")
    every = np.concatenate(values)
    nonzero = np.abs(every[every != 0])
    scale = "linear scale"
    if nonzero.size and nonzero.max() > 10 * nonzero.min():  # a log scale only where it shows more
        if np.all(every > 0):
            ax.set_yscale("log")
            scale = "log scale"
        else:
            ax.set_yscale("symlog", linthresh=float(nonzero.min()))
            scale = "symmetric log scale, linear near 0"
    ranks = max(len(v) for v in values)
    ax.set_xlim(0.4, ranks + 0.6)  # room for the labels beside the first and last points
    ax.set_xlabel("rank")
    ax.set_ylabel(f"eigenvalue of H ({scale})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    matrix = "H" if block == ALL else f"H of {block}"
    ax.set_title(f"extreme eigenvalues of {matrix}; error bar = residual |Hv - θv| (an eigenvalue lies within it)",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return figure


def default_sigma(low: float, high: float) -> float:
    """Gaussian width for the density: 1/400 of the spectrum's range (about 0.5% of its
    half-width, near Ghorbani et al.'s sigma^2 = 1e-5 on a spectrum scaled to [-1, 1])."""
    width = high - low
    return width / 400 if width > 0 else max(abs(high), 1.0) * 1e-3


def spectrum_facts(run: Run, block: str = ALL) -> dict:
    """SLQ facts of one block: runs, nodes, range, mass below zero and the trace estimate it implies."""
    nodes, weights = run.spectrum_runs(block)
    per_run = np.array([float(np.dot(n, w)) for n, w in zip(nodes, weights)])
    size = run.block_size(block)
    # Nodes within rounding of 0 (an exact zero eigenvalue computed as -1e-18) are not negative.
    floor = 1e-10 * max(float(np.abs(n).max()) for n in nodes)
    negative = float(np.mean([np.sum(w[n < -floor]) for n, w in zip(nodes, weights)]))
    stderr = float(size * per_run.std(ddof=1) / np.sqrt(per_run.size)) if per_run.size > 1 else float("nan")
    return {"runs": len(nodes), "nodes": max(len(n) for n in nodes), "low": float(min(n.min() for n in nodes)),
            "high": float(max(n.max() for n in nodes)), "negative_mass": negative,
            "trace": float(size * per_run.mean()), "trace_stderr": stderr}


@_default_style
def plot_spectrum(run: Run, baseline: Run | None = None, sigma: float | None = None):
    """Gaussian-smoothed SLQ spectral density of H on a log scale; top eigenvalues marked. A run
    with per-block spectra (``blocks: variable | layer``) draws each block's density in its own
    colour (at most ``SHOWN_BLOCKS``, the first in model order)."""
    sources = [(s, style, prefix) for s, style, prefix in _runs(run, baseline) if s.has("spectrum")]
    if not sources or not run.has("spectrum"):
        raise InputError(f"run {run.run_id} has no spectrum.parquet")
    shown = run.blocks("spectrum")[:SHOWN_BLOCKS]
    curves = [(source, style, prefix, block, spectrum_facts(source, block))
              for source, style, prefix in sources for block in shown if block in source.blocks("spectrum")]
    low, high = min(c[-1]["low"] for c in curves), max(c[-1]["high"] for c in curves)
    sigma = float(sigma) if sigma else default_sigma(low, high)
    pad = max(5 * sigma, 0.02 * (high - low))
    grid = np.linspace(low - pad, high + pad, 2001)
    figure = _figure()
    ax = figure.add_subplot()
    peak = 0.0
    single = shown == [ALL]
    for source, style, prefix, block, fact in curves:
        nodes, weights = source.spectrum_runs(block)
        phi = density(nodes, weights, grid, sigma)
        peak = max(peak, float(phi.max()))
        color = (BASELINE_COLOR if prefix else RUN_COLOR) if single else BLOCK_COLORS[shown.index(block) % 10]
        name = _label(source) if single else (f"{prefix}{block}" if prefix else block)
        ax.plot(grid, phi, linestyle=style, color=color, linewidth=1.4,
                label=f"{prefix if single else ''}{name}: {fact['runs']} runs x {fact['nodes']} nodes, "
                      f"mass below 0: {fact['negative_mass']:.2%}")
        if source.has("eigenvalues") and block in source.blocks("eigenvalues"):
            for k, value in enumerate(source.block("eigenvalues", block)["eigenvalue"].to_numpy(np.float64)):
                ax.axvline(value, color=color, linestyle=":", linewidth=0.9, alpha=0.7,
                           label=f"{prefix}top eigenvalues (Lanczos)" if k == 0 and single else None)
    ax.set_yscale("log")
    ax.set_ylim(peak * DENSITY_FLOOR, peak * 3)
    ax.set_xlim(grid[0], grid[-1])
    ax.axvline(0, color="0.5", linewidth=0.6)
    ax.set_xlabel("eigenvalue of H" if single else "eigenvalue of the block of H")
    ax.set_ylabel("density (log scale)")
    what = "H" if single else f"each block of H ({len(run.blocks('spectrum'))} blocks"
    what += "" if single else (f", first {len(shown)} shown)" if len(shown) < len(run.blocks("spectrum")) else ")")
    ax.set_title(f"spectral density of {what} (stochastic Lanczos quadrature), Gaussian σ = {sigma:.3g}",
                 fontsize=10)
    ax.legend(fontsize=7 if single else 6.5, loc="upper right")
    return figure


def block_rows(run: Run) -> list[dict]:
    """Per block of H (runs with ``blocks: variable | layer``; the trace's blocks in model order,
    then the eigenvalues' other blocks): ``block``,
    ``parameters``, ``trace`` and ``trace_stderr`` (from trace.parquet), ``top`` (the rank-1
    eigenvalue of eigenvalues.parquet) and ``residual``; NaN where the run has no such number."""
    names = [b for table in ("trace", "eigenvalues") if run.has(table) for b in run.blocks(table) if b != ALL]
    rows = []
    for block in dict.fromkeys(names):
        row = {"block": block, "parameters": run.block_size(block), "trace": np.nan, "trace_stderr": np.nan,
               "top": np.nan, "residual": np.nan}
        if run.has("trace") and block in run.blocks("trace"):
            trace = run.block("trace", block).iloc[0]
            row.update(trace=float(trace["estimate"]), trace_stderr=float(trace["stderr"]))
        if run.has("eigenvalues") and block in run.blocks("eigenvalues"):
            first = run.block("eigenvalues", block).sort_values("rank").iloc[0]
            row.update(top=float(first["eigenvalue"]), residual=float(first["residual"]))
        rows.append(row)
    return rows


@_default_style
def plot_blocks(run: Run, baseline: Run | None = None):
    """Per block of H (layer or variable, in model order): the rank-1 eigenvalue (the block's
    sharpness with ``which: largest``; error bar its residual) and the trace (error bar one
    standard error), the baseline's beside them (its eigenvalues only when they are the same
    ``which``): the per-layer drift of nightly runs."""
    rows = block_rows(run)
    if not rows:
        raise InputError(f"run {run.run_id} has no per-block trace or eigenvalues (blocks: variable or layer)")
    figure = _figure()
    panels = figure.subplots(1, 2)
    for ax, (key, error, title) in zip(panels, (("top", "residual", f"rank-1 eigenvalue ({_which(run)}) of each block"),
                                                ("trace", "trace_stderr", "trace of each block"))):
        # Each panel has the blocks of its own quantity (eigenvalues and trace may be taken per
        # layer and per variable in one run).
        names = [r["block"] for r in rows if np.isfinite(r[key])]
        if not names:
            ax.set_axis_off()
            ax.set_title(f"{title}: not computed per block", fontsize=10)
            continue
        # A baseline's eigenvalues from the other end of the spectrum are not drawn beside them.
        for offset, (source, _, prefix) in enumerate(_runs(run, _comparable(run, baseline) if key == "top"
                                                           else baseline)):
            theirs = {r["block"]: r for r in block_rows(source)}
            y = np.array([theirs.get(n, {}).get(key, np.nan) for n in names], dtype=np.float64)
            e = np.array([theirs.get(n, {}).get(error, np.nan) for n in names], dtype=np.float64)
            if not np.isfinite(y).any():
                continue  # a baseline without these blocks
            color = BASELINE_COLOR if prefix else RUN_COLOR
            ax.errorbar(np.arange(len(names)) + 0.15 * offset, y, yerr=np.where(np.isfinite(e), e, 0.0),
                        fmt="s" if prefix else "o", linestyle="none", capsize=3, markersize=5, color=color,
                        markerfacecolor="none" if prefix else color, label=f"{prefix}{_label(source)}")
        values = np.array([r[key] for r in rows if r["block"] in names], dtype=np.float64)
        if np.all(values > 0) and values.max() > 10 * values.min():
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        if len(names) <= 24:
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        else:
            ax.set_xlabel(f"block (1 to {len(names)}, in model order)")
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    return figure


def trace_estimates(run: Run) -> list[tuple[str, float, float]]:
    """``(label, estimate, stderr)`` for every estimate of ``trace(H)`` the run holds."""
    out = []
    if run.has("trace") and ALL in run.blocks("trace"):
        row = run.block("trace").iloc[0]
        out.append((f"trace ({row['method']}, {int(row['matvecs'])} HVPs)", float(row["estimate"]),
                    float(row["stderr"])))
    diagonal = run.manifest.get("job", {}).get("quantities", {}).get("hessian_diagonal") or {}
    if diagonal.get("method") == "exact" and run.has("summary"):
        summary = run.summary
        row = summary[(summary["variable"] == "__all__") & (summary["quantity"] == "hessian_diagonal")]
        if not row.empty:
            out.append(("sum of the exact Hessian diagonal", float(row["sum"].iloc[0]), 0.0))
    if run.has("spectrum") and ALL in run.blocks("spectrum"):
        facts = spectrum_facts(run)
        out.append((f"SLQ ({facts['runs']} probes)", facts["trace"], facts["trace_stderr"]))
    return out


@_default_style
def plot_trace(run: Run, baseline: Run | None = None):
    """Every trace estimate of the run (and the baseline) with 1 and 2 standard errors."""
    rows = []
    for source, _, prefix in _runs(run, baseline):
        rows += [(f"{prefix}{label}", estimate, stderr, bool(prefix)) for label, estimate, stderr in
                 trace_estimates(source)]
    if not any(not is_baseline for *_, is_baseline in rows):
        raise InputError(f"run {run.run_id} has no trace, exact Hessian diagonal or spectrum")
    figure = _figure()
    ax = figure.add_subplot()
    for y, (label, estimate, stderr, is_baseline) in enumerate(reversed(rows)):
        color = BASELINE_COLOR if is_baseline else RUN_COLOR
        spread = stderr if np.isfinite(stderr) else 0.0
        ax.errorbar([estimate], [y], xerr=[[2 * spread], [2 * spread]], fmt="none", ecolor=color, elinewidth=1,
                    capsize=4)
        ax.errorbar([estimate], [y], xerr=[[spread], [spread]], fmt="o", color=color, elinewidth=3, markersize=6)
        shown = f"{estimate:.6g}" + (f" ± {stderr:.2g}" if stderr > 0 else " (exact)" if stderr == 0 else
                                      " (no s.e.)")
        ax.annotate(shown, (estimate, y), textcoords="offset points", xytext=(0, 9), ha="center", fontsize=8,
                    color=color)
    ax.set_yticks(range(len(rows)), [label for label, *_ in reversed(rows)], fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel("trace(H)")
    ax.set_title("trace of H: estimate, thick bar ±1 standard error, thin bar ±2", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    ax.margins(x=0.15)
    return figure


# ------------------------------------------------------------------------------ the report
@dataclass
class Report:
    """What ``write_report`` wrote: the folder, its HTML page and the PNG file names."""

    out_dir: str
    html: str
    plots: list[str] = field(default_factory=list)


def default_out(run: Run) -> str:
    """``./report-NAME-RUN_ID``: a published run is never written to (and may be a URI)."""
    return os.path.abspath(f"report-{_slug(run.name)}-{_slug(run.run_id)}")


def write_report(run, out: str | None = None, baseline=None, sigma: float | None = None) -> Report:
    """Writes the PNG plots and ``index.html`` for ``run`` (a ``Run`` or a run directory).

    ``out`` defaults to ``./report-NAME-RUN_ID``; files there with the report's names are
    replaced, others are left alone. ``baseline`` (a ``Run`` or a run directory) is overlaid
    on every plot. ``sigma`` is the spectral density's Gaussian width (default: 1/400 of the
    spectrum's range).
    """
    run = run if isinstance(run, Run) else load(run)
    baseline = baseline if baseline is None or isinstance(baseline, Run) else load(baseline)
    out = os.path.abspath(os.path.expanduser(out)) if out else default_out(run)
    inside = published_run_around(out)
    if inside is not None:
        raise InputError(f"report folder {out} is inside the published run {inside}, which is never written to: "
                         f"choose another --out (e.g. --out report-{_slug(run.name)}-{_slug(run.run_id)} outside it)")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create report folder {out}: {err.strerror}: choose another --out") from err
    report = Report(out_dir=out, html=os.path.join(out, "index.html"))
    sections: dict[str, list[tuple[str, str]]] = {}

    def save(section: str, figure, name: str, caption: str) -> None:
        _save(figure, os.path.join(out, name))
        report.plots.append(name)
        sections.setdefault(section, []).append((name, caption))

    has_diagonals = bool(set(run.quantities()) & {c for c, _ in DIAGONALS})
    if trace_estimates(run):
        save("trace", plot_trace(run, baseline), "trace.png", "trace(H): every estimate in the run")
    if run.has("eigenvalues") and ALL in run.blocks("eigenvalues"):
        save("eigenvalues", plot_eigenvalues(run, baseline), "eigenvalues.png", "top eigenvalues of H")
    if block_rows(run):
        save("blocks", plot_blocks(run, baseline), "blocks.png", "top eigenvalue and trace of each block of H")
    if run.has("spectrum"):
        save("spectrum", plot_spectrum(run, baseline, sigma), "spectrum.png", "spectral density of H")
    spectra = {block: hessian_spectrum(run, block) for block in hessian_blocks(run)}
    for k, (block, spectrum) in enumerate(spectra.items(), start=1):
        save("hessian", plot_hessian(run, block, spectrum), f"hessian-{k:02d}-{_slug(block)}.png", f"block {block}")
    factors = factor_spectra(run)
    if factors:
        save("factors", plot_factor_spectra(factors), "factors.png", "eigenvalues of each layer's factors")
    if has_diagonals:
        save("diagonals", plot_variables(run, baseline), "variables.png", "mean |diagonal| per variable")
        save("diagonals", plot_diagonals(run, None, baseline), "diagonals-all.png", "all parameters")
        for k, (name, shape) in enumerate(run.variables, start=1):
            save("diagonals", plot_diagonals(run, name, baseline), f"diagonals-{k:02d}-{_slug(name)}.png",
                 f"{name} {tuple(shape)}")
    with open(report.html, "w", encoding="utf-8") as handle:
        handle.write(_html(run, baseline, sections, {b: values for b, (_, values) in spectra.items()}, factors))
    return report


# ------------------------------------------------------------------------------ HTML
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { padding: 0.2em 0.7em; border-bottom: 1px solid #ddd; text-align: left; vertical-align: top; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0.5em; } figcaption { font-size: 0.85em; color: #555; }
img { width: 800px; max-width: 100%; border: 1px solid #eee; }
code, pre { font-size: 0.85em; } pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
"""


def _e(value) -> str:
    return html.escape(str(value))


def _table(header: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f'<th class="n">{_e(h)}</th>' if i in numeric else f"<th>{_e(h)}</th>"
                   for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="n">{_e(v)}</td>' if i in numeric else f"<td>{_e(v)}</td>"
                                    for i, v in enumerate(row)) + "</tr>\n" for row in rows)
    return f"<table><tr>{head}</tr>\n{body}</table>\n"


def _provenance(run: Run) -> list[tuple[str, str]]:
    m = run.manifest
    job = m.get("job", {})
    data = m.get("data", {})
    model = m.get("model", {})
    quantities = "; ".join(f"{k} {json.dumps(v)}" if v else k for k, v in job.get("quantities", {}).items())
    variables = ", ".join(f"{v['name']} {tuple(v['shape'])}" for v in m.get("variables", []))
    return [
        ("run directory", run.run_dir), ("run id", m.get("run_id")), ("date", m.get("date")),
        ("status", m.get("status")), ("job", job.get("name")), ("loss function", json.dumps(job.get("loss"))),
        ("loss", _fmt(m.get("loss"))), ("examples", _fmt(m.get("examples"))),
        ("weight sum", _fmt(m.get("weight_sum"))), ("precision", job.get("precision")),
        ("regularization included", job.get("include_regularization")), ("seed", job.get("seed")),
        ("quantities", quantities), ("model", model.get("path")), ("model sha256", model.get("sha256")),
        ("parameters", _fmt(m.get("parameters"))), ("variables", variables),
        ("data", f"{data.get('rows', '?'):,} rows in {len(data.get('files', []))} files"
                 if isinstance(data.get("rows"), int) else data.get("rows")),
        ("data path", job.get("data", {}).get("path")), ("data fingerprint", data.get("fingerprint")),
        ("shards", m.get("shards")), ("workers", m.get("workers")), ("passes over the data", m.get("passes")),
        ("started", m.get("started_at")), ("finished", m.get("finished_at")), ("seconds", m.get("seconds")),
        ("versions", ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())),
        ("files", ", ".join(m.get("files", []))),
    ]


def _summary_html(run: Run) -> str:
    if not run.has("summary"):
        return "<p>No summary (no diagonal quantity or gradient was computed).</p>\n"
    frame = run.summary
    columns = ["mean", "std", "min", "max", "abs_mean", "sum", "l2_norm"]
    rows = [[r["variable"], r["quantity"], _fmt(int(r["size"])), *[_fmt(r[c]) for c in columns]]
            for _, r in frame.iterrows()]
    return _table(["variable", "quantity", "size", *columns], rows, numeric=set(range(2, 10)))


def _figures(items: list[tuple[str, str]]) -> str:
    return "".join(f'<figure><a href="{_e(name)}"><img src="{_e(name)}" alt="{_e(caption)}" '
                   f'width="{PLOT_PIXELS[0]}" height="{PLOT_PIXELS[1]}"></a>'
                   f"<figcaption>{_e(caption)} ({_e(name)})</figcaption></figure>\n" for name, caption in items)


def _html(run: Run, baseline: Run | None, sections: dict[str, list[tuple[str, str]]],
          hessian_eigenvalues: dict[str, np.ndarray], factors: list | None = None) -> str:
    title = f"{run.name} {run.run_id}"
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
             f"<style>{_CSS}</style></head><body>\n<h1>{_e(run.name)} <small>{_e(run.run_id)}</small></h1>\n"]
    facts = (f"loss {_fmt(run.loss)} over {_fmt(run.manifest.get('examples'))} examples, "
             f"{_fmt(run.parameters)} parameters")
    parts.append(f"<p>{_e(facts)}.")
    if baseline is not None:
        parts.append(f" Baseline (dashed in every plot): <b>{_e(_label(baseline))}</b>.")
    parts.append("</p>\n")

    parts.append("<h2>Trace</h2>\n")
    estimates = [(f"{prefix}{label}", estimate, stderr) for source, _, prefix in _runs(run, baseline)
                 for label, estimate, stderr in trace_estimates(source)]
    if estimates:
        parts.append(_table(["estimate of trace(H)", "value", "standard error"],
                            [[label, _fmt(v), _fmt(s) if s else "0 (exact)"] for label, v, s in estimates],
                            numeric={1, 2}))
    else:
        parts.append("<p>Not computed.</p>\n")
    parts.append(_figures(sections.get("trace", [])))

    parts.append("<h2>Top eigenvalues</h2>\n")
    if run.has("eigenvalues"):
        rows = [[r["block"], int(r["rank"]), _fmt(r["eigenvalue"]), _fmt(r["residual"])]
                for _, r in run.eigenvalues.iterrows()]
        header = ["block", "rank", f"eigenvalue ({_which(run)})", "residual |Hv - θv|"]
        if baseline is not None and baseline.has("eigenvalues") and _comparable(run, baseline) is None:
            parts.append(f"<p>The baseline's eigenvalues are the {_e(_which(baseline))}, these the "
                         f"{_e(_which(run))}: not shown side by side.</p>\n")
        elif baseline is not None and baseline.has("eigenvalues"):
            theirs = {(r["block"], int(r["rank"])): r for _, r in baseline.eigenvalues.iterrows()}
            rows = [row + ([_fmt(theirs[tuple(row[:2])]["eigenvalue"]), _fmt(theirs[tuple(row[:2])]["residual"])]
                           if tuple(row[:2]) in theirs else ["", ""]) for row in rows]
            header += ["baseline eigenvalue", "baseline residual"]
        parts.append(_table(header, rows, numeric=set(range(1, len(header)))))
    else:
        parts.append("<p>Not computed.</p>\n")
    parts.append(_figures(sections.get("eigenvalues", [])))

    parts.append("<h2>Per block</h2>\n")
    blocks = block_rows(run)
    if blocks:
        theirs = {r["block"]: r for r in block_rows(baseline)} if baseline is not None else {}
        if _comparable(run, baseline) is None:  # no baseline, or its eigenvalues are the other end
            theirs = {block: {**row, "top": np.nan} for block, row in theirs.items()}
        header = ["block", "parameters", f"rank-1 eigenvalue ({_which(run)})", "residual", "trace",
                  "standard error"]
        if baseline is not None:
            header += ["baseline rank-1 eigenvalue", "baseline trace"]

        def shown(value) -> str:
            return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else _fmt(value)

        rows = [[r["block"], _fmt(r["parameters"]), shown(r["top"]), shown(r["residual"]), shown(r["trace"]),
                 shown(r["trace_stderr"])] + ([shown(theirs.get(r["block"], {}).get("top")),
                                               shown(theirs.get(r["block"], {}).get("trace"))]
                                              if baseline is not None else []) for r in blocks]
        parts.append(_table(header, rows, numeric=set(range(1, len(header)))))
        parts.append(_figures(sections.get("blocks", [])))
    else:
        parts.append("<p>Not computed (eigenvalues or trace with blocks: variable or layer).</p>\n")

    parts.append("<h2>Spectral density</h2>\n")
    if run.has("spectrum"):
        for block in run.blocks("spectrum"):
            facts = spectrum_facts(run, block)
            where = "" if block == ALL else f"Block {block}: "
            parts.append(f"<p>{_e(where)}{facts['runs']} stochastic Lanczos quadrature runs of up to {facts['nodes']} "
                         f"nodes; nodes from {_fmt(facts['low'])} to {_fmt(facts['high'])}; mass below zero "
                         f"{facts['negative_mass']:.2%}.</p>\n")
    else:
        parts.append("<p>Not computed.</p>\n")
    parts.append(_figures(sections.get("spectrum", [])))

    parts.append("<h2>Hessian blocks</h2>\n")
    if sections.get("hessian"):
        rows = []
        for block, eigenvalues in hessian_eigenvalues.items():
            rows.append([block, f"{len(eigenvalues):,}", _fmt(eigenvalues.sum()), _fmt(eigenvalues[-1]),
                         _fmt(eigenvalues[0])])
        parts.append(_table(["block", "parameters", "trace", "largest eigenvalue", "smallest eigenvalue"], rows,
                            numeric={1, 2, 3, 4}))
        parts.append(_figures(sections["hessian"]))
    else:
        parts.append("<p>Not computed.</p>\n")

    parts.append("<h2>Kronecker factors</h2>\n")
    if factors:
        rows = [[layer, factor, f"{values.size:,}", _fmt(values.sum()), _fmt(values[0]), _fmt(values[-1]),
                 _fmt(values[0] / values[-1]) if values[-1] > 0 else "∞"] for layer, factor, values in factors]
        parts.append(_table(["layer", "factor", "size", "trace", "largest eigenvalue", "smallest eigenvalue",
                             "condition number"], rows, numeric={2, 3, 4, 5, 6}))
        parts.append(_figures(sections.get("factors", [])))
    else:
        parts.append("<p>Not computed (layer_inputs or kfac).</p>\n")

    parts.append("<h2>Diagonals</h2>\n")
    if sections.get("diagonals"):
        parts.append("<p>Histograms of log10 |entry|: positive entries above the axis, negative entries (by "
                     "magnitude) below it, zeros counted in the legend.</p>\n")
        parts.append(_figures(sections["diagonals"]))
    else:
        parts.append("<p>No Hessian, GGN or Fisher diagonal was computed.</p>\n")

    parts.append("<h2>Hessian-vector products</h2>\n")
    if run.has("hvp"):
        count = run.hvp["vector"].nunique()
        given = "random Rademacher vectors (hvp_vectors.parquet)" if run.has("hvp_vectors") else "the given vectors"
        parts.append(f"<p>{count} products with {_e(given)}, in hvp.parquet.</p>\n")
    else:
        parts.append("<p>Not computed.</p>\n")

    parts.append("<h2>Summary</h2>\n" + _summary_html(run))
    if baseline is not None:
        parts.append(f"<details><summary>Summary of the baseline {_e(_label(baseline))}</summary>\n"
                     f"{_summary_html(baseline)}</details>\n")

    parts.append("<h2>Provenance</h2>\n")
    if baseline is None:
        parts.append(_table(["", "run"], [[k, v] for k, v in _provenance(run)]))
    else:
        parts.append(_table(["", "run", "baseline"], [[k, v, b] for (k, v), (_, b) in
                                                     zip(_provenance(run), _provenance(baseline))]))
    parts.append("<details><summary>manifest.json</summary><pre>"
                 f"{_e(json.dumps(run.manifest, indent=2))}</pre></details>\n")
    parts.append("</body></html>\n")
    return "".join(parts)
