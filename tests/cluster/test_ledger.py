"""One pass's bookkeeping (``pipeline.cluster.ledger``) without Ray: each shard's copies, the
queue, the idle workers."""

from __future__ import annotations

from types import SimpleNamespace

from pipeline.cluster.ledger import PassLedger, error_line, rows_of


def test_pass_ledger_tracks_each_shards_copies_without_ray():
    shards = [SimpleNamespace(index=i, first_row=10 * i, rows=10) for i in range(3)]
    launched = []
    ledger = PassLedger(shards, lambda worker, shard: launched.append((worker, shard.index)) or len(launched))
    ledger.finish(1)  # resumed from staging
    ledger.finish(1)
    ledger.queue_unfinished()
    assert [s.index for s in ledger.pending] == [0, 2]
    ledger.start(["a", "b", "c"])
    assert launched == [("a", 0), ("b", 2)] and ledger.idle == ["c"] and not ledger.pending
    ledger.submit(ledger.idle.pop(0), shards[0])  # a back-up copy of shard 0
    assert ledger.status[0].running == 2
    worker, shard, _ = ledger.take(1)
    assert (worker, shard.index, ledger.status[0].running) == ("a", 0, 1)
    assert ledger.finished == 1 and not ledger.complete and ledger.missing() == [0, 2]
    ledger.pending.appendleft(shards[2])
    ledger.idle.append("a")
    ledger.fill()
    assert launched[-1] == ("a", 2) and not ledger.idle
    assert rows_of(shards[2]) == "rows 20-29"
    assert error_line(RuntimeError("Traceback ...\n  line\nValueError: bad row\n")) == "ValueError: bad row"
