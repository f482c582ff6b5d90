"""The failure policy of a pass over the data: pure functions, tested without Ray.

Ray Train v2 keeps its policy apart from the controller the same way: the pool reports what
happened to a shard, the policy says what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

# A shard that fails (an exception, or a worker lost after Ray's own restarts) is moved to
# another worker this many times before the run stops (exit status 1).
SHARD_RETRIES = 2

# What can happen to a shard on a worker.
INPUT = "input"  # an InputError: bad data, found on the worker
DETERMINISTIC = "deterministic"  # a ComputeError the worker knows will recur
ERROR = "error"  # any other exception raised while computing
LOST = "lost"  # the worker process (or its node) is gone, after Ray's own restarts


def decide(kind: str, attempts: int, workers: int) -> str:
    """``"raise"`` (stop the run) or ``"retry"`` (move the shard to another worker) for a shard
    that has now failed ``attempts`` times, the last time for reason ``kind``; ``workers`` is
    how many workers are left.

    >>> decide(ERROR, 1, 2), decide(ERROR, 3, 2), decide(INPUT, 1, 2), decide(LOST, 1, 0)
    ('retry', 'raise', 'raise', 'raise')
    """
    if kind in (INPUT, DETERMINISTIC):
        return "raise"  # trying again cannot help
    if attempts > SHARD_RETRIES or workers < 1:
        return "raise"
    return "retry"


def late(held_seconds: float, durations: list[float], liveness_seconds: float) -> bool:
    """Whether a shard held this long should be computed again on a free worker: more than
    twice the slowest shard of the pass so far, plus the liveness interval (a worker whose node
    was lost waits for a restart that Ray may never place).

    >>> late(25.0, [5.0, 6.0], 10.0), late(21.0, [5.0, 6.0], 10.0), late(99.0, [], 10.0)
    (True, False, False)
    """
    return bool(durations) and held_seconds > 2 * max(durations) + liveness_seconds


class Decision(str, Enum):
    """What the pool does next with a shard (Ray Train v2's ``FailureDecision``, for shards)."""

    RETRY = "retry"  # queue it again, for another worker
    BACKUP = "backup"  # compute it again on a free worker; the first copy to finish counts
    GIVE_UP = "raise"  # stop the run (exit status 1; 2 for an input error)
    DONE = "done"  # add its result: the first to arrive
    NOOP = "no-op"  # nothing: a copy finished it or computes it, or it is not late yet


# What the pool saw of a shard beside the failure kinds: a result arrived, or it is still held.
RESULT = "result"
HELD = "held"


@dataclass
class ShardStatus:
    """One shard in one pass, as the pool knows it: its failed attempts (those counted against
    ``SHARD_RETRIES``), the copies being computed, whether it is finished and backed up."""

    index: int
    attempts: int = 0
    running: int = 0
    finished: bool = False
    backed_up: bool = False


def make_decision(status: ShardStatus, event: str, workers: int, held_seconds: float = 0.0,
                  durations: list[float] = (), liveness_seconds: float = 0.0) -> Decision:
    """The pool's next step for the shard of ``status`` after ``event``: ``RESULT`` (a copy
    returned), ``HELD`` (a copy held ``held_seconds`` so far, against the pass's ``durations``),
    or a failure kind (``INPUT``, ``DETERMINISTIC``, ``ERROR``, ``LOST``) of a copy no longer
    running; ``workers``: how many are left. Pure: the caller updates ``status``.

    >>> make_decision(ShardStatus(3), ERROR, 2), make_decision(ShardStatus(3, attempts=2), LOST, 2)
    (<Decision.RETRY: 'retry'>, <Decision.GIVE_UP: 'raise'>)
    >>> make_decision(ShardStatus(3, running=1), ERROR, 2), make_decision(ShardStatus(3, finished=True), RESULT, 2)
    (<Decision.NOOP: 'no-op'>, <Decision.NOOP: 'no-op'>)
    """
    if event == RESULT:
        return Decision.NOOP if status.finished else Decision.DONE  # never add a shard twice
    if event == HELD:
        if status.backed_up or status.finished or not late(held_seconds, list(durations), liveness_seconds):
            return Decision.NOOP
        return Decision.BACKUP
    if event in (INPUT, DETERMINISTIC):
        return Decision(decide(event, 1, workers))
    if status.finished or status.running:
        return Decision.NOOP  # its backup copy has finished it, or is computing it
    return Decision(decide(event, status.attempts + 1, workers))
