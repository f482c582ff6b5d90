"""A run from job to published results: plan -> main pass -> spectral passes -> publish.

The driver holds only small things: the plan, one running ``Partial`` (the reducer), and the
Krylov state of the spectral algorithms. Each product with the Hessian over the whole dataset
is one *pass* (``cluster.pool.WorkerPool.map_shards``). What is computed, and how it is
finalised and published, is the quantity units' business (``pipeline.quantities``): this module
only walks them.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np

from pipeline import __version__, faults, interrupts, memory, rows_pass
from pipeline.quantities import registry
from pipeline.cluster import connect
from pipeline.cluster.pool import StartedWorkers, WorkerPool
from pipeline.cluster.progress import PassProgress
from pipeline.cluster.processes import local_ray_processes
from pipeline.curvature.requests import BatchWork
from pipeline.errors import ComputeError, InputError
from pipeline.plan import Plan, make_plan, new_run_id
from pipeline.quantities.influence import DENSE_FILE
from pipeline.quantities.per_example import FOLDER as PER_EXAMPLE_FOLDER
from pipeline.reduce import Sums
from pipeline.storage.publish import RunPublisher, check_output_location, published, published_any_date, read_manifest
from pipeline.storage.staging import PartialStore
from pipeline.storage.layout import plain_name
from pipeline.storage.uri import as_submitted, sha256


@dataclass
class RunResult:
    run_dir: str
    manifest: dict
    results: dict


class HessianOperator:
    """``V [K, P] -> (H V^T)^T`` over the whole dataset: one pass per call."""

    def __init__(self, pool: WorkerPool, regularization: bool, stream, planned_passes: int = 0):
        self.pool = pool
        self.regularization = regularization
        self.stream = stream
        self.calls = 0
        self.progress = PassProgress(stream, planned_passes)

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.ascontiguousarray(np.asarray(vectors, dtype=np.float64))
        return self._pass(BatchWork(gradient=False, hvp_vectors=vectors), "hvp")

    def probe_products(self, probes: np.ndarray) -> np.ndarray:
        """``[z_k * (H z_k)]_k`` [K, P] for Rademacher probes ``probes`` [K, P] (int8 or float):
        one pass, the products formed in the workers, so that neither side holds ``H z`` beside
        ``z`` in float64, and the probes travel as int8 (an eighth of the float64 bytes)."""
        probes = np.ascontiguousarray(probes)
        return self._pass(BatchWork(gradient=False, probes=probes), "hessian_probes")

    def kronecker(self, request) -> Sums:
        """One pass summing a ``KroneckerRequest`` over the data (EK-FAC's projected per-example
        gradients): the reduced sums. Data loss only: no regularization term."""
        return self._reduce(BatchWork(gradient=False, kronecker=(request,)), regularization=False)

    def _pass(self, work: BatchWork, key: str) -> np.ndarray:
        return self._reduce(work, self.regularization).mean(key)

    def _reduce(self, work: BatchWork, regularization: bool) -> Sums:
        self.calls += 1
        started = time.perf_counter()
        reducer = self.pool.map_shards("compute", work, f"pass {self.pool.passes + 1}", self.stream, show=False)
        if regularization:
            reducer.add_regularization(self.pool.call_one("regularization", work))
        sums = reducer.sums()
        self.progress.update(time.perf_counter() - started)
        return sums


def run(job, *, output: str | None = None, run_id: str | None = None, address: str | None = None,
        workers: int | None = None, dry_run: bool = False, stream=None, quiet: bool = False,
        warm_start: tuple[str, dict] | None = None, prestarted: StartedWorkers | None = None) -> RunResult | Plan:
    """Runs ``job`` (a ``JobSpec``) and publishes its results; returns the run.

    With ``dry_run`` the plan is returned and nothing is computed (no Ray is started for a
    local run). Input problems (an existing run, an unwritable output, a bad model or data)
    are found before any worker starts. Called again with the ``run_id`` of an interrupted
    run, it resumes: the shards staged by ``pipeline.storage.staging`` are not computed again,
    and the run keeps its original start date (docs/failures.md). ``quiet``: Ray logs errors only.
    ``warm_start``: ``(run id, {block: Ritz vectors})`` of the previous checkpoint of a series,
    where Lanczos starts (recorded in the manifest as ``warm_start``). ``prestarted``: workers
    started with the local Ray before this process imported TensorFlow (``pool.prestart``).
    """
    stream = stream or sys.stderr
    connect.STOPPED.clear()
    now = _dt.datetime.now(_dt.timezone.utc)
    run_id = run_id or new_run_id(now)
    if dry_run and not (address or os.environ.get("RAY_ADDRESS")):
        interrupts.release()  # no Ray to start: a Ctrl-C the command line held comes now
        return make_plan(job, output, run_id, workers, connect.local_resources(), now)

    # A run whose Ray and workers the command line started early counts from then.
    began = prestarted.began if prestarted is not None and prestarted.began else None
    started = began[0] if began else time.time()
    store, publisher, now = (None, None, now) if dry_run else _open_run(job, output, run_id, now)
    owns_ray = False
    early_workers = prestarted  # started before the plan (StartedWorkers)
    clock = _Clock(began[1] if began else None)
    outcome = None  # the published run, once it is
    try:
        owns_ray = connect.connect(address, quiet)
        clock.lap("ray_start")
        interrupts.release()  # a Ctrl-C while Ray started arrives here, as KeyboardInterrupt
        staged_shards = store.staged_shards if store is not None and job.shards == "auto" else None
        cluster = connect.cluster_resources(owns_ray)
        # The workers start (TensorFlow, the model) while this process plans (the same, and
        # the model on the first rows): the pool takes them if the plan agrees on their number.
        if early_workers is None and not dry_run:
            early_workers = StartedWorkers.for_job(job, workers, cluster)
        plan = make_plan(job, output, run_id, workers, cluster, now, shards=staged_shards)
        clock.lap("plan")
        if dry_run:
            return plan
        with publisher:
            store.open(plan, now)
            stream.write(plan.describe() + "\n")
            results, extra, pool = _compute_in_pool(plan, stream, store, owns_ray, early_workers, warm_start, clock,
                                                    now.isoformat(timespec="seconds"))
            manifest = _manifest(plan, results, pool.passes, extra, started, now.isoformat(timespec="seconds"),
                                 pool.names)
            outcome = RunResult(run_dir=_publish(publisher, plan, results, manifest), manifest=manifest,
                                results=results)
            _pause_after_publish()
        store.remove()
        return outcome
    except BaseException as exc:
        if early_workers is not None:
            early_workers.close()  # (those the pool took are closed already; again is harmless)
        if _clean_up_after(exc, publisher, store, stream, run_id):
            return outcome
        raise
    finally:
        interrupts.release()
        if owns_ray:
            connect.shutdown()


def run_checkpoints(job, *, output: str | None = None, run_id: str | None = None, address: str | None = None,
                    workers: int | None = None, dry_run: bool = False, stream=None,
                    quiet: bool = False) -> list[RunResult | Plan]:
    """One run per checkpoint of a series (``model:`` a list or glob, contract 6.2), in order, on
    one Ray session: run ``k`` (from 1) is ``RUN_ID-kk`` (``RUN_ID`` given or new). A
    checkpoint whose run is already published (an interrupted series run again with its
    ``--run-id``) is not run again: its published run is returned. Each run is ``run``'s, with
    its own manifest, model path and sha256; ``history`` reads them as a series.
    """
    stream = stream or sys.stderr
    base = run_id or new_run_id(_dt.datetime.now(_dt.timezone.utc))
    plain_name(f"{base}-01", "run id", "--run-id")  # before any line of the series
    owns_ray = False
    results: list = []
    try:
        if not dry_run or address or os.environ.get("RAY_ADDRESS"):
            owns_ray = connect.connect(address, quiet)
        interrupts.release()
        start = None  # the previous checkpoint's (run id, Ritz vectors): Lanczos' warm start
        for k, path in enumerate(job.checkpoints):
            one, one_id = job.checkpoint(k), f"{base}-{k + 1:02d}"
            done = None if dry_run else published_any_date(output or job.output, job.name, one_id)
            if done:
                _same_checkpoint(done, path)
            stream.write(f"checkpoint {k + 1} of {len(job.checkpoints)}: {path} (run {one_id})"
                         + (f": published already, at {done}" if done else "") + "\n")
            if done:
                results.append(RunResult(run_dir=done, manifest=read_manifest(done), results={}))
                start = None
                continue
            results.append(run(one, output=output, run_id=one_id, address=address, workers=workers, dry_run=dry_run,
                               stream=stream, quiet=quiet, warm_start=start))
            start = _ritz_vectors(results[-1])
        return results
    finally:
        interrupts.release()
        if owns_ray:
            connect.shutdown()


def _same_checkpoint(run_dir: str, path: str) -> None:
    """A published run of a series stands for its checkpoint only while the file is unchanged."""
    recorded = (read_manifest(run_dir).get("model") or {}).get("sha256")
    now = sha256(path) if recorded else None
    if recorded and recorded != now:
        raise InputError(f"checkpoint {path} changed since run {run_dir} was published from it (sha256 "
                         f"{now[:12]}, the run's {recorded[:12]}): run the series with a new --run-id")


def _ritz_vectors(result) -> tuple[str, dict] | None:
    """``(run id, {block: Ritz vectors [k, block size]})`` of a run's eigenvalues, if it has any."""
    if not isinstance(result, RunResult):
        return None
    found = {block.name: r.eigenvectors for block, r in result.results.get("eigenvalues") or []
             if getattr(r, "eigenvectors", None) is not None}
    return (result.manifest["run_id"], found) if found else None


