"""A resumed pass (``pipeline.cluster.resume``): a staged shard whose input looks changed is
computed again and named, without asking a worker. (Shards the workers check byte by byte are
resumed end to end in tests/system/test_reliability.py.)"""

from __future__ import annotations

import io
from types import SimpleNamespace

from pipeline.cluster.resume import unchanged
from pipeline.storage.staging import StagedShard


def test_a_stale_staged_shard_is_computed_again_and_named():
    shards = [SimpleNamespace(index=0, first_row=0, rows=10), SimpleNamespace(index=1, first_row=10, rows=5)]
    staged = {1: StagedShard(partial=None, digests=[], stale="data/part-1.parquet was modified")}
    log = io.StringIO()
    checked = []
    assert unchanged(staged, shards, [], log, 0.1, lambda: checked.append(1)) == {}
    assert log.getvalue() == ("shard 1 (rows 10-14): staged, but data/part-1.parquet was modified; computing it "
                              "again\n")
    assert not checked  # nothing was asked of a worker, so nothing was waited for
