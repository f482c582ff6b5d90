"""Planning and streaming over real Parquet files: every row exactly once, in order."""

from __future__ import annotations

import math
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.storage.dataset import check_schema, plan_data, read_shard, resolve_filesystem
from pipeline.errors import InputError
from pipeline.signature import ModelSignature, TensorSpec

# Uneven files, one of them empty, written with several row groups each.
FILE_SIZES = {"part-0.parquet": 23, "part-1.parquet": 0, "sub/part-2.parquet": 40, "sub/part-3.parq": 7,
              "z-part-4.parquet": 31}
TOTAL = sum(FILE_SIZES.values())


def rows_table(first: int, count: int) -> pa.Table:
    ids = np.arange(first, first + count, dtype=np.int64)
    pixels = (ids[:, None] * 100 + np.arange(64)[None, :]).astype(np.float32)
    return pa.table({
        "id": ids,
        "pixels": pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), 64),
        "a": ids.astype(np.float64) + 0.5,
        "b": -ids.astype(np.float32),
        "label": ids % 10,
        "target": pa.array([[float(i), float(i) + 1, float(i) + 2] for i in ids], pa.list_(pa.float32())),
        "weight": 1.0 + ids / 1000.0,
    })


def write_dataset(root, sizes=FILE_SIZES) -> dict[str, pa.Table]:
    tables = {}
    first = 0
    for name, count in sizes.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        table = rows_table(first, count)
        pq.write_table(table, path, row_group_size=6)
        tables[name] = table
        first += count
    return tables


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "data"
    write_dataset(root)
    # Beside the data, as Spark leaves them: never read.
    (root / "_SUCCESS").write_text("")
    (root / ".part-0.parquet.crc").write_text("x")
    (root / "notes.txt").write_text("not data")
    (root / "_temporary").mkdir()
    pq.write_table(rows_table(999, 3), root / "_temporary" / "part-9.parquet")
    return root


def spec(path, features="pixels", labels="label", weights=None, batch_size=5, limit=None):
    return SimpleNamespace(path=str(path), features=features, labels=labels, weights=weights,
                           batch_size=batch_size, limit=limit)


def signature(inputs=(("pixels", (8, 8, 1), "float32"),), outputs=(("out", (10,), "float32"),)):
    return ModelSignature(inputs=tuple(TensorSpec(*i) for i in inputs),
                          outputs=tuple(TensorSpec(*o) for o in outputs))


def read_all(plan, data_spec, sig, batch_size, dtype="float32"):
    batches = []
    for shard in plan.shards:
        batches.extend(read_shard(shard, data_spec, sig, plan.uri, batch_size, dtype))
    return batches


def expected_ids(limit=None):
    return np.arange(TOTAL if limit is None else min(limit, TOTAL))


# ----------------------------------------------------------------------------- planning


def global_rows(plan):
    """Global row ids covered by each shard's pieces, in piece order."""
    starts = dict(zip(plan.files, np.concatenate([[0], np.cumsum(plan.file_rows)[:-1]])))
    return [np.concatenate([np.arange(starts[p.file] + p.start, starts[p.file] + p.stop) for p in s.pieces])
            for s in plan.shards]


@pytest.mark.parametrize("shards", [1, 3, 7, 5000])
def test_shards_cover_every_row_once_in_order_and_balanced(dataset, shards):
    plan = plan_data(spec(dataset), shards=shards)
    assert plan.rows == TOTAL
    assert len(plan.shards) == min(shards, TOTAL)
    assert plan.file_rows == (23, 0, 40, 7, 31)
    assert [s.index for s in plan.shards] == list(range(len(plan.shards)))
    sizes = [s.rows for s in plan.shards]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == TOTAL
    covered = global_rows(plan)
    np.testing.assert_array_equal(np.concatenate(covered), np.arange(TOTAL))
    for shard, rows in zip(plan.shards, covered):
        assert rows[0] == shard.first_row and len(rows) == shard.rows
        assert all(p.stop > p.start for p in shard.pieces)


def test_listing_is_sorted_and_skips_hidden_and_other_files(dataset):
    plan = plan_data(spec(dataset))
    assert [f[len(str(dataset)) + 1:] for f in plan.files] == sorted(FILE_SIZES)
    assert plan.uri == str(dataset)


def test_plan_is_deterministic(dataset):
    assert plan_data(spec(dataset), shards=7) == plan_data(spec(dataset), shards=7)