def _open_run(job, output: str | None, run_id: str, now):
    """``(store, publisher, now)`` of a run that computes: its output checked, its staged
    partials (``PartialStore``; an interrupted run with this id keeps its start, and so its
    date, and its layout) and its publisher. Raises ``InputError`` (and removes the staged
    leftovers of a driver that lost a race for this run id) when the run id is taken."""
    check_output_location(output or job.output, job.name, job.data.path)
    store = PartialStore(output or job.output, job.name, run_id)
    now = store.started() or now
    try:
        publisher = RunPublisher(output or job.output, job.name, run_id, now.strftime("%Y-%m-%d"))
    except InputError:
        if published(output or job.output, job.name, now.strftime("%Y-%m-%d"), run_id):
            store.remove()  # leftovers of a driver that lost a race for this run id
        raise
    return store, publisher, now


def _compute_in_pool(plan: Plan, stream, store, owns_ray: bool, early_workers, warm_start, clock,
                     started_at: str = ""):
    """``(results, extra, pool)``: every pass of ``plan`` on a ``WorkerPool`` (closed after),
    with the manifest's worker figures in ``extra``."""
    try:
        pool = WorkerPool(plan, stream, raylets=local_ray_processes() if owns_ray else None, started=early_workers)
        clock.lap("workers_start")
        try:
            results, extra = _compute(plan, pool, stream, store, warm_start[1] if warm_start else None, clock,
                                      started_at)
            if warm_start:
                extra["warm_start"] = warm_start[0]
            extra["worker_peak_bytes"] = pool.peak_memory()
            extra["per_worker"] = pool.per_worker()
            extra["timings"] = clock.laps
        finally:
            pool.close()
    except InputError:
        # Bad data found while computing: the staged partials can never be resumed (the data
        # must change), so leave nothing behind.
        store.remove()
        raise
    extra["resumed_shards"] = pool.resumed
    return results, extra, pool


