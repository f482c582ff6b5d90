"""The failure policy as pure functions (``pipeline.cluster.policy``), tested without Ray: what
happens to a shard after each outcome of one of its copies (Ray Train v2's ``make_decision``)."""

from __future__ import annotations

from pipeline.cluster import policy
from pipeline.cluster.policy import Decision, ShardStatus, make_decision


def test_shard_decisions_retry_back_up_give_up_and_add_each_shard_once():
    fresh = ShardStatus(4)
    assert make_decision(fresh, policy.RESULT, workers=2) is Decision.DONE
    assert make_decision(ShardStatus(4, finished=True), policy.RESULT, workers=2) is Decision.NOOP  # added once
    assert make_decision(fresh, policy.ERROR, workers=2) is Decision.RETRY
    assert make_decision(ShardStatus(4, attempts=policy.SHARD_RETRIES - 1), policy.LOST, 1) is Decision.RETRY
    assert make_decision(ShardStatus(4, attempts=policy.SHARD_RETRIES), policy.LOST, 1) is Decision.GIVE_UP
    assert make_decision(fresh, policy.ERROR, workers=0) is Decision.GIVE_UP  # no worker left to move it to
    # A failed copy of a shard whose other copy finished it, or still computes it: nothing to do.
    assert make_decision(ShardStatus(4, finished=True), policy.ERROR, 2) is Decision.NOOP
    assert make_decision(ShardStatus(4, running=1), policy.LOST, 2) is Decision.NOOP
    # Input errors and deterministic failures stop the run whatever the other copies do.
    assert make_decision(ShardStatus(4, running=1), policy.INPUT, 2) is Decision.GIVE_UP
    assert make_decision(fresh, policy.DETERMINISTIC, 2) is Decision.GIVE_UP
    # Back-ups: once per shard, only when late against the pass's slowest shard.
    assert make_decision(fresh, policy.HELD, 2, 31.0, [10.0, 5.0], 10.0) is Decision.BACKUP
    assert make_decision(fresh, policy.HELD, 2, 29.0, [10.0, 5.0], 10.0) is Decision.NOOP
    assert make_decision(fresh, policy.HELD, 2, 1e9, [], 10.0) is Decision.NOOP
    assert make_decision(ShardStatus(4, backed_up=True), policy.HELD, 2, 99.0, [1.0], 1.0) is Decision.NOOP
    assert make_decision(ShardStatus(4, finished=True), policy.HELD, 2, 99.0, [1.0], 1.0) is Decision.NOOP
    assert Decision.GIVE_UP == policy.decide(policy.INPUT, 1, 2)  # the enum speaks decide's words
