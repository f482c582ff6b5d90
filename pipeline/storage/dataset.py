"""Dataset planning and streaming: Parquet files -> shards -> batches of numpy arrays.

Planning reads only the Parquet footers (row counts, schema, statistics), so it costs a few
small reads per file whatever the dataset's size, and it is deterministic: the same files
give the same shards and the same fingerprint. Reading streams one shard's row ranges with
``ParquetFile.iter_batches``; at most about one batch and one row group are in memory.

Rows are numbered globally, over all files in listing order (sorted paths), so a row index
names the same example whatever the sharding. Storage only: PyArrow and numpy, no
TensorFlow, no Ray.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.signature import ModelSignature, TensorSpec
from pipeline.storage.uri import GLOB_CHARS, is_uri, resolve_filesystem

PARQUET_SUFFIXES = (".parquet", ".parq")
_FOOTER_THREADS = 16  # footers are tiny; on object stores latency, not bandwidth, dominates


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of one file (a filesystem path, as in ``DataPlan.files``)."""

    file: str
    start: int
    stop: int


@dataclass(frozen=True)
class Shard:
    """A contiguous range of global rows, ``[first_row, first_row + rows)``."""

    index: int
    first_row: int
    rows: int
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class DataPlan:
    """What ``plan_data`` found.

    ``files`` and ``file_rows`` list every Parquet file of the dataset (filesystem paths, in
    listing order) with its full row count; ``rows`` is the number of rows used (after
    ``limit``). ``uri`` is where the data lives (absolute for local paths): hand it to
    ``read_shard`` so that a worker resolves the same filesystem.
    """

    files: tuple[str, ...]
    file_rows: tuple[int, ...]
    rows: int
    shards: tuple[Shard, ...]
    fingerprint: str
    schema: pa.Schema
    uri: str


@dataclass
class Batch:
    """Arrays for one batch, in ``signature.inputs`` / ``signature.outputs`` order.

    ``rows`` holds the global row index (int64) of each example: the key that makes per-row
    randomness (Monte Carlo labels) independent of the sharding.
    """

    inputs: list[np.ndarray]
    labels: list[np.ndarray]
    weights: np.ndarray | None
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


# ----------------------------------------------------------------------------- filesystems


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# -------------------------------------------------------------------------------- listing


def _hidden(relative: str) -> bool:
    # Spark/Hadoop leave _SUCCESS, _temporary/ and .crc files beside the data.
    return any(part.startswith((".", "_")) for part in relative.split("/") if part)


def _match_parts(parts: Sequence[str], patterns: Sequence[str]) -> bool:
    """Glob matching component by component: ``*`` stays inside one folder, ``**`` spans any."""
    if not patterns:
        return not parts
    if patterns[0] == "**":
        return any(_match_parts(parts[i:], patterns[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], patterns[0]) and _match_parts(
        parts[1:], patterns[1:])


def _list_files(fs: pafs.FileSystem, path: str, shown: str) -> tuple[list[str], str]:
    """Parquet files (sorted paths) and the root that fingerprints take paths relative to."""
    stripped = path.rstrip("/") or path
    try:
        info = fs.get_file_info(stripped)
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"cannot read data path {shown}: {_one_line(err)}: check data.path and credentials") from err
    if info.type == pafs.FileType.File:
        return [stripped], posixpath.dirname(stripped)
    if info.type == pafs.FileType.Directory:
        root = stripped
        listed = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        files = [i.path for i in listed if i.type == pafs.FileType.File
                 and i.path.endswith(PARQUET_SUFFIXES) and not _hidden(i.path[len(root) + 1:])]
        return sorted(files), root
    if any(c in stripped for c in GLOB_CHARS):
        parts = stripped.split("/")
        first = next(i for i, p in enumerate(parts) if any(c in p for c in GLOB_CHARS))
        root = "/".join(parts[:first]) or ("/" if stripped.startswith("/") else "")
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            return [], root
        listed = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        prefix = len(root.rstrip("/")) + 1
        files = []
        for i in listed:
            relative = i.path[prefix:]
            if (i.type == pafs.FileType.File and not _hidden(relative)
                    and _match_parts(relative.split("/"), parts[first:])):
                files.append(i.path)
        return sorted(files), root
    raise InputError(f"data path {shown} does not exist: check data.path")


# ------------------------------------------------------------------------------- footers


