"""The Ray worker: loads the model once, turns shards into float64 partial sums.

One ``ShardWorker`` actor per GPU (``num_gpus=1``, TensorFlow memory growth on) or, without
GPUs, one per CPU slot with TensorFlow's thread pools sized to the CPUs Ray gave it. A worker
streams its shard from Parquet batch by batch and returns one ``Partial`` per shard; between
passes over the data (Lanczos, Hutch++, SLQ) it keeps the shards it has read in memory when
they fit in ``cache_bytes``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from pipeline.errors import ComputeError
from pipeline.partial import Partial


@dataclass
class ShardResult:
    index: int
    partial: Partial
    seconds: float
    worker: str


class ShardWorker:
    """Computes partials for shards. Created through ``remote_worker_class()``."""

    def __init__(self, job, plan_uri: str, threads: int, gpu: bool, cache_bytes: int = 1 << 30):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import tensorflow as tf

        from pipeline.curvature.engine import _set_threads

        if gpu:
            for device in tf.config.list_physical_devices("GPU"):
                tf.config.experimental.set_memory_growth(device, True)
        else:
            # Ray does not hide GPUs from actors that ask for none (PITFALLS.md): a CPU
            # worker on a GPU node must not grab GPU memory.
            try:
                tf.config.set_visible_devices([], "GPU")
            except RuntimeError:
                pass
        _set_threads(threads)

        from pipeline.curvature import CurvatureEngine, load_model, resolve_loss

        self.job = job
        self.uri = plan_uri
        self.engine = CurvatureEngine(load_model(job.model), resolve_loss(job.loss), precision=job.precision)
        self.signature = self.engine.signature
        self.name = f"{os.uname().nodename}:{os.getpid()}" + (":gpu" if gpu else "")
        self.cache_bytes = int(cache_bytes)
        self._cache: dict[int, list] = {}
        self._cached_bytes = 0

    def info(self) -> dict:
        import tensorflow as tf

        return {"worker": self.name, "gpus": len(tf.config.get_visible_devices("GPU")),
                "parameters": self.engine.parameters}

    def _batches(self, shard):
        """The shard's batches: from memory if cached, else streamed from Parquet."""
        if shard.index in self._cache:
            yield from self._cache[shard.index]
            return
        from pipeline.data import read_shard

        keep, size = [], 0
        for batch in read_shard(shard, self.job.data, self.signature, self.uri, self.job.data.batch_size,
                                dtype=self.job.precision):
            if keep is not None:
                size += sum(a.nbytes for a in batch.inputs + batch.labels) + batch.rows.nbytes
                if self._cached_bytes + size <= self.cache_bytes:
                    keep.append(batch)
                else:
                    keep = None
            yield batch
        if keep is not None:
            self._cache[shard.index] = keep
            self._cached_bytes += size

    def compute(self, shard, work) -> ShardResult:
        """Streams ``shard`` and returns the sum of its batches' partials."""
        start = time.perf_counter()
        total = Partial()
        for batch in self._batches(shard):
            part = self.engine.partial(batch.inputs, batch.labels, batch.weights, batch.rows, work)
            _check_finite(part, shard, batch)
            total.add(part)
        return ShardResult(shard.index, total, time.perf_counter() - start, self.name)

    def regularization(self, work) -> Partial:
        return self.engine.regularization_partial(work)

    def probe_memory(self) -> int:
        """Peak resident memory of this worker process, in bytes (for benchmarks)."""
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _check_finite(part: Partial, shard, batch) -> None:
    """A non-finite loss or gradient poisons every sum: stop with the rows to look at."""
    bad = [key for key in ("loss", "gradient") if key in part.sums and not np.all(np.isfinite(part.sums[key]))]
    if not bad:
        return
    first, last = int(batch.rows[0]), int(batch.rows[-1])
    raise ComputeError(
        f"non-finite {' and '.join(bad)} in shard {shard.index}, rows {first}-{last}: check those rows "
        "of the data (NaN or inf values, labels out of range) and the model's weights"
    )


def remote_worker_class(gpu: bool, cpus: float):
    """``ShardWorker`` as a Ray actor class asking for one GPU, or for ``cpus`` CPUs."""
    import ray

    options = {"num_gpus": 1, "num_cpus": cpus} if gpu else {"num_cpus": cpus}
    env = {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    return ray.remote(ShardWorker).options(
        **options, max_restarts=2, max_task_retries=2, runtime_env={"env_vars": env})
