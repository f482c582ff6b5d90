"""The plan: everything decided before computing, printed by ``--dry-run`` and ``validate``.

``make_plan`` loads the model in the driver (GPUs hidden) as the workers will compute with it,
checks the data's schema against it, runs the model and the loss on the first rows, cuts the
shards, asks every quantity unit for its notes, plan-time inputs and cost, and refuses a plan
over its ``limits`` (``pipeline.cost.check``) before anything of the quantities' size exists.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import os
import secrets
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline import cost, memory
from pipeline.quantities import registry
from pipeline.batch_checks import check_batch, deterministic, model_refused
from pipeline.curvature.engine import CurvatureEngine, set_threads
from pipeline.curvature.losses import resolve_loss
from pipeline.curvature.model import hide_gpus, load_model, model_builder
from pipeline.curvature.probe import measure, probe
from pipeline.storage.dataset import check_schema, first_rows, plan_data, read_seconds, tensor_columns
from pipeline.storage.uri import local_copy, sha256

# Rows of the dataset that ``validate`` (and every plan) runs the model and the loss on.
PROBE_ROWS = 8


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
    # Arrays the quantity units read at plan time, by quantity name (the HVP vectors of a file).
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    cost: cost.Cost | None = None
    workload: cost.Workload | None = None

    @property
    def parameters(self) -> int:
        return self.signature.parameters

    @property
    def batches(self) -> int:
        return sum(-(-s.rows // self.job.data.batch_size) for s in self.data.shards)

    def context(self, log=None) -> registry.Context:
        """What the quantity units see while this plan runs."""
        return registry.Context(signature=self.signature, seed=self.job.seed, inputs=self.inputs, log=log,
                                factor_layers=self.workload.factor_layers if self.workload is not None else ())

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


def new_run_id(now: _dt.datetime) -> str:
    """``20261130T143621Z-1a2b``: the UTC start, and 16 random bits against collisions."""
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(2)


def model_fingerprint(model_spec) -> str:
    """sha256 of the model file (or of the builder name and its weights file)."""
    if model_spec.path:
        return sha256(model_spec.path)
    digest = hashlib.sha256(model_spec.builder.encode())
    if model_spec.weights:
        digest.update(sha256(model_spec.weights).encode())
    return digest.hexdigest()


def inspect_model(job) -> CurvatureEngine:
    """Loads the model in the driver (GPUs hidden) as the workers will compute with it: in the
    job's precision, called through the model adapter. Returns the curvature engine."""
    hide_gpus()
    return CurvatureEngine(load_model(job.model, fetch=local_copy, isolate=True), resolve_loss(job.loss),
                           precision=job.precision,
                           builder=model_builder(job.model), selected=job.variables)


def probe_data(job, engine, data):
    """Runs the model and the loss on the first rows, then times one gradient on the first
    batch (``pipeline.curvature.probe``). Returns ``(ProbeReport, Measurement)``."""
    if job.include_regularization:
        engine.check_regularization()
    columns = tensor_columns(job.data, engine.signature)
    batch = first_rows(data, job.data, engine.signature, PROBE_ROWS, job.precision)
    check_batch(batch, "the first rows", job.data, engine.loss, engine.signature, columns, data.locate)
    report = probe(engine, batch, columns, routes=registry.routes(job.quantities),
                   output_derivatives=bool({"fisher_diagonal", "ggn_diagonal"} & set(job.quantities)) or
                   job.quantities.get("influence", {}).get("curvature", "identity") != "identity",
                   factors=registry.per_layer(job.quantities))
    if job.data.batch_size > len(batch) and data.rows > len(batch):
        batch = first_rows(data, job.data, engine.signature, job.data.batch_size, job.precision)
        check_batch(batch, "the first batch", job.data, engine.loss, engine.signature, columns, data.locate)
    try:
        measured = measure(engine, batch)
    except Exception as exc:  # noqa: BLE001 - the same rows a worker would read first
        if not deterministic(exc):
            raise
        raise model_refused(exc, batch, "the first batch") from None
    # Read the first batches once more, streamed as a worker reads them (the first read also
    # checked the transform): decoding images in a data.transform can cost more than the gradient.
    read = read_seconds(data, job.data, engine.signature, len(batch), job.precision)
    return report, dataclasses.replace(measured, read_seconds=read)


