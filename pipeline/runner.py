"""A run from job to published results: plan -> workers -> reduce -> publish.

The driver holds only small things: the plan, one running ``Partial`` (the reducer), and the
Krylov state of the spectral algorithms. Each product with the Hessian over the whole dataset
is one *pass*: every shard goes to a worker, partial sums come back and are added as they
arrive. Workers are pulled: a worker that finishes a shard gets the next one.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import secrets
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from pipeline import __version__, cost, memory
from pipeline.errors import ComputeError, InputError
from pipeline.reduce import Reducer, finalize

DIAGONAL_COLUMNS = ("hessian_diagonal", "hessian_diagonal_stderr", "ggn_diagonal", "ggn_diagonal_stderr",
                    "fisher_diagonal", "gradient")
SUMMARY_QUANTITIES = ("hessian_diagonal", "ggn_diagonal", "fisher_diagonal", "gradient")
# Every worker must have loaded the model by then, or the run stops (exit 1) instead of
# waiting for an actor that may never be scheduled.
WORKER_START_SECONDS = float(os.environ.get("HESSIAN_PIPELINE_WORKER_START_SECONDS", "600"))
# A shard that fails (an exception, or a worker lost after Ray's own restarts) is moved to
# another worker this many times before the run stops (exit status 1).
SHARD_RETRIES = 2
# How often a pass waiting for results checks that the cluster can still run a worker: a run
# whose nodes all died stops (exit 1) instead of waiting forever (PITFALLS.md).
LIVENESS_SECONDS = float(os.environ.get("HESSIAN_PIPELINE_LIVENESS_SECONDS", "10"))


@dataclass
class Plan:
    """Everything decided before computing: printed by ``--dry-run``."""

    job: object
    data: object
    signature: object
    workers: int
    gpus: int
    run_id: str
    date: str
    output: str
    model_sha256: str
    passes: int
    hvp_vectors: np.ndarray | None = None
    hvp_random: bool = False
    notes: list[str] = field(default_factory=list)
    cost: cost.Cost | None = None
    workload: cost.Workload | None = None

    @property
    def parameters(self) -> int:
        return self.signature.parameters

    @property
    def batches(self) -> int:
        return sum(-(-s.rows // self.job.data.batch_size) for s in self.data.shards)

    def describe(self) -> str:
        batches = self.batches
        lines = [
            f"job          {self.job.name}",
            f"run          {self.run_id} ({self.date})",
            f"output       {self.output}",
            f"model        {self.job.model.path or self.job.model.builder} (sha256 {self.model_sha256[:12]})",
            f"parameters   {self.parameters:,} in {len(self.signature.variables)} variables",
            f"data         {self.data.uri}: {len(self.data.files)} files, {self.data.rows:,} rows, "
            f"{batches:,} batches of <= {self.job.data.batch_size}",
            f"shards       {len(self.data.shards)} (rows {min(s.rows for s in self.data.shards):,}-"
            f"{max(s.rows for s in self.data.shards):,})",
            f"workers      {self.workers}" + (f" (one per GPU, {self.gpus} GPUs)" if self.gpus else " (CPU)"),
            f"quantities   {', '.join(self.job.quantities)}",
            f"passes       {self.passes} over the data (estimated)",
        ]
        if self.cost is not None:
            table = self.cost.describe(self.workload)
            lines += [f"{'cost' if i == 0 else '':<13}{line}" for i, line in enumerate(table)]
        lines += [f"note         {note}" for note in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- planning
def _sha256(path: str) -> str:
    from pipeline.data import resolve_filesystem

    digest = hashlib.sha256()
    filesystem, inner = resolve_filesystem(path)
    with filesystem.open_input_stream(inner) as stream:
        while True:
            chunk = stream.read(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(model_spec) -> str:
    """sha256 of the model file (or of the builder name and its weights file)."""
    if model_spec.path:
        return _sha256(model_spec.path)
    digest = hashlib.sha256(model_spec.builder.encode())
    if model_spec.weights:
        digest.update(_sha256(model_spec.weights).encode())
    return digest.hexdigest()


# Rows of the dataset that ``validate`` (and every plan) runs the model and the loss on.
PROBE_ROWS = 8


def inspect_model(job):
    """Loads the model in the driver (GPUs hidden) as the workers will compute with it: in the
    job's precision, called through the model adapter. Returns the curvature engine."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass
    from pipeline.curvature import CurvatureEngine, load_model, model_builder, resolve_loss

    return CurvatureEngine(load_model(job.model), resolve_loss(job.loss), precision=job.precision,
                           builder=model_builder(job.model))


