"""Passes over the data on Ray: ``WorkerPool`` runs every shard on a worker actor and adds the
partial sums as they arrive.

The pool holds the actors (one per GPU, or per CPU slot), pulls work (a worker that finishes a
shard takes the next), and applies the failure policy (``policy``): a failed shard is moved to
another worker, a lost worker is replaced, a late shard is computed again on a free worker, and
every wait has a deadline and a liveness check (the local Ray's processes every second, the
cluster's nodes every ``LIVENESS_SECONDS``). Each shard's status lives in a ``ledger.PassLedger``
and ``policy.make_decision`` says what to do with it; a resumed pass keeps the staged shards
whose input ``resume.unchanged`` proves unchanged. Ray only.
"""

from __future__ import annotations

import os
import time

import ray

from pipeline import faults
from pipeline.cluster import connect, policy, processes
from pipeline.cluster.ledger import PassLedger, error_line, rows_of
from pipeline.cluster.policy import Decision
from pipeline.cluster.resume import unchanged
from pipeline.cluster.progress import Progress
from pipeline.cluster.actor import remote_worker_class
from pipeline.cost import SHARD_CACHE_BYTES
from pipeline.errors import ComputeError, InputError
from pipeline.reduce import Reducer
from pipeline.storage.dataset import data_uri
from pipeline.storage.uri import STORAGE_TIMEOUT_SECONDS

# Every worker must have loaded the model by then, or the run stops (exit 1) instead of
# waiting for an actor that may never be scheduled.
WORKER_START_SECONDS = float(os.environ.get("HESSIAN_PIPELINE_WORKER_START_SECONDS", "600"))
# How often a pass waiting for results checks that the cluster can still run a worker: a run
# whose nodes all died stops (exit 1) instead of waiting forever (PITFALLS.md).
LIVENESS_SECONDS = float(os.environ.get("HESSIAN_PIPELINE_LIVENESS_SECONDS", "10"))
# A wait that lasts longer than this says what it waits for (a stalled object store, a busy
# cluster), then again each time it lasts as long again: progress never freezes silently.
WAIT_REPORT_SECONDS = float(os.environ.get("HESSIAN_PIPELINE_WAIT_REPORT_SECONDS", "60"))


def _short(cause: str, limit: int = 155) -> str:
    """A shard's failure as it goes into the one ``error:`` line, under ``limit`` characters: its
    start (the exception and what it read) and its end (a storage client's reason, after hundreds
    of characters of request details). Each retry's line printed the whole cause before."""
    if len(cause) <= limit:
        return cause
    return cause[:50] + "..." + cause[-(limit - 53):]

