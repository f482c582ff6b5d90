"""The extreme eigenvalues and the spectral density of H: ``eigenvalues.parquet`` (``block``,
``rank``, ``eigenvalue``, ``residual``), ``eigenvectors.parquet`` and ``spectrum.parquet``
(stochastic Lanczos quadrature: ``block``, ``run``, ``node``, ``weight``).

- ``show``: the eigenvalues, the sharpness ``lambda_max * eta / 2`` when the job gave a learning
  rate, and a line each for the eigenvectors and every block's spectrum.
- ``compare``: each eigenvalue by (block, rank), when both runs asked for the same ``which``.
  ``history``: ``eigenvalue_K`` and ``sharpness`` (``[BLOCK]`` per block).
- ``report``: the top eigenvalues by rank, with the residual ``r = |Hv - theta v|`` as error bar
  (it bounds the distance to an eigenvalue of H: ``min_i |lambda_i - theta| <= r`` for a unit
  ``v`` and a symmetric H); per block of H (``blocks: variable | layer``) the rank-1 eigenvalue
  and the trace, the baseline's beside them (per-layer sharpness and its drift); the spectral
  density from the SLQ nodes and weights, smoothed with a Gaussian of width ``sigma``
  (``pipeline.spectrum.slq.density``) and drawn on a log scale as in Ghorbani, Krishnan, Xiao
  2019.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.blocks import ALL
from pipeline.errors import InputError
from pipeline.read import pages
from pipeline.read.changes import Change, as_float, series_name, shared_blocks
from pipeline.read.figures import (BASELINE_COLOR, BLOCK_COLORS, RUN_COLOR, SHOWN_BLOCKS, default_style, fmt, label,
                                   new_figure, runs)
from pipeline.read.text import aligned, number
from pipeline.read.views._base import Figure, Section, Shown, View
from pipeline.spectrum.slq import density

EIGENVALUES, EIGENVECTORS, SPECTRUM, TRACE = "eigenvalues", "eigenvectors", "spectrum", "trace"
# The spectral density is drawn down to this fraction of its peak: below it the Gaussian
# tails of the smoothing, not the spectrum, would fill the log scale.
DENSITY_FLOOR = 1e-7


class SpectralAccess:
    """``Run``'s eigenvalues, eigenvectors, spectral density and sharpness."""

    @property
    def eigenvalues(self):
        """``block``, ``rank`` (1 first in each block), ``eigenvalue``, ``residual`` = ``|Hv - lambda v|``."""
        return self.blocked(EIGENVALUES)

    @property
    def spectrum(self):
        """Stochastic Lanczos quadrature: ``block``, ``run``, ``node``, ``weight`` (a run's weights
        sum to 1)."""
        return self.blocked(SPECTRUM)

    @property
    def eigenvectors(self):
        """``block``, ``rank``, ``variable``, ``index``, ``value``: unit norm per (block, rank)."""
        return self.table(EIGENVECTORS)

    def spectrum_runs(self, block: str = ALL) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Nodes and weights per SLQ run of one block, as ``pipeline.spectrum.slq.density`` takes them."""
        frame = self.block(SPECTRUM, block)
        nodes, weights = [], []
        for _, part in frame.groupby("run", sort=True):
            nodes.append(part["node"].to_numpy(np.float64))
            weights.append(part["weight"].to_numpy(np.float64))
        return nodes, weights

    @property
    def learning_rate(self) -> float | None:
        """The job's ``quantities.eigenvalues.learning_rate`` (``None`` when not given)."""
        rate = self.options(EIGENVALUES).get("learning_rate")
        return float(rate) if isinstance(rate, (int, float)) and not isinstance(rate, bool) else None

    def sharpness(self) -> dict[str, float]:
        """``{block: lambda_max * eta / 2}``, the edge-of-stability ratio of gradient descent with
        step ``eta`` (Cohen et al. 2021; >= 1: the step is at or past the edge), for a run whose job
        gave ``quantities.eigenvalues.learning_rate: eta`` and asked for the ``largest`` or
        ``magnitude`` eigenvalues; ``{}`` otherwise."""
        rate = self.learning_rate
        if rate is None or not self.has(EIGENVALUES) or which(self) == "smallest":
            return {}
        return {block: float(part["eigenvalue"].max()) * rate / 2.0
                for block, part in self.eigenvalues.groupby("block", sort=False)}


