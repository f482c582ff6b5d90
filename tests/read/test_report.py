"""``report``: every plot rendered from real runs, the HTML page, the command line; ``show``."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import published
from plots import check_plots, image_sources, synthetic_run
from pipeline.read.run import load
from pipeline.cli import main
from pipeline.storage.publish import RunPublisher
from pipeline.read.report import plot_diagonals, write_report
from pipeline.read.show import show_run

pytestmark = pytest.mark.slow
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
VARIABLE_PLOTS = ["diagonals-01-hidden-kernel.png", "diagonals-02-hidden-bias.png", "diagonals-03-out-kernel.png",
                  "diagonals-04-out-bias.png"]
PLOTS = ["trace.png", "eigenvalues.png", "spectrum.png", "variables.png", "diagonals-all.png", *VARIABLE_PLOTS]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real runs of the same model (``tests/published.py``): the run and its baseline."""
    made = published.two_runs(tmp_path_factory)
    return made["main"].run_dir, made["base"].run_dir


def test_every_plot_and_the_html_page_from_a_real_run(runs, tmp_path):
    run_dir, _ = runs
    before = sorted(os.listdir(run_dir))
    report = write_report(run_dir, out=str(tmp_path / "r"))
    assert report.plots == PLOTS
    check_plots(report.out_dir, PLOTS)
    assert image_sources(report.html) == PLOTS  # every plot, by its file name next to the page
    page = open(report.html, encoding="utf-8").read()
    run = load(run_dir)
    for fact in (run.run_id, run.manifest["model"]["sha256"], run.manifest["data"]["fingerprint"],
                 "hidden/kernel (6, 5)", "__all__", "l2_norm", "hutch++"):
        assert fact in page, fact
    assert sorted(os.listdir(run_dir)) == before  # a published run is never written to