def probe_data(job, engine, data):
    """Runs the model and the loss on the first rows, then times one gradient on the first
    batch (``pipeline.curvature.probe``). Returns ``(ProbeReport, Measurement)``."""
    from pipeline.batch_checks import check_batch, deterministic, model_refused
    from pipeline.curvature.probe import measure, probe
    from pipeline.data import first_rows, tensor_columns

    columns = tensor_columns(job.data, engine.signature)
    batch = first_rows(data, job.data, engine.signature, PROBE_ROWS, job.precision)
    check_batch(batch, "the first rows", job.data, engine.loss, engine.signature, columns)
    q = job.quantities
    vectorised = (q.get("hessian_diagonal") or {}).get("method") == "exact" or \
        (q.get("trace") or {}).get("method") == "exact" or "fisher_diagonal" in q or "ggn_diagonal" in q
    report = probe(engine, batch, columns, route=vectorised)
    if job.data.batch_size > len(batch) and data.rows > len(batch):
        batch = first_rows(data, job.data, engine.signature, job.data.batch_size, job.precision)
        check_batch(batch, "the first batch", job.data, engine.loss, engine.signature, columns)
    try:
        measured = measure(engine, batch)
    except Exception as exc:  # noqa: BLE001 - the same rows a worker would read first
        if not deterministic(exc):
            raise
        raise model_refused(exc, batch, "the first batch") from None
    return report, measured


def make_plan(job, output: str | None = None, run_id: str | None = None, workers: int | None = None,
              cluster: dict | None = None, now: _dt.datetime | None = None, shards: int | None = None) -> Plan:
    """Checks the job against the model and the data, decides shards and workers, and
    estimates the cost (``pipeline.cost``): a plan over ``job.limits`` is an ``InputError``.

    ``shards`` overrides ``job.shards`` (a resumed run keeps the layout it started with).
    ``cluster``: Ray's ``cluster_resources()``, plus ``node_memory`` (the smallest node's, in
    bytes) and ``nodes`` when the workers run on other machines than the driver.
    """
    from pipeline.data import check_schema, plan_data
    from pipeline.tables import read_vectors

    now = now or _dt.datetime.now(_dt.timezone.utc)
    run_id = run_id or now.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(2)
    engine = inspect_model(job)
    signature = engine.signature
    cluster = cluster or {}
    gpus = int(cluster.get("GPU", 0))
    if workers is None:
        workers = job.workers if job.workers != "auto" else (gpus or max(1, int(cluster.get("CPU", os.cpu_count() or 1))))
    data = plan_data(job.data, shards or job.shards, workers)
    check_schema(data.schema, job.data, signature)
    trial, measured = probe_data(job, engine, data)
    workers = max(1, min(int(workers), len(data.shards)))
    # An actor asking for a CPU (or GPU) the cluster does not have is never scheduled, silently
    # (PITFALLS.md): start only the workers the cluster can place.
    capacity = gpus if gpus else int(cluster.get("CPU", os.cpu_count() or 1))
    placed = min(workers, capacity) if capacity >= 1 else workers
    plan_notes = []
    if placed < workers:
        plan_notes.append(f"workers: {workers} asked, {placed} can be placed (the cluster has {capacity} "
                          f"{'GPUs' if gpus else 'CPUs'}): using {placed}")
        workers = placed
    plan = Plan(job=job, data=data, signature=signature, workers=workers, gpus=gpus if gpus else 0,
                run_id=run_id, date=now.strftime("%Y-%m-%d"), output=output or job.output,
                model_sha256=model_fingerprint(job.model), passes=1)
    plan.notes.extend(plan_notes)
    plan.notes.append(f"model and loss ran on the first {trial.rows} rows (mean loss {trial.loss:.6g})")
    q = job.quantities
    if trial.route == "loop" and ("hessian_diagonal" in q or "trace" in q):
        plan.notes.append("the model's recurrent (while) loops cannot be vectorised: the exact diagonal is formed "
                          "by a while-loop Jacobian, one backward pass per parameter (slower)")
    if trial.per_example_route == "loop" and ("fisher_diagonal" in q or "ggn_diagonal" in q):
        plan.notes.append("the Fisher/GGN per-example products run one example at a time (recurrent loops, or "
                          "einsum/attention in float32 on CPU, which vectorised crashes TensorFlow's oneDNN "
                          "kernels): slower")
    diag = q.get("hessian_diagonal")
    if (diag and diag["method"] == "exact") or (q.get("trace") or {}).get("method") == "exact":
        plan.notes.append(f"exact Hessian diagonal: {signature.parameters:,} Hessian-vector products per batch, "
                          f"{float(signature.parameters) * plan.batches:,.0f} in all")
    hvp = q.get("hvp")
    if hvp is not None and hvp.get("vectors"):
        plan.hvp_vectors = read_vectors(hvp["vectors"], signature.variables, signature.variable_shapes)
    # Estimated and checked before anything of the quantities' size is built (random vectors).
    quantities = dict(q)
    if plan.hvp_vectors is not None:
        quantities["hvp"] = {**hvp, "count": len(plan.hvp_vectors)}
    plan.workload = _workload(plan, engine, trial)
    plan.cost = cost.estimate(quantities, plan.workload, measured)
    plan.passes = plan.cost.passes
    cost.check(plan.cost, memory_budget(job.limits, cluster, workers), job.limits, workers, bool(gpus))
    if hvp is not None and not hvp.get("vectors"):
        from pipeline.probes import HVP_STREAM, rademacher

        plan.hvp_vectors = rademacher(job.seed, range(hvp["random"]), signature.parameters, stream=HVP_STREAM)
        plan.hvp_random = True
    return plan


