"""Data as TensorFlow teams keep it (contract 5.4): a batch transform, raw columns, TFRecord
files. Planning and streaming only (no Ray); tests/examples/test_images.py runs the jobs end to end."""

from __future__ import annotations

import gzip
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputError
from pipeline.examples.images import write_records
from pipeline.signature import ModelSignature, TensorSpec
from pipeline.storage.dataset import check_schema, first_rows, plan_data, read_shard
from pipeline.storage.tfrecord import arrow_schema

ROWS = 37


def table(first: int, count: int) -> pa.Table:
    ids = np.arange(first, first + count, dtype=np.int64)
    return pa.table({
        "id": ids,
        "a": ids.astype(np.float64) + 0.5,
        "b": -ids.astype(np.float32),
        "label": ids % 3,
        "target": pa.array([[float(i)] * (1 + i % 4) for i in ids], pa.list_(pa.float32())),
        "word": pa.array([f"w{i}".encode() for i in ids], pa.binary()),
    })


@pytest.fixture
def parquet(tmp_path):
    root = tmp_path / "parquet"
    root.mkdir()
    for index, (first, count) in enumerate([(0, 11), (11, 0), (11, 26)]):
        pq.write_table(table(first, count), root / f"part-{index}.parquet", row_group_size=4)
    return root


def spec(path, features="x", labels="label", transform=None, batch_size=5, data_format="parquet", schema=None,
         weights=None, pad_value=0):
    return SimpleNamespace(path=str(path), features=features, labels=labels, weights=weights, batch_size=batch_size,
                           limit=None, pad_value=pad_value, format=data_format, schema=schema, transform=transform)


def signature(width=2, dtype="float32"):
    return ModelSignature(inputs=(TensorSpec("x", (width,), dtype),), outputs=(TensorSpec("out", (3,), "float32"),))


def read_all(data_spec, sig, shards=1, batch_size=5, dtype="float64"):
    plan = plan_data(data_spec, shards)
    check_schema(plan.schema, data_spec, sig)
    return [b for shard in plan.shards for b in read_shard(shard, data_spec, sig, plan.uri, batch_size, dtype)]


def joined(batches):
    return (np.concatenate([b.inputs[0] for b in batches]), np.concatenate([b.labels[0] for b in batches]),
            np.concatenate([b.rows for b in batches]))


# ------------------------------------------------------------------------------ transform


@pytest.mark.parametrize("shards", [1, 3, 7])
def test_transform_builds_the_features_in_every_shard(parquet, shards):
    x, labels, rows = joined(read_all(spec(parquet, transform="transforms:pair"), signature(), shards))
    ids = np.arange(ROWS)
    np.testing.assert_array_equal(rows, ids)
    np.testing.assert_array_equal(x, np.stack([ids + 0.5, -2.0 * ids], axis=1))
    np.testing.assert_array_equal(labels, ids % 3)


def test_transform_sees_variable_length_rows_and_may_return_them(parquet):
    # target has 1-4 values per row; tail drops the first: 0-3 values, padded with pad_value.
    data = spec(parquet, features="tail", labels="size", transform="transforms:lengths", pad_value=-1)
    # Every batch of 8 holds a row of 3: float features are padded to the batch's longest row only,
    # for an input of variable length (a fixed-size float input takes rows of its size alone).
    batches = read_all(data, signature(width=None), shards=1, batch_size=8)
    x, sizes, rows = joined(batches)
    np.testing.assert_array_equal(sizes, 1 + rows % 4)
    for row, values in zip(rows, x):
        expected = [float(row)] * (row % 4)
        np.testing.assert_array_equal(values, expected + [-1.0] * (3 - len(expected)))


