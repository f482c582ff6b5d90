"""Checks of one batch before the model sees it: non-finite values, negative weights and
sparse labels out of range are input errors naming the column, the row and the file; which
model errors are worth a retry; how a model's refusal reads."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.batch_checks import check_batch, deterministic, error_text, model_refused
from pipeline.errors import InputError
from pipeline.job import DataSpec
from pipeline.signature import ModelSignature, TensorSpec
from pipeline.storage.dataset import Batch

ROWS = np.arange(100, 104, dtype=np.int64)  # global row indices of a batch in the middle of the data
DATA = DataSpec(path="/data", features="x", labels="y", weights="w")
SPARSE = SimpleNamespace(name="sparse_categorical_crossentropy", family="categorical_sparse")
MSE = SimpleNamespace(name="mse", family="gaussian")
SIGNATURE = ModelSignature(inputs=(TensorSpec("x", (2,), "float32"),), outputs=(TensorSpec("out", (3,), "float32"),))
COLUMNS = (["x"], ["y"])


def batch(x=None, y=None, w=None) -> Batch:
    return Batch(inputs=[np.zeros((4, 2), np.float32) if x is None else x],
                 labels=[np.array([0, 1, 2, 1]) if y is None else y], weights=w, rows=ROWS)


def error_of(b, loss=SPARSE, signature=SIGNATURE, columns=COLUMNS, locate=None) -> str:
    with pytest.raises(InputError) as info:
        check_batch(b, "shard 2", DATA, loss, signature, columns, locate)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_a_clean_batch_passes():
    check_batch(batch(w=np.ones(4)), "shard 2", DATA, SPARSE, SIGNATURE, COLUMNS)
    # Integer features are not checked for finiteness (they cannot hold NaN).
    check_batch(batch(x=np.ones((4, 2), np.int64)), "shard 2", DATA, SPARSE, SIGNATURE, COLUMNS)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_feature_names_the_column_and_the_first_bad_row(bad):
    x = np.zeros((4, 2), np.float32)
    x[2, 1] = bad
    x[3, 0] = bad
    assert error_of(batch(x=x)) == ("column 'x' has a NaN or infinite value at row 102 (shard 2): clean the data or "
                                    "drop that row")


def test_a_non_finite_label_or_weight_and_the_file_that_holds_it():
    y = np.array([0.0, np.nan, 1.0, 2.0])
    located = error_of(batch(y=y), loss=MSE, locate=lambda row: f"part-0.parquet, its row {row - 100}")
    assert located == ("column 'y' has a NaN or infinite value at row 101 (shard 2); in part-0.parquet, its row 1: "
                       "clean the data or drop that row")
    assert "column 'w' has a NaN or infinite value at row 103" in error_of(batch(w=np.array([1, 1, 1, np.inf])))


def test_a_negative_weight_is_refused():
    assert error_of(batch(w=np.array([1.0, 0.0, -0.5, 2.0]))) == \
        "column 'w' has a negative weight at row 102 (shard 2): weights must be >= 0"


@pytest.mark.parametrize("labels, shown, row", [
    (np.array([0, 3, 1, 1]), "3", 101), (np.array([0, 1, -1, 1]), "-1", 102), (np.array([0.0, 1.0, 1.5, 2.0]), "1.5", 102),
])
def test_sparse_labels_outside_the_classes_are_refused(labels, shown, row):
    assert error_of(batch(y=labels)) == (
        f"column 'y' has label {shown} at row {row} (shard 2), outside the valid range 0-2 of "
        "sparse_categorical_crossentropy (3 classes): fix the labels, or the loss")


def test_sparse_labels_of_the_second_output_name_it():
    signature = ModelSignature(inputs=SIGNATURE.inputs, outputs=(TensorSpec("a", (3,), "float32"),
                                                                 TensorSpec("b", (2,), "float32")))
    b = Batch(inputs=[np.zeros((4, 2))], labels=[np.array([0, 1, 2, 2]), np.array([[0], [1], [2], [0]])],
              weights=None, rows=ROWS)
    message = error_of(b, signature=signature, columns=(["x"], ["ya", "yb"]))
    assert message.startswith("column 'yb' has label 2 at row 102 (shard 2), outside the valid range 0-1")
    assert "for output 'b' (2 classes)" in message


def test_labels_of_another_loss_or_an_output_of_unknown_width_are_not_range_checked():
    check_batch(batch(y=np.array([0, 7, -1, 1])), "shard 2", DATA, MSE, SIGNATURE, COLUMNS)
    unknown = ModelSignature(inputs=SIGNATURE.inputs, outputs=(TensorSpec("out", (None,), "float32"),))
    check_batch(batch(y=np.array([0, 7, -1, 1])), "shard 2", DATA, SPARSE, unknown, COLUMNS)


class InvalidArgumentError(Exception):
    """Named as TensorFlow's: recognised by name, without importing TensorFlow."""


@pytest.mark.parametrize("exc, same_every_time", [
    (ValueError("shapes"), True), (TypeError("dtype"), True), (KeyError("x"), True), (IndexError("i"), True),
    (NotImplementedError(), True), (InvalidArgumentError("rank"), True),
    (RuntimeError("flaky"), False), (OSError("network"), False), (MemoryError(), False),
])
def test_deterministic_errors_are_those_a_retry_cannot_help(exc, same_every_time):
    assert deterministic(exc) is same_every_time


def test_error_text_drops_tensorflows_decoration_and_keras_bold():
    exc = InvalidArgumentError("{{function_node __wrapped__MatMul}} Matrix size-incompatible:\n  In[0]: [4,2], "
                               "In[1]: [3,1] [Op:MatMul] name: dense")
    assert error_text(exc) == "InvalidArgumentError: Matrix size-incompatible: In[0]: [4,2], In[1]: [3,1]"
    assert error_text(ValueError("\x1b[1mInput 0\x1b[0m is incompatible")) == "ValueError: Input 0 is incompatible"
    long = error_text(ValueError("z" * 500), limit=10)
    assert long == "ValueError: " + "z" * 10 + "..."


def test_model_refused_names_the_rows_and_the_way_out():
    error = model_refused(ValueError("expected shape (None, 3)"), batch(), "shard 2")
    assert isinstance(error, InputError) and error.exit_status == 2
    assert str(error) == ("the model or the loss failed on shard 2 (rows 100-103): ValueError: expected shape "
                          "(None, 3): check data.features, data.labels and the loss against the model "
                          "(hessian-pipeline validate runs them on the first rows)")