def _publish(publisher, plan: Plan, results: dict, manifest: dict) -> str:
    """Writes the tables and the manifest; returns the run directory. A full disk or a revoked
    permission is a ``ComputeError`` that keeps the computed shards."""
    try:
        _write_tables(publisher, plan, results, manifest)
        return publisher.publish(manifest)
    except OSError as err:
        raise ComputeError(
            f"cannot write the results under {plan.output}: {err}; nothing was published and the computed "
            f"shards are kept: fix the output (free space, permissions) and run the same command with --run-id "
            f"{plan.run_id} to resume") from None


def _clean_up_after(exc: BaseException, publisher, store, stream, run_id: str) -> bool:
    """What a run stopped by ``exc`` leaves: True when it was published before an interrupt
    (its caller returns it); a ``ComputeError`` for a SIGTERM before; else False (re-raise)."""
    if publisher is not None and publisher.published:
        # Stopped once published (``ray job stop``, SIGTERM, Ctrl-C): the run is complete and
        # only its staged partials were left to remove.
        store.remove()
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):
            stream.write("stopped after the run was published: the results are complete\n")
            return True
        return False
    if publisher is not None:
        publisher.abort()  # no empty OUTPUT/NAME/date=... left by a run that published nothing
        _drop_if_published(store, publisher)
    if connect.STOPPED and isinstance(exc, SystemExit):
        raise ComputeError(f"terminated (SIGTERM); the finished shards are kept: run the same command with "
                           f"--run-id {run_id} to resume") from None
    return False