def test_transform_errors_name_the_function_and_the_first_failing_row(parquet):
    sig = signature()
    with pytest.raises(InputError, match=r"data.transform 'transforms:fails_on_7' failed on row 7: "
                                         r"ValueError: id 7 is cursed: fix the function or the data"):
        read_all(spec(parquet, transform="transforms:fails_on_7"), sig, batch_size=10)
    with pytest.raises(InputError, match=r"returned column 'id' with 4 rows for a batch of 5 rows"):
        read_all(spec(parquet, transform="transforms:drops_a_row"), sig)
    with pytest.raises(InputError, match=r"returned list, not a dict"):
        read_all(spec(parquet, transform="transforms:not_a_dict"), sig)
    with pytest.raises(InputError, match=r"returned no column 'pixels' \(it returned: id, a, b, label, target, "
                                         r"word, x\): return it, or fix data.features"):
        read_all(spec(parquet, features="pixels", transform="transforms:pair"), sig)
    with pytest.raises(InputError, match=r"returned column 'label' of <U\d+ values, not numbers"):
        read_all(spec(parquet, transform="transforms:text_label"), sig)
    with pytest.raises(InputError, match=r"'transforms:exits' failed on row 7: SystemExit: 3"):
        read_all(spec(parquet, transform="transforms:exits"), sig, batch_size=10)
    x, _, _ = joined(read_all(spec(parquet, transform="transforms:numbers_as_objects"), sig))
    assert x.dtype == np.float64 and x[1, 0] == 1.5
    with pytest.raises(InputError, match=r"cannot import module 'no_such_module'"):
        read_all(spec(parquet, transform="no_such_module:f"), sig)
    with pytest.raises(InputError, match=r"module 'transforms' has no 'missing'"):
        read_all(spec(parquet, transform="transforms:missing"), sig)


def test_validate_refuses_a_transform_that_depends_on_the_batch(parquet):
    data = spec(parquet, transform="transforms:batch_mean")
    plan = plan_data(data, 1)
    # Streaming cannot tell; the first rows, cut in two and transformed again, can.
    assert len(read_all(data, signature())) == 8
    with pytest.raises(InputError, match=r"gives row 0 a different 'x' when its batch holds other rows: results "
                                         r"would depend on the sharding and the batch size"):
        first_rows(plan, data, signature(), 8)
    good = spec(parquet, transform="transforms:pair")
    assert len(first_rows(plan_data(good, 1), good, signature(), 8)) == 8


def test_nulls_reach_the_transform_as_nan(tmp_path):
    root = tmp_path / "nulls"
    root.mkdir()
    pq.write_table(pa.table({"a": pa.array([1.0, None, 3.0]), "label": pa.array([0, 1, 2])}), root / "p.parquet")
    x, _, _ = joined(read_all(spec(root, transform="transforms:fill_nulls"), signature()))
    np.testing.assert_array_equal(x[:, 0], [1.0, -1.0, 3.0])
    with pytest.raises(InputError, match=r"column 'a' has a null value at row 1"):
        read_all(spec(root, features="a"), signature(width=1))


def test_binary_columns_go_to_the_model_as_bytes(parquet):
    sig = ModelSignature(inputs=(TensorSpec("word", (), "string"),), outputs=(TensorSpec("out", (3,), "float32"),))
    batches = read_all(spec(parquet, features="word"), sig, shards=2)
    words = np.concatenate([b.inputs[0] for b in batches])
    assert words.dtype == object and list(words[:3]) == [b"w0", b"w1", b"w2"]


# ------------------------------------------------------------------------------- TFRecord

SCHEMA = {"id": {"dtype": "int64", "shape": [], "default": None},
          "x": {"dtype": "float32", "shape": [2], "default": None},
          "label": {"dtype": "int64", "shape": [], "default": None},
          "target": {"dtype": "float32", "shape": [None], "default": None},
          "word": {"dtype": "string", "shape": [], "default": None}}