def make_plan(job, output: str | None = None, run_id: str | None = None, workers: int | None = None,
              cluster: dict | None = None, now: _dt.datetime | None = None, shards: int | None = None) -> Plan:
    """Checks the job against the model and the data, decides shards and workers, and
    estimates the cost (``pipeline.cost``): a plan over ``job.limits`` is an ``InputError``.

    ``shards`` overrides ``job.shards`` (a resumed run keeps the layout it started with).
    ``cluster``: Ray's ``cluster_resources()``, plus ``node_memory`` (the smallest node's, in
    bytes) and ``nodes`` when the workers run on other machines than the driver.
    """
    began = time.perf_counter()
    now = now or _dt.datetime.now(_dt.timezone.utc)
    run_id = run_id or new_run_id(now)
    cluster = cluster or {}
    gpus = int(cluster.get("GPU", 0))
    if workers is None:
        workers = job.workers if job.workers != "auto" else (gpus or max(1, int(cluster.get("CPU", os.cpu_count() or 1))))
    data = plan_data(job.data, shards or job.shards, workers)
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
    if not gpus and "nodes" not in cluster:
        # A local run's workers share this machine's CPUs: the gradient the estimate scales is
        # timed with one worker's threads (TensorFlow's pools are sized once per process, so a
        # process that already ran TensorFlow keeps its own; the estimate then scales by them).
        set_threads(int(worker_cpus(workers)))
    engine = inspect_model(job)
    signature = engine.signature
    check_schema(data.schema, job.data, signature)
    trial, measured = probe_data(job, engine, data)
    plan = Plan(job=job, data=data, signature=signature, workers=workers, gpus=gpus if gpus else 0,
                run_id=run_id, date=now.strftime("%Y-%m-%d"), output=output or job.output,
                model_sha256=model_fingerprint(job.model), passes=1)
    plan.notes.extend(plan_notes)
    plan.notes.extend(data.notes)
    plan.notes.append(f"model and loss ran on the first {trial.rows} rows (mean loss {trial.loss:.6g})")
    facts = registry.PlanFacts(parameters=signature.parameters, batches=plan.batches, route=trial.route,
                                 per_example_route=trial.per_example_route, layer_routes=trial.layer_routes,
                                 variable_sizes=dict(zip(engine.names, engine.sizes)),
                                 route_checks=trial.route_checks, factor_layers=trial.factor_layers,
                                 predictive=engine.loss.family is not None, rows=data.rows,
                                 variable_shapes=tuple(tuple(v) for v in signature.variable_shapes))
    plan.notes.extend(registry.notes(job.quantities, facts))
    # Estimated and checked before anything of the quantities' size is built (random vectors
    # are drawn only when the main pass asks for them).
    plan.inputs = registry.prepare(job.quantities, signature, job.seed)
    plan.workload = _workload(plan, engine, trial)
    measured = dataclasses.replace(measured, plan_seconds=time.perf_counter() - began)
    plan.cost = registry.estimate(job.quantities, plan.workload, measured, plan.inputs)
    plan.passes = plan.cost.passes
    cost.check(plan.cost, memory_budget(job.limits, cluster, workers), job.limits, workers, bool(gpus))
    return plan


def _workload(plan: Plan, engine, trial) -> cost.Workload:
    outputs = sum(int(np.prod([d or 1 for d in spec.shape[1:]], dtype=np.int64)) for spec in plan.signature.outputs)
    return cost.Workload(
        parameters=plan.parameters, largest_variable=max(engine.sizes), outputs=max(1, outputs),
        itemsize=8 if plan.job.precision == "float64" else 4, batch_size=plan.job.data.batch_size,
        batches=plan.batches, rows=plan.data.rows, workers=plan.workers, worker_cpus=worker_cpus(plan.workers),
        gpus=plan.gpus > 0, route=trial.route, per_example_route=trial.per_example_route,
        rule_parameters=sum(size for name, size in zip(engine.names, engine.sizes)
                            if trial.layer_routes.get(name) == "layer rule"),
        rule_rows=trial.rule_rows,
        diagonal_block=engine.diagonal_block, vjp_budget=engine.vjp_budget,
        variables=tuple(plan.signature.variables), variable_shapes=tuple(plan.signature.variable_shapes),
        factor_layers=trial.factor_layers)


def worker_cpus(workers: int) -> float:
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