def which(run) -> str:
    """The ``which`` of the run's eigenvalues (largest, smallest or magnitude)."""
    return run.options(EIGENVALUES).get("which", "largest")


def comparable(run, baseline):
    """The baseline, when its eigenvalues are the same end of the spectrum as the run's."""
    return baseline if baseline is not None and which(baseline) == which(run) else None


def per_block(rows: list[dict]) -> int:
    """1 when the rows hold blocks other than all of H (then a ``block`` column is shown), else 0."""
    return int(any(r["block"] != ALL for r in rows))


class SpectralView(View):
    files = (f"{EIGENVALUES}.parquet", f"{EIGENVECTORS}.parquet", f"{SPECTRUM}.parquet")
    compared = (f"{EIGENVALUES}.parquet",)
    access = SpectralAccess
    page = 20

    def show(self, run) -> Shown:
        shown = Shown()
        if run.has(EIGENVALUES):
            rows = run.eigenvalues.to_dict("records")
            blocked = per_block(rows)
            shown.tables.append((EIGENVALUES, aligned(
                [[r["block"]] * blocked + [r["rank"], number(r["eigenvalue"]), number(r["residual"])] for r in rows],
                ["block"] * blocked + ["rank", "eigenvalue", "residual"], text_columns=blocked)))
            sharpness = run.sharpness()
            if sharpness:
                shown.tables.append((f"sharpness lambda_max * lr / 2 (lr {run.learning_rate:g}; >= 1: the edge of "
                                     "stability)", aligned([[b] * blocked + [number(v)] for b, v in sharpness.items()],
                                                           ["block"] * blocked + ["sharpness"],
                                                           text_columns=blocked)))
        if run.has(EIGENVECTORS):
            rows = run.rows(EIGENVECTORS, ["block", "rank"])
            pairs = {(r["block"], r["rank"]) for r in rows}
            count = len({block for block, _ in pairs})
            shown.lines.append((EIGENVECTORS, f"{len(pairs)} unit eigenvectors"
                                + (f" of {count} blocks" if per_block(rows) else "") + " in eigenvectors.parquet"))
        if run.has(SPECTRUM):
            rows = run.spectrum.to_dict("records")
            for block in dict.fromkeys(r["block"] for r in rows):
                part = [r for r in rows if r["block"] == block]
                nodes = [r["node"] for r in part]
                shown.lines.append((SPECTRUM if block == ALL else f"{SPECTRUM} {block}",
                                    f"{len({r['run'] for r in part})} SLQ runs, {len(nodes)} nodes from "
                                    f"{number(min(nodes))} to {number(max(nodes))} in spectrum.parquet "
                                    "(plots: hessian-pipeline report)"))
        return shown

    def changes(self, comparison, run_a, run_b) -> list[Change]:
        """Each eigenvalue by (block, rank), when both runs asked for the same ``which``.

        A change within the two residuals (``|lambda - theta| <= residual``: neither run knows its
        eigenvalue better), or within 1e-12 of the block's largest eigenvalue, is reported as no
        relative change: per-block spectra often hold exact zeros (a rank-deficient kernel, the
        shift invariance of a softmax bias) whose computed values are rounding noise of either sign.
        """
        which_a, which_b = which(run_a), which(run_b)
        if which_a != which_b:
            comparison.warnings.append(f"eigenvalues are the {which_a} in A and the {which_b} in B: not compared")
            return []
        by_key_b = {(r["block"], int(r["rank"])): r for r in run_b.eigenvalues.to_dict("records")}
        rows_a = run_a.eigenvalues.to_dict("records")
        changes = []
        for block in shared_blocks(comparison.warnings, EIGENVALUES, run_a, run_b):
            mine = sorted((r for r in rows_a if r["block"] == block), key=lambda r: int(r["rank"]))
            theirs = [by_key_b[(block, int(r["rank"]))] for r in mine if (block, int(r["rank"])) in by_key_b]
            scale = max([abs(as_float(r["eigenvalue"])) for r in mine + theirs] + [0.0])
            for row in mine:
                other = by_key_b.get((block, int(row["rank"])))
                if other is not None:
                    floor = as_float(row["residual"]) + as_float(other["residual"]) + 1e-12 * scale
                    changes.append(Change(block, EIGENVALUES, f"rank_{int(row['rank'])}", as_float(row["eigenvalue"]),
                                          as_float(other["eigenvalue"]), floor if math.isfinite(floor) else 0.0))
        return changes

    def series(self, run):
        values: dict[str, float] = {}
        floors: dict[str, float] = {}
        if run.has(EIGENVALUES):
            for row in run.eigenvalues.to_dict("records"):
                key = series_name(f"eigenvalue_{int(row['rank'])}", row["block"])
                values[key] = float(row["eigenvalue"])
                residual = float(row["residual"])
                floors[key] = residual if math.isfinite(residual) else 0.0
            for block, sharpness in run.sharpness().items():
                values[series_name("sharpness", block)] = sharpness
        return values, floors

    def figures(self, run, baseline, context):
        if run.has(EIGENVALUES) and ALL in run.blocks(EIGENVALUES):
            yield Figure("eigenvalues.png", "top eigenvalues of H", plot_eigenvalues(run, baseline))
        if block_rows(run):
            yield Figure("blocks.png", "top eigenvalue and trace of each block of H", plot_blocks(run, baseline))
        if run.has(SPECTRUM):
            yield Figure("spectrum.png", "spectral density of H", plot_spectrum(run, baseline, context.get("sigma")))

    def sections(self, run, baseline, drawn, context):
        named = {f.name: [(f.name, f.caption)] for f in drawn}
        return [Section(20, _eigenvalues_html(run, baseline) + pages.figures(named.get("eigenvalues.png", []))),
                Section(30, _blocks_html(run, baseline, pages.figures(named.get("blocks.png", [])))),
                Section(40, _spectrum_html(run) + pages.figures(named.get("spectrum.png", [])))]


