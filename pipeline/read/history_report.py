"""``history ROOT --plots DIR``: one PNG per series of a job's runs over time, and an HTML page.

Each plot is a series (``loss``, ``trace``, ``eigenvalue_1``, ``sharpness``,
``hessian_diagonal.l2_norm``, ...; per block of H: every block's series in one plot) against the
runs in date order, in ``report``'s style (800 x 450 PNG, matplotlib's Agg canvas, default
style); nights whose change exceeds ``fail_above`` are ringed in red. ``index.html`` shows the
plots and the table. Cost: about 0.1 s per plot; no TensorFlow, no Ray.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import InputError
from pipeline.read import pages
from pipeline.read.figures import BLOCK_COLORS, RUN_COLOR, new_figure, save, slug
from pipeline.read.history import History, as_table, values
from pipeline.storage.publish import published_run_around

FLAG_COLOR = "#d62728"


@dataclass
class HistoryReport:
    """What ``write_history_report`` wrote: the folder, its HTML page and the PNG file names."""

    out_dir: str
    html: str
    plots: list[str] = field(default_factory=list)


def groups(result: History) -> dict[str, list[str]]:
    """Series drawn together: ``trace`` with every ``trace[BLOCK]``, and so on."""
    out: dict[str, list[str]] = {}
    for name in result.series:
        out.setdefault(name.split("[", 1)[0], []).append(name)
    return out


def plot_series(result: History, names: list[str], fail_above: float | None = None):
    """One or more series (a quantity and its blocks) against the runs, oldest left."""
    figure = new_figure()
    ax = figure.add_subplot()
    x = np.arange(len(result.rows))
    flagged = {(run, change.quantity) for _, run, change in (result.above(fail_above) if fail_above is not None
                                                              else [])}
    for k, name in enumerate(names[:len(BLOCK_COLORS)]):
        y = values(result, name)
        color = RUN_COLOR if len(names) == 1 else BLOCK_COLORS[k]
        label = name if len(names) > 1 else None
        ax.plot(x, y, "o-", color=color, label=label, markersize=4)
        hot = [i for i, row in enumerate(result.rows) if (row["run"], name) in flagged]
        if hot:
            ax.plot(x[hot], y[hot], "o", markersize=11, markerfacecolor="none", markeredgecolor=FLAG_COLOR,
                    label=f"change > {fail_above:g}" if k == 0 else None)
    ticks = [f"{row['date']}\n{row['run'][:16]}" for row in result.rows]
    step = max(1, len(ticks) // 12)
    ax.set_xticks(x[::step], ticks[::step], fontsize=7)
    ax.set_ylabel(names[0].split("[", 1)[0])
    ax.set_title(f"{names[0].split('[', 1)[0]} over {len(result.rows)} runs", fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    return figure


def write_history_report(result: History, out: str, fail_above: float | None = None) -> HistoryReport:
    """Writes one PNG per series group and ``index.html`` into ``out`` (created; files with the
    report's names replaced). ``InputError`` when ``out`` is inside a published run."""
    out = os.path.abspath(os.path.expanduser(out))
    inside = published_run_around(out)
    if inside is not None:
        raise InputError(f"plots folder {out} is inside the published run {inside}, which is never written to: "
                         "choose another --plots")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create plots folder {out}: {err.strerror}: choose another --plots") from err
    report = HistoryReport(out_dir=out, html=os.path.join(out, "index.html"))
    captions = []
    for k, (group, names) in enumerate(groups(result).items(), start=1):
        name = f"{k:02d}-{slug(group)}.png"
        save(plot_series(result, names, fail_above), os.path.join(out, name))
        report.plots.append(name)
        captions.append((name, group if len(names) == 1 else f"{group}, {len(names)} series"))
    title = f"history of {result.root}"
    page = (f"{pages.head(title)}<h1>{pages.escape(title)}</h1>\n"
            f"<p>{len(result.rows)} runs, oldest first.</p>\n{pages.figures(captions)}"
            f"<h2>Table</h2>\n<pre>{pages.escape(as_table(result))}</pre>\n</body></html>\n")
    with open(report.html, "w", encoding="utf-8") as handle:
        handle.write(page)
    return report
