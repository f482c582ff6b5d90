"""The view of per-example outputs and influence (``pipeline.read.views.examples``, contract 7) on
hand-made runs of known values (``tests/handmade.publish_examples``): ``show``, ``run.per_example``,
``run.influence``, ``report``, and the folder of parts as one output."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

import handmade
from handmade import SELF_INFLUENCE, publish, publish_examples
from pipeline.errors import InputError
from pipeline.read.report import write_report
from pipeline.read.show import show_run
from pipeline.read.views import VIEWS, claims
from pipeline.read.views.examples import ExamplesView, as_image, data_root, read_rows
from pipeline.read.views.generic import GenericView
from plots import check_plots, image_sources


@pytest.fixture
def run(tmp_path):
    return publish_examples(tmp_path)


def _table(text: str, title: str) -> list[list[str]]:
    """The rows of a titled table of ``show``'s text, split on whitespace (header and rule left out)."""
    block = text.split(f"\n{title}\n", 1)[1].split("\n\n", 1)[0]
    return [line.split() for line in block.splitlines()[2:]]


# ------------------------------------------------------------------------------ show
def test_show_gives_each_querys_top_rows_in_order(run):
    text = show_run(run.run_dir)
    # query 0: rows 1 and 2 tie at 0.9 (the smaller row first), then 7; harmful: 5, 3, 4
    rows = _table(text, "influence, query 0 (id q0)")
    assert [(r[0], r[2], r[4]) for r in rows] == [("helpful", "ex1", "1"), ("helpful", "ex2", "2"),
                                                  ("helpful", "ex7", "7"), ("harmful", "ex5", "5"),
                                                  ("harmful", "ex3", "3"), ("harmful", "ex4", "4")]
    assert rows[3] == ["harmful", "part-1.parquet", "ex5", "1", "5", "1", "-0.8"]
    assert [r[4] for r in _table(text, "influence, query 1 (id q1)")] == ["3", "5", "2", "4", "0", "6"]
    assert "influence_topk  2 queries, top 3 of each kind, C ekfac, damping 0.1, every score in influence.parquet" \
        in text


def test_show_summarises_the_per_example_table(run):
    text = show_run(run.run_dir)
    assert "per_example     8 rows in 2 parts of per_example/ (row, file, file_row, id, weight, loss, gradient_norm, " \
           "self_influence, projection; projection [2] float32) (run.per_example())" in text
    stats = {r[0]: r[1:] for r in _table(text, "per_example: distribution over 8 rows")}
    assert stats["self_influence"][0] == "6.75" and stats["self_influence"][-1] == "40"  # mean, max
    assert stats["loss"][:2] == ["0.45", "0.1"]
    top = _table(text, "per_example: largest self_influence")
    assert [r[2] for r in top] == ["5", "7", "6", "4", "3"]
    # the folder is one entry of the file list, and its parts are not shown as tables of their own
    assert "per_example/ (2 files)" in text and "part-00000" not in text


def test_largest_loss_when_there_is_no_self_influence(tmp_path):
    parts = {name: table.drop_columns(["self_influence", "projection"])
             for name, table in handmade.per_example_parts().items()}
    other = publish(tmp_path, {"hessian_diagonal": np.ones(handmade.PARAMETERS)}, tables=parts)
    text = show_run(other.run_dir)
    assert [r[2] for r in _table(text, "per_example: largest loss")] == ["7", "6", "5", "4", "3"]
    assert "influence" not in text


# ------------------------------------------------------------------------------ accessors
def test_per_example_concatenates_the_parts_sorted_by_row(run):
    assert run.per_example_parts() == ["per_example/part-00000.parquet", "per_example/part-00001.parquet"]
    table = run.per_example()
    assert table.num_rows == 8 and table.column("row").to_pylist() == list(range(8))
    np.testing.assert_array_equal(table.column("self_influence").to_numpy(), SELF_INFLUENCE)
    projection = table.column("projection").combine_chunks().flatten().to_numpy().reshape(8, 2)
    np.testing.assert_array_equal(projection[:, 0], np.arange(8))
    # columns=: only those, still in row order (row read to sort by, then dropped)
    loss = run.per_example(columns=["loss"])
    assert loss.column_names == ["loss"]
    np.testing.assert_allclose(loss.column("loss").to_numpy(), 0.1 * np.arange(1, 9))
    assert run.per_example(["row", "id"]).column("id").to_pylist() == [f"ex{r}" for r in range(8)]
    # parts are outputs of one folder, not tables
    assert "per_example/part-00000" not in run.tables() and "influence_topk" in run.tables()


def test_influence_filters_by_query(run):
    everything = run.influence()
    assert len(everything) == 12 and list(everything.columns) == ["query", "query_id", "kind", "rank", "row", "file",
                                                                  "file_row", "id", "score"]
    one = run.influence(query=1)
    assert set(one["query"]) == {1} and list(one["row"]) == [3, 5, 2, 4, 0, 6]
    assert list(one["kind"]) == ["helpful"] * 3 + ["harmful"] * 3 and list(one.index) == list(range(6))
    with pytest.raises(InputError, match="has no query 7 in influence_topk.parquet \\(queries 0 to 1, 2 in all\\)"):
        run.influence(query=7)
    assert run.table("influence")["score"].tolist() == handmade.SCORES.ravel().tolist()