def _pause_after_publish() -> None:
    """The ``pause-after-publish`` fault (tests): the driver lingers with its run published, as
    one stopped (``ray job stop``) in that moment does."""
    pause = faults.active("pause-after-publish")
    if pause is not None:
        time.sleep(float(pause.get("seconds", 60)))


def _drop_if_published(store, publisher) -> None:
    """Removes the staged partials of a run id that another driver has published meanwhile
    (two drivers started with one --run-id: the loser's shards can never be used)."""
    if store is not None and publisher.published_elsewhere():
        store.remove()


class _Clock:
    """Seconds of each phase of a run, in order (the manifest's ``timings``)."""

    def __init__(self, since: float | None = None):
        self.laps: dict[str, float] = {}
        self._last = time.monotonic() if since is None else since

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps[f"{name}_seconds"] = round(now - self._last, 3)
        self._last = now


def _compute(plan: Plan, pool: WorkerPool, stream, store=None, warm_start: dict | None = None,
             clock: _Clock | None = None, started_at: str = "") -> tuple[dict, dict]:
    """The main pass (every quantity's per-batch sums, staged shard by shard so that it can be
    resumed), then each quantity's driver-side algorithm over passes of HVPs, then the rows pass
    of per-example outputs and influence (``rows_pass``, staged too)."""
    clock = clock or _Clock()
    job = plan.job
    context = plan.context(stream)
    context.warm_start = dict(warm_start or {})
    work = registry.main_request(job.quantities, context)
    reducer = pool.map_shards("compute", work, job.name, stream, store=store)
    clock.lap("main_pass")
    if job.include_regularization:
        reducer.add_regularization(pool.call_one("regularization", work))
    if reducer.total.examples != plan.data.rows:
        raise ComputeError(f"reduced {reducer.total.examples} examples but planned {plan.data.rows}: a shard was "
                           f"lost or counted twice; run the same command with --run-id {plan.run_id} to resume")
    if not reducer.total.weight_sum > 0:
        raise InputError(f"column '{job.data.weights}' sums to {reducer.total.weight_sum:g} over all "
                         f"{reducer.total.examples:,} rows: the weighted mean is undefined; give some rows a "
                         "positive weight, or drop data.weights")
    sums: Sums = reducer.sums()
    results = registry.finalize(sums, job.quantities)
    operator = HessianOperator(pool, job.include_regularization, stream,
                               planned_passes=plan.cost.passes - 1 if plan.cost is not None else 0)
    try:
        results.update(registry.compute(job.quantities, context, operator, sums))
    finally:
        operator.progress.close()
    clock.lap("hvp_passes")
    if rows_pass.asked(job.quantities):
        provenance = rows_pass.provenance_of(plan, started_at, _versions())
        results.update(rows_pass.run(plan, pool, results, store, stream, provenance))
        clock.lap("rows_pass")
    return results, {"examples": reducer.total.examples, "weight_sum": reducer.total.weight_sum}


