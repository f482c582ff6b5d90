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
