"""cluster.yaml passes the checks that `ray up` runs before it touches a cloud, so it cannot rot."""

from __future__ import annotations

import copy
import os

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
import paths

CLUSTER = os.path.join(paths.REPO, "cluster.yaml")


@pytest.fixture()
def config():
    with open(CLUSTER) as handle:
        return yaml.safe_load(handle)


def test_cluster_yaml_passes_ray_up_validation(config):
    # ray.autoscaler._private.commands._bootstrap_config: prepare_config, then validate_config
    # (the JSON schema ray-schema.json and the node-type checks); the rest asks the cloud.
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_cpu_head_and_gpu_workers_that_scale_from_zero(config):
    prepared = prepare_config(copy.deepcopy(config))
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    gpu = [t for name, t in types.items() if name != prepared["head_node_type"]]
    assert gpu and all(t["resources"]["GPU"] >= 1 and t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu)
    assert prepared["idle_timeout_minutes"] > 0
    # Workers install the project with its GPU extra; the head at least the project.
    assert any("[gpu]" in command and "pip install" in command for command in prepared["worker_setup_commands"])
    assert any("pip install" in command for command in prepared["head_setup_commands"])
    assert "." in prepared["file_mounts"].values()


def test_the_validation_catches_mistakes(config):
    # The test above could fail: Ray's checks do reject a broken file.
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["resources"] = {"GPU": 0.5}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))
    misspelt = copy.deepcopy(config)
    misspelt["idle_timeout_minute"] = 5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(misspelt))
    wrong_head = copy.deepcopy(config)
    wrong_head["head_node_type"] = "nope"
    with pytest.raises((ValueError, KeyError)):
        validate_config(prepare_config(wrong_head))


def test_nightly_job_and_kuberay_manifest():
    from pipeline.cluster.submit import prepare_submission

    root = os.path.dirname(CLUSTER)
    # The nightly job is submittable as it stands: its inputs travel with jobs/.
    submission = prepare_submission(os.path.join(root, "jobs", "nightly.yaml"), output="s3://bucket/hessian")
    assert submission.submission_id.startswith("hessian-digits-mlp-nightly-")
    assert "--set model=example/model.keras" in submission.entrypoint
    with open(os.path.join(root, "docs", "kuberay-rayjob.yaml")) as handle:
        manifest = yaml.safe_load(handle)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    assert "python -m pipeline run /app/jobs/nightly.yaml" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    gpu = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


# ------------------------------------------------------------------------------ the shard policy, pure
def test_shard_decisions_retry_back_up_give_up_and_add_each_shard_once():
    from pipeline.cluster import policy
    from pipeline.cluster.policy import Decision, ShardStatus, make_decision

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


def test_pass_ledger_tracks_each_shards_copies_without_ray():
    from types import SimpleNamespace

    from pipeline.cluster.ledger import PassLedger, error_line, rows_of

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