# ------------------------------------------------------------------------------ the page
def _eigenvalues_html(run, baseline) -> str:
    parts = ["<h2>Top eigenvalues</h2>\n"]
    if not run.has(EIGENVALUES):
        return parts[0] + "<p>Not computed.</p>\n"
    rows = [[r["block"], int(r["rank"]), fmt(r["eigenvalue"]), fmt(r["residual"])]
            for _, r in run.eigenvalues.iterrows()]
    header = ["block", "rank", f"eigenvalue ({which(run)})", "residual |Hv - θv|"]
    if baseline is not None and baseline.has(EIGENVALUES) and comparable(run, baseline) is None:
        parts.append(f"<p>The baseline's eigenvalues are the {pages.escape(which(baseline))}, these the "
                     f"{pages.escape(which(run))}: not shown side by side.</p>\n")
    elif baseline is not None and baseline.has(EIGENVALUES):
        theirs = {(r["block"], int(r["rank"])): r for _, r in baseline.eigenvalues.iterrows()}
        rows = [row + ([fmt(theirs[tuple(row[:2])]["eigenvalue"]), fmt(theirs[tuple(row[:2])]["residual"])]
                       if tuple(row[:2]) in theirs else ["", ""]) for row in rows]
        header += ["baseline eigenvalue", "baseline residual"]
    parts.append(pages.table(header, rows, numeric=set(range(1, len(header)))))
    return "".join(parts)


def _blocks_html(run, baseline, figures: str) -> str:
    blocks = block_rows(run)
    if not blocks:
        return "<h2>Per block</h2>\n<p>Not computed (eigenvalues or trace with blocks: variable or layer).</p>\n"
    theirs = {r["block"]: r for r in block_rows(baseline)} if baseline is not None else {}
    if comparable(run, baseline) is None:  # no baseline, or its eigenvalues are the other end
        theirs = {block: {**row, "top": np.nan} for block, row in theirs.items()}
    header = ["block", "parameters", f"rank-1 eigenvalue ({which(run)})", "residual", "trace", "standard error"]
    if baseline is not None:
        header += ["baseline rank-1 eigenvalue", "baseline trace"]

    def shown(value) -> str:
        return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else fmt(value)

    rows = [[r["block"], fmt(r["parameters"]), shown(r["top"]), shown(r["residual"]), shown(r["trace"]),
             shown(r["trace_stderr"])] + ([shown(theirs.get(r["block"], {}).get("top")),
                                           shown(theirs.get(r["block"], {}).get("trace"))]
                                          if baseline is not None else []) for r in blocks]
    return "<h2>Per block</h2>\n" + pages.table(header, rows, numeric=set(range(1, len(header)))) + figures


