"""One pass's bookkeeping: each shard's status (``policy.ShardStatus``), the queue of shards
to compute, the copies being computed and the idle workers. No Ray: a worker is any object and
a copy any key that ``launch`` returns (``WorkerPool`` hands it an actor call's object ref).
"""

from __future__ import annotations

import time
from collections import deque

from pipeline.cluster.policy import ShardStatus


class PassLedger:
    """The shards of one pass and where each one is.

    ``launch(worker, shard) -> key`` starts a copy of a shard on a worker; ``submit`` records
    it under that key (``inflight``: key -> (worker, shard, when submitted)) and ``take``
    forgets it when it returns.
    """

    def __init__(self, shards, launch):
        self.shards = list(shards)
        self.status = {shard.index: ShardStatus(shard.index) for shard in self.shards}
        self.pending: deque = deque()
        self.inflight: dict = {}
        self.idle: list = []
        self.durations: list[float] = []  # seconds of each shard of this pass, as the driver saw them
        self.saved = 0  # shards staged by this pass (``kill-driver`` counts them)
        self.finished = 0  # shards finished (``finish``)
        # For the lines that say what a long wait waits for.
        self.last_result = self.reported = time.monotonic()
        self._launch = launch

    @property
    def complete(self) -> bool:
        return self.finished == len(self.shards)

    def missing(self) -> list[int]:
        return sorted(index for index, status in self.status.items() if not status.finished)

    def finish(self, index: int) -> None:
        """Marks shard ``index`` finished (its result added, or taken from staging)."""
        if not self.status[index].finished:
            self.status[index].finished = True
            self.finished += 1

    def queue_unfinished(self) -> None:
        """Queues every shard not finished yet (by a resumed run), in the plan's order."""
        self.pending = deque(shard for shard in self.shards if not self.status[shard.index].finished)

    def start(self, workers) -> None:
        """Hands each worker a shard while some are queued; the others wait in ``idle``."""
        for worker in workers:
            if self.pending:
                self.submit(worker)
            else:
                self.idle.append(worker)

    def submit(self, worker, shard=None) -> None:
        """Starts ``shard`` (the next queued one when None) on ``worker``."""
        shard = shard or self.pending.popleft()
        self.inflight[self._launch(worker, shard)] = (worker, shard, time.monotonic())
        self.status[shard.index].running += 1

    def take(self, key) -> tuple:
        """``(worker, shard, when submitted)`` of the copy ``key``, no longer running."""
        worker, shard, submitted = self.inflight.pop(key)
        self.status[shard.index].running -= 1
        return worker, shard, submitted

    def fill(self) -> None:
        """Hands queued shards to idle workers."""
        while self.pending and self.idle:
            self.submit(self.idle.pop(0))


def rows_of(shard) -> str:
    """How a shard is named in the log: its first and last rows."""
    return f"rows {shard.first_row}-{shard.first_row + shard.rows - 1}"


def error_line(err) -> str:
    """The last line of a worker's exception: its type and message, not Ray's traceback."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