@dataclass(frozen=True)
class _Footer:
    path: str
    size: int
    rows: int
    schema: pa.Schema
    digest: bytes  # sha256 of the raw footer: schema, row groups, statistics, offsets


def _read_footer(fs: pafs.FileSystem, path: str, shown: str) -> _Footer:
    """Read only a file's footer (two small reads), never its data."""
    try:
        with fs.open_input_file(path) as handle:
            size = handle.size()
            if size < 12:
                raise InputError(f"{shown} is not a Parquet file (too short): remove it from data.path")
            handle.seek(size - 8)
            tail = handle.read(8)
            if tail[4:] != b"PAR1":
                raise InputError(f"{shown} is not a Parquet file (no PAR1 footer): remove it from data.path")
            length = int.from_bytes(tail[:4], "little")
            if length + 12 > size:
                raise InputError(f"{shown} has a corrupt Parquet footer: rewrite or remove it")
            handle.seek(size - 8 - length)
            footer = handle.read(length)
        # The footer alone, framed as a file, parses to the same metadata: no second read.
        metadata = pq.read_metadata(pa.BufferReader(b"PAR1" + footer + tail))
        schema = metadata.schema.to_arrow_schema()
    except InputError:
        raise
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"cannot read Parquet footer of {shown}: {_one_line(err)}: fix or remove the file") from err
    return _Footer(path, size, metadata.num_rows, schema, hashlib.sha256(footer).digest())


def _schema_difference(a: pa.Schema, b: pa.Schema) -> str:
    names_a, names_b = set(a.names), set(b.names)
    if names_a != names_b:
        missing = sorted(names_a - names_b)
        extra = sorted(names_b - names_a)
        said = []
        if missing:
            said.append("lacks " + ", ".join(missing))
        if extra:
            said.append("adds " + ", ".join(extra))
        return " and ".join(said)
    for field in b:
        other = a.field(field.name)
        if not other.equals(field):
            return f"column '{field.name}' is {field.type} (nullable={field.nullable}), not {other.type} (nullable={other.nullable})"
    return "columns are in a different order"


# ------------------------------------------------------------------------------- planning


def _shard_count(shards: int | str, workers: int, rows: int, batch_size: int) -> int:
    if shards == "auto":
        if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)):
            raise ValueError(f"workers must be resolved to an int before planning, got {workers!r}")
        auto = min(max(int(workers) * 4, 1), math.ceil(rows / batch_size))
        return max(auto, 1)
    if isinstance(shards, bool) or not isinstance(shards, (int, np.integer)) or shards < 1:
        raise InputError(f"shards must be a positive integer or 'auto', got {shards!r}: fix shards in the job")
    return min(int(shards), rows)


def _cut_shards(files: Sequence[str], file_rows: Sequence[int], rows: int, count: int) -> tuple[Shard, ...]:
    """Balanced contiguous shards: sizes differ by at most one row, in global row order."""
    base, extra = divmod(rows, count)
    sizes = [base + (1 if i < extra else 0) for i in range(count)]
    file_starts = np.concatenate([[0], np.cumsum(file_rows, dtype=np.int64)])
    shards = []
    first = 0
    for index, size in enumerate(sizes):
        stop = first + size
        pieces = []
        # Files overlapping [first, stop): skip empty files, cut at any row.
        lo = int(np.searchsorted(file_starts, first, side="right")) - 1
        for f in range(lo, len(files)):
            f_start, f_stop = int(file_starts[f]), int(file_starts[f + 1])
            if f_start >= stop:
                break
            a, b = max(first, f_start), min(stop, f_stop)
            if b > a:
                pieces.append(Piece(files[f], a - f_start, b - f_start))
        shards.append(Shard(index, first, size, tuple(pieces)))
        first = stop
    return tuple(shards)


