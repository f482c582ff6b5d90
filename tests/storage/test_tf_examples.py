"""TFRecord files of ``tf.train.Example`` read with TensorFlow's own readers: a real file written
with ``tf.io``, read back by record range and in chunks, fixed and variable-length features, GZIP,
the digest of the records as read, and a record or a file that is wrong as an ``InputError``."""

from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest
import tensorflow as tf

from pipeline.errors import InputError
from pipeline.storage.tf_examples import features, read_records

SCHEMA = {
    "x": {"dtype": "float32", "shape": [2], "default": None},
    "label": {"dtype": "int64", "shape": [], "default": None},
    "name": {"dtype": "string", "shape": [], "default": None},
    "tokens": {"dtype": "int64", "shape": [None], "default": None},
}
N = 7


def example(i: int, drop: str | None = None) -> bytes:
    feature = {
        "x": tf.train.Feature(float_list=tf.train.FloatList(value=[i, -0.5 * i])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[i % 3])),
        "name": tf.train.Feature(bytes_list=tf.train.BytesList(value=[f"row{i}".encode()])),
        "tokens": tf.train.Feature(int64_list=tf.train.Int64List(value=list(range(i % 4)))),
    }
    feature.pop(drop, None)
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write(path, records: list[bytes]) -> str:
    options = tf.io.TFRecordOptions(compression_type="GZIP" if str(path).endswith(".gz") else "")
    with tf.io.TFRecordWriter(str(path), options) as writer:
        for record in records:
            writer.write(record)
    return str(path)


def test_features_turn_the_schema_into_parse_example_specs():
    spec = features({**SCHEMA, "w": {"dtype": "float32", "shape": [], "default": 1.0}})
    assert spec["x"] == tf.io.FixedLenFeature([2], tf.float32, default_value=None)
    assert spec["w"] == tf.io.FixedLenFeature([], tf.float32, default_value=1.0)
    assert spec["name"].dtype == tf.string
    assert isinstance(spec["tokens"], tf.io.RaggedFeature) and spec["tokens"].dtype == tf.int64
    assert spec["tokens"].row_splits_dtype == tf.int64


@pytest.mark.parametrize("name", ["part-0.tfrecord", "part-0.tfrecord.gz"])
def test_a_record_range_reads_back_in_chunks(tmp_path, name):
    path = write(tmp_path / name, [example(i) for i in range(N)])
    if name.endswith(".gz"):
        with gzip.open(path) as handle:  # really GZIP on disk
            assert handle.read(1)
    chunks = list(read_records(path, 2, 7, SCHEMA, None, chunk=2))
    assert [len(c["label"]) for c in chunks] == [2, 2, 1]
    x = np.concatenate([c["x"] for c in chunks])
    np.testing.assert_array_equal(x, np.array([[i, -0.5 * i] for i in range(2, 7)], np.float32))
    assert x.dtype == np.float32 and chunks[0]["label"].dtype == np.int64
    assert [v for c in chunks for v in c["label"]] == [i % 3 for i in range(2, 7)]
    assert [v for c in chunks for v in c["name"]] == [f"row{i}".encode() for i in range(2, 7)]
    flat, splits = chunks[0]["tokens"]  # rows 2 and 3: [0, 1] and [0, 1, 2]
    assert flat.tolist() == [0, 1, 0, 1, 2] and splits.tolist() == [0, 2, 5]


def test_only_the_columns_asked_for_are_decoded(tmp_path):
    path = write(tmp_path / "a.tfrecord", [example(i) for i in range(N)])
    chunks = list(read_records(path, 0, N, SCHEMA, ["label"], chunk=100))
    assert len(chunks) == 1 and list(chunks[0]) == ["label"] and chunks[0]["label"].tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert list(read_records(path, 7, 7, SCHEMA, None, chunk=3)) == []


def test_the_digest_is_fed_each_records_length_and_bytes_as_read(tmp_path):
    records = [example(i) for i in range(N)]
    path = write(tmp_path / "a.tfrecord", records)
    want = hashlib.sha256()
    for record in records[1:5]:
        want.update(len(record).to_bytes(8, "little") + record)
    digest = hashlib.sha256()
    assert list(read_records(path, 1, 5, SCHEMA, None, chunk=3, digest=digest, parse=False)) == []
    assert digest.hexdigest() == want.hexdigest()
    parsed = hashlib.sha256()
    list(read_records(path, 1, 5, SCHEMA, None, chunk=3, digest=parsed))
    assert parsed.hexdigest() == want.hexdigest()


def test_a_default_fills_a_missing_feature_and_without_one_the_record_is_named(tmp_path):
    path = write(tmp_path / "a.tfrecord", [example(i, drop="label" if i == 4 else None) for i in range(N)])
    with_default = {**SCHEMA, "label": {"dtype": "int64", "shape": [], "default": -1}}
    labels = [v for c in read_records(path, 0, N, with_default, None, chunk=3) for v in c["label"]]
    assert labels == [0, 1, 2, 0, -1, 2, 0]
    with pytest.raises(InputError) as info:
        list(read_records(path, 0, N, SCHEMA, None, chunk=3))
    message = str(info.value)
    assert message.startswith(f"record 4 of {path} does not match data.schema: ")
    assert message.endswith(": fix data.schema (or give the feature a default)") and "\n" not in message


def test_a_wrong_shape_is_named_by_its_record(tmp_path):
    path = write(tmp_path / "a.tfrecord", [example(i) for i in range(N)])
    three = {**SCHEMA, "x": {"dtype": "float32", "shape": [3], "default": None}}
    with pytest.raises(InputError, match=r"^record 0 of .* does not match data.schema"):
        list(read_records(path, 0, N, three, None, chunk=4))


def test_a_damaged_file_is_an_input_error_naming_the_file(tmp_path):
    records = [example(i) for i in range(N)]
    path = write(tmp_path / "a.tfrecord", records)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # a flipped byte: a record's CRC no longer matches
    # Each record on disk: length (8 bytes), its CRC (4), the bytes, their CRC (4).
    ends = np.cumsum([8 + 4 + len(r) + 4 for r in records])
    damaged = int(np.searchsorted(ends, len(data) // 2, side="right"))
    (tmp_path / "bad.tfrecord").write_bytes(bytes(data))
    with pytest.raises(InputError) as info:
        list(read_records(str(tmp_path / "bad.tfrecord"), 0, N, SCHEMA, None, chunk=2))
    assert f"of {tmp_path / 'bad.tfrecord'}: " in str(info.value)
    # The chunk of 2 records that holds the damaged one is where reading stopped.
    assert str(info.value).startswith(f"cannot read record {damaged - damaged % 2} or later of ")
    assert str(info.value).endswith("the file is damaged; rewrite it or remove it from data.path")
    (tmp_path / "cut.tfrecord").write_bytes(bytes(data[:len(data) // 3]))
    with pytest.raises(InputError, match="^cannot read record "):
        list(read_records(str(tmp_path / "cut.tfrecord"), 0, N, SCHEMA, None, chunk=100))
