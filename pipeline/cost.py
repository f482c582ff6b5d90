"""What a job will cost before it runs: passes over the data, time, and peak memory per worker
and in the driver, per quantity; and the refusal of a plan that is over its limits.

Plain arithmetic (no TensorFlow, Ray or PyArrow). The plan hands in the model's sizes, the
data's layout and one measurement made in the driver (``Measurement``: one loss-and-gradient
on one batch of the dataset, timed, and the growth of resident memory while it ran). Time is
counted in *gradient equivalents* (that measured gradient) times factors measured with
``benchmarks/`` on this project's CPUs; memory is counted array by array from the code paths
the engine, the workers and the driver take. These are estimates for planning and refusing,
good to a small factor, not promises: the manifest records the estimate beside the measured
peaks and seconds (``estimate``, ``memory``), so a wrong one shows.

Each quantity unit (``pipeline.quantities``) gives its own ``QuantityCost`` from the building
blocks here; ``combine`` adds them up for the whole run, and ``pipeline.quantities.estimate``
does both::

    >>> m = Measurement(rows=64, gradient_seconds=0.01, activation_bytes=1 << 20,
    ...                 process_bytes=600 << 20, row_bytes=520)
    >>> w = Workload(parameters=2410, largest_variable=2048, outputs=10, itemsize=4, batch_size=64,
    ...              batches=30, rows=1900, workers=2, worker_cpus=1)
    >>> c = combine([QuantityCost("gradient"), QuantityCost("eigenvalues", passes=21, vectors=3)], w, m)
    >>> c.passes, [q.name for q in c.quantities]
    (22, ['gradient', 'eigenvalues'])
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from pipeline.errors import InputError
from pipeline.memory import gib

# One more Hessian-vector product on a batch whose forward pass and gradient are already on the
# tape: one backward pass through the gradient computation (an HVP alone measured 1.9x (MLP) to
# 3x (CNN) a gradient on CPU, i.e. 1 + about 1.5).
HVP_GRADIENTS = 1.5
# The exact diagonal's vectorised (pfor) Jacobian blocks against one HVP per parameter
# (benchmarks/diagonal_bench.py: 6x on an MLP, 13-15x on a CNN; the smaller is used).
DIAGONAL_VECTORISATION = 6.0
# One vectorised chunk of per-example products (Fisher, GGN), in gradients of the whole batch
# (the empirical Fisher measured 5.5 gradients on a CNN in one chunk).
PER_EXAMPLE_CHUNK = 4.0
# One example's gradient when per-example products run one example at a time (tf.map_fn).
PER_EXAMPLE_LOOP = 0.25
# Per-layer rules (``curvature.layer_rules``): one forward pass, then per cotangent column a
# backward pass to the layer outputs and each layer's product of its inputs and output
# gradients, in gradients of the batch (benchmarks/engine_bench.py).
LAYER_RULE_FORWARD = 0.5
LAYER_RULE_COLUMN = 0.8
# Start-up, phase by phase (the manifest's ``timings``; benchmarks/scale_bench.py and
# benchmarks/estimate_bench.py, 2 CPUs, 2026-12-06): a local Ray's start (3.7-4.0 s); the plan,
# which the estimate measures itself (``Measurement.plan_seconds``: model load, checks, the
# traces and timings on the first rows, 2 to 12 s); the workers' own start (TensorFlow's import,
# the model), which runs beside the plan and ends about 6 s after Ray's; the workers' traces of
# the compiled functions on their first batch (``Measurement.trace_seconds`` per function);
# publishing and Ray's shutdown.
RAY_START_SECONDS = 4.0
WORKER_READY_SECONDS = 6.0
PUBLISH_SECONDS = 1.5
# Functions a quantity compiles beyond the loss-and-gradient, in traces of that function: its
# main-pass work (layer rules, HVPs, per-example products) and its HVP passes.
TRACES_MAIN = 2.0
TRACES_PASSES = 2.0
# A Ray worker process beyond what the driver measured for TensorFlow and the model.
WORKER_OVERHEAD_BYTES = 250 << 20
# Bytes per entry of a published long table (variable string, index, value, ...) while built.
TABLE_ENTRY_BYTES = 48
# Float64 copies of the K x P vectors a worker holds at once for Hessian-vector products (the
# shared vectors, the products as computed and converted, the shard's total; the compute-dtype
# copy is counted apart), and the driver (the vectors, their copy in Ray's object store, each
# arriving partial, the running sum, staging's serialised copy, the finalised mean and its
# standard error). Measured with the bundled example at K = 4,000.
WORKER_VECTOR_COPIES = 3
DRIVER_VECTOR_COPIES = 8
# Workers keep their shards in memory between passes up to this size (``worker.ShardWorker``).
SHARD_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class Measurement:
    """What the plan measured in the driver on the first batch of the dataset."""

    rows: int  # rows of the measured batch
    gradient_seconds: float  # one loss-and-gradient on it, after tracing
    activation_bytes: int  # growth of resident memory while it ran (0 where it cannot be measured)
    process_bytes: int  # resident memory of the driver with TensorFlow and the model loaded
    row_bytes: int  # decoded bytes of one row (features, labels, weights)
    read_seconds: float = 0.0  # reading these rows and converting them (data.transform included)
    # Threads TensorFlow's pools had when the gradient was timed (0: TensorFlow's default, all CPUs).
    threads: int = 0
    trace_seconds: float = 0.0  # one trace of the loss-and-gradient function
    plan_seconds: float = 0.0  # the plan's own time up to the estimate


@dataclass(frozen=True)
class Workload:
    """The sizes a cost depends on."""

    parameters: int
    largest_variable: int
    outputs: int  # model output values per example (C)
    itemsize: int  # bytes of one number in the compute dtype
    batch_size: int
    batches: int  # batches in the whole dataset
    rows: int
    workers: int
    worker_cpus: float = 1.0  # CPUs each worker's TensorFlow uses (0 for GPU workers)
    gpus: bool = False
    route: str | None = None  # exact diagonal: "vectorised" | "loop"
    per_example_route: str | None = None  # Fisher/GGN products: "vectorised" | "loop"
    rule_parameters: int = 0  # parameters whose Fisher/GGN products take a per-layer rule
    rule_rows: int = 0  # rows per call of the layer rules (0: the whole batch)
    diagonal_block: int = 512  # CurvatureEngine.diagonal_block
    vjp_budget: int = 1 << 24  # CurvatureEngine.vjp_budget
    # The selected variables (paths and shapes, model order), for costs per block of H.
    variables: tuple[str, ...] = ()
    variable_shapes: tuple[tuple[int, ...], ...] = ()
    # Layers with Kronecker factors: (path, d_in, d_out, positions per example, bias).
    factor_layers: tuple = ()


@dataclass(frozen=True)
class BlockCost:
    """One diagonal block of a quantity taken per block (``blocks: variable | layer``)."""

    name: str
    parameters: int
    vectors: int  # Hessian-vector products per batch in each of its passes
    driver_bytes: float


@dataclass
class QuantityCost:
    """One quantity's share: gradient equivalents per batch in the main pass, extra passes
    (each ``vectors`` Hessian-vector products per batch), and memory beyond the base process."""

    name: str
    main: float = 0.0
    passes: int = 0
    vectors: int = 0
    worker_bytes: float = 0.0
    driver_bytes: float = 0.0
    seconds: float = 0.0
    blocks: tuple[BlockCost, ...] = ()  # per block, when it runs on several blocks of H
    # The cheaper way to the same number, named first when this quantity is the one over a limit.
    remedy: str = ""


#: Blocks the plan lists per quantity; the rest are summed up in one line.
SHOWN_BLOCKS = 8


@dataclass
class Cost:
    passes: int
    seconds: float
    worker_bytes: int
    driver_bytes: int
    quantities: list[QuantityCost] = field(default_factory=list)
    measured: Measurement | None = None
    startup: float = 0.0  # seconds of ``seconds`` before and after the passes (``startup_seconds``)

    def as_dict(self) -> dict:
        """For the manifest: the estimate a run can be checked against."""
        return {"passes": self.passes, "seconds": round(self.seconds, 1), "startup_seconds": round(self.startup, 1),
                "worker_bytes": self.worker_bytes,
                "driver_bytes": self.driver_bytes,
                "gradient_seconds": None if self.measured is None else self.measured.gradient_seconds}

    def describe(self, workload: Workload) -> list[str]:
        """The plan's cost table: one line per quantity, then the whole run."""
        rows = [("quantity", "passes", "time", "worker", "driver")]
        for q in self.quantities:
            rows.append((q.name, str(q.passes) if q.passes else "main", _duration(q.seconds),
                         "+" + gib(q.worker_bytes), "+" + gib(q.driver_bytes)))
        rows.append(("whole run", str(self.passes), _duration(self.seconds), gib(self.worker_bytes),
                     gib(self.driver_bytes)))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        for q in self.quantities:
            lines += _block_lines(q)
        m = self.measured
        where = "GPU workers will be faster" if workload.gpus else f"{workload.workers} workers"
        if m is not None:
            lines.append(f"(estimates from one gradient on {m.rows} rows measured in the driver: "
                         f"{m.gradient_seconds * 1e3:,.1f} ms, reading them {m.read_seconds * 1e3:,.1f} ms; {where}; "
                         f"time includes {self.startup:.0f} s of start-up and tracing)")
        return lines