def test_a_run_without_them_says_so(tmp_path):
    plain = publish(tmp_path, {"hessian_diagonal": np.ones(handmade.PARAMETERS)})
    with pytest.raises(InputError, match="has no per_example/ .*add per_example"):
        plain.per_example()
    with pytest.raises(InputError, match="has no influence_topk.parquet"):
        plain.influence()
    view = ExamplesView()
    assert not view.present(plain) and view.show(plain).tables == [] and view.sections(plain, None, [], {}) == []


# ------------------------------------------------------------------------------ the folder of parts
def test_a_folder_claims_its_parts_and_the_generic_view_leaves_them(run):
    assert claims(("per_example/",), "per_example/part-00012.parquet") and not claims(("per_example/",), "p.parquet")
    assert claims(("kfac.parquet",), "kfac.parquet")
    generic = VIEWS[-1]
    assert isinstance(generic, GenericView) and not generic.present(run)
    view = ExamplesView()
    assert view.present(run) and view.changes(None, run, run) == [] and view.series(run) == ({}, {})
    assert view.export(run) == {}


# ------------------------------------------------------------------------------ report
def test_report_draws_the_influence_page(run, tmp_path):
    report = write_report(run, out=str(tmp_path / "report"))
    drawn = ["influence-01-query-0.png", "influence-02-query-1.png", "self-influence.png"]
    assert report.plots[-3:] == drawn
    check_plots(report.out_dir, drawn)
    assert image_sources(report.html)[-3:] == drawn
    page = open(report.html, encoding="utf-8").read()
    assert "<h2>Influence</h2>" in page and "<h3>Query 0 (id q0)</h3>" in page and "C <b>ekfac</b>" in page
    # query 0's most harmful row: row 5 (ex5, label 5 % 3 = 2, loss 0.6, score -0.8)
    assert ('<tr><td>harmful</td><td class="n">1</td><td class="n">5</td><td>part-1.parquet</td><td class="n">1</td>'
            '<td>ex5</td><td>2</td><td class="n">0.6</td><td class="n">-0.8</td></tr>') in page
    mislabeled = page.split("Likely mislabeled", 1)[1]
    assert mislabeled.index("<td>ex5</td>") < mislabeled.index("<td>ex7</td>")
    assert "could not be read" not in page


def test_report_goes_on_without_the_training_data(tmp_path):
    run = publish_examples(tmp_path, data=False)
    report = write_report(run, out=str(tmp_path / "report"))
    assert report.plots[-1] == "self-influence.png" and not [p for p in report.plots if p.startswith("influence-")]
    page = open(report.html, encoding="utf-8").read()
    assert "Labels were not read" in page and "<td>ex5</td>" in page


# ------------------------------------------------------------------------------ the training data
def test_rows_of_the_training_data_and_their_images(tmp_path):
    folder = handmade.training_data(tmp_path / "data")
    data = {"path": folder, "labels": "label", "features": "pixels"}
    rows = read_rows(data, [("part-1.parquet", 1), ("part-0.parquet", 3)])
    assert rows[("part-1.parquet", 1)]["label"] == 2 and rows[("part-0.parquet", 3)]["label"] == 0
    image = as_image(rows[("part-1.parquet", 1)]["features"])
    assert image.shape == (4, 4) and image[1, 1] == 1.0 and image.sum() == 1.0
    assert read_rows({**data, "format": "tfrecord"}, [("part-0.parquet", 0)]) == {}
    assert read_rows({**data, "path": str(tmp_path / "gone")}, [("part-0.parquet", 0)]) == {}
    assert data_root(folder) == folder and data_root(os.path.join(folder, "part-0.parquet")) == folder
    assert data_root(f"{folder}/part-*.parquet") == folder


def test_what_is_drawn_as_an_image():
    assert as_image(np.arange(64.0)).shape == (8, 8) and as_image(np.arange(48)).shape == (4, 4, 3)
    assert as_image(np.arange(10.0)) is None and as_image("text") is None and as_image(None) is None
    from matplotlib.figure import Figure

    png = io.BytesIO()
    Figure(figsize=(0.2, 0.1), dpi=100).savefig(png, format="png")
    assert as_image(png.getvalue()).shape[:2] == (10, 20)
    assert as_image(b"not an image") is None


# ------------------------------------------------------------------------------ the docs' recipes
def _recipe(fence: str) -> str:
    """The ```FENCE block of docs/reading.md's per-example section (not run by test_docs: the
    bundled example computes no influence)."""
    import paths

    text = open(os.path.join(paths.REPO, "docs", "reading.md"), encoding="utf-8").read()
    section = text.split("## Per-example outputs and influence", 1)[1]
    return section.split(f"```{fence}\n", 1)[1].split("```", 1)[0]


def test_the_reading_pages_recipes_run_on_a_hand_made_run(run, tmp_path):
    duckdb = pytest.importorskip("duckdb")
    data = os.path.join(str(tmp_path), "data")
    sql = _recipe("sql").replace("RUN", run.run_dir).replace("data/train/", f"{data}/")
    rows = duckdb.sql(sql).fetchall()
    assert [(row, label) for row, *_, label in rows][:3] == [(5, 2), (7, 1), (6, 0)]
    namespace = {"RUN": run.run_dir}
    exec(_recipe("text").replace("data/train/", f"{data}/"), namespace)
    assert namespace["mislabeled"]["row"].tolist()[:3] == [5, 7, 6]
    query = namespace["query"]
    assert query["row"].tolist() == [1, 2, 7, 5, 3, 4] and query["label"].tolist() == [1, 2, 1, 2, 0, 1]