def _workload(plan: Plan, engine, trial) -> cost.Workload:
    outputs = sum(int(np.prod([d or 1 for d in spec.shape[1:]], dtype=np.int64)) for spec in plan.signature.outputs)
    return cost.Workload(
        parameters=plan.parameters, largest_variable=max(engine.sizes), outputs=max(1, outputs),
        itemsize=8 if plan.job.precision == "float64" else 4, batch_size=plan.job.data.batch_size,
        batches=plan.batches, rows=plan.data.rows, workers=plan.workers, worker_cpus=_worker_cpus(plan.workers),
        gpus=plan.gpus > 0, route=trial.route, per_example_route=trial.per_example_route,
        diagonal_block=engine.diagonal_block, vjp_budget=engine.vjp_budget)


def _worker_cpus(workers: int) -> float:
    """CPUs each local worker's TensorFlow gets (as ``WorkerPool`` shares them out)."""
    return max(1.0, float((os.cpu_count() or 1) // max(1, workers)))


def memory_budget(limits, cluster: dict, workers: int) -> cost.Budget:
    """What the plan's memory may reach: ``limits.memory_gib`` per process; else the free memory
    of this machine shared by the driver and every worker (a local run), or the smallest
    node's memory shared by the workers Ray places on it (a cluster)."""
    if limits.memory_gib != "auto":
        size = limits.memory_gib * (1 << 30)
        return cost.Budget(worker_bytes=size, driver_bytes=size,
                           source=f"limits.memory_gib={limits.memory_gib:g} allows per process")
    available = memory.available_bytes()
    node = cluster.get("node_memory")
    if not node:
        return cost.Budget(machine_bytes=available, source="this machine has free")
    per_node = -(-workers // max(1, int(cluster.get("nodes", 1))))
    return cost.Budget(worker_bytes=node / per_node, driver_bytes=available,
                       source=f"a node can give each of its {per_node} workers (or the driver's machine has free)")


def batch_work(job, plan: Plan):
    """The per-batch work of the main pass (``BatchWork`` for the engine)."""
    from pipeline.curvature.engine import BatchWork
    from pipeline.probes import PROBE_STREAM, rademacher

    q = job.quantities
    diag = q.get("hessian_diagonal")
    method = diag["method"] if diag else None
    if method is None and q.get("trace", {}).get("method") == "exact":
        method = "exact"
    probes = None
    if method == "hutchinson":
        probes = rademacher(job.seed, range(diag["probes"]), plan.parameters, stream=PROBE_STREAM)
    ggn = q.get("ggn_diagonal")
    return BatchWork(
        gradient=True,
        hessian_diagonal=method,
        probes=probes,
        hvp_vectors=plan.hvp_vectors,
        ggn_diagonal=ggn["method"] if ggn else None,
        ggn_samples=ggn["samples"] if ggn else 1,
        fisher_diagonal="fisher_diagonal" in q,
        seed=job.seed,
    )


# ---------------------------------------------------------------------------------- progress
class Progress:
    """A progress bar on a terminal; plain log lines otherwise (nightly logs)."""

    def __init__(self, stream, total_rows: int, label: str, enabled: bool = True):
        self.stream = stream
        self.total = total_rows
        self.label = label
        self.enabled = enabled
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.start = time.perf_counter()
        self.rows = 0
        self.shards = 0
        self.last_log = 0.0

    def update(self, rows: int, shards_total: int) -> None:
        self.rows += rows
        self.shards += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        rate = self.rows / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.rows) / rate if rate > 0 else float("nan")
        if self.tty:
            width = 30
            filled = int(width * self.rows / max(1, self.total))
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.shards}/{shards_total} "
                              f"shards {rate:,.0f} ex/s ETA {eta:,.0f}s ")
            if self.shards == shards_total:
                self.stream.write("\n")
            self.stream.flush()
        elif self.shards == shards_total or elapsed - self.last_log >= 10:
            self.last_log = elapsed
            self.stream.write(f"{self.label}: {self.shards}/{shards_total} shards, {self.rows:,} rows, "
                              f"{rate:,.0f} examples/s, ETA {eta:,.0f}s\n")
            self.stream.flush()


