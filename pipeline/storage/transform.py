"""The user's batch transform (``data.transform``, contract 5.4).

``fn(batch: dict[str, numpy.ndarray]) -> dict[str, numpy.ndarray]`` is called in the workers
on each batch's columns, before features and labels are taken: it decodes images, tokenises
text, builds a column the model needs. What it is given:

- every column of the data, ``[B]`` for a scalar column (``object`` arrays of ``str`` or
  ``bytes`` for string and binary columns), ``[B, width]`` for a fixed-size list column, and
  an ``object`` array of 1-D arrays for a variable-length list column;
- nulls as they come out of ``pyarrow.Array.to_numpy``: ``NaN`` or ``None``.

What it must return: a mapping of column name to an array of ``B`` rows each (any rank; a
``[B, ...]`` array is flattened in C order and reshaped to the model input, an ``object``
array of 1-D arrays is padded with ``data.pad_value`` like a variable-length list column).
It may keep, drop or add columns; ``features``, ``labels`` and ``weights`` name the columns it
returns.

It must map each row on its own and deterministically: shards and batches cut the data
anywhere, so a row's result must not depend on the other rows of its batch.
``check_row_independent`` checks that on the first rows (``validate``).

Storage only: numpy, no TensorFlow, no Ray (the function itself may use anything).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from pipeline.callables import import_callable
from pipeline.errors import InputError


class Transform:
    """A loaded ``data.transform``: call it as ``transform(columns, rows)``."""

    def __init__(self, reference: str, function):
        self.reference = reference
        self.function = function

    @classmethod
    def load(cls, reference: str | None) -> "Transform | None":
        """Imports ``"pkg.module:function"`` (None for a job without a transform).

        Raises ``InputError`` when the module cannot be imported or has no such function.
        """
        if reference is None:
            return None
        return cls(reference, import_callable(reference, "data.transform"))

    @property
    def name(self) -> str:
        return f"data.transform {self.reference!r}"

    def __call__(self, columns: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
        """The transformed columns, checked to hold ``len(rows)`` rows each.

        ``rows`` are the global row indices, for messages. An exception of the function is an
        ``InputError`` naming the first row that fails on its own (the function is then called
        on one row at a time to find it): bad data fails the same way on any worker, so it is
        never retried.
        """
        try:
            result = self.function(dict(columns))
        except MemoryError:
            raise
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code: any failure is the user's input
            raise InputError(f"{self.name} failed {self._where(columns, rows)}: {type(exc).__name__}: "
                             f"{_short(exc)}: fix the function or the data") from None
        return self._checked(result, len(rows))

    def _where(self, columns: dict[str, np.ndarray], rows: np.ndarray) -> str:
        for i, row in enumerate(rows):
            try:
                self.function({name: values[i:i + 1] for name, values in columns.items()})
            except MemoryError:
                raise
            except (Exception, SystemExit):  # noqa: BLE001 - looking for the first row that fails
                return f"on row {int(row)}"
        return f"on the batch of rows {int(rows[0])}-{int(rows[-1])} (each row alone passes)"

    def _checked(self, result, count: int) -> dict[str, np.ndarray]:
        if not isinstance(result, Mapping):
            raise InputError(f"{self.name} returned {type(result).__name__}, not a dict of column name -> numpy "
                             "array: return the batch's columns as a dict")
        out = {}
        for name, values in result.items():
            if not isinstance(name, str):
                raise InputError(f"{self.name} returned a column named {name!r}: name columns with strings")
            try:
                array = _array(values)
            except (ValueError, TypeError) as exc:
                raise InputError(f"{self.name} returned column {name!r} that is not an array ({_short(exc)}): "
                                 "return numpy arrays") from None
            if array.dtype == object and array.size and all(
                    isinstance(v, (int, float, bool, np.number)) for v in array.ravel()):
                array = array.astype(np.float64)  # numbers in an object array (pandas): numbers
            if array.ndim == 0 or len(array) != count:
                got = "a scalar" if array.ndim == 0 else f"{len(array)} rows"
                raise InputError(f"{self.name} returned column {name!r} with {got} for a batch of {count} rows: "
                                 "return one value (or array) per row, in the rows' order")
            out[name] = array
        return out

    def check_row_independent(self, columns: dict[str, np.ndarray], rows: np.ndarray) -> None:
        """Raises ``InputError`` when a row's result depends on the other rows of its batch.

        Compares the transform of the whole batch with that of its two halves (floats within
        1e-5 relative, other values exactly). Cost: the transform on the rows twice.
        """
        if len(rows) < 2:
            return
        whole = self(columns, rows)
        cut = len(rows) // 2
        halves = [self({k: v[a:b] for k, v in columns.items()}, rows[a:b]) for a, b in ((0, cut), (cut, len(rows)))]
        for name, values in whole.items():
            parts = [h.get(name) for h in halves]
            if any(p is None for p in parts):
                raise InputError(f"{self.name} returns column {name!r} for some batches and not others: "
                                 "return the same columns for every batch")
            for i in range(len(rows)):
                part = parts[0] if i < cut else parts[1]
                if not _same(values[i], part[i if i < cut else i - cut]):
                    raise InputError(
                        f"{self.name} gives row {int(rows[i])} a different {name!r} when its batch holds other rows: "
                        "results would depend on the sharding and the batch size; make it map each row on its own "
                        "(e.g. normalise with fixed constants, not batch statistics)")


def _array(values) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values
    if isinstance(values, (list, tuple)) and values and isinstance(values[0], (list, tuple, np.ndarray)):
        # A list of rows of different lengths: keep the rows, as a variable-length list column.
        lengths = {np.shape(v) for v in values}
        if len(lengths) > 1:
            array = np.empty(len(values), dtype=object)
            for i, row in enumerate(values):
                array[i] = np.asarray(row)
            return array
    return np.asarray(values)


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "fc" and b.dtype.kind in "fc":
        return bool(np.allclose(a, b, rtol=1e-5, atol=1e-8, equal_nan=True))
    if a.dtype == object or b.dtype == object:
        return all(_same(x, y) for x, y in zip(a.ravel(), b.ravel())) if a.ndim else bool(a.item() == b.item())
    return bool(np.array_equal(a, b))


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")
