"""Dataset planning and streaming: Parquet (or TFRecord) files -> shards -> batches of numpy arrays.

Planning reads only the Parquet footers (row counts, schema, statistics), so it costs a few
small reads per file whatever the dataset's size, and it is deterministic: the same files
give the same shards and the same fingerprint. TFRecord files have no footer: their records
are counted from the record headers (``pipeline.storage.tfrecord``). Reading streams one
shard's row ranges with ``ParquetFile.iter_batches`` (TFRecord: TensorFlow's reader, in
``pipeline.storage.tf_examples``); at most about one batch and one row group are in memory.

Each batch goes through the same steps whatever the format: Arrow columns -> numpy columns
-> the job's ``data.transform`` (``pipeline.storage.transform``) -> the model's inputs,
labels and weights.

Rows are numbered globally, over all files in listing order (sorted paths), so a row index
names the same example whatever the sharding. Storage only: PyArrow and numpy, no
TensorFlow (but for the TFRecord reader, imported only for TFRecord data), no Ray.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import os
import posixpath
import time
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
from pipeline.storage import tfrecord
from pipeline.storage.transform import Transform
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

    def origins(self, rows) -> tuple[list[str], np.ndarray]:
        """Each global row's file and its row in that file (from 0): ``([file], [file_row])``."""
        offsets = np.asarray(rows, np.int64) - self.first_row
        lengths = np.array([p.stop - p.start for p in self.pieces], np.int64)
        ends = np.cumsum(lengths)
        which = np.searchsorted(ends, offsets, side="right")
        if len(which) and (which.max() >= len(self.pieces) or offsets.min() < 0):
            raise ValueError(f"rows outside shard {self.index}")
        starts = ends - lengths
        file_rows = np.array([p.start for p in self.pieces], np.int64)[which] + offsets - starts[which]
        return [self.pieces[k].file for k in which], file_rows

    def locate(self, row: int) -> str:
        """``FILE, its row N`` for global row ``row`` of this shard (N from 0 in that file): a
        message about a value names the file to fix, not only the dataset's row."""
        offset = int(row) - self.first_row
        for piece in self.pieces:
            if 0 <= offset < piece.stop - piece.start:
                return f"{piece.file}, its row {piece.start + offset}"
            offset -= piece.stop - piece.start
        return f"row {row} is not in shard {self.index}"


@dataclass(frozen=True)
class DataPlan:
    """What ``plan_data`` found.

    ``files`` and ``file_rows`` list every file of the dataset (filesystem paths, in listing
    order) with its full row count; ``rows`` is the number of rows used (after ``limit``).
    ``uri`` is where the data lives (absolute for local paths): hand it to ``read_shard`` so
    that a worker resolves the same filesystem. ``notes``: what planning had to read, for the
    plan (counting GZIP TFRecord files decompresses them). ``file_stamps``: each file's
    ``(size, mtime_ns)`` as listed (mtime -1 where the filesystem has none), so that a resumed
    run can tell which files were rewritten since a shard was staged.
    """

    files: tuple[str, ...]
    file_rows: tuple[int, ...]
    rows: int
    shards: tuple[Shard, ...]
    fingerprint: str
    schema: pa.Schema
    uri: str
    notes: tuple[str, ...] = ()
    file_stamps: tuple[tuple[int, int], ...] = ()
    # Each file's name as the per-example outputs give it (contract 7.1): relative to data.path,
    # its own name when data.path is a file.
    names: tuple[str, ...] = ()

    def origins(self, rows) -> tuple[list[str], np.ndarray]:
        """Each global row's file, as ``names`` gives it, and its row in that file (``Shard.origins``)."""
        files, file_rows = _cut_shards(self.files, self.file_rows, self.rows, 1)[0].origins(rows)
        named = dict(zip(self.files, self.names or self.files))
        return [named[f] for f in files], file_rows

    def locate(self, row: int) -> str:
        """``FILE, its row N`` for global row ``row`` (``Shard.locate``)."""
        return _cut_shards(self.files, self.file_rows, self.rows, 1)[0].locate(row)


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
    # The ``data.id`` column's values (numbers or strings), when the job names one.
    ids: np.ndarray | None = None

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


