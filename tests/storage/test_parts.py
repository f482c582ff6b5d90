"""Parts the workers write as they go: atomic (no temporary left, a second write of the same
shard replaces the first whole), listed by name, published into the run by a rename (local) and
moved back when the publisher aborts, so that a resumed run still has them."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import parts
from pipeline.storage.publish import PROVENANCE_KEY, RunPublisher
from pipeline.storage.tables import per_example_table


def test_a_part_is_written_whole_with_its_provenance_and_listed(tmp_path):
    folder = str(tmp_path / "staged" / "per_example")
    table = per_example_table({"row": [0, 1], "file": ["a.parquet", "a.parquet"], "file_row": [0, 1],
                               "loss": [0.5, 0.25]})
    parts.write_part(folder, 3, table, {"run_id": "r"})
    parts.write_part(folder, 3, table, {"run_id": "r"})  # a shard computed twice: the same part
    parts.write_part(folder, 1, table.slice(0, 1), {"run_id": "r"})
    assert sorted(os.listdir(folder)) == ["part-00001.parquet", "part-00003.parquet"]
    assert [os.path.basename(p) for p in parts.list_parts(folder)] == ["part-00001.parquet", "part-00003.parquet"]
    read = pq.read_table(os.path.join(folder, "part-00003.parquet"))
    assert read.column("loss").to_pylist() == [0.5, 0.25]
    assert json.loads(read.schema.metadata[PROVENANCE_KEY])["run_id"] == "r"
    assert parts.list_parts(str(tmp_path / "none")) == []


def test_published_parts_are_listed_in_the_manifest_and_an_abort_puts_them_back(tmp_path):
    staged = tmp_path / "out" / "job" / ".partials" / "run=r" / "per_example"
    for shard in range(2):
        parts.write_part(str(staged), shard, pa.table({"row": [shard]}), {})
    sources = parts.list_parts(str(staged))
    aborted = RunPublisher(str(tmp_path / "out"), "job", "r", "2026-12-08")
    aborted.add_parts("per_example", sources)
    assert os.listdir(staged) == []
    aborted.abort()
    assert sorted(os.listdir(staged)) == ["part-00000.parquet", "part-00001.parquet"]
    publisher = RunPublisher(str(tmp_path / "out"), "job", "r", "2026-12-08")
    publisher.add_parts("per_example", sources)
    publisher.write_parts_table("both.parquet", [], {})  # no parts: no table
    run_dir = publisher.publish({"run_id": "r"})
    manifest = json.loads(open(os.path.join(run_dir, "manifest.json")).read())
    assert manifest["files"] == ["per_example/part-00000.parquet", "per_example/part-00001.parquet"]
    assert pq.read_table(os.path.join(run_dir, "per_example")).column("row").to_pylist() == [0, 1]
