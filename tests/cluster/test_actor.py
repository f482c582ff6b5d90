"""``WorkerActor``: importable without TensorFlow, a ``ShardWorker`` behind it whose answers it
hands on unchanged, and as a Ray actor (``remote_worker_class``) the same numbers from a worker
process of a local Ray, holding the CPUs it asked for."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

import jobs
import paths
from pipeline.cluster.actor import MAX_RESTARTS, WorkerActor, remote_worker_class
from pipeline.curvature.requests import BatchWork
from pipeline.job import load_job
from pipeline.storage.dataset import plan_data

WORK = BatchWork(gradient=True, sum_grad_squared=True)


def test_the_actor_module_imports_no_tensorflow():
    """The driver defines the actor class (and starts workers) before it imports TensorFlow."""
    code = "import sys, pipeline.cluster.actor; print('tensorflow' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([paths.REPO, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    assert MAX_RESTARTS >= 1


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("actor")
    jobs.write_model(str(root / "model.keras"), dtype="float64")
    jobs.write_data(str(root / "data"), rows=50, files=2, row_group=10)
    job = load_job(jobs.job(root, {"gradient": {}}, data={"batch_size": 16}))
    return job, plan_data(job.data, shards=2)


def _same(a, b):
    assert (a.index, a.partial.examples, a.partial.weight_sum, a.digests) == \
        (b.index, b.partial.examples, b.partial.weight_sum, b.digests)
    assert sorted(a.partial.sums) == sorted(b.partial.sums)
    for key, value in a.partial.sums.items():
        np.testing.assert_allclose(b.partial.sums[key], value, rtol=1e-12, atol=1e-15)


@pytest.mark.slow
def test_the_actor_hands_each_call_to_its_worker(ray_local, files):
    job, plan = files
    actor = WorkerActor(job, plan.uri, 1, False)
    worker = actor.worker
    shard = plan.shards[0]
    assert actor.info() == worker.info()
    _same(worker.compute(shard, WORK), actor.compute(shard, WORK))
    staged = actor.compute(shard, WORK).digests
    assert actor.changed_piece(shard, staged) is None and actor.changed_piece(shard, ()) == 0
    regularization = actor.regularization(WORK)
    assert regularization.sums.keys() == worker.regularization(WORK).sums.keys()
    assert actor.probe_memory() > 0
    actor.keep_shards(1 << 30)
    assert worker.cache_bytes == 1 << 30


@pytest.mark.slow
def test_the_remote_actor_gives_the_in_process_numbers(ray_local, files):
    ray = ray_local
    job, plan = files
    here = WorkerActor(job, plan.uri, 1, False)
    cpus = ray.available_resources().get("CPU", 0)
    actor = remote_worker_class(False, 1.5).remote(job, plan.uri, 1, False)
    try:
        info = ray.get(actor.info.remote(), timeout=120)
        assert info["worker"] != here.info()["worker"]  # another process
        assert info["parameters"] == here.info()["parameters"] and info["gpus"] == 0
        for shard in plan.shards:
            _same(here.compute(shard, WORK), ray.get(actor.compute.remote(shard, WORK), timeout=120))
        deadline = time.monotonic() + 10
        while ray.available_resources().get("CPU", 0) != pytest.approx(cpus - 1.5) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ray.available_resources().get("CPU", 0) == pytest.approx(cpus - 1.5)
    finally:
        ray.kill(actor)