def _versions() -> dict:
    """Versions of the product and the libraries it computed with (read from the installed
    distributions, so the driver imports none of them for it)."""
    versions = {"hessian-pipeline": __version__, "python": platform.python_version()}
    for name, *other_names in (("tensorflow", "tensorflow-cpu"), ("keras",), ("ray",), ("pyarrow",), ("numpy",)):
        versions[name] = None
        for distribution in (name, *other_names):
            try:
                versions[name] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _manifest(plan: Plan, results: dict, passes: int, extra: dict, started: float, started_at: str,
              worker_names: list[str]) -> dict:
    job = plan.job
    finished = time.time()
    return {
        "run_id": plan.run_id,
        "date": plan.date,
        "status": "complete",
        # The output root the run used (an --output given overrides the job file's).
        "job": {**_as_submitted(job.to_dict()), "output": plan.output},
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
        "resumed_shards": len(extra.get("resumed_shards", [])),
        # Which ones: those whose input the workers proved unchanged (the others were computed again).
        "resumed_shard_indices": [int(i) for i in extra.get("resumed_shards", [])],
        # A series: the run whose eigenvectors started this run's Lanczos (None: a random start).
        **({"warm_start": extra["warm_start"]} if extra.get("warm_start") else {}),
        "started_at": started_at,
        "finished_at": _now(),
        "seconds": round(finished - started, 3),
        "versions": _versions(),
        "model": {"path": as_submitted(job.model.path) or job.model.builder, "weights": as_submitted(job.model.weights),
                  "sha256": plan.model_sha256},
        "data": {"files": [as_submitted(f) for f in plan.data.files], "rows": plan.data.rows,
                 "fingerprint": plan.data.fingerprint},
        # The plan's estimate beside what the run measured, so that a wrong estimate shows.
        "estimate": plan.cost.as_dict() if plan.cost is not None else None,
        "memory": {"worker_peak_bytes": list(extra.get("worker_peak_bytes", [])),
                   "driver_peak_bytes": memory.peak_bytes()},
        # Where the time went (seconds of each phase, in order: Ray's start or connection, the
        # plan, the workers' start, the main pass, the passes of HVPs), and each worker's share.
        "timings": dict(extra.get("timings", {})),
        "per_worker": list(extra.get("per_worker", [])),
        # The quantities' own entries (layer_inputs and kfac: each layer's positions per example).
        **registry.manifest(job.quantities, results),
        # The per-example parts (``per_example``, or influence's self-influence alone).
        **(results["per_example"]["entry"] if "per_example" in results else {}),
    }


def _as_submitted(job: dict) -> dict:
    """The resolved job with its model, weights and data paths as the submitting user names them."""
    if isinstance(job.get("model"), dict):
        job["model"]["weights"] = as_submitted(job["model"].get("weights"))
    elif isinstance(job.get("model"), list):
        job["model"] = [as_submitted(p) for p in job["model"]]
    else:
        job["model"] = as_submitted(job.get("model"))
    job["data"]["path"] = as_submitted(job["data"]["path"])
    return job


def _write_tables(publisher, plan: Plan, results: dict, manifest: dict) -> None:
    provenance = {k: manifest[k] for k in ("run_id", "date", "job", "examples", "loss", "parameters", "model",
                                           "data", "versions", "started_at")}
    for filename, table in registry.tables(plan.job.quantities, results, plan.context()).items():
        publisher.write_table(filename, table, provenance)
    # What the workers wrote as they went (contract 7): the per-example parts, the dense scores.
    if "per_example" in results:
        publisher.add_parts(PER_EXAMPLE_FOLDER, results["per_example"]["parts"])
    dense = (results.get("influence") or {}).get("dense")
    if dense:
        publisher.write_parts_table(DENSE_FILE, dense, provenance)