def write_tfrecords(folder, gzip_files=(), sizes=(11, 0, 26)):
    """The rows of ``table`` with x = (a, 2b), as TFRecord files ``part-<i>.tfrecord[.gz]``."""
    first = 0
    for index, count in enumerate(sizes):
        rows = table(first, count).to_pydict()
        columns = {"id": np.array(rows["id"], np.int64),
                   "x": np.stack([np.array(rows["a"]), 2 * np.array(rows["b"])], axis=1).reshape(count, 2),
                   "label": np.array(rows["label"], np.int64),
                   "target": [np.array(t, np.float32) for t in rows["target"]],
                   "word": rows["word"]}
        part = folder / f"part-{index}"
        write_records(str(part), columns, files=1, gzip=index in gzip_files)
        produced = next(part.iterdir())
        produced.rename(folder / (f"part-{index}" + "".join(produced.suffixes)))
        part.rmdir()
        first += count


@pytest.fixture
def records(tmp_path):
    root = tmp_path / "records"
    root.mkdir()
    write_tfrecords(root, gzip_files=(2,))
    (root / "notes.txt").write_text("not data")
    return root


def tf_spec(path, features="x", labels="label", schema=SCHEMA, **extra):
    return spec(path, features=features, labels=labels, data_format="tfrecord", schema=schema, **extra)


@pytest.mark.parametrize("shards", [1, 2, 7])
def test_tfrecord_rows_match_the_parquet_rows(parquet, records, shards):
    plan = plan_data(tf_spec(records), shards)
    assert plan.files[-1].endswith("part-2.tfrecord.gz") and plan.file_rows == (11, 0, 26)
    assert "37 records counted in 3 TFRecord file(s)" in plan.notes[0] and "1 GZIP file(s)" in plan.notes[0]
    x, labels, rows = joined(read_all(tf_spec(records), signature(), shards))
    px, plabels, prows = joined(read_all(spec(parquet, transform="transforms:pair"), signature(), shards))
    np.testing.assert_array_equal(rows, prows)
    np.testing.assert_array_equal(x, px)
    np.testing.assert_array_equal(labels, plabels)


def test_tfrecord_variable_length_and_string_features(records):
    # Token ids: padded to the batch's longest row, then up to the model's length.
    sig = ModelSignature(inputs=(TensorSpec("target", (4,), "int64"),), outputs=(TensorSpec("out", (3,), "float32"),))
    x, _, rows = joined(read_all(tf_spec(records, features="target", pad_value=-1), sig, shards=3, batch_size=6))
    for row, values in zip(rows, x):
        n = 1 + row % 4
        np.testing.assert_array_equal(values, [float(row)] * n + [-1.0] * (4 - n))
    words = ModelSignature(inputs=(TensorSpec("word", (), "string"),), outputs=(TensorSpec("out", (3,), "float32"),))
    batches = read_all(tf_spec(records, features="word"), words)
    assert list(np.concatenate([b.inputs[0] for b in batches])[:2]) == [b"w0", b"w1"]


def test_tfrecord_with_a_transform(records):
    data = tf_spec(records, transform="transforms:lengths", features="tail", labels="size",
                   schema={k: SCHEMA[k] for k in ("id", "target", "label")})
    _, sizes, rows = joined(read_all(data, signature(width=None), shards=2))
    np.testing.assert_array_equal(sizes, 1 + rows % 4)


def test_tfrecord_counting_and_fingerprint(records, tmp_path):
    plan = plan_data(tf_spec(records), 1)
    assert plan.schema == arrow_schema(SCHEMA)
    assert plan_data(tf_spec(records), 1).fingerprint == plan.fingerprint
    # The same records, all uncompressed: counted from the headers alone; another fingerprint.
    plain = tmp_path / "plain"
    plain.mkdir()
    write_tfrecords(plain)
    other = plan_data(tf_spec(plain), 1)
    assert other.file_rows == plan.file_rows and other.fingerprint != plan.fingerprint
    assert "GZIP" not in other.notes[0]
    # A file ending inside a record is found at planning.
    data = (plain / "part-2.tfrecord").read_bytes()
    (plain / "part-2.tfrecord").write_bytes(data[:-3])
    with pytest.raises(InputError, match=r"part-2.tfrecord ends inside record 25 \(truncated or not a TFRecord"):
        plan_data(tf_spec(plain), 1)
    (plain / "part-2.tfrecord").write_bytes(gzip.compress(data))  # GZIP bytes under a plain name
    with pytest.raises(InputError, match=r"part-2.tfrecord ends inside record"):
        plan_data(tf_spec(plain), 1)


