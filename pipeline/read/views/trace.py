"""The trace of H: ``trace.parquet`` (one row per block: ``block``, ``method``, ``estimate``,
``stderr``, ``matvecs``), and every other estimate of it a run holds.

- ``show``: the trace table. ``compare``: the estimate of each block both runs hold (with a
  warning when the methods differ). ``history``: ``trace`` (``trace[BLOCK]`` per block).
- ``report``: every trace estimate with 1 and 2 standard errors: the ``trace`` quantity, the sum
  of the exact Hessian diagonal, and the SLQ estimate ``P * mean_r sum_j w_rj theta_rj`` (a
  Hutchinson estimate with one probe per SLQ run).
"""

from __future__ import annotations

import numpy as np

from pipeline.blocks import ALL
from pipeline.errors import InputError
from pipeline.read import pages
from pipeline.read.changes import Change, as_float, series_name, shared_blocks
from pipeline.read.figures import BASELINE_COLOR, RUN_COLOR, default_style, fmt, new_figure, runs
from pipeline.read.text import aligned, number
from pipeline.read.views._base import Figure, Section, Shown, View
from pipeline.read.views.spectral import SPECTRUM, per_block, spectrum_facts

TRACE = "trace"
# The exact Hessian diagonal's sum is an estimate of the trace with no error.
DIAGONAL = "hessian_diagonal"


class TraceAccess:
    """``Run``'s trace table."""

    @property
    def trace(self):
        """One row per block: ``block``, ``method``, ``estimate``, ``stderr``, ``matvecs``."""
        return self.blocked(TRACE)


class TraceView(View):
    files = (f"{TRACE}.parquet",)
    compared = files
    access = TraceAccess
    page = 10

    def show(self, run) -> Shown:
        if not run.has(TRACE):
            return Shown()
        rows = run.trace.to_dict("records")
        blocked = per_block(rows)
        return Shown(tables=[(TRACE, aligned(
            [[r["block"]] * blocked + [r["method"], number(r["estimate"]), number(r["stderr"]), r["matvecs"]]
             for r in rows], ["block"] * blocked + ["method", "estimate", "stderr", "matvecs"],
            text_columns=1 + blocked))])

    def changes(self, comparison, run_a, run_b) -> list[Change]:
        """The trace of each block both runs hold (``variable`` = the block: ``__all__``, a
        variable path or a layer name)."""
        rows_a = {r["block"]: r for r in run_a.trace.to_dict("records")}
        rows_b = {r["block"]: r for r in run_b.trace.to_dict("records")}
        changes = []
        for block in shared_blocks(comparison.warnings, TRACE, run_a, run_b):
            a, b = rows_a[block], rows_b[block]
            if a["method"] != b["method"]:
                where = "" if block == ALL else f" of block {block}"
                comparison.warnings.append(f"the trace{where} was estimated by {a['method']} in A and by "
                                           f"{b['method']} in B")
            changes.append(Change(block, TRACE, "estimate", as_float(a["estimate"]), as_float(b["estimate"])))
        return changes

    def series(self, run):
        values = {}
        if run.has(TRACE):
            for row in run.trace.to_dict("records"):
                values[series_name(TRACE, row["block"])] = float(row["estimate"])
        return values, {}

    def figures(self, run, baseline, context):
        if trace_estimates(run):
            yield Figure("trace.png", "trace(H): every estimate in the run", plot_trace(run, baseline))

    def sections(self, run, baseline, drawn, context):
        parts = ["<h2>Trace</h2>\n"]
        estimates = [(f"{prefix}{label}", estimate, stderr) for source, _, prefix in runs(run, baseline)
                     for label, estimate, stderr in trace_estimates(source)]
        if estimates:
            parts.append(pages.table(["estimate of trace(H)", "value", "standard error"],
                                     [[label, fmt(v), fmt(s) if s else "0 (exact)"] for label, v, s in estimates],
                                     numeric={1, 2}))
        else:
            parts.append("<p>Not computed.</p>\n")
        parts.append(pages.figures([(f.name, f.caption) for f in drawn]))
        return [Section(10, "".join(parts))]


def trace_estimates(run) -> list[tuple[str, float, float]]:
    """``(label, estimate, stderr)`` for every estimate of ``trace(H)`` the run holds."""
    out = []
    if run.has(TRACE) and ALL in run.blocks(TRACE):
        row = run.block(TRACE).iloc[0]
        out.append((f"trace ({row['method']}, {int(row['matvecs'])} HVPs)", float(row["estimate"]),
                    float(row["stderr"])))
    if run.options(DIAGONAL).get("method") == "exact" and run.has("summary"):
        summary = run.summary
        row = summary[(summary["variable"] == ALL) & (summary["quantity"] == DIAGONAL)]
        if not row.empty:
            out.append(("sum of the exact Hessian diagonal", float(row["sum"].iloc[0]), 0.0))
    if run.has(SPECTRUM) and ALL in run.blocks(SPECTRUM):
        facts = spectrum_facts(run)
        out.append((f"SLQ ({facts['runs']} probes)", facts["trace"], facts["trace_stderr"]))
    return out


@default_style
def plot_trace(run, baseline=None):
    """Every trace estimate of the run (and the baseline) with 1 and 2 standard errors."""
    rows = []
    for source, _, prefix in runs(run, baseline):
        rows += [(f"{prefix}{label}", estimate, stderr, bool(prefix)) for label, estimate, stderr in
                 trace_estimates(source)]
    if not any(not is_baseline for *_, is_baseline in rows):
        raise InputError(f"run {run.run_id} has no trace, exact Hessian diagonal or spectrum")
    figure = new_figure()
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