class WorkerPool:
    """Ray actors that hold the model; ``map_shards`` is one pass over the data."""

    def __init__(self, plan, log, raylets: list[int] | None = None, started: "StartedWorkers | None" = None):
        self.plan = plan
        self.log = log
        gpu = plan.gpus > 0
        # CPUs held by workers started before the plan count as free: they are this run's.
        held = started.count * started.cpus if started is not None and not started.gpu else 0.0
        cpus = worker_cpus(plan.workers, gpu, held)
        self._need = ("GPU", 1.0) if gpu else ("CPU", cpus)
        # The raylet and GCS of a local Ray this driver started: when one dies, Ray ends this
        # process (exit 1, no message) ten to sixty seconds later, so they are watched every second.
        self._raylets = list(raylets or [])
        self._nodes_checked = time.monotonic()
        # Workers keep shards in memory only for the passes after the first (spectral
        # quantities): in a one-pass run the cache would grow with the data for nothing.
        cache = SHARD_CACHE_BYTES if plan.passes > 1 else 0
        begun = StartedWorkers(plan.job, plan.workers, gpu, cpus, start=False)
        if started is not None and started.fits(plan.workers, gpu, cpus):
            begun = started
        elif started is not None:
            started.close()  # started for another layout (fewer shards than workers): start afresh

        def start():
            actor = begun.actor()
            actor.keep_shards.remote(cache)  # runs before any call made after it
            return actor

        self._start = start
        self.actors = begun.actors[:plan.workers]
        for extra in begun.actors[plan.workers:]:
            ray.kill(extra)
        for actor in self.actors:
            actor.keep_shards.remote(cache)
        self.actors += [start() for _ in range(plan.workers - len(self.actors))]
        try:
            infos = _await_start([a.info.remote() for a in self.actors], self.log)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise ComputeError(
                f"the {plan.workers} workers did not all start within {WORKER_START_SECONDS:.0f} s (the cluster may "
                f"lack the CPUs/GPUs they ask for, or be busy with other work): check `ray status`, or run "
                f"with fewer --workers") from None
        self.names = [info["worker"] for info in infos]
        # The local Ray's own processes (agents, worker processes): when its raylet dies they
        # are orphaned and live on, so a run that stops for that reason ends them.
        self._ray_children = processes.children(self._raylets)
        # Replacements for lost workers until they have loaded the model: info ref -> (actor, started).
        self._starting: dict = {}
        self.passes = 0
        # Shards taken from staging: the main pass's (the manifest's), and the last staged pass's.
        self.resumed, self.last_resumed = [], []
        # Per worker, over every pass: shards and rows computed and the seconds they took in the
        # worker (the manifest's ``per_worker``: each node's throughput on a cluster).
        self.throughput: dict[str, dict] = {}
        # A worker lost for good (after Ray's restarts) is replaced, this many times in all.
        self.replacements_left = 2 * plan.workers

    def _ready(self, every: bool = True) -> list:
        """The workers that have loaded the model (with ``every``, all of them if none has)."""
        starting = {actor for actor, _ in self._starting.values()}
        return [actor for actor in self.actors if actor not in starting] or (self.actors if every else [])

    def _resume_hint(self) -> str:
        return f"run the same command with --run-id {self.plan.run_id} to resume (finished shards are kept)"

    def map_shards(self, method: str, argument, label: str, progress_stream, show: bool = True,
                   store=None) -> Reducer:
        """Runs ``actor.<method>(shard, argument)`` on every shard, adding results as they arrive.

        Each shard is added once, by its index, whatever happens to the workers. A shard whose
        worker died (after Ray restarted it and ran the shard again ``MAX_RESTARTS`` times) or
        that raised an ordinary exception is moved to another worker, up to ``policy.SHARD_RETRIES``
        more times; then the run stops with a ``ComputeError`` naming the shard. Input errors
        found by a worker stop the run at once. With ``store`` (a ``staging.PartialStore``),
        shards already staged are not computed again, once the workers have found their input
        unchanged (``resume.unchanged``), and each new one is staged as it arrives. Each shard's
        status is kept in a ``PassLedger``; what to do with it is ``policy.make_decision``'s.
        """
        argument_ref = ray.put(argument)

        def launch(actor, shard):
            return getattr(actor, method).remote(shard, argument_ref)

        ledger = PassLedger(self.plan.data.shards, launch)
        reducer = Reducer()
        progress = Progress(progress_stream, self.plan.data.rows, label, enabled=show)
        if store is not None:
            self._resume(store, ledger, reducer, progress, progress_stream)
        ledger.queue_unfinished()
        keep = self._keeper(ledger, reducer, progress, store)
        ledger.start(self._ready(every=False))  # the others join once they have loaded the model
        while not ledger.complete and (ledger.inflight or (ledger.pending and self._starting)):
            waiting = list(ledger.inflight) + list(self._starting)
            done, _ = ray.wait(waiting, num_returns=1, timeout=1.0 if self._raylets else LIVENESS_SECONDS)
            if not done or self._raylets:
                self._check_live(bool(ledger.inflight), ledger.finished, len(ledger.shards))
            if not done:
                if ledger.inflight and time.monotonic() - ledger.reported >= WAIT_REPORT_SECONDS:
                    ledger.reported = time.monotonic()
                    self.log.write(_waiting_line(ledger.inflight, ledger.last_result))
            elif done[0] in self._starting:
                self._joined(done[0], ledger)
            else:
                self._arrived(done[0], ledger, keep)
            ledger.fill()
            if ledger.idle and not ledger.pending and ledger.durations:
                self._back_up(ledger)
        if not ledger.complete:
            raise ComputeError(f"shards {ledger.missing()[:10]} were never computed (no worker left): "
                               f"{self._resume_hint()}")
        self.passes += 1
        return reducer

    def _resume(self, store, ledger: PassLedger, reducer: Reducer, progress: Progress, stream) -> None:
        """Adds the shards ``store`` holds whose input is unchanged (``resume.unchanged``) as finished."""
        shards = ledger.shards
        staged = unchanged(store.load(shards), shards, self._ready(), self.log,
                           1.0 if self._raylets else LIVENESS_SECONDS, lambda: self._check_live(True, 0, 0))
        for index, partial in sorted(staged.items()):
            reducer.add(partial)
            ledger.finish(index)
        self.resumed, self.last_resumed = (self.resumed if self.passes else sorted(staged)), sorted(staged)
        if staged:
            stream.write(f"resumed {len(staged)} of {len(shards)} shards from {store.location}; "
                         f"computing {len(shards) - len(staged)}\n")
            progress.rows = sum(s.rows for s in shards if ledger.status[s.index].finished)
            progress.shards = ledger.finished

    def _keeper(self, ledger: PassLedger, reducer: Reducer, progress: Progress, store):
        """``keep(result, shard)``: stages (with ``store``) and adds the first result of a shard."""
        kill_driver = faults.active("kill-driver") if store is not None else None
        kill_driver = kill_driver if kill_driver and kill_driver.get("pass", "main") == store.pass_name else None

        def keep(result, shard) -> None:
            if store is not None:
                store.save(shard, result.partial, result.digests)
                ledger.saved += 1
                if kill_driver is not None and ledger.saved >= int(kill_driver.get("shards", 1)):
                    faults.die(f"kill-driver after {ledger.saved} shards")
            reducer.add(result.partial)
            self._count(result, shard.rows)
            progress.update(shard.rows, len(ledger.shards))
            if result.worker not in self.names:
                self.names.append(result.worker)

        return keep

    def _joined(self, ref, ledger: PassLedger) -> None:
        """A replacement worker has loaded the model (or failed to): only then does it get
        shards, so a worker no node can host never holds one."""
        actor, _ = self._starting.pop(ref)
        try:
            ray.get(ref)
            ledger.idle.append(actor)
        except ray.exceptions.RayError:
            self._drop(actor)

    def _arrived(self, ref, ledger: PassLedger, keep) -> None:
        """A copy of a shard has returned: its result is kept (``keep``) if it is the first, its
        failure handed to ``_failed``; a worker that is still up takes the next shard."""
        actor, shard, submitted = ledger.take(ref)
        status = ledger.status[shard.index]
        try:
            result = ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, (InputError, ComputeError)):
                kind = policy.INPUT if isinstance(cause, InputError) else policy.DETERMINISTIC
                if policy.make_decision(status, kind, len(self.actors)) is Decision.GIVE_UP:
                    raise _one_line(cause) from None
            self._failed(ledger, shard, error_line(err), policy.ERROR)
            ledger.idle.append(actor)
            return
        except ray.exceptions.RayError as err:
            # RayActorError, ObjectLostError, ...: the worker process (or its node) is gone and
            # Ray's own restarts are spent. Drop it, start a fresh one, move the shard to a worker
            # that is up.
            self._drop(actor)
            self._failed(ledger, shard, f"its worker died ({type(err).__name__})", policy.LOST)
            return
        if result.index != shard.index:
            raise ComputeError(f"shard {shard.index} came back as shard {result.index}: {self._resume_hint()}")
        ledger.durations.append(time.monotonic() - submitted)
        ledger.last_result = ledger.reported = time.monotonic()
        if policy.make_decision(status, policy.RESULT, len(self.actors)) is Decision.DONE:
            ledger.finish(shard.index)
            keep(result, shard)
        ledger.idle.append(actor)

    def _failed(self, ledger: PassLedger, shard, cause: str, kind: str) -> None:
        """Queues a failed shard again, or stops the run (``policy.make_decision``)."""
        status = ledger.status[shard.index]
        decision = policy.make_decision(status, kind, len(self.actors))
        if decision is Decision.NOOP:
            return
        status.attempts += 1
        if decision is Decision.GIVE_UP:
            what = "lost its worker" if kind == policy.LOST else "failed"
            raise ComputeError(f"shard {shard.index} ({rows_of(shard)}) {what} after its retries: "
                               f"{_short(cause)}; {self._resume_hint()}") from None
        self.log.write(f"shard {shard.index} ({rows_of(shard)}): {cause}; trying again "
                       f"({status.attempts} of {policy.SHARD_RETRIES})\n")
        ledger.pending.appendleft(shard)

    def _count(self, result, rows: int) -> None:
        entry = self.throughput.setdefault(result.worker, {"worker": result.worker, "node": result.node, "shards": 0,
                                                           "rows": 0, "seconds": 0.0})
        entry["shards"] += 1
        entry["rows"] += int(rows)
        entry["seconds"] += float(result.seconds)

    def per_worker(self) -> list[dict]:
        """Each worker's shards, rows and compute seconds over every pass, with its rows per second."""
        return [{**entry, "seconds": round(entry["seconds"], 3),
                 "rows_per_second": round(entry["rows"] / entry["seconds"], 1) if entry["seconds"] > 0 else None}
                for entry in self.throughput.values()]

    def _back_up(self, ledger: PassLedger) -> None:
        """Computes a shard again on a free worker when its own has held it for more than twice
        the slowest shard of the pass (plus ``LIVENESS_SECONDS``, ``policy.late``): a worker
        whose node was lost waits for a restart that Ray may never place. The first copy to
        finish counts."""
        now = time.monotonic()
        for _, shard, submitted in list(ledger.inflight.values()):
            if not ledger.idle:
                return
            status = ledger.status[shard.index]
            if policy.make_decision(status, policy.HELD, len(self.actors), now - submitted, ledger.durations,
                                    LIVENESS_SECONDS) is not Decision.BACKUP:
                continue
            status.backed_up = True
            self.log.write(f"shard {shard.index} ({rows_of(shard)}): no result after {now - submitted:.0f} s (its "
                           f"worker may be waiting for a restart); computing it again on a free worker\n")
            ledger.submit(ledger.idle.pop(0), shard)

    def _drop(self, actor) -> None:
        """Forgets a lost worker and starts a replacement (``replacements_left`` in all)."""
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
        kind, amount = self._need
        done = f"; {finished} of {total} shards are finished and kept" if total else ""
        if self._raylets and not all(processes.running(pid) for pid in self._raylets):
            processes.end(self._raylets + self._ray_children)
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
        try:
            return [int(b) for b in ray.get([a.probe_memory.remote() for a in self.actors], timeout=60)]
        except ray.exceptions.RayError:
            return []  # a worker lost at the very end: the result stands, the figure is left out

    def call_one(self, method: str, argument):
        """One call on one worker (the regularization term), with the passes' liveness checks."""
        return _result_of(getattr(self._ready()[0], method).remote(argument), lambda: self._check_live(True, 0, 0))

    def close(self):
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - closing after a failure: some may be gone
                pass


