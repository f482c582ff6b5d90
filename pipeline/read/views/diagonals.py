"""The diagonal quantities and the gradient: ``diagonals.parquet`` (one row per parameter) and
``summary.parquet`` (per variable and ``__all__``: size, mean, std, min, max, abs_mean, sum,
l2_norm).

- ``show``: the summary table. ``compare``: ``mean``, ``l2_norm`` and ``sum`` of every
  (variable, quantity) row both runs hold. ``history``: ``QUANTITY.l2_norm`` of the ``__all__``
  rows. ``report``: the mean ``|d|`` per variable and, per variable, histograms of
  ``log10 |d|`` for the Hessian, GGN and Fisher diagonals ``d``. Signs are kept apart, never
  folded: positive entries are counted above the axis, negative ones (by magnitude) below it,
  and exact zeros (which have no logarithm) are counted in the legend.
"""

from __future__ import annotations

import numpy as np

from pipeline.blocks import ALL
from pipeline.errors import InputError
from pipeline.quantities.registry import DIAGONAL_COLUMNS, UNITS
from pipeline.read import pages
from pipeline.read.changes import Change, as_float
from pipeline.read.figures import BINS, default_style, fmt, label, new_figure, runs, slug
from pipeline.read.text import aligned, number
from pipeline.read.views._base import Figure, Section, Shown, View

DIAGONALS_TABLE, SUMMARY_TABLE = "diagonals", "summary"
# The curvature diagonals, with each unit's label, colour and line width (the gradient has no label).
DIAGONALS = tuple((unit.name, unit.label) for unit in UNITS.values() if unit.label)
COLORS = {unit.name: unit.color for unit in UNITS.values() if unit.label}
# Line widths: the Hessian drawn wider, under the others (for a last linear layer it equals the
# GGN exactly).
WIDTHS = {unit.name: unit.line_width for unit in UNITS.values() if unit.label}
STATISTICS = ("mean", "std", "min", "max", "abs_mean", "sum", "l2_norm")
COMPARED = ("mean", "l2_norm", "sum")


class DiagonalsAccess:
    """``Run``'s tables of the diagonal quantities."""

    @property
    def diagonals(self):
        """One row per parameter: ``variable``, ``index``, then each diagonal quantity computed."""
        return self.table(DIAGONALS_TABLE)

    @property
    def summary(self):
        """Per (variable, quantity) and ``__all__``: size, mean, std, min, max, abs_mean, sum, l2_norm."""
        return self.table(SUMMARY_TABLE)

    @property
    def diagonal_columns(self) -> list[str]:
        """The columns of ``diagonals.parquet`` ([] without one), read from its schema only."""
        return self.columns(DIAGONALS_TABLE) if self.has(DIAGONALS_TABLE) else []

    def _variables_from_tables(self):
        # Without the manifest's shapes (not written by every version) each variable is flat.
        if not self.has(DIAGONALS_TABLE):
            return None
        counts = self.table(DIAGONALS_TABLE, columns=["variable"])["variable"].value_counts(sort=False)
        return [(str(name), (int(count),)) for name, count in counts.items()]


class DiagonalsView(View):
    files = (f"{DIAGONALS_TABLE}.parquet", f"{SUMMARY_TABLE}.parquet")
    compared = (f"{SUMMARY_TABLE}.parquet",)
    access = DiagonalsAccess
    page = 70

    def show(self, run) -> Shown:
        if not run.has(SUMMARY_TABLE):
            return Shown()
        rows = run.rows(SUMMARY_TABLE)
        return Shown(tables=[(SUMMARY_TABLE, aligned(
            [[r["variable"], r["quantity"], r["size"], *[number(r[c]) for c in STATISTICS]] for r in rows],
            ["variable", "quantity", "size", *STATISTICS]))])

    def notebook(self, run) -> str:
        if not run.has(SUMMARY_TABLE):
            return ""
        summary = run.summary
        return summary[summary["variable"] == ALL].to_html(index=False)

    def export(self, run) -> dict:
        """``QUANTITY/VARIABLE_PATH``: every diagonal quantity and the gradient, each a float64
        array of its variable's shape."""
        return {f"{quantity}/{name}": np.asarray(array, dtype=np.float64)
                for quantity in run.quantities() if quantity in DIAGONAL_COLUMNS
                for name, array in run.arrays(quantity).items()}

    def changes(self, comparison, run_a, run_b) -> list[Change]:
        rows_a, rows_b = run_a.rows(SUMMARY_TABLE), run_b.rows(SUMMARY_TABLE)
        by_key_b = {(r["variable"], r["quantity"]): r for r in rows_b}
        keys_a = {(r["variable"], r["quantity"]) for r in rows_a}
        changes = []
        for row in rows_a:  # in A's order: quantity-major, variables in parameter order
            other = by_key_b.get((row["variable"], row["quantity"]))
            if other is None:
                continue
            if row.get("size") != other.get("size"):
                comparison.warnings.append(f"{row['variable']} ({row['quantity']}) has {row.get('size')} parameters "
                                           f"in A and {other.get('size')} in B")
            for statistic in COMPARED:
                changes.append(Change(row["variable"], row["quantity"], statistic, as_float(row[statistic]),
                                      as_float(other[statistic])))
        unmatched = len(keys_a ^ set(by_key_b))
        if unmatched:
            comparison.warnings.append(f"{unmatched} (variable, quantity) summary rows are in only one run: not "
                                       "compared")
        return changes

    def series(self, run):
        values = {}
        if run.has(SUMMARY_TABLE):
            for row in run.rows(SUMMARY_TABLE, ["variable", "quantity", "l2_norm"]):
                if row["variable"] == ALL:
                    values[f"{row['quantity']}.l2_norm"] = float(row["l2_norm"])
        return values, {}

    def figures(self, run, baseline, context):
        if not set(run.quantities()) & {c for c, _ in DIAGONALS}:
            return
        yield Figure("variables.png", "mean |diagonal| per variable", plot_variables(run, baseline))
        yield Figure("diagonals-all.png", "all parameters", plot_diagonals(run, None, baseline))
        for k, (name, shape) in enumerate(run.variables, start=1):
            yield Figure(f"diagonals-{k:02d}-{slug(name)}.png", f"{name} {tuple(shape)}",
                         plot_diagonals(run, name, baseline))

    def sections(self, run, baseline, drawn, context):
        parts = ["<h2>Diagonals</h2>\n"]
        if drawn:
            parts.append("<p>Histograms of log10 |entry|: positive entries above the axis, negative entries (by "
                         "magnitude) below it, zeros counted in the legend.</p>\n")
            parts.append(pages.figures([(f.name, f.caption) for f in drawn]))
        else:
            parts.append("<p>No Hessian, GGN or Fisher diagonal was computed.</p>\n")
        summary = "<h2>Summary</h2>\n" + summary_html(run)
        if baseline is not None:
            summary += (f"<details><summary>Summary of the baseline {pages.escape(label(baseline))}</summary>\n"
                        f"{summary_html(baseline)}</details>\n")
        return [Section(70, "".join(parts)), Section(90, summary)]