def test_tfrecord_errors_name_the_file_and_record(records, tmp_path):
    # A schema the records do not match: the record is named.
    bad = dict(SCHEMA, x={"dtype": "float32", "shape": [3], "default": None})
    with pytest.raises(InputError, match=r"record 0 of .*part-0.tfrecord does not match data.schema: .*fix data.schema"):
        read_all(tf_spec(records, schema=bad), signature(width=3))
    # A feature the records lack is an error, unless the schema gives it a default.
    lacking = dict(SCHEMA, extra={"dtype": "int64", "shape": [], "default": None})
    with pytest.raises(InputError, match=r"record 0 of .* does not match data.schema"):
        read_all(tf_spec(records, labels="extra", schema=lacking), signature())
    lacking["extra"] = {"dtype": "int64", "shape": [], "default": 2}
    _, labels, _ = joined(read_all(tf_spec(records, labels="extra", schema=lacking), signature()))
    assert set(labels) == {2}
    # A column the schema does not have: found at planning, before any record is read.
    with pytest.raises(InputError, match=r"column 'pixels' not in data \(columns: id, x, label, target, word\)"):
        read_all(tf_spec(records, features="pixels"), signature())
    # A damaged record (a flipped byte fails its CRC): an input error naming the file.
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    write_tfrecords(damaged)
    path = damaged / "part-0.tfrecord"
    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"cannot read record 0 or later of .*part-0.tfrecord: .*the file is damaged"):
        read_all(tf_spec(damaged), signature())


def test_tfrecord_directory_without_records(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(__file__, empty / "x.py")
    with pytest.raises(InputError, match=r"no TFRecord files under .*: check data.path \(a directory gives its files "
                                         r"ending in .tfrecord"):
        plan_data(tf_spec(empty), 1)
    assert os.path.exists(empty / "x.py")


def test_tfrecord_shard_digests_cover_the_record_bytes(tmp_path, monkeypatch):
    """A record rewritten with another value of the same length (the same record headers, so
    the same data fingerprint) changes the digest of the shard that reads it, and only that one."""
    from pipeline.storage.dataset import read_shard, shard_digests

    plain = tmp_path / "plain"
    plain.mkdir()
    write_tfrecords(plain)
    data_spec = tf_spec(plain)
    plan = plan_data(data_spec, 3)
    before = []
    for shard in plan.shards:
        digests = []
        for _ in read_shard(shard, data_spec, signature(), plan.uri, 4, digests=digests):
            pass
        assert digests == shard_digests(shard, data_spec, signature(), plan.uri, 4)
        before.append(digests)
    original = table

    def edited(first, count):  # row 30's word, in the last shard
        written = original(first, count)
        words = [b"w99" if w == b"w30" else w for w in written.column("word").to_pylist()]
        return written.set_column(written.schema.get_field_index("word"), "word", pa.array(words, pa.binary()))

    size = (plain / "part-2.tfrecord").stat().st_size
    shutil.rmtree(plain)
    plain.mkdir()
    monkeypatch.setitem(globals(), "table", edited)
    write_tfrecords(plain)
    assert (plain / "part-2.tfrecord").stat().st_size == size
    assert plan_data(data_spec, 3).fingerprint == plan.fingerprint
    after = [shard_digests(shard, data_spec, signature(), plan.uri, 4) for shard in plan.shards]
    assert after[-1] != before[-1] and after[:-1] == before[:-1]
