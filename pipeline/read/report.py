"""``report RUN_DIR``: PNG plots of a run and one HTML page that shows them with its tables.

Every registered view (``pipeline.read.views``) draws its plots (``View.figures``) and writes
its sections of the page (``View.sections``), in page order: the trace, the top eigenvalues,
per block of H, the spectral density, dense Hessian blocks, Kronecker factors, the diagonals,
Hessian-vector products, influence and self-influence, the summary; then the run's
provenance. Every plot is an 800 x 450 pixel PNG (``PLOT_PIXELS``, ``pipeline.read.figures``);
``index.html`` references each PNG by its file name, so the folder is the report and works
wherever it is copied. With a baseline run every plot overlays the two: the run in solid
lines, the baseline dashed.

The plots are functions that return a matplotlib ``Figure`` (for notebooks), each in its
view's module and importable from here: ``plot_diagonals``, ``plot_variables``,
``plot_eigenvalues``, ``plot_spectrum``, ``plot_blocks``, ``plot_trace``, ``plot_hessian``,
``plot_factor_spectra``.

Cost: reading the run's tables and about 0.1 s per plot; no TensorFlow, no Ray.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from pipeline.errors import InputError
from pipeline.read import pages
from pipeline.read.figures import PLOT_PIXELS, fmt, label, save, slug
from pipeline.read.run import Run, load
from pipeline.read.views import on_page
from pipeline.read.views.diagonals import plot_diagonals, plot_variables
from pipeline.read.views.hessian_blocks import HEAT_CELLS, plot_hessian, pooled
from pipeline.read.views.kronecker import plot_factor_spectra
from pipeline.read.views.spectral import plot_blocks, plot_eigenvalues, plot_spectrum
from pipeline.read.views.trace import plot_trace
from pipeline.storage.publish import published_run_around

__all__ = ["HEAT_CELLS", "PLOT_PIXELS", "Report", "default_out", "plot_blocks", "plot_diagonals", "plot_eigenvalues",
           "plot_factor_spectra", "plot_hessian", "plot_spectrum", "plot_trace", "plot_variables", "pooled",
           "write_report"]


@dataclass
class Report:
    """What ``write_report`` wrote: the folder, its HTML page and the PNG file names."""

    out_dir: str
    html: str
    plots: list[str] = field(default_factory=list)


def default_out(run: Run) -> str:
    """``./report-NAME-RUN_ID``: a published run is never written to (and may be a URI)."""
    return os.path.abspath(f"report-{slug(run.name)}-{slug(run.run_id)}")


def write_report(run, out: str | None = None, baseline=None, sigma: float | None = None) -> Report:
    """Writes the PNG plots and ``index.html`` for ``run`` (a ``Run`` or a run directory).

    ``out`` defaults to ``./report-NAME-RUN_ID``; files there with the report's names are
    replaced, others are left alone. ``baseline`` (a ``Run`` or a run directory) is overlaid
    on every plot. ``sigma`` is the spectral density's Gaussian width (default: 1/400 of the
    spectrum's range). ``InputError`` when ``out`` is inside a published run or cannot be made.
    """
    run = run if isinstance(run, Run) else load(run)
    baseline = baseline if baseline is None or isinstance(baseline, Run) else load(baseline)
    out = _report_folder(run, out)
    report = Report(out_dir=out, html=os.path.join(out, "index.html"))
    context: dict = {"sigma": sigma}
    sections = []
    for view in on_page():
        drawn = []
        for figure in view.figures(run, baseline, context):
            save(figure.figure, os.path.join(out, figure.name))
            report.plots.append(figure.name)
            drawn.append(figure)
        sections += view.sections(run, baseline, drawn, context)
    with open(report.html, "w", encoding="utf-8") as handle:
        handle.write(_html(run, baseline, [s.html for s in sorted(sections, key=lambda s: s.place)]))
    return report


def _report_folder(run: Run, out: str | None) -> str:
    out = os.path.abspath(os.path.expanduser(out)) if out else default_out(run)
    inside = published_run_around(out)
    if inside is not None:
        raise InputError(f"report folder {out} is inside the published run {inside}, which is never written to: "
                         f"choose another --out (e.g. --out report-{slug(run.name)}-{slug(run.run_id)} outside it)")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create report folder {out}: {err.strerror}: choose another --out") from err
    return out


# ------------------------------------------------------------------------------ HTML
def _html(run: Run, baseline: Run | None, sections: list[str]) -> str:
    parts = [pages.head(f"{run.name} {run.run_id}"),
             f"<h1>{pages.escape(run.name)} <small>{pages.escape(run.run_id)}</small></h1>\n"]
    facts = (f"loss {fmt(run.loss)} over {fmt(run.manifest.get('examples'))} examples, "
             f"{fmt(run.parameters)} parameters")
    parts.append(f"<p>{pages.escape(facts)}.")
    if baseline is not None:
        parts.append(f" Baseline (dashed in every plot): <b>{pages.escape(label(baseline))}</b>.")
    parts.append("</p>\n")
    parts += sections
    parts.append("<h2>Provenance</h2>\n")
    if baseline is None:
        parts.append(pages.table(["", "run"], [[k, v] for k, v in _provenance(run)]))
    else:
        parts.append(pages.table(["", "run", "baseline"], [[k, v, b] for (k, v), (_, b) in
                                                          zip(_provenance(run), _provenance(baseline))]))
    parts.append("<details><summary>manifest.json</summary><pre>"
                 f"{pages.escape(json.dumps(run.manifest, indent=2))}</pre></details>\n")
    parts.append("</body></html>\n")
    return "".join(parts)


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
        ("loss", fmt(m.get("loss"))), ("examples", fmt(m.get("examples"))),
        ("weight sum", fmt(m.get("weight_sum"))), ("precision", job.get("precision")),
        ("regularization included", job.get("include_regularization")), ("seed", job.get("seed")),
        ("quantities", quantities), ("model", model.get("path")), ("model sha256", model.get("sha256")),
        ("parameters", fmt(m.get("parameters"))), ("variables", variables),
        ("data", f"{data.get('rows', '?'):,} rows in {len(data.get('files', []))} files"
                 if isinstance(data.get("rows"), int) else data.get("rows")),
        ("data path", job.get("data", {}).get("path")), ("data fingerprint", data.get("fingerprint")),
        ("shards", m.get("shards")), ("workers", m.get("workers")), ("passes over the data", m.get("passes")),
        ("started", m.get("started_at")), ("finished", m.get("finished_at")), ("seconds", m.get("seconds")),
        ("versions", ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())),
        ("files", ", ".join(m.get("files", []))),
    ]
