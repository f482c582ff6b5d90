"""TFRecord files seen from the planner: which files, how many records, which columns.

A TFRecord file is a sequence of framed records: ``uint64 length``, ``uint32`` masked CRC of
the length, ``length`` bytes of data, ``uint32`` masked CRC of the data (all little-endian;
TensorFlow's ``tensorflow/core/lib/io/record_writer.cc``). Counting a file's records needs
only the 12-byte headers: on an uncompressed local file the planner seeks from header to
header and never reads the data; a GZIP file (name ending in ``.gz``) has to be decompressed
once, which the plan says. Workers read the records with TensorFlow
(``pipeline.storage.tf_examples``), which also checks the CRCs.

Rows are numbered in file order (sorted paths), then record order, as for Parquet.
PyArrow and numpy only: no TensorFlow, no Ray.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.errors import InputError

SUFFIXES = (".tfrecord", ".tfrecords", ".tfrec", ".tfrecord.gz", ".tfrecords.gz", ".tfrec.gz")
_HEADER = 12  # uint64 length + uint32 CRC of the length
_FOOTER = 4  # uint32 CRC of the data
_CHUNK = 1 << 20


def compressed(path: str) -> bool:
    """GZIP when the name ends in ``.gz`` (contract 5.4), as ``tf.data.TFRecordDataset`` reads it."""
    return path.endswith(".gz")


@dataclass(frozen=True)
class Count:
    """A file's record count and a digest of its record lengths (the file's fingerprint)."""

    path: str
    size: int
    records: int
    digest: bytes


def count_records(fs: pafs.FileSystem, path: str, shown: str) -> Count:
    """Counts the records of one TFRecord file from their headers.

    Cost: one 12-byte read per record on an uncompressed local file; a sequential read (and,
    for GZIP, a decompression) of the whole file otherwise. Raises ``InputError`` for a
    truncated or unreadable file.
    """
    digest = hashlib.sha256()
    try:
        size = fs.get_file_info(path).size
        if not compressed(path) and isinstance(fs, pafs.LocalFileSystem):
            records = _count_seeking(fs, path, shown, size, digest)
        else:
            records = _count_streaming(fs, path, shown, digest)
    except InputError:
        raise
    except (pa.ArrowException, OSError, EOFError) as err:
        raise InputError(f"cannot read TFRecord file {shown}: {_one_line(err)}: fix or remove the file") from err
    return Count(path, int(size or 0), records, digest.digest())


def _count_seeking(fs, path: str, shown: str, size: int, digest) -> int:
    records = 0
    position = 0
    with fs.open_input_file(path) as handle:
        while position < size:
            handle.seek(position)
            header = handle.read(_HEADER)
            if len(header) < _HEADER:
                raise _truncated(shown, records)
            length = struct.unpack("<Q", header[:8])[0]
            digest.update(header[:8])
            position += _HEADER + length + _FOOTER
            if position > size:
                raise _truncated(shown, records)
            records += 1
    return records


def _count_streaming(fs, path: str, shown: str, digest) -> int:
    records = 0
    codec = "gzip" if compressed(path) else None
    with fs.open_input_stream(path, compression=codec, buffer_size=_CHUNK) as stream:
        while True:
            header = stream.read(_HEADER)
            if not header:
                return records
            if len(header) < _HEADER:
                raise _truncated(shown, records)
            length = struct.unpack("<Q", header[:8])[0]
            digest.update(header[:8])
            left = length + _FOOTER
            while left:
                got = len(stream.read(min(left, _CHUNK)))
                if not got:
                    raise _truncated(shown, records)
                left -= got
            records += 1


def _truncated(shown: str, records: int) -> InputError:
    return InputError(f"TFRecord file {shown} ends inside record {records} (truncated or not a TFRecord file): "
                      "rewrite it or remove it from data.path")


def arrow_schema(schema: dict) -> pa.Schema:
    """The columns a batch of parsed records has, as Arrow types, from ``data.schema``.

    ``shape: []`` is a scalar column, a fixed shape a fixed-size list of its values in C order,
    ``shape: [null]`` a variable-length list; ``string`` features are binary (``bytes``).
    """
    fields = []
    for name, entry in schema.items():
        kind = {"float32": pa.float32(), "int64": pa.int64(), "string": pa.binary()}[entry["dtype"]]
        shape = entry["shape"]
        if not shape:
            fields.append(pa.field(name, kind, nullable=False))
        elif shape[0] is None:
            fields.append(pa.field(name, pa.list_(kind), nullable=False))
        else:
            size = 1
            for d in shape:
                size *= int(d)
            fields.append(pa.field(name, pa.list_(kind, size), nullable=False))
    return pa.schema(fields)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def record_batch(parsed: dict, schema: dict) -> pa.RecordBatch:
    """A chunk of parsed records (``pipeline.storage.tf_examples.read_records``) as the Arrow
    columns ``arrow_schema`` names, in ``parsed``'s order."""
    types = arrow_schema({name: schema[name] for name in parsed})
    return pa.RecordBatch.from_arrays([_arrow(values, types.field(name).type) for name, values in parsed.items()],
                                      names=list(parsed))


def _arrow(values, kind: pa.DataType) -> pa.Array:
    if isinstance(values, tuple):  # (flat values, row splits) of a variable-length feature
        flat, splits = values
        return pa.ListArray.from_arrays(pa.array(splits, pa.int64()).cast(pa.int32()), _plain(flat, kind.value_type))
    if pa.types.is_fixed_size_list(kind):
        return pa.FixedSizeListArray.from_arrays(_plain(values.reshape(-1), kind.value_type), kind.list_size)
    return _plain(values, kind)


def _plain(values, kind: pa.DataType) -> pa.Array:
    return pa.array(list(values) if values.dtype == object else values, type=kind)