def _spectrum_html(run) -> str:
    parts = ["<h2>Spectral density</h2>\n"]
    if not run.has(SPECTRUM):
        return parts[0] + "<p>Not computed.</p>\n"
    for block in run.blocks(SPECTRUM):
        facts = spectrum_facts(run, block)
        where = "" if block == ALL else f"Block {block}: "
        parts.append(f"<p>{pages.escape(where)}{facts['runs']} stochastic Lanczos quadrature runs of up to "
                     f"{facts['nodes']} nodes; nodes from {fmt(facts['low'])} to {fmt(facts['high'])}; mass below "
                     f"zero {facts['negative_mass']:.2%}.</p>\n")
    return "".join(parts)


# ------------------------------------------------------------------------------ plots
@default_style
def plot_eigenvalues(run, baseline = None, block: str = ALL):
    """Top eigenvalues of one block of H (all of it by default) by rank; error bars are the
    residuals ``|Hv - theta v|``."""
    figure = new_figure()
    ax = figure.add_subplot()
    values = []
    for offset, (source, style, prefix) in enumerate(runs(run, comparable(run, baseline))):
        if not source.has(EIGENVALUES) or block not in source.blocks(EIGENVALUES):
            continue
        frame = source.block(EIGENVALUES, block).sort_values("rank")
        rank = frame["rank"].to_numpy() + 0.12 * offset
        eigen = frame["eigenvalue"].to_numpy(np.float64)
        residual = frame["residual"].to_numpy(np.float64)
        end = which(source)
        color = BASELINE_COLOR if prefix else RUN_COLOR
        ax.errorbar(rank, eigen, yerr=residual, fmt="o" if not prefix else "s", linestyle=style, linewidth=0.8,
                    color=color, capsize=4, markersize=5,
                    label=f"{prefix}{label(source)} ({end}); largest residual {residual.max():.2g}")
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


def spectrum_facts(run, block: str = ALL) -> dict:
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


@default_style
def plot_spectrum(run, baseline = None, sigma: float | None = None):
    """Gaussian-smoothed SLQ spectral density of H on a log scale; top eigenvalues marked. A run
    with per-block spectra (``blocks: variable | layer``) draws each block's density in its own
    colour (at most ``SHOWN_BLOCKS``, the first in model order)."""
    sources = [(s, style, prefix) for s, style, prefix in runs(run, baseline) if s.has(SPECTRUM)]
    if not sources or not run.has(SPECTRUM):
        raise InputError(f"run {run.run_id} has no spectrum.parquet")
    shown = run.blocks(SPECTRUM)[:SHOWN_BLOCKS]
    curves = [(source, style, prefix, block, spectrum_facts(source, block))
              for source, style, prefix in sources for block in shown if block in source.blocks(SPECTRUM)]
    low, high = min(c[-1]["low"] for c in curves), max(c[-1]["high"] for c in curves)
    sigma = float(sigma) if sigma else default_sigma(low, high)
    pad = max(5 * sigma, 0.02 * (high - low))
    grid = np.linspace(low - pad, high + pad, 2001)
    figure = new_figure()
    ax = figure.add_subplot()
    peak = 0.0
    single = shown == [ALL]
    for source, style, prefix, block, fact in curves:
        nodes, weights = source.spectrum_runs(block)
        phi = density(nodes, weights, grid, sigma)
        peak = max(peak, float(phi.max()))
        color = (BASELINE_COLOR if prefix else RUN_COLOR) if single else BLOCK_COLORS[shown.index(block) % 10]
        name = label(source) if single else (f"{prefix}{block}" if prefix else block)
        ax.plot(grid, phi, linestyle=style, color=color, linewidth=1.4,
                label=f"{prefix if single else ''}{name}: {fact['runs']} runs x {fact['nodes']} nodes, "
                      f"mass below 0: {fact['negative_mass']:.2%}")
        if source.has(EIGENVALUES) and block in source.blocks(EIGENVALUES):
            for k, value in enumerate(source.block(EIGENVALUES, block)["eigenvalue"].to_numpy(np.float64)):
                ax.axvline(value, color=color, linestyle=":", linewidth=0.9, alpha=0.7,
                           label=f"{prefix}top eigenvalues (Lanczos)" if k == 0 and single else None)
    ax.set_yscale("log")
    ax.set_ylim(peak * DENSITY_FLOOR, peak * 3)
    ax.set_xlim(grid[0], grid[-1])
    ax.axvline(0, color="0.5", linewidth=0.6)
    ax.set_xlabel("eigenvalue of H" if single else "eigenvalue of the block of H")
    ax.set_ylabel("density (log scale)")
    what = "H" if single else f"each block of H ({len(run.blocks('spectrum'))} blocks"
    what += "" if single else (f", first {len(shown)} shown)" if len(shown) < len(run.blocks(SPECTRUM)) else ")")
    ax.set_title(f"spectral density of {what} (stochastic Lanczos quadrature), Gaussian σ = {sigma:.3g}",
                 fontsize=10)
    ax.legend(fontsize=7 if single else 6.5, loc="upper right")
    return figure