def _stamp(info: pafs.FileInfo) -> tuple[int, int]:
    mtime = info.mtime_ns
    return int(info.size if info.size is not None else -1), int(mtime if mtime is not None else -1)


def _list_files(fs: pafs.FileSystem, path: str, shown: str,
                suffixes: tuple[str, ...] = PARQUET_SUFFIXES) -> tuple[list[str], str, dict]:
    """Data files (sorted paths), the root that fingerprints take paths relative to, and each
    file's ``(size, mtime_ns)`` from the same listing (no extra request per file).

    A directory gives its files ending in ``suffixes``; a glob, every file it matches."""
    stripped = path.rstrip("/") or path
    try:
        info = fs.get_file_info(stripped)
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"cannot read data path {shown}: {_one_line(err)}: check data.path and credentials") from err
    if info.type == pafs.FileType.File:
        return [stripped], posixpath.dirname(stripped), {stripped: _stamp(info)}
    if info.type == pafs.FileType.Directory:
        root = stripped
        listed = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        found = {i.path: _stamp(i) for i in listed if i.type == pafs.FileType.File
                 and i.path.endswith(suffixes) and not _hidden(i.path[len(root) + 1:])}
        return sorted(found), root, found
    if any(c in stripped for c in GLOB_CHARS):
        parts = stripped.split("/")
        first = next(i for i, p in enumerate(parts) if any(c in p for c in GLOB_CHARS))
        root = "/".join(parts[:first]) or ("/" if stripped.startswith("/") else "")
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            return [], root, {}
        listed = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        prefix = len(root.rstrip("/")) + 1
        found = {}
        for i in listed:
            relative = i.path[prefix:]
            if (i.type == pafs.FileType.File and not _hidden(relative)
                    and _match_parts(relative.split("/"), parts[first:])):
                found[i.path] = _stamp(i)
        return sorted(found), root, found
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


def data_uri(data_spec) -> str:
    """Where the workers read the data: the job's URI, or the local path it names."""
    shown = data_spec.path
    return shown if is_uri(shown) else resolve_filesystem(shown)[1]


def plan_data(data_spec, shards: int | str = "auto", workers: int = 1) -> DataPlan:
    """List the files, count their rows and cut the rows into balanced shards.

    Cost, Parquet: one listing plus two small reads per file (run concurrently), never the
    data. TFRecord: one listing plus the records' 12-byte headers (a GZIP file is decompressed
    once); the plan's ``notes`` say which.
    """
    shown = data_spec.path
    batch_size = data_spec.batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"data.batch_size must be a positive integer, got {batch_size!r}: fix data.batch_size")
    limit = data_spec.limit
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0):
        raise InputError(f"data.limit must be a non-negative integer or null, got {limit!r}: fix data.limit")

    fs, path = resolve_filesystem(shown)
    uri = data_uri(data_spec)
    records = getattr(data_spec, "format", "parquet") == "tfrecord"
    files, root, stamps = _list_files(fs, path, shown, tfrecord.SUFFIXES if records else PARQUET_SUFFIXES)
    if not files:
        raise InputError(f"no {'TFRecord' if records else 'Parquet'} files under {shown}: check data.path"
                         + (f" (a directory gives its files ending in {', '.join(tfrecord.SUFFIXES)})"
                            if records else ""))

    def relative(p: str) -> str:
        return p[len(root.rstrip("/")) + 1:] if root else p

    if records:
        schema, file_rows, fingerprint, notes = _count_tfrecords(fs, files, relative, data_spec.schema)
    else:
        schema, file_rows, fingerprint = _read_footers(fs, files, relative)
        notes = ()
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
        fingerprint=fingerprint,
        schema=schema,
        uri=uri,
        notes=notes,
        file_stamps=tuple(stamps[f] for f in files),
        names=tuple(relative(f) for f in files),
    )


