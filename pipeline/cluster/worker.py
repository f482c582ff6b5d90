"""The Ray worker: loads the model once, turns shards into float64 partial sums.

The one module that imports TensorFlow, Ray and PyArrow together: it is where the three layers
meet (a Ray actor that reads shards through the storage layer and computes with the engine).

One ``ShardWorker`` per GPU (``num_gpus=1``, TensorFlow memory growth on) or, without GPUs,
one per CPU slot with TensorFlow's thread pools sized to the CPUs Ray gave it, each inside a
Ray actor (``actor.WorkerActor``). A worker streams its shard from Parquet batch by batch and
returns one ``Partial`` per shard; between passes over the data (Lanczos, Hutch++, SLQ) it
keeps the shards it has read in memory when they fit in ``cache_bytes``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import ray
import tensorflow as tf

from pipeline import memory
from pipeline.batch_checks import check_batch, deterministic, model_refused
from pipeline.curvature.engine import CurvatureEngine, set_threads
from pipeline.curvature.losses import resolve_loss
from pipeline.curvature.model import hide_gpus, load_model, model_builder
from pipeline.errors import InputError
from pipeline.faults import worker_faults
from pipeline.influence.shard_rows import ShardRows
from pipeline.quantities.influence import about_queries
from pipeline.partial import Partial
from pipeline.storage import parts, tables
from pipeline.storage.dataset import plan_data, read_shard, shard_digests, tensor_columns
from pipeline.storage.uri import local_copy



@dataclass
class ShardResult:
    index: int
    partial: Partial
    seconds: float
    worker: str
    # sha256 of the bytes each piece was read from (``dataset.shard_digests``), staged with
    # the partial so that a resumed run can prove the shard's input unchanged; empty when the
    # shard came from the worker's memory.
    digests: tuple[str, ...] = ()
    # The Ray node the worker runs on (the manifest's per-worker throughput groups by it).
    node: str = ""


class ShardWorker:
    """Computes partials for shards. Runs inside a ``actor.WorkerActor`` (``actor.remote_worker_class``)."""

    def __init__(self, job, plan_uri: str, threads: int, gpu: bool):
        if gpu:
            for device in tf.config.list_physical_devices("GPU"):
                tf.config.experimental.set_memory_growth(device, True)
        else:
            hide_gpus()  # a CPU worker on a GPU node must not grab GPU memory
        set_threads(threads)
        self.job = job
        self.uri = plan_uri
        self.engine = CurvatureEngine(load_model(job.model, fetch=local_copy), resolve_loss(job.loss), precision=job.precision,
                                      builder=model_builder(job.model), selected=job.variables)
        self.signature = self.engine.signature
        self.columns = tensor_columns(job.data, self.signature)
        self.name = f"{os.uname().nodename}:{os.getpid()}" + (":gpu" if gpu else "")
        self.node_id = ray.get_runtime_context().get_node_id()
        # Shards are kept in memory between passes only once ``keep_shards`` says the run has
        # several: a worker starts while the driver plans, before the number of passes is known.
        # A worker that Ray restarts starts again from here, so it reads its shards from the
        # files on every pass (slower, never more memory than planned).
        self.cache_bytes = 0
        self._cache: dict[int, list] = {}
        self._read_digests: dict[int, tuple[str, ...]] = {}  # of each cached shard's pieces
        self._cached_bytes = 0

    def keep_shards(self, cache_bytes: int) -> None:
        """How many bytes of shards to keep in memory between passes (0 for a one-pass run)."""
        self.cache_bytes = int(cache_bytes)

    def info(self) -> dict:
        return {"worker": self.name, "gpus": len(tf.config.get_visible_devices("GPU")),
                "parameters": self.engine.parameters, "node_id": self.node_id}

    def _batches(self, shard, digests: list | None = None):
        """The shard's batches: from memory if cached, else streamed from Parquet (``digests``
        then receives each piece's digest)."""
        if shard.index in self._cache:
            if digests is not None:  # those of the bytes it was read from: a later staged pass needs them
                digests.extend(self._read_digests.get(shard.index, ()))
            yield from self._cache[shard.index]
            return
        keep, size = [], 0
        for batch in read_shard(shard, self.job.data, self.signature, self.uri, self.job.data.batch_size,
                                dtype=self.job.precision, digests=digests):
            if keep is not None:
                size += sum(a.nbytes for a in batch.inputs + batch.labels) + batch.rows.nbytes
                if self._cached_bytes + size <= self.cache_bytes:
                    keep.append(batch)
                else:
                    keep = None
            yield batch
        if keep is not None:
            self._cache[shard.index] = keep
            self._read_digests[shard.index] = tuple(digests or ())
            self._cached_bytes += size

    def compute(self, shard, work) -> ShardResult:
        """Streams ``shard`` and returns the sum of its batches' partials.

        Bad data found on the way (non-finite values, labels outside the classes of a sparse
        loss) and a non-finite loss or gradient are ``InputError``s that name the shard and
        the row: retrying would fail the same way.
        """
        worker_faults(shard.index, self.node_id)
        start = time.perf_counter()
        total = Partial()
        where = f"shard {shard.index}"
        digests: list[str] = []
        for batch in self._batches(shard, digests):
            check_batch(batch, where, self.job.data, self.engine.loss, self.signature, self.columns, shard.locate)
            try:
                part = self.engine.partial(batch.inputs, batch.labels, batch.weights, batch.rows, work)
            except Exception as exc:  # noqa: BLE001 - sorted into input errors and the rest below
                if not deterministic(exc):
                    raise
                # The model or the loss refused this data (a shape, rank or dtype): the same input
                # fails the same way on any worker, so it is an input error, never retried.
                raise model_refused(exc, batch, where) from None
            if not _finite(part):
                raise self._non_finite(part, shard, batch, work)
            # The first batch's sums become the shard's: the engine's arrays are fresh and
            # writable, and a copy would hold a second [K, P] of per-probe sums at the peak.
            total = part if total.batches == 0 else total.add(part)
        return ShardResult(shard.index, total, time.perf_counter() - start, self.name, tuple(digests), self.node_id)

    def rows(self, shard, argument) -> ShardResult:
        """The rows pass (contract 7): each example's outputs (``engine.rows``), written as the
        shard's ``per_example/`` part under ``folder`` (and its dense scores under
        ``folder/influence_scores``), with its top-k rows per query in the result's partial.
        ``argument``: ``(RowsRequest, folder, provenance)``."""
        request, folder, provenance = argument
        worker_faults(shard.index, self.node_id)
        start = time.perf_counter()
        names = dict(request.files)
        gathered = ShardRows(request.top_k, request.dense_scores, request.projection_dtype)
        total = Partial()
        digests: list[str] = []
        where = f"shard {shard.index}"
        # Written as the batches come (row groups of ``parts.ROW_GROUP_BYTES``): memory stays bounded.
        with parts.PartWriter(f"{folder}/per_example", shard.index, provenance) as rows_part, \
                parts.PartWriter(f"{folder}/influence_scores", shard.index, provenance) as scores_part:
            for batch in self._batches(shard, digests):
                check_batch(batch, where, self.job.data, self.engine.loss, self.signature, self.columns, shard.locate)
                got = self._rows_of(batch, request, shard, where)
                files, file_rows = shard.origins(batch.rows)
                columns, scores = gathered.add(batch.rows, [names.get(f, f) for f in files], file_rows, batch.ids,
                                               batch.weights, got)
                if request.write:
                    rows_part.write(tables.per_example_table(columns))
                if scores is not None:
                    scores_part.write(tables.dense_scores_table(scores))
                total.examples += len(batch.rows)
                total.weight_sum += float(np.sum(batch.weights if batch.weights is not None else len(batch.rows)))
                total.batches += 1
            rows_part.close()
            scores_part.close()
        total.tops = gathered.tops
        return ShardResult(shard.index, total, time.perf_counter() - start, self.name, tuple(digests), self.node_id)

    def _rows_of(self, batch, request, shard, where: str) -> dict:
        """``engine.rows`` of one batch; a model that refuses the data, or a non-finite number,
        is an input error naming the row (as in ``compute``)."""
        try:
            got = self.engine.rows(batch.inputs, batch.labels, request)
        except Exception as exc:  # noqa: BLE001 - as in ``compute``
            if not deterministic(exc):
                raise
            raise model_refused(exc, batch, where) from None
        bad = [name for name, value in got.items() if not np.all(np.isfinite(value))]
        if bad:
            rows_bad = ~np.isfinite(got[bad[0]]).reshape(len(batch.rows), -1).all(axis=1)
            first = int(batch.rows[np.flatnonzero(rows_bad)[0]])
            raise InputError(f"non-finite {' and '.join(bad)} in {where}, first at row {first} "
                             f"({shard.locate(first)}): check that row and the model's weights, or try "
                             "precision: float64")
        return got

    def query_gradients(self, argument) -> dict:
        """The query set's per-example gradients (influence): ``{gradients [Q, P], loss [Q],
        ids [Q] or None}``, read whole by this worker. ``argument``: ``(DataSpec, RowsRequest)``."""
        spec, request = argument
        with about_queries():
            return self._query_gradients(spec, request)

    def _query_gradients(self, spec, request) -> dict:
        planned = plan_data(spec, 1, 1)
        out: dict = {"gradients": [], "loss": [], "ids": []}
        for shard in planned.shards:
            for batch in read_shard(shard, spec, self.signature, planned.uri, spec.batch_size,
                                    dtype=self.job.precision):
                check_batch(batch, f"query rows {int(batch.rows[0])}-{int(batch.rows[-1])}", spec, self.engine.loss,
                            self.signature, tensor_columns(spec, self.signature), shard.locate)
                got = self.engine.rows(batch.inputs, batch.labels, request)
                out["gradients"].append(got["gradients"])
                out["loss"].append(got["loss"])
                out["ids"].append(batch.ids)
        ids = None if spec.id is None else np.concatenate(out["ids"])
        return {"gradients": np.concatenate(out["gradients"]), "loss": np.concatenate(out["loss"]), "ids": ids}

    def changed_piece(self, shard, digests) -> int | None:
        """The first of ``shard``'s pieces whose bytes differ from ``digests`` (those it was
        staged with), or None when all are the same: one read of the shard, no model."""
        found = shard_digests(shard, self.job.data, self.signature, self.uri, self.job.data.batch_size)
        for index, (now, then) in enumerate(zip(found, digests)):
            if now != then:
                return index
        return None if len(found) == len(digests) else min(len(found), len(digests))

    def _non_finite(self, part: Partial, shard, batch, work) -> InputError:
        """Finds the first row whose own sums are not finite (one row at a time, the same work)."""
        bad = [key for key, value in part.sums.items() if not np.all(np.isfinite(value))]
        what = " and ".join(sorted(bad)) or "curvature sums"
        first, last = int(batch.rows[0]), int(batch.rows[-1])
        for i, row in enumerate(batch.rows):
            one = self.engine.partial([a[i:i + 1] for a in batch.inputs], [a[i:i + 1] for a in batch.labels],
                                      None if batch.weights is None else batch.weights[i:i + 1],
                                      batch.rows[i:i + 1], work)
            if not _finite(one):
                return InputError(
                    f"non-finite {what} in shard {shard.index} (rows {first}-{last}), first at row {int(row)} "
                    "(its inputs are finite): the model or the loss is not finite there (an overflow, or a loss "
                    "without a second derivative at that point); check that row, the model's weights and the loss, "
                    "or try precision: float64")
        return InputError(
            f"non-finite {what} in shard {shard.index}, rows {first}-{last} (no single row is non-finite on its "
            "own): check those rows and the model's weights, or try precision: float64")

    def regularization(self, work) -> Partial:
        return self.engine.regularization_partial(work)

    def probe_memory(self) -> int:
        """Peak resident memory of this worker process, in bytes (the manifest's ``memory``)."""
        return memory.peak_bytes()


def _finite(part: Partial) -> bool:
    """A non-finite number in any sum poisons the whole result."""
    return all(np.all(np.isfinite(value)) for value in part.sums.values())
