"""The failure policy of a pass over the data: pure functions, tested without Ray.

Ray Train v2 keeps its policy apart from the controller the same way: the pool reports what
happened to a shard, the policy says what to do.
"""

from __future__ import annotations

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
