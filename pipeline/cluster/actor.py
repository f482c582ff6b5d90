"""The Ray actor class of the workers, without TensorFlow in the driver.

``WorkerActor`` holds a ``worker.ShardWorker`` and hands each call on to it. The ShardWorker
(and with it TensorFlow and the model) is imported in the worker process only: the command
line starts a local Ray and asks for the workers before its own process imports TensorFlow,
so the workers' start (their imports, the model) overlaps the driver's (its import, the plan)
(``pool.prestart``). Ray only.
"""

from __future__ import annotations

import ray

from pipeline.cluster.connect import worker_env

# A worker process that dies is restarted by Ray and its in-flight shard run again on the new
# process (up to MAX_RESTARTS times); the driver then moves the shard to another worker
# (``pool.WorkerPool``), and counts each shard once, by its index.
MAX_RESTARTS = 2


class WorkerActor:
    """A ``ShardWorker`` behind a class whose import needs no TensorFlow."""

    def __init__(self, job, plan_uri: str, threads: int, gpu: bool):
        # lazy: the driver defines this class (and starts workers) before it imports TensorFlow
        from pipeline.cluster.worker import ShardWorker

        self.worker = ShardWorker(job, plan_uri, threads, gpu)

    def keep_shards(self, cache_bytes: int) -> None:
        self.worker.keep_shards(cache_bytes)

    def info(self) -> dict:
        return self.worker.info()

    def compute(self, shard, work):
        return self.worker.compute(shard, work)

    def rows(self, shard, argument):
        return self.worker.rows(shard, argument)

    def query_gradients(self, argument):
        return self.worker.query_gradients(argument)

    def changed_piece(self, shard, digests):
        return self.worker.changed_piece(shard, digests)

    def regularization(self, work):
        return self.worker.regularization(work)

    def probe_memory(self) -> int:
        return self.worker.probe_memory()


def remote_worker_class(gpu: bool, cpus: float):
    """``WorkerActor`` as a Ray actor class asking for one GPU, or for ``cpus`` CPUs."""
    options = {"num_gpus": 1, "num_cpus": cpus} if gpu else {"num_cpus": cpus}
    return ray.remote(WorkerActor).options(
        **options, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS, runtime_env={"env_vars": worker_env()})