@pytest.mark.parametrize("limit", [1, 30, 63, TOTAL, TOTAL + 50])
def test_limit_takes_first_rows_in_listing_order(dataset, limit):
    plan = plan_data(spec(dataset, limit=limit), shards=4)
    assert plan.rows == min(limit, TOTAL)
    np.testing.assert_array_equal(np.concatenate(global_rows(plan)), expected_ids(limit))


@pytest.mark.parametrize("workers, batch_size, expected", [
    (1, 5, 4), (2, 5, 8), (3, 256, 1), (2, 40, math.ceil(TOTAL / 40)), (0, 5, 1)])
def test_auto_shard_count(dataset, workers, batch_size, expected):
    plan = plan_data(spec(dataset, batch_size=batch_size), shards="auto", workers=workers)
    assert len(plan.shards) == expected


def test_fingerprint_changes_only_when_data_changes(dataset, tmp_path):
    before = plan_data(spec(dataset)).fingerprint
    assert plan_data(spec(dataset)).fingerprint == before
    # Same files elsewhere: the fingerprint uses paths relative to the data root.
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    assert plan_data(spec(copy)).fingerprint == before
    # One value changed in one file.
    changed = rows_table(63, 7).to_pydict()
    changed["a"][3] = 1e9
    pq.write_table(pa.table(changed, schema=rows_table(63, 7).schema), dataset / "sub" / "part-3.parq",
                   row_group_size=6)
    assert plan_data(spec(dataset)).fingerprint != before


def test_fingerprint_changes_when_a_file_is_renamed(dataset):
    before = plan_data(spec(dataset)).fingerprint
    (dataset / "z-part-4.parquet").rename(dataset / "z-part-5.parquet")
    assert plan_data(spec(dataset)).fingerprint != before


def test_single_file_glob_and_file_uri(dataset):
    single = plan_data(spec(dataset / "sub" / "part-2.parquet"))
    assert single.files == (str(dataset / "sub" / "part-2.parquet"),) and single.rows == 40
    globbed = plan_data(spec(f"{dataset}/sub/*.parq*"))
    assert [f.rsplit("/", 1)[1] for f in globbed.files] == ["part-2.parquet", "part-3.parq"]
    assert globbed.rows == 47
    top = plan_data(spec(f"{dataset}/*.parquet"))  # `*` stays inside one folder
    assert top.rows == 23 + 31
    deep = plan_data(spec(f"{dataset}/**/part-*.parquet"))
    assert deep.rows == 23 + 40
    uri = plan_data(spec(f"file://{dataset}"), shards=3)
    assert uri.files == plan_data(spec(dataset)).files and uri.uri == f"file://{dataset}"
    batches = read_all(uri, spec(f"file://{dataset}"), signature(), 16)
    np.testing.assert_array_equal(np.concatenate([b.rows for b in batches]), np.arange(TOTAL))


def test_resolve_filesystem_keeps_glob_out_of_uri(tmp_path):
    fs, path = resolve_filesystem(f"file://{tmp_path}/a[0-9]*.parquet")
    assert path == f"{tmp_path}/a[0-9]*.parquet"
    with pytest.raises(InputError, match="cannot open"):
        resolve_filesystem("nosuchscheme://bucket/x")


def test_empty_and_missing_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no Parquet files under .*empty: check data.path"):
        plan_data(spec(tmp_path / "empty"))
    with pytest.raises(InputError, match="no Parquet files"):
        plan_data(spec(f"{tmp_path}/empty/*.parquet"))
    with pytest.raises(InputError, match="does not exist"):
        plan_data(spec(tmp_path / "missing"))
    write_dataset(tmp_path / "zero", {"a.parquet": 0, "b.parquet": 0})
    with pytest.raises(InputError, match=r"dataset .*zero is empty"):
        plan_data(spec(tmp_path / "zero"))
    write_dataset(tmp_path / "some", {"a.parquet": 4})
    with pytest.raises(InputError, match="is empty"):
        plan_data(spec(tmp_path / "some", limit=0))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="not a Parquet file"):
        plan_data(spec(tmp_path / "bad"))


def test_files_must_share_one_schema(tmp_path):
    root = tmp_path / "data"
    write_dataset(root, {"a.parquet": 3, "b.parquet": 3})
    pq.write_table(rows_table(6, 2).drop_columns(["weight"]), root / "c.parquet")
    with pytest.raises(InputError, match=r"file c.parquet has a different schema from a.parquet .*weight"):
        plan_data(spec(root))


