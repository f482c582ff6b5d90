"""The read side's views (``pipeline.read.views``): the registry, the generic view, a new view
taken up by every read command without touching them, and the shared pieces (``changes``,
``text``, ``pages``, ``figures``, ``published``). Runs are published with the real publisher."""

from __future__ import annotations

import math
import os

import numpy as np
import pyarrow as pa
import pytest

from pipeline.blocks import ALL
from pipeline.errors import InputError
from pipeline.read import compare, history, pages, show
from pipeline.read.changes import Change
from pipeline.read.figures import PLOT_PIXELS, fmt, slug
from pipeline.read.history_report import write_history_report
from pipeline.read.published import RunTables
from pipeline.read.run import Run, load
from pipeline.read.text import aligned, number
from pipeline.read.views import ACCESSORS, VIEWS, Shown, View, on_page
from pipeline.read.views.diagonals import DiagonalsView
from pipeline.read.views.generic import OTHER_ROWS, GenericView
from pipeline.storage import tables
from pipeline.storage.publish import RunPublisher

VARIABLES = ("dense/kernel", "dense/bias")
SHAPES = ((2, 2), (2,))


def publish(root, run_id, *, extra: dict | None = None, scale: float = 1.0, date="2026-12-01", variables=True):
    """A run of diagonals and summary, plus ``extra`` tables ``{file name: pyarrow.Table}``."""
    values = {"hessian_diagonal": scale * np.arange(1.0, 7.0)}
    publisher = RunPublisher(str(root), "views", run_id, date)
    provenance = {"run_id": run_id}
    publisher.write_table("diagonals.parquet", tables.diagonals_table(VARIABLES, SHAPES, values), provenance)
    publisher.write_table("summary.parquet", tables.summary_table(VARIABLES, SHAPES, values), provenance)
    for name, table in (extra or {}).items():
        publisher.write_table(name, table, provenance)
    manifest = {"run_id": run_id, "date": date, "status": "complete", "examples": 10, "loss": 0.25 * scale,
                "parameters": 6, "job": {"name": "views", "quantities": {"hessian_diagonal": {"method": "exact"}}},
                "model": {"path": "m.keras", "sha256": "a" * 64}, "data": {"fingerprint": "f" * 64, "rows": 10}}
    if variables:
        manifest["variables"] = [{"name": n, "shape": list(s)} for n, s in zip(VARIABLES, SHAPES)]
    return publisher.publish(manifest)


def small_table(rows: int) -> pa.Table:
    return pa.table({"row": pa.array(range(rows), pa.int64()), "score": pa.array(np.linspace(0, 1, rows))})


# ------------------------------------------------------------------------------ the registry
def test_every_family_has_an_accessor_and_the_generic_view_is_last():
    assert isinstance(VIEWS[-1], GenericView)
    assert len(ACCESSORS) == len(VIEWS) - 1
    assert all(issubclass(Run, accessor) for accessor in ACCESSORS)
    pages_order = [view.page for view in on_page()]
    assert pages_order == sorted(pages_order)


def test_a_table_without_a_view_is_shown_by_the_generic_view(tmp_path):
    run_dir = publish(tmp_path, "r1", extra={"scores.parquet": small_table(3),
                                             "many.parquet": small_table(OTHER_ROWS + 5)})
    text = show.show_run(run_dir)
    # small: in full, under its name; large: one line with its row count
    assert "\nscores\nrow  score\n" in text and "0.5" in text
    assert f"many  {OTHER_ROWS + 5} rows in many.parquet" in text
    assert "\nsummary\n" in text


# ------------------------------------------------------------------------------ a new view
class ScoresView(View):
    """What a new family's view looks like: its files, and what it adds to the read commands."""

    files = ("scores.parquet",)
    compared = files
    page = 75

    def show(self, run) -> Shown:
        total = sum(r["score"] for r in run.rows("scores"))
        return Shown(lines=[("scores", f"total {total:g}")])

    def changes(self, comparison, run_a, run_b):
        a, b = (sum(r["score"] for r in run.rows("scores")) for run in (run_a, run_b))
        return [Change(ALL, "scores", "total", a, b)]

    def series(self, run):
        return ({"scores.total": sum(r["score"] for r in run.rows("scores"))}, {}) if run.has("scores") else ({}, {})