def block_rows(run) -> list[dict]:
    """Per block of H (runs with ``blocks: variable | layer``; the trace's blocks in model order,
    then the eigenvalues' other blocks): ``block``,
    ``parameters``, ``trace`` and ``trace_stderr`` (from trace.parquet), ``top`` (the rank-1
    eigenvalue of eigenvalues.parquet) and ``residual``; NaN where the run has no such number."""
    names = [b for table in (TRACE, EIGENVALUES) if run.has(table) for b in run.blocks(table) if b != ALL]
    rows = []
    for block in dict.fromkeys(names):
        row = {"block": block, "parameters": run.block_size(block), "trace": np.nan, "trace_stderr": np.nan,
               "top": np.nan, "residual": np.nan}
        if run.has(TRACE) and block in run.blocks(TRACE):
            trace = run.block(TRACE, block).iloc[0]
            row.update(trace=float(trace["estimate"]), trace_stderr=float(trace["stderr"]))
        if run.has(EIGENVALUES) and block in run.blocks(EIGENVALUES):
            first = run.block(EIGENVALUES, block).sort_values("rank").iloc[0]
            row.update(top=float(first["eigenvalue"]), residual=float(first["residual"]))
        rows.append(row)
    return rows


@default_style
def plot_blocks(run, baseline = None):
    """Per block of H (layer or variable, in model order): the rank-1 eigenvalue (the block's
    sharpness with ``which: largest``; error bar its residual) and the trace (error bar one
    standard error), the baseline's beside them (its eigenvalues only when they are the same
    ``which``): the per-layer drift of nightly runs."""
    rows = block_rows(run)
    if not rows:
        raise InputError(f"run {run.run_id} has no per-block trace or eigenvalues (blocks: variable or layer)")
    figure = new_figure()
    panels = figure.subplots(1, 2)
    for ax, (key, error, title) in zip(panels, (("top", "residual", f"rank-1 eigenvalue ({which(run)}) of each block"),
                                                ("trace", "trace_stderr", "trace of each block"))):
        # Each panel has the blocks of its own quantity (eigenvalues and trace may be taken per
        # layer and per variable in one run).
        names = [r["block"] for r in rows if np.isfinite(r[key])]
        if not names:
            ax.set_axis_off()
            ax.set_title(f"{title}: not computed per block", fontsize=10)
            continue
        # A baseline's eigenvalues from the other end of the spectrum are not drawn beside them.
        for offset, (source, _, prefix) in enumerate(runs(run, comparable(run, baseline) if key == "top"
                                                           else baseline)):
            theirs = {r["block"]: r for r in block_rows(source)}
            y = np.array([theirs.get(n, {}).get(key, np.nan) for n in names], dtype=np.float64)
            e = np.array([theirs.get(n, {}).get(error, np.nan) for n in names], dtype=np.float64)
            if not np.isfinite(y).any():
                continue  # a baseline without these blocks
            color = BASELINE_COLOR if prefix else RUN_COLOR
            ax.errorbar(np.arange(len(names)) + 0.15 * offset, y, yerr=np.where(np.isfinite(e), e, 0.0),
                        fmt="s" if prefix else "o", linestyle="none", capsize=3, markersize=5, color=color,
                        markerfacecolor="none" if prefix else color, label=f"{prefix}{label(source)}")
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