def summary_html(run) -> str:
    if not run.has(SUMMARY_TABLE):
        return "<p>No summary (no diagonal quantity or gradient was computed).</p>\n"
    rows = [[r["variable"], r["quantity"], fmt(int(r["size"])), *[fmt(r[c]) for c in STATISTICS]]
            for _, r in run.summary.iterrows()]
    return pages.table(["variable", "quantity", "size", *STATISTICS], rows, numeric=set(range(2, 10)))


# ------------------------------------------------------------------------------ plots
def _values(run, column: str, variable: str | None) -> np.ndarray | None:
    if not run.has(DIAGONALS_TABLE) or column not in run.quantities():
        return None
    if variable is None:
        return run.diagonals[column].to_numpy(np.float64)
    arrays = run.arrays(column)
    return arrays[variable].reshape(-1) if variable in arrays else None


@default_style
def plot_diagonals(run, variable: str | None = None, baseline=None):
    """Histograms of ``log10 |d|`` per diagonal quantity of one variable (``None``: all).

    Positive entries are counted above the axis, negative ones below it; zeros in the
    legend. With hutchinson or mc standard errors, the legend also counts the entries within
    two standard errors of zero (indistinguishable from zero at that precision).
    """
    figure = new_figure()
    ax = figure.add_subplot()
    series = []
    for source, style, prefix in runs(run, baseline):
        for column, name in DIAGONALS:
            values = _values(source, column, variable)
            if values is not None:
                stderr = _values(source, f"{column}_stderr", variable)
                series.append((source, style, prefix, column, name, values, stderr))
    if not series:
        raise InputError(f"run {run.run_id} has no Hessian, GGN or Fisher diagonal to plot")
    edges = _edges(series)
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
    _diagonal_axes(ax, run, variable, len(series), top, bottom)
    return figure


def _edges(series) -> np.ndarray:
    """``BINS`` logarithmic bins spanning every nonzero magnitude of the series."""
    magnitudes = np.concatenate([np.abs(v[np.isfinite(v) & (v != 0)]) for *_, v, _ in series])
    if magnitudes.size:
        low, high = np.log10(magnitudes.min()), np.log10(magnitudes.max())
    else:
        low, high = -1.0, 1.0
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    edges = 10.0 ** np.linspace(low, high, BINS + 1)
    edges[0], edges[-1] = edges[0] * 0.999, edges[-1] * 1.001  # keep the extremes inside
    return edges


def _diagonal_axes(ax, run, variable, count: int, top: float, bottom: float) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator  # lazy: pipeline.read.figures says why

    ax.set_xscale("log")
    ax.axhline(0, color="black", linewidth=0.8)
    # Room above the bars for the legend (about 4.5% of the height per line).
    below = bottom * 1.08
    legend = min(0.6, 0.05 + 0.045 * count)
    ax.set_ylim(-below, (top + below) / (1 - legend) - below + 1)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{abs(value):,.0f}"))
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


@default_style
def plot_variables(run, baseline=None):
    """Mean ``|d|`` of each variable for the Hessian, GGN and Fisher diagonals (log scale)."""
    if not run.has(SUMMARY_TABLE):
        raise InputError(f"run {run.run_id} has no summary.parquet")
    names = [name for name, _ in run.variables]
    position = {name: k for k, name in enumerate(names)}
    figure = new_figure()
    ax = figure.add_subplot()
    drawn = False
    for source, style, prefix in runs(run, baseline):
        if not source.has(SUMMARY_TABLE):
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