def test_a_registered_view_is_taken_up_by_show_compare_and_history(tmp_path, monkeypatch):
    registry = VIEWS[:-1] + (ScoresView(), VIEWS[-1])
    for module in (show, compare):
        monkeypatch.setattr(module, "VIEWS", registry)
    monkeypatch.setattr(history, "on_page", lambda: sorted(registry, key=lambda view: view.page))
    a = publish(tmp_path, "a", extra={"scores.parquet": small_table(3)}, date="2026-12-01")
    b = publish(tmp_path, "b", extra={"scores.parquet": small_table(5)}, date="2026-12-02")
    assert "scores  total 1.5" in show.show_run(a)
    changes = {(c.quantity, c.statistic): c for c in compare.compare_runs(a, b).changes}
    assert changes[("scores", "total")].a == pytest.approx(1.5) and changes[("scores", "total")].b == pytest.approx(2.5)
    series = history.history(str(tmp_path / "views"))
    assert series.series[-1] == "scores.total"  # page 75: after the diagonals' l2 norms (page 70)
    assert [row["scores.total"] for row in series.rows] == pytest.approx([1.5, 2.5])


def test_a_compared_table_in_one_run_only_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "VIEWS", VIEWS[:-1] + (ScoresView(), VIEWS[-1]))
    a = publish(tmp_path, "a", extra={"scores.parquet": small_table(3)})
    b = publish(tmp_path, "b")
    result = compare.compare_runs(a, b)
    assert "only one run has scores.parquet: not compared" in result.warnings
    assert not [c for c in result.changes if c.quantity == "scores"]


# ------------------------------------------------------------------------------ published runs
def test_a_table_without_a_block_column_is_one_block_of_all_parameters(tmp_path):
    run = load(publish(tmp_path, "r", extra={"scores.parquet": small_table(2)}))
    assert isinstance(run, RunTables)
    assert run.blocks("scores") == [ALL]
    assert list(run.block("scores")["row"]) == [0, 1]
    with pytest.raises(InputError, match="has no block 'dense' in scores.parquet"):
        run.block("scores", "dense")
    assert sorted(run.tables()) == ["diagonals", "scores", "summary"]
    assert run.columns("scores") == ["row", "score"]
    assert run.options("hessian_diagonal") == {"method": "exact"} and run.options("trace") == {}


def test_variables_come_from_the_diagonals_when_the_manifest_lacks_them(tmp_path):
    run = load(publish(tmp_path, "r", variables=False))
    assert run.variables == [("dense/kernel", (4,)), ("dense/bias", (2,))]
    assert run.arrays("hessian_diagonal")["dense/bias"].tolist() == [5.0, 6.0]


def test_the_notebook_view_shows_the_facts_and_the_summary(tmp_path):
    text = load(publish(tmp_path, "r"))._repr_html_()
    assert "<th style='text-align:left'>tables</th><td style='text-align:left'>diagonals, summary</td>" in text
    assert DiagonalsView().notebook(load(publish(tmp_path, "s"))) in text


# ------------------------------------------------------------------------------ shared pieces
def test_change_rules():
    assert Change(ALL, "q", "s", 2.0, 3.0).relative_change == 0.5
    assert Change(ALL, "q", "s", -2.0, -3.0).relative_change == -0.5
    assert Change(ALL, "q", "s", 0.0, -1.0).relative_change == -math.inf
    assert Change(ALL, "q", "s", 0.0, 0.0).relative_change == 0.0
    assert math.isnan(Change(ALL, "q", "s", math.nan, 1.0).relative_change)
    assert Change(ALL, "q", "s", 1.0, 1.0 + 1e-9, floor=1e-8).relative_change == 0.0


def test_aligned_text_puts_numbers_under_their_headers():
    text = aligned([["a", "1.5"], ["bbb", "22"]], ["name", "value"], text_columns=1)
    assert text.splitlines() == ["name  value", "----  -----", "a       1.5", "bbb      22"]
    assert number(1 / 3) == "0.333333" and number("x") == "x" and number(None) == "None"


def test_html_pieces_escape_and_align():
    table = pages.table(["<b>", "n"], [["x&y", 3]], numeric={1})
    assert "<th>&lt;b&gt;</th>" in table and '<td class="n">3</td>' in table and "x&amp;y" in table
    assert f'width="{PLOT_PIXELS[0]}" height="{PLOT_PIXELS[1]}"' in pages.figures([("a.png", "a")])
    assert pages.head("t").startswith("<!DOCTYPE html>") and "<title>t</title>" in pages.head("t")
    assert slug("dense/kernel:0") == "dense-kernel-0" and slug("///") == "variable"
    assert fmt(1234567) == "1,234,567" and fmt(0.5) == "0.5" and fmt(None) == "None"