def test_bad_shards_and_batch_size(dataset):
    with pytest.raises(InputError, match="shards"):
        plan_data(spec(dataset), shards="many")
    with pytest.raises(InputError, match="batch_size"):
        plan_data(spec(dataset, batch_size=0))


# ------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("shards", [1, 7])
@pytest.mark.parametrize("batch_size", [1, 5, 256])
def test_batches_reproduce_the_dataset(dataset, shards, batch_size):
    data_spec = spec(dataset, weights="weight")
    plan = plan_data(data_spec, shards=shards)
    batches = []
    for shard in plan.shards:
        got = list(read_shard(shard, data_spec, signature(), plan.uri, batch_size))
        assert all(len(b) == batch_size for b in got[:-1]) and 0 < len(got[-1]) <= batch_size
        assert sum(len(b) for b in got) == shard.rows
        batches.extend(got)
    ids = expected_ids()
    rows = np.concatenate([b.rows for b in batches])
    assert rows.dtype == np.int64
    np.testing.assert_array_equal(rows, ids)
    pixels = np.concatenate([b.inputs[0] for b in batches])
    assert pixels.shape == (TOTAL, 8, 8, 1) and pixels.dtype == np.float32
    # The values follow the global row index: a wrong or repeated row would show.
    np.testing.assert_array_equal(pixels[:, 0, 0, 0], ids * 100)
    labels = np.concatenate([b.labels[0] for b in batches])
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, ids % 10)
    weights = np.concatenate([b.weights for b in batches])
    assert weights.dtype == np.float64
    np.testing.assert_allclose(weights, 1.0 + ids / 1000.0)


def test_limit_while_reading(dataset):
    data_spec = spec(dataset, limit=50)
    plan = plan_data(data_spec, shards=3)
    batches = read_all(plan, data_spec, signature(), 8)
    np.testing.assert_array_equal(np.concatenate([b.rows for b in batches]), np.arange(50))
    np.testing.assert_array_equal(np.concatenate([b.inputs[0] for b in batches])[:, 0, 0, 0], np.arange(50) * 100)
    assert batches[0].weights is None


def test_fixed_size_list_is_reshaped_in_c_order(dataset):
    data_spec = spec(dataset)
    plan = plan_data(data_spec, shards=1)
    batch = next(read_shard(plan.shards[0], data_spec, signature(), plan.uri, 4))
    flat = np.arange(64, dtype=np.float32)
    for i in range(4):
        np.testing.assert_array_equal(batch.inputs[0][i], (i * 100 + flat).reshape(8, 8, 1))
    sig = signature(inputs=(("pixels", (64,), "float32"),))
    batch = next(read_shard(plan.shards[0], data_spec, sig, plan.uri, 4, dtype="float64"))
    assert batch.inputs[0].shape == (4, 64) and batch.inputs[0].dtype == np.float64


def test_wrong_width_names_both_sizes(dataset):
    data_spec = spec(dataset)
    plan = plan_data(data_spec)
    sig = signature(inputs=(("pixels", (7, 7, 1), "float32"),))
    pattern = r"column 'pixels' holds 64 values per row but model input 'pixels' has shape \(7, 7, 1\) = 49"
    with pytest.raises(InputError, match=pattern):
        check_schema(plan.schema, data_spec, sig)
    with pytest.raises(InputError, match=pattern):
        next(read_shard(plan.shards[0], data_spec, sig, plan.uri, 4))
    # A variable-size list column is checked while reading.
    target = spec(dataset, features="target")
    with pytest.raises(InputError, match=r"column 'target' has 3 values at row 0 \(.*part-0.parquet, its row 0\) "
                                         r"but model input 't' of shape \(4,\) takes 4 per row"):
        next(read_shard(plan.shards[0], target, signature(inputs=(("t", (4,), "float32"),)), plan.uri, 4))
    scalar = spec(dataset, features="a")
    with pytest.raises(InputError, match=r"column 'a' holds 1 values per row but .* = 64 values"):
        check_schema(plan.schema, scalar, signature())


