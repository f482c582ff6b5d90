"""Checks of one batch of data before it reaches the model, and how a model's refusal reads.

Used by the worker on every batch and by ``validate`` on the first rows, so that a problem
with the data is an ``InputError`` (exit 2) naming the column and the row, found before any
compute where possible, and never retried as a compute failure. NumPy only.
"""

from __future__ import annotations

import re

import numpy as np

from pipeline.errors import InputError

# TensorFlow errors are recognised by name: this module stays free of TensorFlow.
_DETERMINISTIC_TF_ERRORS = {"InvalidArgumentError", "UnimplementedError", "FailedPreconditionError"}


def deterministic(exc: BaseException) -> bool:
    """True for errors that the same input raises every time (shapes, ranks, dtypes, a loss
    with the wrong signature): retrying on another worker cannot help."""
    return isinstance(exc, (ValueError, TypeError, KeyError, IndexError, NotImplementedError)) \
        or type(exc).__name__ in _DETERMINISTIC_TF_ERRORS


def error_text(exc: BaseException, limit: int = 400) -> str:
    """``Type: message`` of a model or loss error on one line, without TensorFlow's
    ``{{function_node ...}}`` prefix and ``[Op:...]`` suffix, cut at ``limit`` characters."""
    text = re.sub(r"\{\{[^}]*\}\}\s*|\s*\[Op:[^\]]*\].*$", "", " ".join(str(exc).split()))
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # Keras' bold in its exception texts
    return f"{type(exc).__name__}: {text[:limit] + '...' if len(text) > limit else text}"


def model_refused(exc: BaseException, batch, where: str) -> InputError:
    """The one-line input error for a model or loss that raised on a batch."""
    first, last = int(batch.rows[0]), int(batch.rows[-1])
    return InputError(f"the model or the loss failed on {where} (rows {first}-{last}): {error_text(exc)}: "
                      "check data.features, data.labels and the loss against the model "
                      "(hessian-pipeline validate runs them on the first rows)")


def check_batch(batch, where: str, data_spec, loss, signature, columns, locate=None) -> None:
    """Non-finite values, negative weights and sparse labels out of range, as input errors.

    ``columns`` is ``pipeline.storage.dataset.tensor_columns(data_spec, signature)``: the column name(s)
    of each input and label tensor, in the order of ``batch.inputs`` and ``batch.labels``.
    ``locate(row) -> "FILE, its row N"`` (``Shard.locate``) names the file that holds a bad row
    (a damaged data page often decodes to such values rather than failing).
    """
    def found(row: int) -> str:
        return f"; in {locate(row)}" if locate is not None else ""

    _check_finite(batch, where, data_spec, columns, found)
    _check_sparse_labels(batch, where, loss, signature, columns[1], found)


def _check_finite(batch, where: str, data_spec, columns, found) -> None:
    groups = list(zip(batch.inputs, columns[0])) + list(zip(batch.labels, columns[1]))
    if batch.weights is not None:
        groups.append((batch.weights, data_spec.weights))
    for array, column in groups:
        if not np.issubdtype(array.dtype, np.floating):
            continue
        finite = np.isfinite(array).reshape(len(array), -1).all(axis=1)
        if not finite.all():
            row = int(batch.rows[int(np.flatnonzero(~finite)[0])])
            raise InputError(f"column '{column}' has a NaN or infinite value at row {row} ({where}){found(row)}: "
                             "clean the data or drop that row")
    if batch.weights is not None and np.any(batch.weights < 0):
        row = int(batch.rows[int(np.flatnonzero(batch.weights < 0)[0])])
        raise InputError(f"column '{data_spec.weights}' has a negative weight at row {row} ({where}){found(row)}: "
                         "weights must be >= 0")


def _check_sparse_labels(batch, where: str, loss, signature, label_columns, found) -> None:
    """Sparse class labels outside ``[0, classes)``: TensorFlow would fail or return NaN."""
    if getattr(loss, "family", None) != "categorical_sparse":
        return
    for k, (array, output) in enumerate(zip(batch.labels, signature.outputs)):
        classes = output.shape[-1] if output.shape else None
        if classes is None:
            continue
        values = np.asarray(array).reshape(len(array), -1)
        bad = (values < 0) | (values >= classes)
        if np.issubdtype(values.dtype, np.floating):
            bad |= values != np.floor(values)
        rows = np.flatnonzero(bad.any(axis=1))
        if len(rows):
            at = int(rows[0])
            value = values[at][bad[at]][0]
            raise InputError(
                f"column '{label_columns[k]}' has label {value.item()!r} at row {int(batch.rows[at])} ({where}), "
                f"outside the valid range 0-{classes - 1} of {loss.name}"
                + (f" for output '{output.name}'" if len(signature.outputs) > 1 else "")
                + f" ({classes} classes){found(int(batch.rows[at]))}: fix the labels, or the loss")