# ---------------------------------------------------------------------------------- the pool
class WorkerPool:
    """Ray actors that hold the model; ``map_shards`` is one pass over the data."""

    def __init__(self, plan: Plan, log, raylets: list[int] | None = None):
        import ray

        from pipeline.workers import remote_worker_class

        self.plan = plan
        self.log = log
        gpu = plan.gpus > 0
        cpus = 1.0
        if not gpu:
            free = ray.available_resources().get("CPU", 1.0)
            cpus = max(1.0, float(int(free // plan.workers))) if free >= plan.workers else 1.0
        threads = 0 if gpu else int(cpus)
        self._need = ("GPU", 1.0) if gpu else ("CPU", cpus)
        # The raylet and GCS of a local Ray this driver started: when one dies, Ray ends this
        # process (exit 1, no message) ten to sixty seconds later, so they are watched every second.
        self._raylets = list(raylets or [])
        self._nodes_checked = time.monotonic()
        actor = remote_worker_class(gpu, cpus if not gpu else 1.0)
        # Workers keep shards in memory only for the passes after the first (spectral
        # quantities): in a one-pass run the cache would grow with the data for nothing.
        cache = cost.SHARD_CACHE_BYTES if plan.passes > 1 else 0
        self._start = lambda: actor.remote(plan.job, plan.data.uri, threads, gpu, cache)
        self.actors = [self._start() for _ in range(plan.workers)]
        try:
            infos = ray.get([a.info.remote() for a in self.actors], timeout=WORKER_START_SECONDS)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise ComputeError(
                f"the {plan.workers} workers did not all start within {WORKER_START_SECONDS:.0f} s (the cluster may "
                f"lack the CPUs/GPUs they ask for, or be busy with other work): check `ray status`, or run "
                f"with fewer --workers") from None
        self.names = [info["worker"] for info in infos]
        # The local Ray's own processes (agents, worker processes): when its raylet dies they
        # are orphaned and live on, so a run that stops for that reason ends them.
        self._ray_children = _children(self._raylets)
        # Replacements for lost workers until they have loaded the model: info ref -> (actor, started).
        self._starting: dict = {}
        self.passes = 0
        self.resumed = 0  # shards of the main pass taken from staging
        # A worker lost for good (after Ray's restarts) is replaced, this many times in all.
        self.replacements_left = 2 * plan.workers

    def _rows(self, shard) -> str:
        return f"rows {shard.first_row}-{shard.first_row + shard.rows - 1}"

    def _resume_hint(self) -> str:
        return f"run the same command with --run-id {self.plan.run_id} to resume (finished shards are kept)"

    def map_shards(self, method: str, argument, label: str, progress_stream, show: bool = True,
                   store=None) -> Reducer:
        """Runs ``actor.<method>(shard, argument)`` on every shard, adding results as they arrive.

        Each shard is added once, by its index, whatever happens to the workers. A shard whose
        worker died (after Ray restarted it and ran the shard again ``MAX_RESTARTS`` times) or
        that raised an ordinary exception is moved to another worker, up to ``SHARD_RETRIES``
        more times; then the run stops with a ``ComputeError`` naming the shard. Input errors
        found by a worker stop the run at once. With ``store`` (a ``staging.PartialStore``),
        shards already staged are not computed again and each new one is staged as it arrives.
        """
        import ray

        from pipeline import faults

        shards = self.plan.data.shards
        reducer = Reducer()
        progress = Progress(progress_stream, self.plan.data.rows, label, enabled=show)
        finished: set[int] = set()
        if store is not None:
            staged = store.load(shards)
            for index, partial in sorted(staged.items()):
                reducer.add(partial)
                finished.add(index)
            self.resumed = len(staged)
            if staged:
                progress_stream.write(f"resumed {len(staged)} of {len(shards)} shards from {store.location}; "
                                      f"computing {len(shards) - len(staged)}\n")
                progress.rows = sum(s.rows for s in shards if s.index in finished)
                progress.shards = len(finished)
        pending = deque(s for s in shards if s.index not in finished)
        kill_driver = faults.active("kill-driver") if store is not None else None
        staged_now = 0
        attempts: dict[int, int] = {}
        argument_ref = ray.put(argument)
        inflight = {}
        idle = []

        durations: list[float] = []  # seconds of each shard of this pass, as the driver saw them
        backed_up: set[int] = set()

        def submit(actor, shard=None):
            shard = shard or pending.popleft()
            inflight[getattr(actor, method).remote(shard, argument_ref)] = (actor, shard, time.monotonic())

        def retry(shard, cause: str, lost_worker: bool):
            if shard.index in finished or any(s.index == shard.index for _, s, _ in inflight.values()):
                return  # its backup copy has finished it, or is computing it
            attempts[shard.index] = attempts.get(shard.index, 0) + 1
            if attempts[shard.index] > SHARD_RETRIES or not self.actors:
                what = "lost its worker" if lost_worker else "failed"
                raise ComputeError(
                    f"shard {shard.index} ({self._rows(shard)}) {what} after its retries: {cause}; "
                    f"{self._resume_hint()}") from None
            self.log.write(f"shard {shard.index} ({self._rows(shard)}): {cause}; trying again "
                           f"({attempts[shard.index]} of {SHARD_RETRIES})\n")
            pending.appendleft(shard)

        starting = {actor for actor, _ in self._starting.values()}
        for actor in self.actors:
            if actor in starting:
                continue  # joins once it has loaded the model
            if pending:
                submit(actor)
            else:
                idle.append(actor)
        while len(finished) < len(shards) and (inflight or (pending and self._starting)):
            waiting = list(inflight) + list(self._starting)
            done, _ = ray.wait(waiting, num_returns=1, timeout=1.0 if self._raylets else LIVENESS_SECONDS)
            if not done or self._raylets:
                self._check_live(bool(inflight), len(finished), len(shards))
            if not done:
                if idle and not pending and durations:
                    self._back_up(inflight, idle, durations, backed_up, finished, submit)
                continue
            if done[0] in self._starting:
                # A replacement worker has loaded the model (or failed to): only then does it
                # get shards, so a worker no node can host never holds one.
                actor, _ = self._starting.pop(done[0])
                try:
                    ray.get(done[0])
                    idle.append(actor)
                except ray.exceptions.RayError:
                    self._drop(actor)
            else:
                actor, shard, submitted = inflight.pop(done[0])
                try:
                    result = ray.get(done[0])
                except ray.exceptions.RayTaskError as err:
                    cause = getattr(err, "cause", None)
                    if isinstance(cause, (InputError, ComputeError)):
                        # Bad data or a deterministic failure: trying again cannot help.
                        raise type(cause)(" ".join(str(cause).split())) from None
                    retry(shard, _cause(err), lost_worker=False)
                    idle.append(actor)
                except ray.exceptions.RayError as err:
                    # RayActorError, ObjectLostError, ...: the worker process (or its node) is
                    # gone and Ray's own restarts are spent. Drop it, start a fresh one, move
                    # the shard to a worker that is up.
                    self._drop(actor)
                    retry(shard, f"its worker died ({type(err).__name__})", lost_worker=True)
                else:
                    if result.index != shard.index:
                        raise ComputeError(f"shard {shard.index} came back as shard {result.index}: "
                                           f"{self._resume_hint()}")
                    durations.append(time.monotonic() - submitted)
                    if shard.index not in finished:  # never add a shard twice
                        finished.add(shard.index)
                        if store is not None:
                            store.save(shard, result.partial)
                            staged_now += 1
                            if kill_driver is not None and staged_now >= int(kill_driver.get("shards", 1)):
                                faults.die(f"kill-driver after {staged_now} shards")
                        reducer.add(result.partial)
                        progress.update(shard.rows, len(shards))
                        if result.worker not in self.names:
                            self.names.append(result.worker)
                    idle.append(actor)
            while pending and idle:
                submit(idle.pop(0))
            if idle and not pending and durations:
                self._back_up(inflight, idle, durations, backed_up, finished, submit)
        if len(finished) != len(shards):
            missing = sorted({s.index for s in shards} - finished)
            raise ComputeError(f"shards {missing[:10]} were never computed (no worker left): {self._resume_hint()}")
        self.passes += 1
        return reducer

    def _back_up(self, inflight: dict, idle: list, durations: list, backed_up: set, finished: set, submit) -> None:
        """Computes a shard again on a free worker when its own has held it for more than twice
        the slowest shard of the pass (plus ``LIVENESS_SECONDS``): a worker whose node was lost
        waits for a restart that Ray may never place. The first copy to finish counts."""
        now = time.monotonic()
        late = 2 * max(durations) + LIVENESS_SECONDS
        for _, shard, submitted in list(inflight.values()):
            if not idle:
                return
            if shard.index in backed_up or shard.index in finished or now - submitted <= late:
                continue
            backed_up.add(shard.index)
            self.log.write(f"shard {shard.index} ({self._rows(shard)}): no result after {now - submitted:.0f} s (its "
                           f"worker may be waiting for a restart); computing it again on a free worker\n")
            submit(idle.pop(0), shard)

    def _drop(self, actor) -> None:
        """Forgets a lost worker and starts a replacement (``replacements_left`` in all)."""
        import ray

        if actor not in self.actors:
            return
        self.actors.remove(actor)
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - it is already dead
            pass
        if self.replacements_left > 0:
            self.replacements_left -= 1
            fresh = self._start()
            self.actors.append(fresh)
            self._starting[fresh.info.remote()] = (fresh, time.monotonic())

    def _check_live(self, busy: bool, finished: int, total: int) -> None:
        """Raises ``ComputeError`` when no live node can run a worker any more, or when nothing
        is being computed and the replacement workers did not start within ``WORKER_START_SECONDS``."""
        import ray

        kind, amount = self._need
        done = f"; {finished} of {total} shards are finished and kept" if total else ""
        if self._raylets and not all(_running(pid) for pid in self._raylets):
            _end(self._raylets + self._ray_children)
            raise ComputeError(f"the local Ray node died mid-pass (its raylet or GCS process ended: killed, or out "
                               f"of memory){done}: {self._resume_hint()}")
        if time.monotonic() - self._nodes_checked < LIVENESS_SECONDS:
            return
        self._nodes_checked = time.monotonic()
        try:
            nodes = ray.nodes()
        except Exception:  # noqa: BLE001 - the cluster itself is unreachable: that is the answer too
            nodes = []
        if not any(node.get("Alive") and node.get("Resources", {}).get(kind, 0) >= amount for node in nodes):
            raise ComputeError(
                f"no live Ray node can run a worker (each needs {amount:g} {kind}): the cluster's nodes died or "
                f"left mid-pass{done}: check `ray status`, then {self._resume_hint()}")
        now = time.monotonic()
        if not busy and self._starting and all(now - t > WORKER_START_SECONDS for _, t in self._starting.values()):
            raise ComputeError(
                f"the workers started to replace lost ones did not start within {WORKER_START_SECONDS:.0f} s (the "
                f"cluster lacks the {kind}s they ask for, or is busy){done}: check `ray status`, then "
                f"{self._resume_hint()}")

    def peak_memory(self) -> list[int]:
        """Each live worker's peak resident memory so far, in bytes (for the manifest)."""
        import ray

        try:
            return [int(b) for b in ray.get([a.probe_memory.remote() for a in self.actors], timeout=60)]
        except ray.exceptions.RayError:
            return []  # a worker lost at the very end: the result stands, the figure is left out

    def call_one(self, method: str, argument):
        """One call on one worker (the regularization term), with the passes' liveness checks."""
        import ray

        starting = {actor for actor, _ in self._starting.values()}
        ready = [actor for actor in self.actors if actor not in starting] or self.actors
        ref = getattr(ready[0], method).remote(argument)
        while not ray.wait([ref], timeout=LIVENESS_SECONDS)[0]:
            self._check_live(True, 0, 0)
        return ray.get(ref)

    def close(self):
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - closing after a failure: some may be gone
                pass


def _stat(pid) -> tuple[str, str, int] | None:
    """(name, state, parent id) of process ``pid`` from /proc (Linux); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            stat = handle.read()
        rest = stat[stat.rindex(")") + 2:].split()
        return stat[stat.index("(") + 1:stat.rindex(")")], rest[0], int(rest[1])
    except (OSError, ValueError, IndexError):
        return None


def _processes() -> list[tuple[int, str, int]]:
    """(pid, name, parent id) of every process on this machine ([] off Linux)."""
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    found = ((int(e), _stat(e)) for e in entries)
    return [(pid, stat[0], stat[2]) for pid, stat in found if stat is not None]


def _running(pid: int) -> bool:
    """Whether process ``pid`` is alive (a zombie, ended but not yet reaped, is not)."""
    stat = _stat(pid)
    return stat is not None and stat[1] not in ("Z", "X")


def _children(parents: list[int]) -> list[int]:
    """Process ids whose parent is one of ``parents``."""
    wanted = set(parents)
    return [pid for pid, _, parent in _processes() if parent in wanted] if wanted else []


def _end(pids: list[int]) -> None:
    """SIGKILL to the processes of a local Ray that died (best effort: some are gone)."""
    for pid in pids:
        if _running(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def local_ray_processes() -> list[int]:
    """Process ids of the raylet and the GCS server this process started (a local Ray); [] off
    Linux. When either dies, the local Ray instance is gone."""
    return [pid for pid, name, parent in _processes()
            if name in ("raylet", "gcs_server") and parent == os.getpid()]


def _cause(err) -> str:
    """The last line of a worker's exception: its type and message, not Ray's traceback."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


# ---------------------------------------------------------------------------------- the run
@dataclass
class RunResult:
    run_dir: str
    manifest: dict
    results: dict


class HessianOperator:
    """``V [K, P] -> (H V^T)^T`` over the whole dataset: one pass per call."""

    def __init__(self, pool: WorkerPool, job, regularization: bool, stream, weight_sum: float):
        self.pool = pool
        self.job = job
        self.regularization = regularization
        self.stream = stream
        self.weight_sum = weight_sum
        self.calls = 0

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        from pipeline.curvature.engine import BatchWork

        vectors = np.ascontiguousarray(np.asarray(vectors, dtype=np.float64))
        work = BatchWork(gradient=False, hvp_vectors=vectors)
        self.calls += 1
        reducer = self.pool.map_shards("compute", work, f"pass {self.pool.passes + 1}", self.stream, show=False)
        if self.regularization:
            reducer.add_regularization(self.pool.call_one("regularization", work))
        return finalize(reducer.total, reducer.regularization)["hvp"]


def _versions() -> dict:
    import keras
    import pyarrow
    import ray
    import tensorflow as tf

    return {"hessian-pipeline": __version__, "python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "ray": ray.__version__, "pyarrow": pyarrow.__version__,
            "numpy": np.__version__}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _connect(address: str | None, quiet: bool = False):
    """Uses a Ray already initialised in this process, a cluster at ``address``, or a new local one.

    ``quiet`` (the command line without ``--debug``): Ray logs errors only, so its start-up
    warnings (token authentication, ...) do not precede the product's own lines.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    env = {"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3"}}
    level = "ERROR" if quiet else "WARNING"
    try:
        if address:
            ray.init(address=address, logging_level=level, log_to_driver=False, runtime_env=env)
        else:
            # address="local": always a new instance, never a cluster some other `ray start`
            # left on this machine. Worker logs stay in Ray's session logs: TensorFlow prints
            # start-up noise that no setting silences; errors still reach the driver.
            ray.init(address="local", include_dashboard=False, logging_level=level, log_to_driver=False,
                     runtime_env=env)
    except ConnectionError as err:
        raise InputError(f"cannot reach the Ray cluster at {address}: {err}; check --address") from None
    _python_handles_sigterm()
    return True


def _python_handles_sigterm() -> None:
    """Ray's core worker installs a C-level failure handler for SIGTERM that prints a report and
    aborts the process; a Python-level handler installed after it is in charge again: it notes
    the signal and exits (as Ray's own does), and ``run`` turns that into a ComputeError that
    says how to resume."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


_STOPPED: list[int] = []  # signals received by a run (SIGTERM)


def _on_sigterm(signum, frame):
    _STOPPED.append(signum)
    sys.exit(signum)  # may surface as Ray's own SystemExit(1) when it arrives inside ray.wait


def run(job, *, output: str | None = None, run_id: str | None = None, address: str | None = None,
        workers: int | None = None, dry_run: bool = False, stream=None, quiet: bool = False) -> RunResult | Plan:
    """Runs ``job`` (a ``JobSpec``) and publishes its results; returns the run.

    With ``dry_run`` the plan is returned and nothing is computed (no Ray is started for a
    local run). Input problems (an existing run, an unwritable output, a bad model or data)
    are found before any worker starts. Called again with the ``run_id`` of an interrupted
    run, it resumes: the shards staged by ``pipeline.staging`` are not computed again, and
    the run keeps its original start date (docs/failures.md). ``quiet``: Ray logs errors only.
    """
    from pipeline.publish import RunPublisher, published

    stream = stream or sys.stderr
    _STOPPED.clear()
    now = _dt.datetime.now(_dt.timezone.utc)
    run_id = run_id or now.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(2)
    if dry_run and not (address or os.environ.get("RAY_ADDRESS")):
        import ray

        cluster = ray.cluster_resources() if ray.is_initialized() else {"CPU": os.cpu_count() or 1}
        return make_plan(job, output, run_id, workers, cluster, now)

    started = time.time()
    store = None
    if not dry_run:
        from pipeline.staging import PartialStore

        # An interrupted run with this id keeps its start (and so its date) and its layout.
        store = PartialStore(output or job.output, job.name, run_id)
        now = store.started() or now
    try:
        publisher = None if dry_run else RunPublisher(output or job.output, job.name, run_id,
                                                      now.strftime("%Y-%m-%d"))
    except InputError:
        if store is not None and published(output or job.output, job.name, now.strftime("%Y-%m-%d"), run_id):
            store.remove()  # leftovers of a driver that lost a race for this run id
        raise
    owns_ray = _connect(address, quiet)
    import ray

    try:
        staged_shards = store.staged_shards if store is not None and job.shards == "auto" else None
        plan = make_plan(job, output, run_id, workers, _cluster(owns_ray), now, shards=staged_shards)
        if dry_run:
            return plan
        with publisher:
            store.open(plan, now)
            stream.write(plan.describe() + "\n")
            try:
                pool = WorkerPool(plan, stream, raylets=local_ray_processes() if owns_ray else None)
                try:
                    results, passes, extra = _compute(plan, pool, stream, store)
                    extra["worker_peak_bytes"] = pool.peak_memory()
                finally:
                    pool.close()
            except InputError:
                # Bad data found while computing: the staged partials can never be resumed
                # (the data must change), so leave nothing behind.
                store.remove()
                raise
            extra["resumed_shards"] = pool.resumed
            manifest = _manifest(plan, results, passes, extra, started, now.isoformat(timespec="seconds"),
                                 pool.names)
            try:
                _write_tables(publisher, plan, results, manifest)
                run_dir = publisher.publish(manifest)
            except OSError as err:  # a full disk, a revoked permission: the computed shards are kept
                raise ComputeError(
                    f"cannot write the results under {plan.output}: {err}; nothing was published and the computed "
                    f"shards are kept: fix the output (free space, permissions) and run the same command with --run-id "
                    f"{plan.run_id} to resume") from None
        store.remove()
        return RunResult(run_dir=run_dir, manifest=manifest, results=results)
    except BaseException as exc:
        if publisher is not None:
            publisher.abort()  # no empty OUTPUT/NAME/date=... left by a run that published nothing
            _drop_if_published(store, publisher)
        if _STOPPED and isinstance(exc, SystemExit):
            raise ComputeError(f"terminated (SIGTERM); the finished shards are kept: run the same command with "
                               f"--run-id {run_id} to resume") from None
        raise
    finally:
        if owns_ray:
            ray.shutdown()


def _cluster(local: bool) -> dict:
    """Ray's ``cluster_resources()``; for a cluster this driver did not start, also the smallest
    worker node's memory (``node_memory``, bytes) and the number of such nodes (``nodes``), which
    ``memory_budget`` shares out among the workers."""
    import ray

    resources = dict(ray.cluster_resources())
    if local:
        return resources
    nodes = [n["Resources"] for n in ray.nodes()
             if n.get("Alive") and (n["Resources"].get("CPU", 0) >= 1 or n["Resources"].get("GPU", 0) >= 1)]
    if nodes:
        resources["node_memory"] = min(r.get("memory", 0) + r.get("object_store_memory", 0) for r in nodes)
        resources["nodes"] = len(nodes)
    return resources


def _drop_if_published(store, publisher) -> None:
    """Removes the staged partials of a run id that another driver has published meanwhile
    (two drivers started with one --run-id: the loser's shards can never be used)."""
    if store is not None and publisher.published_elsewhere():
        store.remove()


def _compute(plan: Plan, pool: WorkerPool, stream, store=None):
    job = plan.job
    work = batch_work(job, plan)
    # The main pass is staged shard by shard (resumable); spectral passes are not.
    reducer = pool.map_shards("compute", work, job.name, stream, store=store)
    if job.include_regularization:
        reducer.add_regularization(pool.call_one("regularization", work))
    if reducer.total.examples != plan.data.rows:
        raise ComputeError(f"reduced {reducer.total.examples} examples but planned {plan.data.rows}: a shard was "
                           f"lost or counted twice; run the same command with --run-id {plan.run_id} to resume")
    if not reducer.total.weight_sum > 0:
        raise InputError(f"column '{job.data.weights}' sums to {reducer.total.weight_sum:g} over all "
                         f"{reducer.total.examples:,} rows: the weighted mean is undefined; give some rows a "
                         "positive weight, or drop data.weights")
    results = reducer.result()
    extra = {"examples": reducer.total.examples, "weight_sum": reducer.total.weight_sum}
    spectral = {k: job.quantities[k] for k in ("trace", "eigenvalues", "spectrum") if k in job.quantities}
    if spectral:
        results.update(_spectral(plan, pool, stream, results, reducer.total.weight_sum))
    return results, pool.passes, extra


def _spectral(plan: Plan, pool: WorkerPool, stream, results: dict, weight_sum: float) -> dict:
    """Trace, top eigenvalues and spectral density from passes of Hessian-vector products."""
    from pipeline import spectrum

    job = plan.job
    operator = HessianOperator(pool, job, job.include_regularization, stream, weight_sum)
    size = plan.parameters
    out = {}
    q = job.quantities
    if "trace" in q:
        method = q["trace"]["method"]
        if method == "exact":
            out["trace"] = spectrum.exact_trace(results["hessian_diagonal"])
        elif method == "hutchinson":
            out["trace"] = spectrum.hutchinson_trace(operator, size, q["trace"]["probes"], job.seed)
        else:
            out["trace"] = spectrum.hutchpp_trace(operator, size, q["trace"]["probes"], job.seed)
        stream.write(f"trace ({method}): {out['trace'].estimate:.6g} +- {out['trace'].stderr:.2g}\n")
    if "eigenvalues" in q:
        e = q["eigenvalues"]
        out["eigenvalues"] = spectrum.top_eigenvalues(operator, size, top=min(e["top"], size), which=e["which"],
                                                      iterations=e["iterations"], tol=e["tol"], seed=job.seed)
        stream.write(f"eigenvalues ({e['which']}): {np.array2string(out['eigenvalues'].eigenvalues, precision=6)}\n")
    if "spectrum" in q:
        s = q["spectrum"]
        out["spectrum"] = spectrum.spectral_density(operator, size, runs=s["runs"], steps=min(s["steps"], size),
                                                    seed=job.seed)
    return out


def _manifest(plan: Plan, results: dict, passes: int, extra: dict, started: float, started_at: str,
              worker_names: list[str]) -> dict:
    job = plan.job
    finished = time.time()
    return {
        "run_id": plan.run_id,
        "date": plan.date,
        "status": "complete",
        "job": job.to_dict(),
        "examples": int(extra["examples"]),
        "weight_sum": float(extra["weight_sum"]),
        "loss": float(results["loss"]),
        "shards": len(plan.data.shards),
        "workers": len(worker_names),
        "worker_names": worker_names,
        "parameters": plan.parameters,
        "variables": [{"name": n, "shape": list(s)} for n, s in zip(plan.signature.variables,
                                                                    plan.signature.variable_shapes)],
        "passes": passes,
        "resumed_shards": int(extra.get("resumed_shards", 0)),
        "started_at": started_at,
        "finished_at": _now(),
        "seconds": round(finished - started, 3),
        "versions": _versions(),
        "model": {"path": job.model.path or job.model.builder, "weights": job.model.weights,
                  "sha256": plan.model_sha256},
        "data": {"files": list(plan.data.files), "rows": plan.data.rows, "fingerprint": plan.data.fingerprint},
        # The plan's estimate beside what the run measured, so that a wrong estimate shows.
        "estimate": plan.cost.as_dict() if plan.cost is not None else None,
        "memory": {"worker_peak_bytes": list(extra.get("worker_peak_bytes", [])),
                   "driver_peak_bytes": memory.peak_bytes()},
    }


def _write_tables(publisher, plan: Plan, results: dict, manifest: dict) -> None:
    from pipeline import tables

    names, shapes = plan.signature.variables, plan.signature.variable_shapes
    provenance = {k: manifest[k] for k in ("run_id", "date", "job", "examples", "loss", "parameters", "model",
                                           "data", "versions", "started_at")}
    asked = plan.job.quantities
    columns = {k: results[k] for k in DIAGONAL_COLUMNS if k in results and k.replace("_stderr", "") in asked}
    if columns:
        publisher.write_table("diagonals.parquet", tables.diagonals_table(names, shapes, columns), provenance)
        summary = {k: results[k] for k in SUMMARY_QUANTITIES if k in columns}
        publisher.write_table("summary.parquet", tables.summary_table(names, shapes, summary), provenance)
    if "hvp" in results and "hvp" in plan.job.quantities:
        publisher.write_table("hvp.parquet", tables.vectors_table(names, shapes, results["hvp"]), provenance)
        if plan.hvp_random:
            publisher.write_table("hvp_vectors.parquet", tables.vectors_table(names, shapes, plan.hvp_vectors),
                                  provenance)
    if "eigenvalues" in results:
        e = results["eigenvalues"]
        publisher.write_table("eigenvalues.parquet", tables.eigenvalues_table(e.eigenvalues, e.residuals), provenance)
    if "trace" in results:
        t = results["trace"]
        publisher.write_table("trace.parquet", tables.trace_table(t.method, t.estimate, t.stderr, t.matvecs),
                              provenance)
    if "spectrum" in results:
        s = results["spectrum"]
        publisher.write_table("spectrum.parquet", tables.spectrum_table(s.nodes, s.weights), provenance)