def _block_lines(q: QuantityCost) -> list[str]:
    """``eigenvalues per block: dense_1 650 parameters, 4 HVPs per batch, +1.2 MiB driver; ...``."""
    if len(q.blocks) < 2:
        return []
    shown = [f"{b.name} {b.parameters:,} parameter{'' if b.parameters == 1 else 's'}, {b.vectors:,} HVPs per "
             f"batch, +{gib(b.driver_bytes)} driver" for b in q.blocks[:SHOWN_BLOCKS]]
    rest = q.blocks[SHOWN_BLOCKS:]
    if rest:
        shown.append(f"{len(rest)} more blocks of {min(b.parameters for b in rest):,} to "
                     f"{max(b.parameters for b in rest):,} parameters")
    together = (f"side by side, each pass {q.vectors:,} HVPs per batch in all" if q.passes else
                "in the main pass, basis-vector HVPs")
    return [f"{q.name}: {len(q.blocks)} blocks {together}"] + [f"  {line}" for line in shown]


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:,.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:,.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:,.1f} h"
    return f"{seconds / 86400:,.1f} days"


# ------------------------------------------------------------------------------ building blocks
# The engine's building blocks, which the quantity units (``pipeline.quantities``) combine into
# their own costs.
def vector_bytes(w: Workload, m: Measurement, count: int) -> float:
    """A worker's memory for ``count`` vectors of Hessian-vector products, and, beside the
    gradient's activations, those of the products' second backward pass (about as many again)."""
    return count * w.parameters * (8 * WORKER_VECTOR_COPIES + w.itemsize) + m.activation_bytes


