"""Reading TFRecord files of serialized ``tf.train.Example`` with TensorFlow's own readers.

The workers' side of ``data.format: tfrecord``: ``tf.data.TFRecordDataset`` reads a file's
record range (checking every record's CRC; GZIP when the name ends in ``.gz``) and
``tf.io.parse_example`` decodes each chunk of records by ``data.schema``. The chunks come out
as numpy arrays, which ``pipeline.storage.tfrecord.record_batch`` turns into Arrow columns, so
batching, the transform and the columns-to-model rules are those of Parquet data.
TensorFlow and numpy only.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import tensorflow as tf

from pipeline.errors import InputError
from pipeline.storage.tfrecord import compressed

_DTYPES = {"float32": tf.float32, "int64": tf.int64, "string": tf.string}

# TensorFlow errors that mean the file's bytes (or the schema) are wrong: reading again cannot
# help. Others (a network file system) stay retryable.
_DAMAGED = (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.NotFoundError,
            tf.errors.OutOfRangeError)


def features(schema: dict) -> dict:
    """``data.schema`` as ``tf.io.parse_example`` takes it: ``FixedLenFeature(shape, dtype,
    default)`` for a fixed shape, ``RaggedFeature(dtype)`` for ``shape: [null]``."""
    out = {}
    for name, entry in schema.items():
        dtype = _DTYPES[entry["dtype"]]
        shape = entry["shape"]
        if shape and shape[0] is None:
            out[name] = tf.io.RaggedFeature(dtype, row_splits_dtype=tf.int64)
        else:
            out[name] = tf.io.FixedLenFeature(shape, dtype, default_value=entry.get("default"))
    return out


def read_records(path: str, start: int, stop: int, schema: dict, columns: Sequence[str] | None,
                 chunk: int, digest=None, parse: bool = True) -> Iterator[dict]:
    """Records ``[start, stop)`` of one file, decoded in chunks of at most ``chunk`` rows.

    Each chunk is ``{feature: values}``: ``[n, *shape]`` arrays for fixed shapes (``object``
    arrays of ``bytes`` for strings), ``(flat values, row splits)`` for variable-length
    features. ``columns``: the features to decode (None: every feature of ``schema``). A record
    that does not match the schema, or a damaged file, is an ``InputError`` naming the file and
    the record (its index in the file, from 0). ``digest`` (a ``hashlib`` object) is fed each
    record's length and serialized bytes as read; with ``parse`` False the records are only
    read (for ``digest``) and nothing is yielded.
    """
    names = list(schema) if columns is None else list(columns)
    spec = features({name: schema[name] for name in names})
    dataset = tf.data.TFRecordDataset(path, compression_type="GZIP" if compressed(path) else "")
    dataset = dataset.skip(start).take(stop - start).batch(chunk)
    position = start
    iterator = iter(dataset)
    while True:
        try:
            serialized = next(iterator)
        except StopIteration:
            return
        except _DAMAGED as err:
            raise InputError(f"cannot read record {position} or later of {path}: {_message(err)}: the file is "
                             "damaged; rewrite it or remove it from data.path") from None
        except tf.errors.OpError as err:
            raise OSError(f"reading {path}: {_message(err)}") from err
        if digest is not None:
            for record in serialized.numpy():
                digest.update(len(record).to_bytes(8, "little"))
                digest.update(record)
        if parse:
            parsed = _parse(serialized, spec, path, position)
            yield {name: _numpy(parsed[name]) for name in names}
        position += int(serialized.shape[0])


def _parse(serialized, spec: dict, path: str, position: int) -> dict:
    try:
        return tf.io.parse_example(serialized, spec)
    except tf.errors.InvalidArgumentError as err:
        first = position
        for i in range(int(serialized.shape[0])):
            try:
                tf.io.parse_example(serialized[i:i + 1], spec)
            except tf.errors.InvalidArgumentError as one:
                first, err = position + i, one
                break
        raise InputError(f"record {first} of {path} does not match data.schema: {_message(err)}: fix data.schema "
                         "(or give the feature a default)") from None


def _numpy(tensor):
    if isinstance(tensor, tf.RaggedTensor):
        return tensor.flat_values.numpy(), tensor.row_splits.numpy()
    return tensor.numpy()


def _message(err: BaseException) -> str:
    text = " ".join(str(getattr(err, "message", err)).split())
    return text[:300] + ("..." if len(text) > 300 else "")