def test_baseline_is_overlaid_through_the_command_line(runs, tmp_path):
    run_dir, base_dir = runs
    done = subprocess.run([sys.executable, "-m", "pipeline", "report", run_dir, "--baseline", base_dir,
                           "--out", str(tmp_path / "both")], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr
    html = done.stdout.strip().splitlines()[-1]
    assert html == str(tmp_path / "both" / "index.html")
    check_plots(tmp_path / "both", image_sources(html))
    assert image_sources(html) == PLOTS
    page = open(html, encoding="utf-8").read()
    assert "Baseline" in page and "run=base" in page and "baseline eigenvalue" in page
    # The overlay draws both runs: the legend of a variable's histogram names the baseline.
    figure = plot_diagonals(load(run_dir), "hidden/kernel", baseline=load(base_dir))
    labels = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert sum(label.startswith("baseline ") for label in labels) == 3 and len(labels) == 6


def test_default_out_is_a_folder_in_the_current_directory_and_errors_exit_2(runs, tmp_path):
    run_dir, _ = runs
    done = subprocess.run([sys.executable, "-m", "pipeline", "report", run_dir], capture_output=True, text=True,
                          env=ENV, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(tmp_path / "report-test-job-main" / "index.html")
    for args, problem in (([str(tmp_path)], "not a complete run"), ([run_dir, "--sigma", "-1"], "--sigma"),
                          ([run_dir, "--baseline", str(tmp_path)], "not a complete run")):
        out, err = io.StringIO(), io.StringIO()
        assert main(["report", *args, "--out", str(tmp_path / "bad")], out, err) == 2
        assert err.getvalue().startswith("error:") and problem in err.getvalue() and err.getvalue().count("\n") == 1


def test_signed_diagonals_are_counted_apart_and_zeros_named(tmp_path):
    values = np.array([1e-3, 2e-3, 5e-1, -1e-4, -3e-2, 0.0, 0.0])
    run = load(synthetic_run(tmp_path, values))
    figure = plot_diagonals(run, "w")
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Hessian: 3 positive, 2 negative, 2 zero"]
    assert ax.get_xscale() == "log" and ax.get_ylim()[0] < 0  # negative magnitudes drawn below the axis
    report = write_report(run, out=str(tmp_path / "r"))
    assert report.plots == ["variables.png", "diagonals-all.png", "diagonals-01-w.png"]  # no trace: no exact diag
    check_plots(report.out_dir, report.plots)
    page = open(report.html, encoding="utf-8").read()
    assert page.count("Not computed.") == 5  # trace, eigenvalues, spectrum, hessian blocks, hvp


def test_show_aligns_headers_with_numbers_and_names_hvp_and_spectrum(runs):
    text = show_run(runs[0])
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    title, rule, row = lines[header], lines[header + 1], lines[header + 2]
    assert set(rule.replace(" ", "")) == {"-"}
    for column in ("estimate", "stderr", "matvecs"):  # right-aligned: each header ends where its number ends
        end = title.index(column) + len(column)
        assert row[end - 1] != " " and (end == len(row) or row[end] == " "), (title, row)
    assert re.search(r"^hvp +2 Hessian-vector products", text, re.M)
    assert re.search(r"^spectrum +2 SLQ runs", text, re.M)
    assert "hidden/kernel (6, 5)" in text


def test_a_table_show_has_no_layout_for_is_shown_and_loaded_by_name(tmp_path):
    """A quantity's own file that show and load know nothing of (a quantity added later): its
    rows shown when few, its size otherwise, and ``load(...).table(name)`` reads it."""
    import pyarrow as pa

    manifest = {"run_id": "extra", "date": "2026-01-01", "status": "complete", "examples": 1, "loss": 0.0,
                "parameters": 1, "job": {"name": "extra", "quantities": {}}, "variables": []}
    with RunPublisher(str(tmp_path), "extra", "extra", "2026-01-01") as publisher:
        publisher.write_table("norm.parquet", pa.table({"value": [0.125]}), {})
        publisher.write_table("many.parquet", pa.table({"i": list(range(30))}), {})
        run_dir = publisher.publish(manifest)
    text = show_run(run_dir)
    assert re.search(r"^norm\n *value\n *-+\n *0\.125$", text, re.M), text
    assert re.search(r"^many +30 rows in many.parquet$", text, re.M), text
    assert load(run_dir).table("norm")["value"].tolist() == [0.125]


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_show_report_and_load_name_a_damaged_file_of_a_run(runs, tmp_path, damage):
    """A published run whose summary or diagonals file was deleted or cut short: one error line
    (exit 2) naming the file from show, report and pipeline.load, never a traceback."""
    import shutil

    from pipeline.errors import InputError

    damaged = str(tmp_path / "run")
    shutil.copytree(runs[0], damaged)
    for name in ("diagonals.parquet", "summary.parquet"):  # report reads the first, show the second
        target = os.path.join(damaged, name)
        if damage == "missing":
            os.remove(target)
        else:
            with open(target, "r+b") as handle:
                handle.truncate(100)
    for command in (["show", damaged], ["report", damaged, "--out", str(tmp_path / "report")]):
        out, err = io.StringIO(), io.StringIO()
        assert main(command, out=out, err=err) == 2, err.getvalue()
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1 and re.match(r"error: cannot read .*(diagonals|summary)\.parquet", lines[0]), lines
        assert "the run is damaged" in lines[0]
    with pytest.raises(InputError, match="diagonals.parquet"):
        load(damaged).diagonals


@pytest.mark.parametrize("field,value", [("variables", 5), ("job", 0), ("files", 0), ("variables", [["x", "y"]])])
def test_a_manifest_with_a_field_of_the_wrong_kind_is_a_damaged_run(runs, tmp_path, field, value):
    """A hand-edited manifest (found by a hostile trial): show, report, compare and load give one
    error line naming the field, never a traceback."""
    import json
    import shutil

    from pipeline.errors import InputError

    edited = str(tmp_path / "run")
    shutil.copytree(runs[0], edited)
    path = os.path.join(edited, "manifest.json")
    manifest = json.load(open(path))
    manifest[field] = value
    json.dump(manifest, open(path, "w"))
    for command in (["show", edited], ["report", edited, "--out", str(tmp_path / "report")],
                    ["compare", runs[0], edited]):
        out, err = io.StringIO(), io.StringIO()
        assert main(command, out=out, err=err) == 2, err.getvalue()
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1 and f"field '{field}' is not" in lines[0] and "damaged or was edited" in lines[0], lines
    with pytest.raises(InputError, match=field):
        load(edited)