def test_scalar_feature_shapes(dataset):
    plan = plan_data(spec(dataset))
    shard = plan.shards[0]
    one = next(read_shard(shard, spec(dataset, features="a"), signature(inputs=(("x", (1,), "float32"),)),
                          plan.uri, 3))
    assert one.inputs[0].shape == (3, 1)
    bare = next(read_shard(shard, spec(dataset, features="a"), signature(inputs=(("x", (), "float32"),)),
                           plan.uri, 3))
    assert bare.inputs[0].shape == (3,)


def test_list_of_scalar_columns_is_stacked(dataset):
    data_spec = spec(dataset, features=("a", "b"))
    plan = plan_data(data_spec, shards=2)
    sig = signature(inputs=(("x", (2,), "float32"),))
    check_schema(plan.schema, data_spec, sig)
    batches = read_all(plan, data_spec, sig, 10)
    x = np.concatenate([b.inputs[0] for b in batches])
    ids = expected_ids()
    np.testing.assert_array_equal(x, np.stack([ids + 0.5, -ids], axis=1).astype(np.float32))
    with pytest.raises(InputError, match="= 3 values"):
        check_schema(plan.schema, data_spec, signature(inputs=(("x", (3,), "float32"),)))
    with pytest.raises(InputError, match="list column"):
        check_schema(plan.schema, spec(dataset, features=("a", "pixels")), sig)


def test_dict_features_feed_inputs_in_model_order(dataset):
    sig = signature(inputs=(("image", (8, 8, 1), "float32"), ("token", (), "int32")))
    data_spec = spec(dataset, features={"token": "label", "image": "pixels"})
    plan = plan_data(data_spec, shards=2)
    check_schema(plan.schema, data_spec, sig)
    batches = read_all(plan, data_spec, sig, 16)
    image = np.concatenate([b.inputs[0] for b in batches])
    token = np.concatenate([b.inputs[1] for b in batches])
    assert image.shape == (TOTAL, 8, 8, 1) and token.dtype == np.int32
    np.testing.assert_array_equal(token, expected_ids() % 10)
    with pytest.raises(InputError, match=r"missing token.*image, token"):
        check_schema(plan.schema, spec(dataset, features={"image": "pixels"}), sig)
    with pytest.raises(InputError, match=r"unknown tokens"):
        check_schema(plan.schema, spec(dataset, features={"image": "pixels", "token": "a", "tokens": "b"}), sig)
    with pytest.raises(InputError, match="2 inputs"):
        check_schema(plan.schema, spec(dataset, features="pixels"), sig)


def test_multi_output_labels(dataset):
    sig = signature(outputs=(("digit", (10,), "float32"), ("box", (3,), "float32"), ("score", (1,), "float32")))
    data_spec = spec(dataset, labels=["label", "target", "a"])
    plan = plan_data(data_spec, shards=3)
    check_schema(plan.schema, data_spec, sig)
    batches = read_all(plan, data_spec, sig, 7, dtype="float64")
    digit, box, score = (np.concatenate([b.labels[i] for b in batches]) for i in range(3))
    ids = expected_ids()
    assert digit.dtype == np.int64 and digit.shape == (TOTAL,)
    assert box.dtype == np.float64 and box.shape == (TOTAL, 3)
    np.testing.assert_array_equal(box, np.stack([ids, ids + 1, ids + 2], axis=1))
    np.testing.assert_array_equal(score, ids + 0.5)
    with pytest.raises(InputError, match="3 outputs"):
        check_schema(plan.schema, spec(dataset, labels="label"), sig)


def test_single_output_labels(dataset):
    plan = plan_data(spec(dataset), shards=1)
    shard = plan.shards[0]
    listed = next(read_shard(shard, spec(dataset, labels="target"), signature(), plan.uri, 4))
    assert listed.labels[0].shape == (4, 3) and listed.labels[0].dtype == np.float32
    stacked = next(read_shard(shard, spec(dataset, labels=("a", "label")), signature(), plan.uri, 4))
    assert stacked.labels[0].shape == (4, 2) and stacked.labels[0].dtype == np.float32
    np.testing.assert_array_equal(stacked.labels[0][:, 1], [0, 1, 2, 3])


def test_missing_or_bad_columns(dataset):
    plan = plan_data(spec(dataset))
    with pytest.raises(InputError, match=r"column 'pixel' not in data \(columns: id, pixels, a, .*\): fix data.features"):
        check_schema(plan.schema, spec(dataset, features="pixel"), signature())
    with pytest.raises(InputError, match=r"column 'lbl' not in data .*: fix data.labels"):
        next(read_shard(plan.shards[0], spec(dataset, labels="lbl"), signature(), plan.uri, 4))
    with pytest.raises(InputError, match=r"fix data.weights"):
        check_schema(plan.schema, spec(dataset, weights="w"), signature())
    with pytest.raises(InputError, match="list column"):
        check_schema(plan.schema, spec(dataset, weights="target"), signature())