def plan_data(data_spec, shards: int | str = "auto", workers: int = 1) -> DataPlan:
    """List the Parquet files, read their footers and cut the rows into balanced shards.

    Cost: one listing plus two small reads per file (run concurrently), never the data.
    """
    shown = data_spec.path
    batch_size = data_spec.batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"data.batch_size must be a positive integer, got {batch_size!r}: fix data.batch_size")
    limit = data_spec.limit
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0):
        raise InputError(f"data.limit must be a non-negative integer or null, got {limit!r}: fix data.limit")

    fs, path = resolve_filesystem(shown)
    uri = shown if is_uri(shown) else path
    files, root = _list_files(fs, path, shown)
    if not files:
        raise InputError(f"no Parquet files under {shown}: check data.path")

    def relative(p: str) -> str:
        return p[len(root.rstrip("/")) + 1:] if root else p

    with ThreadPoolExecutor(max_workers=min(_FOOTER_THREADS, len(files))) as pool:
        footers = list(pool.map(lambda p: _read_footer(fs, p, p), files))

    schema = footers[0].schema
    fingerprint = hashlib.sha256()
    for footer in footers:
        if not footer.schema.equals(schema, check_metadata=False):
            raise InputError(
                f"file {relative(footer.path)} has a different schema from {relative(files[0])} "
                f"({_schema_difference(schema, footer.schema)}): give data.path files of one schema")
        name = relative(footer.path).encode()
        fingerprint.update(len(name).to_bytes(8, "little") + name)
        fingerprint.update(footer.size.to_bytes(8, "little") + footer.rows.to_bytes(8, "little"))
        fingerprint.update(footer.digest)

    file_rows = tuple(f.rows for f in footers)
    rows = sum(file_rows) if limit is None else min(int(limit), sum(file_rows))
    if rows == 0:
        raise InputError(f"dataset {shown} is empty" + (" after data.limit" if limit is not None else "")
                         + ": check data.path and data.limit")
    count = _shard_count(shards, workers, rows, int(batch_size))
    return DataPlan(
        files=tuple(files),
        file_rows=file_rows,
        rows=rows,
        shards=_cut_shards(files, file_rows, rows, count),
        fingerprint=fingerprint.hexdigest(),
        schema=schema,
        uri=uri,
    )


# ------------------------------------------------------------------------- column layout


def _size(shape: Sequence[int | None]) -> int | None:
    if any(d is None for d in shape):
        return None
    return int(np.prod(shape, dtype=np.int64))