def test_history_plots_are_one_png_per_series_and_a_page(tmp_path):
    publish(tmp_path, "a", date="2026-12-01")
    publish(tmp_path, "b", scale=2.0, date="2026-12-02")
    series = history.history(str(tmp_path / "views"))
    report = write_history_report(series, str(tmp_path / "plots"), fail_above=0.5)
    assert report.plots == ["01-loss.png", "02-hessian_diagonal.l2_norm.png"]
    assert all(os.path.getsize(tmp_path / "plots" / name) > 1000 for name in report.plots)
    page = open(report.html, encoding="utf-8").read()
    assert "2 runs, oldest first" in page and "01-loss.png" in page
    with pytest.raises(InputError, match="inside the published run"):
        write_history_report(series, str(tmp_path / "views" / "date=2026-12-01" / "run=a" / "plots"))


# ------------------------------------------------------------------------------ each family
def test_each_family_reads_and_describes_its_own_tables(tmp_path):
    from pipeline.read.views import _base, hessian_blocks, kronecker, spectral, trace, vectors

    a, s = np.array([[2.0, 0.5], [0.5, 1.0]]), np.array([[3.0]])
    hessian = np.diag(np.arange(1.0, 7.0))
    extra = {
        "trace.parquet": tables.trace_table([(ALL, "hutchinson", 21.0, 0.5, 40)]),
        "eigenvalues.parquet": tables.eigenvalues_table([(ALL, [6.0, 5.0], [1e-9, 2e-9])]),
        "spectrum.parquet": tables.spectrum_table([(ALL, [np.array([1.0, 6.0]), np.array([2.0, 5.0])],
                                                    [np.array([0.5, 0.5]), np.array([0.25, 0.75])])]),
        "hvp.parquet": tables.vectors_table(VARIABLES, SHAPES, np.ones((2, 6))),
        "kfac.parquet": tables.factors_table([("dense", "A", a), ("dense", "S", s)]),
        "hessian.parquet": tables.hessian_table([(ALL, VARIABLES, SHAPES, hessian)]),
    }
    run = load(publish(tmp_path, "r", extra=extra))
    # trace: the quantity, the exact diagonal's sum (method: exact in the manifest), SLQ
    labels = [label for label, *_ in trace.trace_estimates(run)]
    assert labels == ["trace (hutchinson, 40 HVPs)", "sum of the exact Hessian diagonal", "SLQ (2 probes)"]
    assert trace.trace_estimates(run)[1][1] == 21.0
    # SLQ: P * mean_r sum_j w_rj theta_rj = 6 * mean(3.5, 4.25)
    assert spectral.spectrum_facts(run)["trace"] == pytest.approx(6 * (3.5 + 4.25) / 2)
    assert spectral.which(run) == "largest" and spectral.per_block([{"block": ALL}]) == 0
    assert spectral.SpectralView().series(run)[0] == {"eigenvalue_1": 6.0, "eigenvalue_2": 5.0}
    assert vectors.VectorsView().show(run).lines == [("hvp", "2 Hessian-vector products (given vectors) in hvp.parquet")]
    lines = kronecker.KroneckerView().show(run).lines
    assert lines == [("kfac", "1 layers (dense A 2 x 2, S 1 x 1) in kfac.parquet (run.kfac(layer))")]
    np.testing.assert_array_equal(run.kfac("dense")[0], a)
    assert [factor for _, factor, _ in kronecker.factor_spectra(run)] == ["A", "S"]
    np.testing.assert_array_equal(run.hessian(), hessian)
    assert hessian_blocks.hessian_blocks(run) == [ALL]
    assert hessian_blocks.pooled(hessian, cells=3)[1] == 2
    # the base view adds nothing anywhere
    nothing = _base.View()
    assert nothing.show(run) == Shown() and nothing.series(run) == ({}, {}) and not list(nothing.figures(run, None, {}))
    assert nothing.sections(run, None, [], {}) == [] and nothing.notebook(run) == "" and not nothing.present(run)