def worker_cpus(workers: int, gpu: bool, held: float = 0.0) -> float:
    """CPUs each CPU worker asks for: the free CPUs (with ``held`` ones of this run's own
    workers) shared out, at least 1, never more than the cluster has; 1 beside a GPU."""
    if gpu:
        return 1.0
    free = ray.available_resources().get("CPU", 0.0) + held
    total = ray.cluster_resources().get("CPU", 0.0)
    if total > 0:
        # Workers started before the plan and still waiting for their CPUs (a previous run's
        # actors not yet released) hold none: counted as held on top of the free ones, a
        # worker asked for 4 CPUs of 2 and was never scheduled.
        free = min(free, total)
    if free <= 0:
        free = 1.0
    return max(1.0, float(int(free // workers))) if free >= workers else 1.0


class StartedWorkers:
    """Worker actors started before the plan is made, so that their start (TensorFlow import,
    model load) overlaps the driver's own (the plan loads the model and runs it on the first
    rows). ``WorkerPool`` takes them if the plan asks for as many workers with the same
    resources, else closes them and starts its own."""

    def __init__(self, job, count: int, gpu: bool, cpus: float, start: bool = True):
        self.job, self.count, self.gpu, self.cpus = job, int(count), bool(gpu), float(cpus)
        # (time.time(), time.monotonic()) when ``prestart`` began starting Ray: the run counts from then.
        self.began: tuple[float, float] | None = None
        self.uri = data_uri(job.data)
        self._class = remote_worker_class(self.gpu, self.cpus)
        self.actors = [self.actor() for _ in range(self.count)] if start else []

    @classmethod
    def for_job(cls, job, workers: int | None, cluster: dict) -> "StartedWorkers":
        """As many workers as the plan will ask for unless the data has fewer shards: the job's
        (or ``--workers``) count, capped by what the cluster can place."""
        gpus = int(cluster.get("GPU", 0))
        count = workers if workers is not None else job.workers
        capacity = gpus if gpus else int(cluster.get("CPU", os.cpu_count() or 1))
        if count == "auto":
            count = capacity
        count = max(1, min(int(count), capacity)) if capacity >= 1 else max(1, int(count))
        return cls(job, count, gpus > 0, worker_cpus(count, gpus > 0))

    def actor(self):
        return self._class.remote(self.job, self.uri, int(self.cpus) if not self.gpu else 0, self.gpu)

    def fits(self, count: int, gpu: bool, cpus: float) -> bool:
        return self.count >= count and self.gpu == gpu and self.cpus == cpus

    def close(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - some may be gone already
                pass
        self.actors = []


def prestart(job, workers: int | None, quiet: bool) -> StartedWorkers:
    """A local Ray and the job's workers, started before this process imports TensorFlow: the
    workers' own start (TensorFlow, the model) then overlaps the driver's import and plan. The
    driver's ``connect`` takes the Ray (``connect.start_early``) and its pool the workers;
    ``StartedWorkers.close`` and ``connect.release_early`` end them if the run stops first.
    Measured on the bundled MLP over 100,000 rows, 2 CPUs: the whole command from 16.1-17.4 s to
    14.5-15.6 s (3 runs each)."""
    began = time.time(), time.monotonic()
    connect.start_early(quiet)
    try:
        started = StartedWorkers.for_job(job, workers, connect.cluster_resources(True))
    except BaseException:
        connect.release_early(lambda: None)
        raise
    started.began = began
    return started


def _one_line(cause: Exception) -> Exception:
    """A worker's ``InputError`` or ``ComputeError`` as one line (the command line's ``error:``)."""
    return type(cause)(" ".join(str(cause).split()))


def _result_of(ref, check_live):
    """``ray.get(ref)`` once ready, ``check_live()`` every ``LIVENESS_SECONDS`` meanwhile; a
    worker's input or compute error comes out as itself, without Ray's traceback around it."""
    while not ray.wait([ref], timeout=LIVENESS_SECONDS)[0]:
        check_live()
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, (InputError, ComputeError)):
            raise _one_line(cause) from None
        raise


def _waiting_line(inflight: dict, since: float) -> str:
    """One line naming the shards a pass waits for, and for how long."""
    now = time.monotonic()
    oldest = sorted(inflight.values(), key=lambda item: item[2])[:3]
    shards = ", ".join(f"shard {shard.index} ({rows_of(shard)}, {now - submitted:.0f} s)"
                       for _, shard, submitted in oldest)
    more = f" and {len(inflight) - len(oldest)} more" if len(inflight) > len(oldest) else ""
    return (f"waiting for {shards}{more}: no shard finished for {now - since:.0f} s (the workers are reading the "
            f"data or computing; a read of object storage gives up after {STORAGE_TIMEOUT_SECONDS:.0f} s)\n")


def _await_start(refs: list, log) -> list:
    """The workers' ``info``, once all have loaded the model; a line every
    ``WAIT_REPORT_SECONDS`` while they have not; ``GetTimeoutError`` after ``WORKER_START_SECONDS``."""
    began = time.monotonic()
    while True:
        left = WORKER_START_SECONDS - (time.monotonic() - began)
        ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, min(left, WAIT_REPORT_SECONDS)))
        if not waiting:
            return ray.get(refs)
        if left <= WAIT_REPORT_SECONDS:
            raise ray.exceptions.GetTimeoutError()
        log.write(f"waiting for {len(waiting)} of {len(refs)} workers to start (import TensorFlow, load the "
                  f"model): {time.monotonic() - began:.0f} s so far, at most {WORKER_START_SECONDS:.0f} s\n")