def _read_footers(fs, files: list[str], relative) -> tuple[pa.Schema, tuple[int, ...], str]:
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
    return schema, tuple(f.rows for f in footers), fingerprint.hexdigest()


def _count_tfrecords(fs, files: list[str], relative, schema_spec: dict
                     ) -> tuple[pa.Schema, tuple[int, ...], str, tuple[str, ...]]:
    """Record counts from the headers; the fingerprint covers names, sizes and record lengths."""
    with ThreadPoolExecutor(max_workers=min(_FOOTER_THREADS, len(files))) as pool:
        counts = list(pool.map(lambda p: tfrecord.count_records(fs, p, p), files))
    fingerprint = hashlib.sha256(b"tfrecord")
    for count in counts:
        name = relative(count.path).encode()
        fingerprint.update(len(name).to_bytes(8, "little") + name)
        fingerprint.update(count.size.to_bytes(8, "little") + count.records.to_bytes(8, "little"))
        fingerprint.update(count.digest)
    gzip = [c for c in counts if tfrecord.compressed(c.path)]
    note = (f"data: {sum(c.records for c in counts):,} records counted in {len(counts)} TFRecord file(s) from "
            f"their headers")
    if gzip:
        note += (f"; {len(gzip)} GZIP file(s) ({sum(c.size for c in gzip) / 1e6:,.1f} MB) decompressed to count "
                 "them (uncompressed files only need the headers)")
    return (tfrecord.arrow_schema(schema_spec), tuple(c.records for c in counts), fingerprint.hexdigest(),
            (note,))


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
    id: str | None = None  # data.id: carried to the per-example outputs, never to the model

    @property
    def columns(self) -> list[str]:
        seen: dict[str, None] = {}
        for tensor in self.inputs + self.labels:
            seen.update(dict.fromkeys(tensor.columns))
        for extra in (self.weights, self.id):
            if extra is not None:
                seen[extra] = None
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
    identity = getattr(data_spec, "id", None)
    if identity is not None and not isinstance(identity, str):
        raise InputError(f"data.id must be a column name or null, got {identity!r}: fix data.id")
    return _Layout(in_tensors, out_tensors, weights, identity)


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
    if layout.id is not None:
        _check_column(schema, layout.id, "data.id", scalar_only=True, text=True)


def tensor_columns(data_spec, signature: ModelSignature) -> tuple[list[str], list[str]]:
    """The column name(s) behind each model input and each label, in signature order."""
    layout = _layout(data_spec, signature)
    return ([", ".join(t.columns) for t in layout.inputs], [", ".join(t.columns) for t in layout.labels])


def check_schema(schema: pa.Schema, data_spec, signature: ModelSignature) -> None:
    """Fail early, before any compute, when the data cannot feed the model.

    Widths of fixed-size list columns are checked here; variable-size lists while reading.
    With a ``data.transform`` the model is fed the transform's columns, which are checked on
    each batch instead (``validate`` runs it on the first rows).
    """
    if getattr(data_spec, "transform", None) is None:
        _check_layout(schema, _layout(data_spec, signature))


# ------------------------------------------------------------------------------- reading


def _null_error(column: str, row: int) -> InputError:
    return InputError(f"column '{column}' has a null value at row {row}: fill or drop nulls in the data")


