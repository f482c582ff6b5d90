"""Atomic publication: a run directory appears complete, with its manifest, or not at all."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputError
from pipeline.storage.publish import RunPublisher, read_manifest, run_dir

DATE = "2025-01-31"


def small_table(n=3):
    return pa.table({"rank": pa.array(range(1, n + 1), pa.int32()), "eigenvalue": [float(i) for i in range(n)]})


def everything_under(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, files in os.walk(path) for f in files)


def test_run_dir_layout():
    assert run_dir("s3://bucket/results/", "digits", DATE, "r1") == f"s3://bucket/results/digits/date={DATE}/run=r1"
    assert run_dir("/out", "digits", DATE, "r1") == f"/out/digits/date={DATE}/run=r1"


def test_files_appear_only_on_publish_with_manifest_last(tmp_path):
    publisher = RunPublisher(str(tmp_path / "out"), "digits", "r1", DATE)
    final = tmp_path / "out" / "digits" / f"date={DATE}" / "run=r1"
    assert publisher.final_dir == str(final)
    publisher.write_table("eigenvalues.parquet", small_table(), {"run_id": "r1", "rows": 3})
    publisher.write_table("trace.parquet", small_table(1), {"run_id": "r1"})
    assert not final.exists()
    # Staged beside the final directory, hidden from Hive-style readers.
    staged = [p.name for p in final.parent.iterdir()]
    assert len(staged) == 1 and staged[0].startswith(".staging-run=r1-")

    assert publisher.publish({"run_id": "r1", "status": "complete"}) == str(final)
    assert everything_under(final) == ["eigenvalues.parquet", "manifest.json", "trace.parquet"]
    assert [p.name for p in final.parent.iterdir()] == ["run=r1"]
    manifest = read_manifest(str(final))
    assert manifest == {"run_id": "r1", "status": "complete", "files": ["eigenvalues.parquet", "trace.parquet"]}
    # Every file the manifest lists was complete before the manifest existed.
    assert all(os.path.getmtime(final / f) <= os.path.getmtime(final / "manifest.json") for f in manifest["files"])
    table = pq.read_table(final / "eigenvalues.parquet")
    assert table.equals(small_table())
    assert json.loads(table.schema.metadata[b"hessian_pipeline"]) == {"rows": 3, "run_id": "r1"}
    with pytest.raises(RuntimeError):
        publisher.write_table("late.parquet", small_table(), {})


def test_already_published_run_is_an_input_error(tmp_path):
    first = RunPublisher(str(tmp_path), "digits", "r1", DATE)
    first.write_table("trace.parquet", small_table(1), {})
    first.publish({})
    with pytest.raises(InputError, match=rf"run r1 already published at {first.final_dir}: choose another --run-id"):
        RunPublisher(str(tmp_path), "digits", "r1", DATE)
    RunPublisher(str(tmp_path), "digits", "r2", DATE).abort()


def test_second_publisher_racing_for_the_same_run_loses(tmp_path):
    a = RunPublisher(str(tmp_path), "digits", "r1", DATE)
    b = RunPublisher(str(tmp_path), "digits", "r1", DATE)
    a.publish({"who": "a"})
    b.write_table("trace.parquet", small_table(1), {})
    with pytest.raises(InputError, match="already published"):
        b.publish({"who": "b"})
    b.abort()
    assert read_manifest(a.final_dir)["who"] == "a"
    assert [p.name for p in (tmp_path / "digits" / f"date={DATE}").iterdir()] == ["run=r1"]


@pytest.mark.parametrize("run_id", ["../x", "..", ".", "a/b", "", "r 1"])
def test_run_id_must_be_a_plain_name(tmp_path, run_id):
    with pytest.raises(InputError, match="not a plain name.*--run-id"):
        RunPublisher(str(tmp_path), "digits", run_id, DATE)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_an_input_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a regular file")
    with pytest.raises(InputError, match=r"cannot write to output .*file/out: .*Not a directory.*: choose a writable --output"):
        RunPublisher(str(blocker / "out"), "digits", "r1", DATE)


def test_abort_leaves_nothing(tmp_path):
    publisher = RunPublisher(str(tmp_path), "digits", "r1", DATE)
    publisher.write_table("trace.parquet", small_table(1), {})
    publisher.abort()
    assert everything_under(tmp_path) == []
    with RunPublisher(str(tmp_path), "digits", "r2", DATE) as publisher:
        publisher.write_table("trace.parquet", small_table(1), {})
        with pytest.raises(ZeroDivisionError):
            with publisher:
                1 / 0
    assert everything_under(tmp_path) == []


def test_stale_final_dir_without_manifest_is_replaced(tmp_path):
    final = tmp_path / "digits" / f"date={DATE}" / "run=r1"
    final.mkdir(parents=True)
    (final / "diagonals.parquet").write_text("half written by a crashed run")
    publisher = RunPublisher(str(tmp_path), "digits", "r1", DATE)
    publisher.write_table("trace.parquet", small_table(1), {})
    publisher.publish({"run_id": "r1"})
    assert everything_under(final) == ["manifest.json", "trace.parquet"]


def test_file_uri_output(tmp_path):
    publisher = RunPublisher(f"file://{tmp_path}/out/", "digits", "r1", DATE)
    assert publisher.final_dir == f"file://{tmp_path}/out/digits/date={DATE}/run=r1"
    publisher.write_table("trace.parquet", small_table(1), {"uri": True})
    assert read_manifest(publisher.publish({"n": 1}))["files"] == ["trace.parquet"]
    assert (tmp_path / "out" / "digits" / f"date={DATE}" / "run=r1" / "trace.parquet").exists()


def test_read_manifest_of_incomplete_run(tmp_path):
    with pytest.raises(InputError, match=r"is not a complete run \(no manifest.json\)"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_manifest(str(tmp_path))


def test_copy_publication_used_for_object_stores(tmp_path):
    # Object stores have no rename: exercise that path on the local filesystem.
    final = tmp_path / "digits" / f"date={DATE}" / "run=r1"
    final.mkdir(parents=True)
    (final / "stale.parquet").write_text("left by a crash")
    publisher = RunPublisher(str(tmp_path), "digits", "r1", DATE)
    publisher._local = False
    publisher.write_table("trace.parquet", small_table(1), {"k": 1})
    publisher.write_table("eigenvalues.parquet", small_table(), {"k": 1})
    assert publisher.publish({"run_id": "r1"}) == str(final)
    assert everything_under(tmp_path) == [f"digits/date={DATE}/run=r1/{f}"
                                          for f in ("eigenvalues.parquet", "manifest.json", "trace.parquet")]
    assert read_manifest(str(final))["files"] == ["eigenvalues.parquet", "trace.parquet"]
    assert pq.read_table(final / "trace.parquet").equals(small_table(1))