def test_nulls_name_the_column_and_global_row(tmp_path):
    root = tmp_path / "data"
    write_dataset(root, {"a.parquet": 6})
    table = rows_table(6, 6).to_pydict()
    table["a"][4] = None
    table["pixels"][2] = None
    schema = rows_table(6, 6).schema
    pq.write_table(pa.table(table, schema=schema), root / "b.parquet")
    plan = plan_data(spec(root), shards=1)
    sig = signature(inputs=(("x", (1,), "float32"),))
    with pytest.raises(InputError, match=r"column 'a' has a null value at row 10"):
        read_all(plan, spec(root, features="a"), sig, 4)
    with pytest.raises(InputError, match=r"column 'pixels' has a null value at row 8"):
        read_all(plan, spec(root), signature(), 4)
    values = rows_table(12, 2).to_pydict()
    values["target"][1] = [1.0, None, 3.0]
    pq.write_table(pa.table(values, schema=schema), root / "c.parquet")
    plan = plan_data(spec(root), shards=1)
    with pytest.raises(InputError, match=r"column 'target' has a null value at row 13"):
        read_all(plan, spec(root, features="id", labels="target"), signature(inputs=(("x", (1,), "float32"),)), 4)


def test_a_file_that_shrinks_after_the_plan_is_an_input_error(dataset):
    """A file replaced mid-run by a valid one with fewer rows (found by a hostile trial): an
    input error naming the file, never an IndexError retried as a compute failure."""
    plan = plan_data(spec(dataset), shards=2)
    pq.write_table(rows_table(23, 20), dataset / "sub" / "part-2.parquet")  # 40 rows planned
    with pytest.raises(InputError, match=r"part-2.parquet has 20 rows, but had at least \d+ when the run was "
                                         r"planned: the data changed during the run"):
        read_all(plan, spec(dataset), signature(), 5)


# ------------------------------------------------------------------------ content digests


def edit_in_place(path, old: bytes, new: bytes) -> None:
    """Replaces the one occurrence of ``old`` by ``new`` (same length): a data page changes,
    the file's size, footer and modification time stay as they were."""
    raw = path.read_bytes()
    assert raw.count(old) == 1 and len(old) == len(new)
    before = path.stat()
    path.write_bytes(raw.replace(old, new))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_shard_digests_cover_the_data_pages_a_shard_reads(tmp_path):
    """What the data fingerprint (footers, sizes) cannot see, a shard's digest does: the bytes
    it read. The digest a worker collects while computing equals the one a resumed run
    recomputes, whatever the batch size, and changes only for the shards that read the edit."""
    from pipeline.storage.dataset import shard_digests

    root = tmp_path / "data"
    root.mkdir()
    first = 0
    for name, count in (("part-0.parquet", 23), ("part-1.parquet", 40)):
        # No statistics, dictionary or compression: a value is edited without touching the footer.
        pq.write_table(rows_table(first, count), root / name, row_group_size=6, write_statistics=False,
                       use_dictionary=False, compression="NONE")
        first += count
    data_spec, sig = spec(root), signature()
    plan = plan_data(data_spec, 4)
    assert len(plan.file_stamps) == 2 and plan.file_stamps[0][0] == (root / "part-0.parquet").stat().st_size
    collected = []
    for shard in plan.shards:
        digests = []
        for _ in read_shard(shard, data_spec, sig, plan.uri, 5, digests=digests):
            pass
        assert len(digests) == len(shard.pieces)
        assert digests == shard_digests(shard, data_spec, sig, plan.uri, 7)
        collected.append(digests)
    # Row 10's pixel 3 (1003.0), in shard 0 only.
    edit_in_place(root / "part-0.parquet", np.float32(1003).tobytes(), np.float32(-7).tobytes())
    again = plan_data(data_spec, 4)
    assert again.fingerprint == plan.fingerprint and again.file_stamps == plan.file_stamps
    after = [shard_digests(shard, data_spec, sig, plan.uri, 5) for shard in plan.shards]
    assert after[0] != collected[0] and after[1:] == collected[1:]
