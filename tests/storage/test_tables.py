"""Result tables in the contract's layouts, and the HVP vectors file reader."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputError
from pipeline.storage.tables import (diagonals_table, eigenvalues_table, read_vectors, spectrum_table, summary_table,
                             trace_table, vectors_table)

VARIABLES = ("dense/kernel", "dense/bias", "out/kernel", "scale")
SHAPES = ((3, 2), (2,), (2, 2, 2), ())
P = 6 + 2 + 8 + 1


def test_diagonals_row_order_is_variable_by_variable_in_c_order():
    values = np.arange(P, dtype=np.float64)
    table = diagonals_table(VARIABLES, SHAPES, {"hessian_diagonal": values, "gradient": -values})
    assert table.column_names == ["variable", "index", "hessian_diagonal", "gradient"]
    assert table.schema.field("variable").type == pa.string()
    assert table.schema.field("index").type == pa.int64()
    assert table.column("variable").to_pylist() == ["dense/kernel"] * 6 + ["dense/bias"] * 2 + \
        ["out/kernel"] * 8 + ["scale"]
    assert table.column("index").to_pylist() == list(range(6)) + [0, 1] + list(range(8)) + [0]
    np.testing.assert_array_equal(table.column("gradient").to_numpy(), -values)
    # C order: row (i, j) of a (3, 2) kernel is index 2 * i + j.
    kernel = np.arange(6.0).reshape(3, 2)
    flat = diagonals_table(VARIABLES[:1], SHAPES[:1], {"v": kernel.reshape(-1)})
    assert flat.column("v").to_pylist()[2 * 2 + 1] == kernel[2, 1]
    with pytest.raises(ValueError):
        diagonals_table(VARIABLES, SHAPES, {"v": np.zeros(P + 1)})


def test_summary_matches_numpy():
    rng = np.random.default_rng(0)
    quantities = {"hessian_diagonal": rng.normal(size=P), "gradient": rng.normal(size=P) * 1e3 + 1e6}
    table = summary_table(VARIABLES, SHAPES, quantities)
    assert table.column_names == ["variable", "quantity", "size", "mean", "std", "min", "max", "abs_mean",
                                  "sum", "l2_norm"]
    assert table.schema.field("size").type == pa.int64()
    assert all(table.schema.field(c).type == pa.float64() for c in table.column_names[3:])
    rows = table.to_pylist()
    assert len(rows) == 2 * (len(VARIABLES) + 1)
    assert [(r["quantity"], r["variable"]) for r in rows[:5]] == \
        [("hessian_diagonal", v) for v in VARIABLES] + [("hessian_diagonal", "__all__")]
    bounds = np.cumsum([0, 6, 2, 8, 1])
    for row in rows:
        values = quantities[row["quantity"]]
        if row["variable"] != "__all__":
            i = VARIABLES.index(row["variable"])
            values = values[bounds[i]:bounds[i + 1]]
        assert row["size"] == values.size
        np.testing.assert_allclose(
            [row["mean"], row["std"], row["min"], row["max"], row["abs_mean"], row["sum"], row["l2_norm"]],
            [values.mean(), values.std(), values.min(), values.max(), np.abs(values).mean(), values.sum(),
             np.linalg.norm(values)], rtol=1e-12, atol=1e-12)


def test_summary_of_an_empty_variable_is_nan():
    table = summary_table(("a", "empty"), ((2,), (0,)), {"q": np.array([1.0, 3.0])})
    rows = {r["variable"]: r for r in table.to_pylist()}
    assert rows["empty"]["size"] == 0 and np.isnan(rows["empty"]["mean"])
    assert rows["__all__"]["mean"] == 2.0 and rows["a"]["std"] == 1.0


def test_small_tables():
    eig = eigenvalues_table([("__all__", [5.0, 2.0], [1e-7, 2e-7])])
    assert eig.schema.field("rank").type == pa.int32()
    assert eig.to_pydict() == {"block": ["__all__"] * 2, "rank": [1, 2], "eigenvalue": [5.0, 2.0],
                               "residual": [1e-7, 2e-7]}
    trace = trace_table([("__all__", "hutch++", 12.5, 0.25, np.int64(300))])
    assert trace.to_pylist() == [{"block": "__all__", "method": "hutch++", "estimate": 12.5, "stderr": 0.25,
                                  "matvecs": 300}]
    assert trace.schema.field("matvecs").type == pa.int64()
    spectrum = spectrum_table([("__all__", [np.array([1.0, 2.0]), np.array([3.0])],
                                [np.array([0.25, 0.75]), np.array([1.0])])])
    assert spectrum.schema.field("run").type == pa.int32()
    assert spectrum.to_pydict() == {"block": ["__all__"] * 3, "run": [0, 0, 1], "node": [1.0, 2.0, 3.0],
                                    "weight": [0.25, 0.75, 1.0]}


def test_small_tables_per_block_keep_each_block_in_order_with_its_own_ranks_and_runs():
    eig = eigenvalues_table([("a/kernel", [5.0, 2.0], [1e-7, 2e-7]), ("b/kernel", [9.0], [0.0])])
    assert eig.to_pydict()["block"] == ["a/kernel", "a/kernel", "b/kernel"]
    assert eig.to_pydict()["rank"] == [1, 2, 1]
    trace = trace_table([("a", "exact", 1.0, 0.0, 0), ("b", "exact", 2.0, 0.0, 0)])
    assert trace.column("block").to_pylist() == ["a", "b"]
    spectrum = spectrum_table([("a", [np.array([1.0])], [np.array([1.0])]),
                               ("b", [np.array([2.0]), np.array([3.0])], [np.array([1.0]), np.array([1.0])])])
    assert spectrum.to_pydict()["run"] == [0, 0, 1] and spectrum.to_pydict()["block"] == ["a", "b", "b"]
    empty = eigenvalues_table([])
    assert empty.num_rows == 0 and empty.schema.field("eigenvalue").type == pa.float64()


# --------------------------------------------------------------------------- HVP vectors


@pytest.fixture
def vectors():
    return np.random.default_rng(1).normal(size=(3, P))


def write(path, table):
    pq.write_table(table, path)
    return str(path)


def test_vectors_round_trip(tmp_path, vectors):
    table = vectors_table(VARIABLES, SHAPES, vectors)
    assert table.column_names == ["vector", "variable", "index", "value"]
    assert [f.type for f in table.schema] == [pa.int32(), pa.string(), pa.int64(), pa.float64()]
    assert table.num_rows == 3 * P
    path = write(tmp_path / "v.parquet", table)
    np.testing.assert_array_equal(read_vectors(path, VARIABLES, SHAPES), vectors)
    np.testing.assert_array_equal(read_vectors(f"file://{path}", VARIABLES, SHAPES), vectors)


def test_vectors_in_any_row_order_and_sparse_ids(tmp_path, vectors):
    table = vectors_table(VARIABLES, SHAPES, vectors)
    ids = pa.array(np.array([7, 2, 40], dtype=np.int64)[table.column("vector").to_numpy()])
    table = table.set_column(0, "vector", ids)
    shuffled = table.take(np.random.default_rng(2).permutation(table.num_rows))
    got = read_vectors(write(tmp_path / "v.parquet", shuffled), VARIABLES, SHAPES)
    np.testing.assert_array_equal(got, vectors[[1, 0, 2]])  # ids 2, 7, 40


def edit(table, row, column, value):
    values = table.column(column).to_pylist()
    values[row] = value
    return table.set_column(table.column_names.index(column), column, pa.array(values, table.schema.field(column).type))


@pytest.mark.parametrize("change, message", [
    (lambda t: t.slice(1), r"vector 0, variable 'dense/kernel', index 0 is missing"),
    (lambda t: pa.concat_tables([t, t.slice(P + 6, 1)]), r"vector 1, variable 'dense/bias', index 0 appears more than once"),
    (lambda t: edit(t, 5, "variable", "dense/kernal"), r"vector 0 names unknown variable 'dense/kernal'"),
    (lambda t: edit(t, P + 7, "index", 2), r"vector 1, variable 'dense/bias': index 2 out of range \(size 2\)"),
    (lambda t: edit(t, 3, "index", -1), r"index -1 out of range"),
    (lambda t: edit(t, 4, "value", float("nan")), r"vector 0, variable 'dense/kernel', index 4 is nan"),
    (lambda t: edit(t, 4, "value", float("inf")), r"index 4 is inf"),
    (lambda t: t.drop_columns(["index"]), r"lacks column\(s\) index"),
    (lambda t: edit(t, 2, "vector", None), r"column 'vector' is null at row 2"),
    (lambda t: t.slice(0, 0), r"has no rows"),
    (lambda t: t.set_column(1, "variable", pa.array(np.arange(t.num_rows))), r"column 'variable' has type int64"),
])
def test_vectors_errors_name_the_entry(tmp_path, vectors, change, message):
    table = change(vectors_table(VARIABLES, SHAPES, vectors))
    path = write(tmp_path / "v.parquet", table)
    with pytest.raises(InputError, match=message) as error:
        read_vectors(path, VARIABLES, SHAPES)
    assert "\n" not in str(error.value) and "fix the vectors file" in str(error.value)


def test_vectors_missing_variable_and_bad_files(tmp_path, vectors):
    # A model variable absent from the file.
    table = vectors_table(VARIABLES[:3], SHAPES[:3], vectors[:, :P - 1])
    path = write(tmp_path / "v.parquet", table)
    with pytest.raises(InputError, match=r"vector 0, variable 'scale', index 0 is missing"):
        read_vectors(path, VARIABLES, SHAPES)
    with pytest.raises(InputError, match="not found"):
        read_vectors(str(tmp_path / "nope.parquet"), VARIABLES, SHAPES)
    (tmp_path / "junk.parquet").write_text("junk")
    with pytest.raises(InputError, match="cannot read vectors file"):
        read_vectors(str(tmp_path / "junk.parquet"), VARIABLES, SHAPES)
