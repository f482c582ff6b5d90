"""The user's batch transform (``data.transform``): loaded by reference, called on a batch's
columns, its result checked to hold one value per row; a failure names the first row that fails
alone; ``check_row_independent`` catches a transform that uses batch statistics."""

from __future__ import annotations

import numpy as np
import pytest

import transforms
from pipeline.errors import InputError
from pipeline.storage.transform import Transform

ROWS = np.arange(10, 16, dtype=np.int64)


def columns(n=6):
    return {"id": np.arange(n, dtype=np.int64) + 5, "a": np.linspace(0.0, 1.0, n), "b": np.arange(n, dtype=np.float64)}


def own(function, name="tests:own") -> Transform:
    return Transform(name, function)


def error_of(transform, cols=None, rows=ROWS) -> str:
    with pytest.raises(InputError) as info:
        transform(columns() if cols is None else cols, rows)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"data.transform {transform.reference!r} "), message
    return message


def test_load_imports_the_reference_and_none_is_no_transform():
    assert Transform.load(None) is None
    transform = Transform.load("transforms:pair")
    assert transform.function is transforms.pair and transform.name == "data.transform 'transforms:pair'"
    with pytest.raises(InputError, match=r"^data.transform 'transforms:no_such': module 'transforms' has no 'no_such'"):
        Transform.load("transforms:no_such")


def test_a_call_returns_the_functions_columns_checked():
    out = Transform.load("transforms:pair")(columns(), ROWS)
    assert set(out) == {"id", "a", "b", "x"}
    np.testing.assert_array_equal(out["x"], np.stack([columns()["a"], 2.0 * columns()["b"]], axis=1))
    # The function gets a copy of the mapping: a function that pops a column leaves the caller's.
    given = columns()
    own(lambda batch: {"a": batch.pop("a")})(given, ROWS)
    assert set(given) == {"id", "a", "b"}


def test_a_failure_names_the_first_row_that_fails_alone():
    message = error_of(Transform.load("transforms:fails_on_7"))
    # id 7 is the third row of the batch, global row 12.
    assert message == ("data.transform 'transforms:fails_on_7' failed on row 12: ValueError: id 7 is cursed: fix the "
                       "function or the data")
    assert "failed on row 12: SystemExit: 3" in error_of(Transform.load("transforms:exits"))


def test_a_failure_of_the_batch_only_says_each_row_alone_passes():
    def needs_two_rows(batch):
        if len(batch["a"]) > 1:
            raise RuntimeError("batch too big")
        return batch

    assert "failed on the batch of rows 10-15 (each row alone passes): RuntimeError: batch too big" in \
        error_of(own(needs_two_rows))


def test_memory_errors_are_not_turned_into_input_errors():
    def oom(batch):
        raise MemoryError()

    with pytest.raises(MemoryError):
        own(oom)(columns(), ROWS)


@pytest.mark.parametrize("result, problem", [
    ([1, 2], "returned list, not a dict of column name -> numpy array"),
    ({3: np.zeros(6)}, "returned a column named 3: name columns with strings"),
    ({"x": np.zeros(5)}, "returned column 'x' with 5 rows for a batch of 6 rows"),
    ({"x": 4.0}, "returned column 'x' with a scalar for a batch of 6 rows"),
    ({"x": [1.0, [2.0, 3.0]] + [0.0] * 4}, "returned column 'x' that is not an array"),
])
def test_a_result_of_the_wrong_shape_is_refused(result, problem):
    assert problem in error_of(own(lambda batch: result))


def test_numbers_in_an_object_array_become_floats_and_ragged_rows_stay_rows():
    out = Transform.load("transforms:numbers_as_objects")(columns(), ROWS)
    assert out["x"].dtype == np.float64 and out["x"].shape == (6, 2)
    ragged = [[1.0] * (k + 1) for k in range(6)]
    out = own(lambda batch: {"r": ragged, "even": [[1, 2]] * 6, "s": ["a", None] * 3})(columns(), ROWS)
    assert out["r"].dtype == object and [len(row) for row in out["r"]] == [1, 2, 3, 4, 5, 6]
    assert out["even"].shape == (6, 2)
    assert out["s"].dtype == object and out["s"][1] is None  # not numbers: kept as they are


def test_row_independence_passes_a_row_by_row_function():
    Transform.load("transforms:pair").check_row_independent(columns(), ROWS)
    Transform.load("transforms:fill_nulls").check_row_independent(columns(5), ROWS[:5])
    # Ragged and text columns are compared row by row too.
    Transform.load("transforms:lengths").check_row_independent(
        {"target": np.array([np.arange(k + 1.0) for k in range(6)], dtype=object)}, ROWS)


def test_row_independence_catches_batch_statistics_and_columns_that_come_and_go():
    message = str(pytest.raises(InputError, Transform.load("transforms:batch_mean").check_row_independent,
                                columns(), ROWS).value)
    assert message.startswith("data.transform 'transforms:batch_mean' gives row 10 a different 'x' when its batch "
                              "holds other rows")

    def sometimes(batch):
        return {"a": batch["a"], **({"big": batch["a"]} if len(batch["a"]) > 3 else {})}

    with pytest.raises(InputError, match="returns column 'big' for some batches and not others"):
        own(sometimes).check_row_independent(columns(), ROWS)
    # One row cannot be cut in halves: nothing to compare, the function is not even called.
    own(lambda batch: 1 / 0).check_row_independent(columns(1), ROWS[:1])


def test_row_independence_allows_float_rounding_only():
    def rounding(batch):
        a = batch["a"].copy()
        a[0] *= 1 + 1e-9 * len(a)  # the first row of a batch wobbles in the ninth digit
        return {"a": a}

    own(rounding).check_row_independent(columns(), ROWS)

    def half_a_percent(batch):
        return {"a": batch["a"] * (1 + 0.005 * (len(batch["a"]) > 3))}

    with pytest.raises(InputError, match="gives row 11 a different 'a'"):
        own(half_a_percent).check_row_independent(columns(), ROWS)
