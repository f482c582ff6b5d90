"""A resumed pass: which of the shards staged by an interrupted run may be kept, their input
proven unchanged by the workers (they read the bytes again: I/O, no model). Ray only."""

from __future__ import annotations

import ray

from pipeline.cluster.ledger import error_line, rows_of


def unchanged(staged: dict, shards: list, workers: list, log, wait_seconds: float, check_live) -> dict:
    """``{index: Partial}`` of the ``staged`` shards (``PartialStore.load``) whose input is
    proven unchanged: each file's size and modification time as planned, and the bytes each
    piece reads equal to those the shard was computed from (``changed_piece`` on ``workers``,
    in turn). The others are named in ``log`` and computed again; a check that fails counts as
    a change. ``check_live()`` runs each ``wait_seconds`` without an answer."""
    shards = {s.index: s for s in shards}
    usable, checks = {}, {}
    for index, entry in sorted(staged.items()):
        if entry.stale is not None:
            _recompute(log, shards[index], entry.stale)
        else:
            actor = workers[len(checks) % len(workers)]
            checks[actor.changed_piece.remote(shards[index], entry.digests)] = index
    while checks:
        done, _ = ray.wait(list(checks), num_returns=1, timeout=wait_seconds)
        if not done:
            check_live()
            continue
        shard = shards[checks.pop(done[0])]
        try:
            piece = ray.get(done[0])
        except ray.exceptions.RayError as err:
            _recompute(log, shard, f"its input could not be read to check it ({error_line(err)})")
            continue
        if piece is None:
            usable[shard.index] = staged[shard.index].partial
        else:
            changed = shard.pieces[min(piece, len(shard.pieces) - 1)]
            _recompute(log, shard, f"the bytes of {changed.file} rows {changed.start}-{changed.stop - 1} differ "
                                   "from those it was computed from")
    return usable


def _recompute(log, shard, why: str) -> None:
    log.write(f"shard {shard.index} ({rows_of(shard)}): staged, but {why}; computing it again\n")