def _values(array: pa.Array, column: str, rows: np.ndarray, nulls: bool = False) -> np.ndarray:
    """One Arrow column as numpy: ``[B]`` for a scalar column, ``[B, width]`` for a fixed-size
    list column, and an ``object`` array of 1-D arrays for a variable-length list column
    (padded later, by ``_dense``). ``nulls``: give nulls through as NaN/None (to a transform)
    instead of raising ``InputError``."""
    t = array.type
    if array.null_count and not nulls:
        first = int(np.flatnonzero(pc.is_null(array).to_numpy(zero_copy_only=False))[0])
        raise _null_error(column, int(rows[first]))
    if not _is_list(t):
        return array.to_numpy(zero_copy_only=False)
    flat = array.flatten()
    if array.null_count or flat.null_count:
        if nulls:
            return array.to_numpy(zero_copy_only=False)
        first = int(np.flatnonzero(pc.is_null(flat).to_numpy(zero_copy_only=False))[0])
        if pa.types.is_fixed_size_list(t):
            raise _null_error(column, int(rows[first // max(1, t.list_size)]))
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False).astype(np.int64)
        raise _null_error(column, int(rows[int(np.searchsorted(np.cumsum(lengths), first, side="right"))]))
    values = flat.to_numpy(zero_copy_only=False)
    if pa.types.is_fixed_size_list(t):
        return values.reshape(len(array), t.list_size)
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False).astype(np.int64)
    ragged = np.empty(len(array), dtype=object)
    for i, part in enumerate(np.split(values, np.cumsum(lengths)[:-1])):
        ragged[i] = part
    return ragged


def _ragged(values: np.ndarray) -> bool:
    """An ``object`` array of rows of their own lengths (a variable-length list column)."""
    if values.dtype != object or values.ndim != 1:
        return False
    return any(isinstance(v, (np.ndarray, list, tuple)) for v in values)


def _dense(values: np.ndarray, column: str, rows: np.ndarray, pad_value) -> np.ndarray:
    """``values`` as a regular array: rows of a variable-length column are padded at the end
    with ``pad_value`` up to the batch's longest row (what ``keras.utils.pad_sequences(
    padding="post")`` gives), so a masking model sees what ``model.fit`` would feed it."""
    if not _ragged(values):
        return values
    parts = []
    for i, row in enumerate(values):
        if row is None:
            raise _null_error(column, int(rows[i]))
        parts.append(np.asarray(row).reshape(-1))
    lengths = [len(part) for part in parts]
    width = max(lengths)
    if all(length == width for length in lengths):
        return np.stack(parts)
    flat = np.concatenate(parts)
    text = flat.dtype.kind in "OSU"
    if text != isinstance(pad_value, str):
        raise InputError(f"column '{column}' holds {'strings' if text else 'numbers'} but data.pad_value is "
                         f"{pad_value!r}: set data.pad_value to a {'string' if text else 'number'}")
    out = np.full((len(parts), width), pad_value, dtype=object if text else np.result_type(flat, type(pad_value)))
    for i, part in enumerate(parts):
        out[i, :len(part)] = part
    return out


def _float_or_given(spec_dtype: str, float_dtype: str) -> np.dtype:
    try:
        given = np.dtype(spec_dtype)
    except TypeError:  # e.g. bfloat16, which numpy does not name
        return np.dtype(float_dtype)
    return np.dtype(float_dtype) if np.issubdtype(given, np.floating) else given


def _takes_tokens(spec: TensorSpec) -> bool:
    """Whether a model input takes token ids or strings (padded up to its length), not floats."""
    return not spec.dtype.startswith(("float", "bfloat", "half"))


def _check_row_widths(values: np.ndarray, column: str, rows: np.ndarray, tensor: _Tensor, locate=None) -> None:
    """Each row of a variable-length column against the model input it feeds: a float input of a
    fixed shape takes exactly its size per row (padding a short row would be silently wrong),
    one with an unknown dimension whole steps of the others; token ids and strings may be
    shorter than a fixed input (padded, as ``keras.utils.pad_sequences`` would), never longer.
    ``InputError`` naming the row, its file (``locate``) and both widths."""
    shape = tuple(tensor.spec.shape)
    known = _size(shape)
    step = int(np.prod([d for d in shape if d is not None], dtype=np.int64))
    tokens = _takes_tokens(tensor.spec)
    lengths = np.fromiter((0 if row is None else np.size(row) for row in values), dtype=np.int64, count=len(values))
    if known is not None:
        bad = lengths > known if tokens else lengths != known
        want = f"at most {known}" if tokens else f"{known}"
    else:
        bad = (lengths % max(1, step)) != 0
        want = f"a multiple of {step}"
    bad &= np.fromiter((row is not None for row in values), dtype=bool, count=len(values))  # nulls: _dense
    if bad.any():
        at = int(np.flatnonzero(bad)[0])
        where = f" ({locate(int(rows[at]))})" if locate is not None else ""
        raise InputError(f"column '{column}' has {int(lengths[at])} values at row {int(rows[at])}{where} but model "
                         f"input '{tensor.spec.name}' of shape {_shape_text(shape)} takes {want} per row: fix or drop "
                         "that row")


def _input_array(columns: dict[str, np.ndarray], tensor: _Tensor, rows: np.ndarray, float_dtype: str,
                 pad_value=0, locate=None) -> np.ndarray:
    n = len(rows)
    if len(tensor.columns) == 1:
        column = tensor.columns[0]
        variable = _ragged(columns[column])
        if variable:
            _check_row_widths(columns[column], column, rows, tensor, locate)
        values = _dense(columns[column], column, rows, pad_value)
        if values.ndim > 2:  # a transform's [B, ...] output: its values in C order
            values = values.reshape(n, -1)
        width = 1 if values.ndim == 1 else values.shape[1]
        known = _size(tensor.spec.shape)
        tokens = _takes_tokens(tensor.spec)
        if variable and tokens and known is not None and width < known:
            # Variable-length token ids or strings feeding a fixed-length input: pad up to the
            # model's length, as keras.utils.pad_sequences(maxlen=...) would. Float features of
            # another width stay an error (padding them would be silently wrong).
            values = np.concatenate([values, np.full((n, known - width), pad_value, dtype=values.dtype)], axis=1)
            width = known
    else:
        column = ", ".join(tensor.columns)
        values = np.stack([_dense(columns[c], c, rows, pad_value) for c in tensor.columns], axis=1)
        width = int(np.prod(values.shape[1:], dtype=np.int64))
    shape = _target_shape(tensor.spec, width, column, tensor.key, "model input")
    if values.dtype.kind in "OSU":  # strings/bytes go to the model as tf.string
        return values.reshape((n,) + shape).astype(object)
    return values.reshape((n,) + shape).astype(_float_or_given(tensor.spec.dtype, float_dtype))


def _label_array(columns: dict[str, np.ndarray], tensor: _Tensor, rows: np.ndarray, float_dtype: str,
                 pad_value=0) -> np.ndarray:
    n = len(rows)
    if len(tensor.columns) > 1:
        stacked = [_dense(columns[c], c, rows, 0) for c in tensor.columns]
        return np.stack(stacked, axis=1).astype(float_dtype)
    column = tensor.columns[0]
    values = _dense(columns[column], column, rows, 0 if isinstance(pad_value, str) else pad_value)
    dtype = np.int64 if np.issubdtype(values.dtype, np.integer) else np.dtype(float_dtype)
    if values.ndim >= 2:
        # Labels may legitimately differ from the output's shape (the loss decides); reshape
        # only when the sizes agree, so rank>1 outputs get labels of their own shape.
        size = _size(tensor.spec.shape)
        if size == int(np.prod(values.shape[1:], dtype=np.int64)) and len(tensor.spec.shape) > 1:
            values = values.reshape((n,) + tuple(int(d) for d in tensor.spec.shape))
    return values.astype(dtype)


def _check_transformed(columns: dict[str, np.ndarray], layout: _Layout, transform: Transform) -> None:
    """The transform returned every column the job names, labels and weights as numbers."""
    for tensor in layout.inputs + layout.labels:
        for column in tensor.columns:
            if column not in columns:
                raise InputError(f"{transform.name} returned no column '{column}' (it returned: "
                                 f"{_column_list(list(columns)) or 'none'}): return it, or fix {tensor.key}")
    named = [(c, t.key) for t in layout.labels for c in t.columns]
    if layout.weights is not None:
        named.append((layout.weights, "data.weights"))
        if layout.weights not in columns:
            raise InputError(f"{transform.name} returned no column '{layout.weights}' (it returned: "
                             f"{_column_list(list(columns)) or 'none'}): return it, or fix data.weights")
    for column, key in named:
        values = columns[column]
        first = next((v for v in values if v is not None), 0) if _ragged(values) else values
        if np.asarray(first).dtype.kind not in "biuf":
            raise InputError(f"{transform.name} returned column '{column}' of {np.asarray(first).dtype} values, "
                             f"not numbers: return numbers, or fix {key}")


def _to_batch(columns: dict[str, np.ndarray], layout: _Layout, rows: np.ndarray, float_dtype: str,
              pad_value=0, locate=None) -> Batch:
    weights = None
    if layout.weights is not None:
        weights = _dense(columns[layout.weights], layout.weights, rows, 0).astype(np.float64)
        if weights.ndim != 1:
            raise InputError(f"column '{layout.weights}' holds {weights.shape[1:]} values per row, not one: "
                             "fix data.weights")
    ids = None
    if layout.id is not None:
        if layout.id not in columns:
            raise InputError(f"the data has no column '{layout.id}' (columns: {_column_list(list(columns))}): fix "
                             "data.id")
        ids = np.asarray(columns[layout.id])
    return Batch(
        inputs=[_input_array(columns, t, rows, float_dtype, pad_value, locate) for t in layout.inputs],
        labels=[_label_array(columns, t, rows, float_dtype, pad_value) for t in layout.labels],
        weights=weights,
        rows=rows,
        ids=ids,
    )


class _HashedReads:
    """A Parquet input file whose reads, once ``digest`` is set, also feed it (offset, length,
    bytes): the column chunks a piece's rows are decoded from, hashed as they are read rather
    than read again. PyArrow reads whole (coalesced) column chunks, so the same file, row groups
    and columns give the same reads whatever the batch size."""

    def __init__(self, handle):
        self._handle = handle
        self.digest = None

    def read(self, nbytes=None):
        position = self._handle.tell()
        data = self._handle.read() if nbytes is None or nbytes < 0 else self._handle.read(nbytes)
        if self.digest is not None:
            self.digest.update(position.to_bytes(8, "little") + len(data).to_bytes(8, "little"))
            self.digest.update(data)
        return data

    def seek(self, offset, whence=0):
        return self._handle.seek(offset, whence)

    def tell(self):
        return self._handle.tell()

    def size(self):
        return self._handle.size()

    @property
    def closed(self):
        return self._handle.closed

    def readable(self):
        return True

    def seekable(self):
        return True

    def close(self):
        pass  # the caller's ``with`` closes the handle


def _piece_batches(fs: pafs.FileSystem, piece: Piece, columns: list[str] | None, chunk: int,
                   layout: _Layout, checked: list[bool], digest=None) -> Iterator[pa.RecordBatch]:
    """Record batches of rows ``[piece.start, piece.stop)``, reading only the row groups needed.
    ``columns``: None reads every column. ``digest`` (a ``hashlib`` object): fed the bytes of
    the row groups read (not the footer, which the data fingerprint covers)."""
    with fs.open_input_file(piece.file) as handle:
        source = handle if digest is None else _HashedReads(handle)
        # Pages written with a CRC (write_page_checksum) are checked: a damaged page then fails,
        # naming the file, instead of decoding to other values. Files without CRCs cost nothing.
        parquet = pq.ParquetFile(source, page_checksum_verification=True)
        if digest is not None:
            source.digest = digest
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
                yield pa.RecordBatch.from_arrays(part.columns, names=record.schema.names)
            position = end
            if position >= piece.stop:
                return


def first_rows(plan: DataPlan, data_spec, signature: ModelSignature, count: int, dtype: str = "float32",
               check_rows: bool = True) -> Batch:
    """The dataset's first ``count`` rows as one batch (``validate`` runs the model on them).

    With a ``data.transform`` and ``check_rows``, also checks that it maps each of these rows
    on its own (``Transform.check_row_independent``): results must not depend on the sharding.
    """
    count = max(1, min(int(count), plan.rows))
    shard = _cut_shards(plan.files, plan.file_rows, count, 1)[0]
    return next(iter(read_shard(shard, data_spec, signature, plan.uri, count, dtype, check_rows=check_rows)))


def read_seconds(plan: DataPlan, data_spec, signature: ModelSignature, batch_size: int, dtype: str = "float32",
                 batches: int = 4) -> float:
    """Seconds to read one batch of ``batch_size`` rows as a worker streams a shard: the first
    ``batches`` batches are read, and the time after the first (which opens the file and reads
    its footer, once per shard) is divided by the rest; with one batch of data, that one.
    Cost: reading ``batches x batch_size`` rows (the plan's estimate of reading)."""
    count = max(1, min(int(batches) * batch_size, plan.rows))
    shard = _cut_shards(plan.files, plan.file_rows, count, 1)[0]
    start = time.perf_counter()
    stamps = [time.perf_counter() - start for _ in read_shard(shard, data_spec, signature, plan.uri, batch_size, dtype)]
    if len(stamps) < 2:
        return stamps[0] if stamps else 0.0
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


# Errors of Parquet decoding (not of the network): the file's bytes are wrong, and reading it
# again cannot help.
_DAMAGED = ("corrupt", "deserializ", "invalid", "unexpected end", "not a parquet", "magic", "out of bounds",
            "checksum")


def _read_piece(fs: pafs.FileSystem, piece: Piece, columns: list[str] | None, chunk: int, layout: _Layout,
                checked: list[bool], digest=None) -> Iterator[pa.RecordBatch]:
    """``_piece_batches``, with read errors naming the file: a damaged file (or any error on a
    local disk) is an input error, never retried; other errors (a network) stay retryable."""
    try:
        yield from _piece_batches(fs, piece, columns, chunk, layout, checked, digest)
    except (pa.ArrowException, OSError) as err:
        text = _one_line(err)
        if isinstance(fs, pafs.LocalFileSystem) or any(word in text.lower() for word in _DAMAGED):
            raise InputError(f"cannot read rows {piece.start}-{piece.stop - 1} of {piece.file}: {text}: the file is "
                             "damaged; rewrite it or remove it from data.path") from None
        raise OSError(f"reading {piece.file}: {text}") from err


def _tfrecord_path(uri: str, file: str) -> str:
    """The name TensorFlow opens: a local path as it is, else the URI's scheme and the path."""
    return f"{uri.split('://', 1)[0]}://{file}" if is_uri(uri) else file


def _read_columns(data_spec, layout: _Layout) -> list[str] | None:
    # Without a transform only the named columns are read; a transform may read any.
    return None if getattr(data_spec, "transform", None) is not None else layout.columns


def _piece_chunks(fs, uri: str, piece: Piece, data_spec, columns, batch_size: int, layout: _Layout,
                  checked: list[bool], digest=None, parse: bool = True) -> Iterator:
    """The piece's rows as Arrow record batches (TFRecord: parsed by ``data.schema``; with
    ``parse`` False, nothing is yielded and the records are only read, for ``digest``)."""
    if getattr(data_spec, "format", "parquet") == "tfrecord":
        # Planning, reducing and reading results never need TensorFlow, only the workers
        # reading TFRecord data do: a lazy import.
        from pipeline.storage.tf_examples import read_records

        for parsed in read_records(_tfrecord_path(uri, piece.file), piece.start, piece.stop, data_spec.schema,
                                   columns, batch_size, digest=digest, parse=parse):
            yield tfrecord.record_batch(parsed, data_spec.schema)
        return
    for record in _read_piece(fs, piece, columns, batch_size, layout, checked, digest):
        if parse:
            yield record


def shard_digests(shard: Shard, data_spec, signature: ModelSignature, uri: str, batch_size: int) -> list[str]:
    """sha256 (hex) of the bytes each of ``shard``'s pieces is read from: Parquet, its row
    groups' column chunks (the columns the job reads); TFRecord, its serialized records. The
    same as ``read_shard(..., digests=...)`` collects while computing, without decoding the
    rows for the model. Cost: one read of the shard's bytes."""
    layout = _layout(data_spec, signature)
    columns = _read_columns(data_spec, layout)
    fs, _ = resolve_filesystem(uri)
    checked = [True]  # the schema was checked when the shard was computed
    found = []
    for piece in shard.pieces:
        digest = hashlib.sha256()
        for _ in _piece_chunks(fs, uri, piece, data_spec, columns, batch_size, layout, checked, digest, parse=False):
            pass
        found.append(digest.hexdigest())
    return found


def read_shard(shard: Shard, data_spec, signature: ModelSignature, uri: str, batch_size: int,
               dtype: str = "float32", check_rows: bool = False, digests: list | None = None) -> Iterator[Batch]:
    """Stream a shard as batches of exactly ``batch_size`` rows (the last may be shorter).

    A batch may span pieces and files. Memory: about one batch plus one decoded chunk.
    ``data.transform`` is applied to each batch's columns (all the data's columns) before
    features, labels and weights are taken from them; ``check_rows`` also checks that it maps
    each row on its own (``Transform.check_row_independent``, for ``validate``). ``digests``: a
    list that receives each piece's ``shard_digests`` value as it is read (a resumed run checks
    a staged shard's input against them).
    """
    if batch_size < 1:
        raise InputError(f"batch size must be positive, got {batch_size}: fix data.batch_size")
    layout = _layout(data_spec, signature)
    transform = Transform.load(getattr(data_spec, "transform", None))
    columns = _read_columns(data_spec, layout)
    pad_value = getattr(data_spec, "pad_value", 0)
    records = getattr(data_spec, "format", "parquet") == "tfrecord"
    fs, _ = resolve_filesystem(uri)
    # The schema was checked at planning (TFRecord: it is the job's); a transform's output is
    # checked batch by batch instead.
    checked = [records or transform is not None]
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    emitted = 0

    def emit(table: pa.Table) -> Batch:
        nonlocal emitted
        rows = np.arange(shard.first_row + emitted, shard.first_row + emitted + table.num_rows, dtype=np.int64)
        emitted += table.num_rows
        arrays = {name: _values(table.column(name).combine_chunks(), name, rows, nulls=transform is not None)
                  for name in table.column_names}
        if transform is not None:
            if check_rows:
                transform.check_row_independent(arrays, rows)
            arrays = transform(arrays, rows)
            _check_transformed(arrays, layout, transform)
        return _to_batch(arrays, layout, rows, dtype, pad_value, shard.locate)

    for piece in shard.pieces:
        digest = hashlib.sha256() if digests is not None else None
        for record in _piece_chunks(fs, uri, piece, data_spec, columns, batch_size, layout, checked, digest):
            pending.append(record)
            pending_rows += record.num_rows
            while pending_rows >= batch_size:
                table = pa.Table.from_batches(pending)
                yield emit(table.slice(0, batch_size))
                rest = table.slice(batch_size)
                pending = rest.to_batches()
                pending_rows = rest.num_rows
        if digest is not None:
            digests.append(digest.hexdigest())
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