def driver_vector_bytes(w: Workload, count: int) -> float:
    """The driver's memory for ``count`` vectors of per-probe or per-vector sums."""
    return DRIVER_VECTOR_COPIES * 8 * count * w.parameters


def per_example(w: Workload, m: Measurement, products: int) -> tuple[float, float]:
    """(gradient equivalents, worker bytes) of ``products`` per-example products per example:
    by per-layer rules for ``w.rule_parameters`` of the parameters, by vectorised (or looped)
    products of the whole model for the rest."""
    main, held = 1.0, 3 * 8 * w.parameters
    covered = min(w.rule_parameters, w.parameters)
    if covered:
        # Each call (rows within the budget of per-example gradients) repeats its passes.
        calls = math.ceil(w.batch_size / w.rule_rows) if w.rule_rows else 1
        main += calls * (LAYER_RULE_FORWARD + products * LAYER_RULE_COLUMN)
        # The activations of one pass, and at most one layer's per-example gradients at a time.
        held += 2 * m.activation_bytes + min(w.vjp_budget, w.batch_size * w.largest_variable) * w.itemsize
    rest = w.parameters - covered
    if rest:
        rows_per_chunk = max(1, w.vjp_budget // rest)
        if w.per_example_route == "loop":
            main += products * w.batch_size * PER_EXAMPLE_LOOP
        else:
            main += products * PER_EXAMPLE_CHUNK * math.ceil(w.batch_size / rows_per_chunk)
        held += 3 * min(w.vjp_budget, w.batch_size * rest) * w.itemsize + 2 * m.activation_bytes
    return main, held


def diagonal_driver_bytes(w: Workload) -> float:
    """A diagonal quantity in the driver: sums, the reduced total, and its rows in the tables."""
    return 4 * 8 * w.parameters + 2 * TABLE_ENTRY_BYTES * w.parameters


def exact_diagonal(w: Workload, m: Measurement) -> tuple[float, float]:
    """(gradient equivalents, worker bytes) of diag(H) by P basis-vector HVPs per batch."""
    block = min(w.diagonal_block, w.largest_variable)
    if w.route == "loop":
        rows = max(1, min(w.parameters, w.vjp_budget // max(1, w.parameters)))
        main = w.parameters * HVP_GRADIENTS + math.ceil(w.parameters / rows)
        held = 2 * w.vjp_budget * w.itemsize + 2 * m.activation_bytes
    else:
        # pfor vectorises ``block`` backward passes at once: each holds its own intermediates
        # (about one batch's activations) and its row of the variable's Hessian.
        blocks = math.ceil(w.parameters / max(1, block))
        main = w.parameters * HVP_GRADIENTS / DIAGONAL_VECTORISATION + blocks
        held = block * (m.activation_bytes + 2 * w.largest_variable * w.itemsize)
    return main, held + 3 * 8 * w.parameters


# ------------------------------------------------------------------------------ the whole run
def combine(parts: list[QuantityCost], w: Workload, m: Measurement) -> Cost:
    """Passes, seconds and peak bytes per worker and in the driver of a run whose quantities
    cost ``parts`` (each unit's ``Quantity.cost``).

    Time: ``startup_seconds`` plus, per pass, ``batches x gradient_seconds x (gradient
    equivalents per batch)``, plus ``batches x read_seconds`` once (every pass when the shards
    do not stay in the workers' memory), shared by the workers (``worker_speedup``). Memory: the
    driver's own resident memory with the model loaded (plus a Ray worker's overhead, for a
    worker), one batch and its activations, each quantity's arrays, and the shards a worker
    keeps between passes.
    """
    speedup = worker_speedup(w, m)
    per_batch = m.gradient_seconds * w.batches / speedup
    for q in parts:
        q.seconds = per_batch * (q.main + q.passes * (1.0 + HVP_GRADIENTS * q.vectors))
    passes = 1 + sum(q.passes for q in parts)
    shard_bytes = math.ceil(w.rows / max(1, w.workers)) * m.row_bytes
    # Reading (and data.transform) is paid once when a worker keeps its shards in memory
    # between passes, else on every pass.
    reads = 1 if passes == 1 or shard_bytes <= SHARD_CACHE_BYTES else passes
    startup = startup_seconds(parts, m)
    seconds = startup + per_batch + sum(q.seconds for q in parts) + reads * m.read_seconds * w.batches / speedup
    batch_bytes = m.activation_bytes + w.batch_size * m.row_bytes
    cache = 0 if passes == 1 else min(SHARD_CACHE_BYTES, shard_bytes)
    worker = m.process_bytes + WORKER_OVERHEAD_BYTES + batch_bytes + cache + sum(q.worker_bytes for q in parts)
    driver = m.process_bytes + sum(q.driver_bytes for q in parts)
    return Cost(passes=passes, seconds=seconds, worker_bytes=int(worker), driver_bytes=int(driver),
                quantities=parts, measured=m, startup=startup)


def worker_speedup(w: Workload, m: Measurement) -> float:
    """How many of the driver's measured batches the workers finish in its time: GPU workers,
    one each; CPU workers, one each when the gradient was timed with a worker's threads (the
    plan sizes its own pools so), in proportion to their threads when it was timed with more."""
    if w.gpus:
        return float(w.workers)
    threads = m.threads or os.cpu_count() or 1
    return max(1.0, w.workers * min(1.0, w.worker_cpus / threads))


def startup_seconds(parts: list[QuantityCost], m: Measurement) -> float:
    """Seconds of a run beside its passes: Ray's start, the plan (as measured), the rest of the
    workers' start, their traces (the loss-and-gradient and each quantity's functions, in
    ``trace_seconds``), publishing."""
    traces = 1.0 + sum((TRACES_MAIN if q.main else 0.0) + (TRACES_PASSES if q.passes else 0.0) for q in parts)
    return (RAY_START_SECONDS + m.plan_seconds + max(0.0, WORKER_READY_SECONDS - m.plan_seconds)
            + traces * m.trace_seconds + PUBLISH_SECONDS)


@dataclass(frozen=True)
class Budget:
    """Memory the run may use: per worker and in the driver, or both together on one machine."""

    worker_bytes: float | None = None
    driver_bytes: float | None = None
    machine_bytes: float | None = None  # local runs: the driver and every worker share it
    source: str = ""


def check(cost: Cost, budget: Budget, limits, workers: int, gpus: bool) -> None:
    """Refuses a plan over its limits (``InputError`` with the numbers and the way out)."""
    if limits.force:
        return
    force = "or set limits.force=true to run anyway"

    def way_out(size) -> str:
        top = max(cost.quantities, key=size, default=None)
        remedy = f"{top.remedy}, or " if top is not None and size(top) > 0 and top.remedy else ""
        return remedy + "use fewer probes, vectors or iterations, a smaller data.batch_size"

    if budget.worker_bytes is not None and cost.worker_bytes > budget.worker_bytes:
        raise InputError(f"each worker would need about {gib(cost.worker_bytes)} "
                         f"({_largest(cost, lambda q: q.worker_bytes, gib)}), more than the "
                         f"{gib(budget.worker_bytes)} {budget.source}: {way_out(lambda q: q.worker_bytes)}, {force}")
    if budget.driver_bytes is not None and cost.driver_bytes > budget.driver_bytes:
        raise InputError(f"the driver would need about {gib(cost.driver_bytes)} "
                         f"({_largest(cost, lambda q: q.driver_bytes, gib)}), more than the "
                         f"{gib(budget.driver_bytes)} {budget.source}: {way_out(lambda q: q.driver_bytes)}, {force}")
    together = cost.driver_bytes + workers * cost.worker_bytes
    if budget.machine_bytes is not None and together > budget.machine_bytes:
        share = _largest(cost, lambda q: q.driver_bytes + workers * q.worker_bytes, gib)
        raise InputError(
            f"the driver and {workers} workers would need about {gib(together)} ({gib(cost.worker_bytes)} "
            f"/worker, {gib(cost.driver_bytes)} driver; {share}), more than the "
            f"{gib(budget.machine_bytes)} {budget.source}: "
            f"{way_out(lambda q: q.driver_bytes + workers * q.worker_bytes)}, fewer --workers, {force}")
    if not gpus and cost.seconds > limits.hours * 3600:
        raise InputError(
            f"the run would take about {_duration(cost.seconds)} ({cost.passes:,} passes over the data; "
            f"{_largest(cost, lambda q: q.seconds, _duration)}), more than limits.hours={limits.hours:g}: "
            f"{way_out(lambda q: q.seconds)}, more workers, a larger limits.hours, {force}")


def _largest(cost: Cost, size, shown) -> str:
    """The quantity with the largest ``size(q)``, as ``quantities.NAME: SIZE of it``."""
    top = max(cost.quantities, key=size, default=None)
    if top is None or size(top) <= 0:
        return "the model and one batch"
    return f"quantities.{top.name}: {shown(size(top))} of it"