def _shape_text(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _target_shape(spec: TensorSpec, width: int, column: str, key: str, what: str) -> tuple[int, ...]:
    """Shape (without batch) that a row of ``width`` values is reshaped to, or InputError."""
    shape = tuple(spec.shape)
    unknown = [i for i, d in enumerate(shape) if d is None]
    known = int(np.prod([d for d in shape if d is not None], dtype=np.int64))
    if not unknown and width == known:
        return tuple(int(d) for d in shape)
    if len(unknown) == 1 and known > 0 and width % known == 0:
        return tuple(width // known if d is None else int(d) for d in shape)
    if len(unknown) > 1:
        raise InputError(f"{what} '{spec.name}' has shape {_shape_text(shape)}, which a flat column cannot fill: "
                         f"give the model fixed dimensions")
    size = f"{known}" if not unknown else f"a multiple of {known}"
    raise InputError(f"column '{column}' holds {width} values per row but {what} '{spec.name}' has shape "
                     f"{_shape_text(shape)} = {size} values: fix {key} or the model")


@dataclass(frozen=True)
class _Tensor:
    """How one model tensor is built: one column (scalar or list) or several scalar columns."""

    columns: tuple[str, ...]
    spec: TensorSpec
    key: str  # the job key to fix ("data.features", "data.labels")
    label: bool


@dataclass(frozen=True)
class _Layout:
    inputs: tuple[_Tensor, ...]
    labels: tuple[_Tensor, ...]
    weights: str | None

    @property
    def columns(self) -> list[str]:
        seen: dict[str, None] = {}
        for tensor in self.inputs + self.labels:
            seen.update(dict.fromkeys(tensor.columns))
        if self.weights is not None:
            seen[self.weights] = None
        return list(seen)


def _names(value, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise InputError(f"{key} must be a column name or a list of column names, got {value!r}: fix {key}")


def _layout(data_spec, signature: ModelSignature) -> _Layout:
    """Map the job's column names onto the model's inputs and outputs (no schema needed)."""
    inputs, outputs = tuple(signature.inputs), tuple(signature.outputs)
    if not inputs or not outputs:
        raise InputError("the model has no inputs or no outputs: give a built Keras model")
    features = data_spec.features
    input_names = ", ".join(s.name for s in inputs)
    if isinstance(features, dict):
        given = set(features)
        expected = [s.name for s in inputs]
        if given != set(expected):
            missing = [n for n in expected if n not in given]
            unknown = sorted(str(n) for n in given - set(expected))
            said = (f"missing {', '.join(missing)}" if missing else "") + \
                   ("; " if missing and unknown else "") + (f"unknown {', '.join(unknown)}" if unknown else "")
            raise InputError(f"data.features maps model inputs by name ({said}): use the model's input "
                             f"names {input_names}")
        in_tensors = tuple(_Tensor(_names(features[s.name], f"data.features.{s.name}"), s,
                                   "data.features", False) for s in inputs)
    else:
        columns = _names(features, "data.features")
        if len(inputs) != 1:
            raise InputError(f"the model has {len(inputs)} inputs ({input_names}) but data.features is not a "
                             f"mapping: set data.features to {{input_name: column}} for each input")
        in_tensors = (_Tensor(columns, inputs[0], "data.features", False),)

    output_names = ", ".join(_output_label(signature, k) for k in range(len(outputs)))
    if isinstance(data_spec.labels, dict):
        # Labels by output name (contract 5.5): the order of the model's outputs never matters.
        by_index: dict[int, str] = {}
        unknown = []
        for name, column in data_spec.labels.items():
            index = signature.output_index(str(name))
            if index is None or index in by_index:
                unknown.append(str(name))
            else:
                by_index[index] = column
        missing = [_output_label(signature, k) for k in range(len(outputs)) if k not in by_index]
        if unknown or missing:
            said = "; ".join(part for part in (f"unknown {', '.join(unknown)}" if unknown else "",
                                               f"missing {', '.join(missing)}" if missing else "") if part)
            raise InputError(f"data.labels maps model outputs by name ({said}): use the model's output names "
                             f"{output_names}")
        out_tensors = tuple(_Tensor(_names(by_index[k], f"data.labels.{outputs[k].name}"), outputs[k],
                                    "data.labels", True) for k in range(len(outputs)))
    else:
        label_columns = _names(data_spec.labels, "data.labels")
        if len(outputs) > 1:
            if isinstance(data_spec.labels, str) or len(label_columns) != len(outputs):
                raise InputError(f"the model has {len(outputs)} outputs ({output_names}) but data.labels names "
                                 f"{len(label_columns)} column(s): set data.labels to {{output_name: column}} "
                                 "for each output")
            out_tensors = tuple(_Tensor((c,), s, "data.labels", True) for c, s in zip(label_columns, outputs))
        else:
            out_tensors = (_Tensor(label_columns, outputs[0], "data.labels", True),)

    weights = data_spec.weights
    if weights is not None and not isinstance(weights, str):
        raise InputError(f"data.weights must be a column name or null, got {weights!r}: fix data.weights")
    return _Layout(in_tensors, out_tensors, weights)


def _output_label(signature: ModelSignature, index: int) -> str:
    """An output's name for messages, with its dict key when the model returns a dict."""
    name = signature.outputs[index].name
    aliases = signature.output_aliases
    if aliases and aliases[index] != name:
        return f"{name} (key {aliases[index]})"
    return name


def _text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) \
        or pa.types.is_large_binary(t)


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _column_list(names: Sequence[str]) -> str:
    shown = ", ".join(names[:30])
    return shown + (f", ... ({len(names)} columns)" if len(names) > 30 else "")


def _check_column(schema: pa.Schema, column: str, key: str, scalar_only: bool, text: bool = False) -> pa.DataType:
    """The column's type, or InputError. ``text``: string/binary values are allowed (features
    for models that start with StringLookup/TextVectorization, contract 5.4)."""
    if column not in schema.names:
        raise InputError(f"column '{column}' not in data (columns: {_column_list(schema.names)}): fix {key}")
    t = schema.field(column).type
    allowed = "numbers or strings" if text else "numbers"
    if _is_list(t):
        if scalar_only:
            raise InputError(f"column '{column}' is a list column ({t}) where one value per row is needed: "
                             f"fix {key}")
        if not (_numeric(t.value_type) or (text and _text(t.value_type))):
            raise InputError(f"column '{column}' is a list of {t.value_type}, not {allowed}: store each row flat "
                             f"(a fixed-size list, or a variable-length list of T*d values for an input of shape "
                             f"(None, d), reshaped in C order) and fix {key}")
    elif not (_numeric(t) or (text and _text(t))):
        raise InputError(f"column '{column}' has type {t}, not {allowed}: fix {key}")
    return t


def _check_layout(schema: pa.Schema, layout: _Layout) -> None:
    for tensor in layout.inputs + layout.labels:
        several = len(tensor.columns) > 1
        for column in tensor.columns:
            t = _check_column(schema, column, tensor.key, scalar_only=several, text=not tensor.label)
        if several:
            if not tensor.label:
                _target_shape(tensor.spec, len(tensor.columns), ", ".join(tensor.columns), tensor.key,
                              "model input")
        elif pa.types.is_fixed_size_list(t) and not tensor.label:
            _target_shape(tensor.spec, t.list_size, tensor.columns[0], tensor.key, "model input")
        elif not _is_list(t) and not tensor.label:
            _target_shape(tensor.spec, 1, tensor.columns[0], tensor.key, "model input")
    if layout.weights is not None:
        _check_column(schema, layout.weights, "data.weights", scalar_only=True)


def tensor_columns(data_spec, signature: ModelSignature) -> tuple[list[str], list[str]]:
    """The column name(s) behind each model input and each label, in signature order."""
    layout = _layout(data_spec, signature)
    return ([", ".join(t.columns) for t in layout.inputs], [", ".join(t.columns) for t in layout.labels])


def check_schema(schema: pa.Schema, data_spec, signature: ModelSignature) -> None:
    """Fail early, before any compute, when the data cannot feed the model.

    Widths of fixed-size list columns are checked here; variable-size lists while reading.
    """
    _check_layout(schema, _layout(data_spec, signature))


# ------------------------------------------------------------------------------- reading


def _null_error(column: str, row: int) -> InputError:
    return InputError(f"column '{column}' has a null value at row {row}: fill or drop nulls in the data")


def _values(array: pa.Array, column: str, rows: np.ndarray, pad_value=0) -> np.ndarray:
    """[B] for a scalar column, [B, width] for a list column.

    Rows of a variable-length list column are padded at the end with ``pad_value`` up to the
    batch's longest row (what ``keras.utils.pad_sequences(padding="post")`` gives), so a
    masking model sees what ``model.fit`` would feed it.
    """
    if array.null_count:
        first = int(np.flatnonzero(pc.is_null(array).to_numpy(zero_copy_only=False))[0])
        raise _null_error(column, int(rows[first]))
    t = array.type
    if not _is_list(t):
        return array.to_numpy(zero_copy_only=False)
    if pa.types.is_fixed_size_list(t):
        width = t.list_size
        lengths = None
    else:
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False).astype(np.int64)
        width = int(lengths.max()) if len(lengths) else 0
        if len(lengths) and np.any(lengths != width):
            return _padded(array, lengths, width, column, rows, pad_value)
    flat = array.flatten()
    if flat.null_count:
        first = int(np.flatnonzero(pc.is_null(flat).to_numpy(zero_copy_only=False))[0])
        raise _null_error(column, int(rows[first // width]))
    return flat.to_numpy(zero_copy_only=False).reshape(len(array), width)


def _padded(array: pa.Array, lengths: np.ndarray, width: int, column: str, rows: np.ndarray,
            pad_value) -> np.ndarray:
    flat = array.flatten()
    if flat.null_count:
        first = int(np.flatnonzero(pc.is_null(flat).to_numpy(zero_copy_only=False))[0])
        row = int(np.searchsorted(np.cumsum(lengths), first, side="right"))
        raise _null_error(column, int(rows[row]))
    values = flat.to_numpy(zero_copy_only=False)
    text = values.dtype.kind in "OSU"
    if text != isinstance(pad_value, str):
        raise InputError(f"column '{column}' holds {'strings' if text else 'numbers'} but data.pad_value is "
                         f"{pad_value!r}: set data.pad_value to a {'string' if text else 'number'}")
    out = np.full((len(lengths), width), pad_value, dtype=object if text else np.result_type(values, type(pad_value)))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for i, (start, length) in enumerate(zip(starts, lengths)):
        out[i, :length] = values[start:start + length]
    return out


def _float_or_given(spec_dtype: str, float_dtype: str) -> np.dtype:
    try:
        given = np.dtype(spec_dtype)
    except TypeError:  # e.g. bfloat16, which numpy does not name
        return np.dtype(float_dtype)
    return np.dtype(float_dtype) if np.issubdtype(given, np.floating) else given


def _input_array(table: pa.Table, tensor: _Tensor, rows: np.ndarray, float_dtype: str, pad_value=0) -> np.ndarray:
    n = len(rows)
    if len(tensor.columns) == 1:
        column = tensor.columns[0]
        values = _values(table.column(column).combine_chunks(), column, rows, pad_value)
        width = 1 if values.ndim == 1 else values.shape[1]
        known = _size(tensor.spec.shape)
        variable = values.ndim == 2 and not pa.types.is_fixed_size_list(table.column(column).type)
        tokens = not tensor.spec.dtype.startswith(("float", "bfloat", "half"))
        if variable and tokens and known is not None and width < known:
            # Variable-length token ids or strings feeding a fixed-length input: pad up to the
            # model's length, as keras.utils.pad_sequences(maxlen=...) would. Float features of
            # another width stay an error (padding them would be silently wrong).
            values = np.concatenate([values, np.full((n, known - width), pad_value, dtype=values.dtype)], axis=1)
            width = known
    else:
        column = ", ".join(tensor.columns)
        values = np.stack([_values(table.column(c).combine_chunks(), c, rows, pad_value) for c in tensor.columns],
                          axis=1)
        width = len(tensor.columns)
    shape = _target_shape(tensor.spec, width, column, tensor.key, "model input")
    if values.dtype.kind in "OSU":  # strings/bytes go to the model as tf.string
        return values.reshape((n,) + shape).astype(object)
    return values.reshape((n,) + shape).astype(_float_or_given(tensor.spec.dtype, float_dtype))


def _label_array(table: pa.Table, tensor: _Tensor, rows: np.ndarray, float_dtype: str, pad_value=0) -> np.ndarray:
    n = len(rows)
    if len(tensor.columns) > 1:
        stacked = [_values(table.column(c).combine_chunks(), c, rows) for c in tensor.columns]
        return np.stack(stacked, axis=1).astype(float_dtype)
    column = tensor.columns[0]
    values = _values(table.column(column).combine_chunks(), column, rows, 0 if isinstance(pad_value, str) else pad_value)
    dtype = np.int64 if np.issubdtype(values.dtype, np.integer) else np.dtype(float_dtype)
    if values.ndim == 2:
        # Labels may legitimately differ from the output's shape (the loss decides); reshape
        # only when the sizes agree, so rank>1 outputs get labels of their own shape.
        size = _size(tensor.spec.shape)
        if size == values.shape[1] and len(tensor.spec.shape) > 1:
            values = values.reshape((n,) + tuple(int(d) for d in tensor.spec.shape))
    return values.astype(dtype)


def _to_batch(table: pa.Table, layout: _Layout, rows: np.ndarray, float_dtype: str, pad_value=0) -> Batch:
    weights = None
    if layout.weights is not None:
        weights = _values(table.column(layout.weights).combine_chunks(), layout.weights, rows).astype(np.float64)
    return Batch(
        inputs=[_input_array(table, t, rows, float_dtype, pad_value) for t in layout.inputs],
        labels=[_label_array(table, t, rows, float_dtype, pad_value) for t in layout.labels],
        weights=weights,
        rows=rows,
    )


def _piece_batches(fs: pafs.FileSystem, piece: Piece, columns: list[str], chunk: int,
                   layout: _Layout, checked: list[bool]) -> Iterator[pa.RecordBatch]:
    """Record batches of rows ``[piece.start, piece.stop)``, reading only the row groups needed."""
    with fs.open_input_file(piece.file) as handle:
        parquet = pq.ParquetFile(handle)
        if not checked[0]:
            _check_layout(parquet.schema_arrow, layout)
            checked[0] = True
        metadata = parquet.metadata
        starts = np.concatenate([[0], np.cumsum([metadata.row_group(i).num_rows
                                                 for i in range(metadata.num_row_groups)], dtype=np.int64)])
        if starts[-1] < piece.stop:
            raise InputError(f"{piece.file} has {int(starts[-1]):,} rows, but had at least {piece.stop:,} when the run "
                             "was planned: the data changed during the run; run the job again on data that stays put")
        first = int(np.searchsorted(starts, piece.start, side="right")) - 1
        last = int(np.searchsorted(starts, piece.stop, side="left"))
        groups = [g for g in range(first, last) if starts[g + 1] > starts[g]]
        if not groups:
            return
        position = int(starts[groups[0]])
        for record in parquet.iter_batches(batch_size=chunk, row_groups=groups, columns=columns,
                                           use_threads=False):
            end = position + record.num_rows
            a, b = max(position, piece.start), min(end, piece.stop)
            if b > a:
                # Rebuild without schema metadata: files may differ in it, and batches from
                # several files are concatenated.
                part = record.slice(a - position, b - a)
                yield pa.RecordBatch.from_arrays(part.columns, names=columns)
            position = end
            if position >= piece.stop:
                return


def first_rows(plan: DataPlan, data_spec, signature: ModelSignature, count: int, dtype: str = "float32") -> Batch:
    """The dataset's first ``count`` rows as one batch (``validate`` runs the model on them)."""
    count = max(1, min(int(count), plan.rows))
    shard = _cut_shards(plan.files, plan.file_rows, count, 1)[0]
    return next(iter(read_shard(shard, data_spec, signature, plan.uri, count, dtype)))


# Errors of Parquet decoding (not of the network): the file's bytes are wrong, and reading it
# again cannot help.
_DAMAGED = ("corrupt", "deserializ", "invalid", "unexpected end", "not a parquet", "magic", "out of bounds")


def _read_piece(fs: pafs.FileSystem, piece: Piece, columns: list[str], chunk: int, layout: _Layout,
                checked: list[bool]) -> Iterator[pa.RecordBatch]:
    """``_piece_batches``, with read errors naming the file: a damaged file (or any error on a
    local disk) is an input error, never retried; other errors (a network) stay retryable."""
    try:
        yield from _piece_batches(fs, piece, columns, chunk, layout, checked)
    except (pa.ArrowException, OSError) as err:
        text = _one_line(err)
        if isinstance(fs, pafs.LocalFileSystem) or any(word in text.lower() for word in _DAMAGED):
            raise InputError(f"cannot read rows {piece.start}-{piece.stop - 1} of {piece.file}: {text}: the file is "
                             "damaged; rewrite it or remove it from data.path") from None
        raise OSError(f"reading {piece.file}: {text}") from err


def read_shard(shard: Shard, data_spec, signature: ModelSignature, uri: str, batch_size: int,
               dtype: str = "float32") -> Iterator[Batch]:
    """Stream a shard as batches of exactly ``batch_size`` rows (the last may be shorter).

    A batch may span pieces and files. Memory: about one batch plus one decoded chunk.
    """
    if batch_size < 1:
        raise InputError(f"batch size must be positive, got {batch_size}: fix data.batch_size")
    layout = _layout(data_spec, signature)
    columns = layout.columns
    fs, _ = resolve_filesystem(uri)
    checked = [False]
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    emitted = 0

    def emit(table: pa.Table) -> Batch:
        nonlocal emitted
        rows = np.arange(shard.first_row + emitted, shard.first_row + emitted + table.num_rows, dtype=np.int64)
        emitted += table.num_rows
        return _to_batch(table, layout, rows, dtype, getattr(data_spec, "pad_value", 0))

    for piece in shard.pieces:
        for record in _read_piece(fs, piece, columns, batch_size, layout, checked):
            pending.append(record)
            pending_rows += record.num_rows
            while pending_rows >= batch_size:
                table = pa.Table.from_batches(pending)
                yield emit(table.slice(0, batch_size))
                rest = table.slice(batch_size)
                pending = rest.to_batches()
                pending_rows = rest.num_rows
    if pending_rows:
        yield emit(pa.Table.from_batches(pending))
    if emitted != shard.rows:
        raise InputError(f"shard {shard.index} read {emitted} rows but planned {shard.rows}: the data changed "
                         f"since planning, plan the run again")


def write_columns(folder: str, columns: dict[str, np.ndarray], files: int = 1, row_group_size: int = 1 << 16) -> None:
    """Writes ``columns`` (arrays of equal length; a 2-D array becomes a fixed-size list column)
    as ``files`` Parquet files ``folder/part-0000.parquet``, ... of consecutive rows."""
    os.makedirs(folder, exist_ok=True)
    rows = len(next(iter(columns.values())))
    for index, part in enumerate(np.array_split(np.arange(rows), files)):
        table = pa.table({
            name: (pa.FixedSizeListArray.from_arrays(pa.array(values[part].ravel()), values.shape[1])
                   if np.ndim(values) == 2 else pa.array(values[part]))
            for name, values in columns.items()})
        pq.write_table(table, os.path.join(folder, f"part-{index:04d}.parquet"), row_group_size=row_group_size)
