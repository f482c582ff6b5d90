"""``validate``'s trial: the model and the loss run on the dataset's first rows, in the driver.

Every shape, rank, dtype and loss-signature problem then surfaces as one ``InputError`` that
names the column, the output and the fix, before any worker starts (a worker would find the
same problem in every shard). ``measure`` then times one gradient on the first batch, which
the plan's cost estimates (``pipeline.cost``) scale. TensorFlow only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from pipeline import memory
from pipeline.batch_checks import deterministic, error_text
from pipeline.cost import Measurement
from pipeline.curvature.engine import CurvatureEngine, batch_tensor
from pipeline.curvature.requests import BatchWork
from pipeline.errors import InputError


@dataclass(frozen=True)
class ProbeReport:
    """What the trial found: the rows it used, their mean loss, and how the exact diagonal and
    the per-example products will be formed (``CurvatureEngine.route_for``; None if not asked)."""

    rows: int
    loss: float
    route: str | None
    per_example_route: str | None
    # Per variable: "layer rule" or "per-example" (``CurvatureEngine.layer_routes``; {} if not asked).
    layer_routes: dict = field(default_factory=dict)
    rule_rows: int = 0  # rows per call of the layer rules (``CurvatureEngine.rule_rows``), 0 if not asked
    route_checks: dict = field(default_factory=dict)  # ``CurvatureEngine.route_checks`` ({} if not asked)
    # Per factored layer (``KroneckerFactors``): (path, d_in, d_out, positions per example, bias)
    # when layer_inputs or kfac is asked, else ().
    factor_layers: tuple = ()


def _shapes(arrays) -> str:
    return ", ".join(str(tuple(np.shape(a))) for a in arrays)


def _refuse_channels_first(model, exc: Exception) -> None:
    """TensorFlow has no CPU kernel for a channels_first convolution or pooling, and the plan runs
    the model on the CPU: the data is not the cause, so the message names the layer instead."""
    if not isinstance(exc, tf.errors.UnimplementedError):
        return
    for layer in model._flatten_layers(include_self=False):  # Keras has no public walk
        if getattr(layer, "data_format", None) == "channels_first":
            raise InputError(f"layer {layer.name!r} ({type(layer).__name__}) is channels_first, which TensorFlow's CPU "
                             "kernels do not run (the plan runs the model on the CPU): rebuild the model with "
                             "data_format='channels_last' and the same weights") from None


def probe(engine: CurvatureEngine, batch, columns, routes: tuple[str, ...] = (),
          output_derivatives: bool = False, factors: bool = False) -> ProbeReport:
    """Runs the model, each output's loss, and one loss-and-gradient step on ``batch``.

    ``columns`` is ``pipeline.storage.dataset.tensor_columns``: the column(s) behind each input and label.
    Raises ``InputError`` naming what failed. With ``routes`` (``routes.ROUTES`` the job's
    quantities take), those vectorised routes are checked against their loops
    (``CurvatureEngine.vectorisation_routes``) and the layer rules are decided; with ``output_derivatives``
    (Fisher or GGN asked), the output-space derivatives against the gradient
    (``CurvatureEngine.check_output_derivatives``); with ``factors`` (layer_inputs or kfac),
    the layers with Kronecker factors and their positions (an ``InputError`` when there are none
    or one cannot be factored). Cost: one forward pass per output loss check plus one traced
    gradient on a few rows, and the checks' few passes.
    """
    signature = engine.signature
    inputs = [batch_tensor(a, engine.dtype) for a in batch.inputs]
    try:
        engine.check_copy(batch.inputs)
    except InputError:
        raise
    except Exception:  # noqa: BLE001 - the model failing on the data is reported just below
        pass
    try:
        outputs, masks = engine.adapter.forward(inputs)
    except Exception as exc:  # noqa: BLE001 - any failure of the model on the data is an input problem
        _refuse_channels_first(engine.model, exc)
        specs = ", ".join(f"{s.name} {s.shape}" for s in signature.inputs)
        raise InputError(
            f"the model fails on the first {len(batch)} rows of data.features (columns {'; '.join(columns[0])}, "
            f"shapes {_shapes(batch.inputs)}; model inputs {specs}): {error_text(exc, 300)}: fix data.features "
            "or the model") from None
    losses = engine.adapter.keras_loss
    flags = engine.adapter.logit_outputs
    per_output = zip(range(len(outputs)), batch.labels, outputs, masks) if not (
        losses.loss.user_function and len(outputs) > 1) else []
    for k, label, output, mask in per_output:
        name = signature.outputs[k].name
        try:
            values = losses.output_losses([label], [output], [mask], (flags[k],))[0]
        except Exception as exc:  # noqa: BLE001
            raise InputError(
                f"the loss {engine.loss.name} fails on output '{name}' (shape {tuple(output.shape)}) with labels "
                f"from column '{columns[1][k]}' (shape {np.shape(label)}): {error_text(exc, 300)}: fix data.labels or "
                "the loss") from None
        if tuple(values.shape) != (len(batch),):
            raise InputError(f"the loss {engine.loss.name} gives shape {tuple(values.shape)} for output '{name}', "
                             f"not one value per example ({len(batch)}): return per-example losses")
    try:
        part = engine.partial(batch.inputs, batch.labels, batch.weights, batch.rows, BatchWork(gradient=True))
        chosen = engine.vectorisation_routes(batch.inputs, batch.labels, routes) if routes else (None, None)
        if output_derivatives:
            engine.check_output_derivatives(batch.inputs, batch.labels, batch.weights)
        layers = engine.layer_routes(batch.inputs) if routes else {}
        rule_rows = engine.rule_rows(1 << 30) if routes else 0
        factor_layers = ()
        if factors:
            try:
                found = engine.kronecker.layers()
            except InputError:
                if factors != "optional":  # per-example outputs and influence work without any
                    raise
                found = []
            positions = engine.kronecker.positions(batch.inputs) if found else {}
            factor_layers = tuple((info.path, info.inputs, info.outputs, positions[info.path], info.bias)
                                  for info, _ in found)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001
        if not deterministic(exc) and not isinstance(exc, (tf.errors.OpError, LookupError, AttributeError)):
            raise
        raise InputError(f"the loss or its derivatives fail on the first {len(batch)} rows: {error_text(exc, 300)}: "
                         "check data.labels and the loss against the model") from None
    weight = part.weight_sum if part.weight_sum > 0 else 1.0
    return ProbeReport(rows=len(batch), loss=float(part.sums["loss"]) / weight, route=chosen[0],
                       per_example_route=chosen[1], layer_routes=layers, rule_rows=rule_rows,
                       route_checks=dict(engine.route_checks) if routes else {}, factor_layers=factor_layers)


def measure(engine: CurvatureEngine, batch, repeats: int = 2) -> Measurement:
    """Times one loss-and-gradient on ``batch`` and measures the growth of resident memory
    while the first one runs (``pipeline.memory``; 0 where the peak cannot be reset).

    The growth is taken on the first call at this batch size: memory freed after a call stays
    with the process's allocator, so later calls would show none. Cost: ``repeats + 1``
    gradients on the batch; the fastest repeat is kept (the first call also pays for
    TensorFlow's one-time set-up).
    """
    work = BatchWork(gradient=True)

    def step():
        engine.partial(batch.inputs, batch.labels, batch.weights, batch.rows, work)

    reset = memory.reset_peak()
    before = memory.resident_bytes()
    step()
    grown = max(0, memory.peak_bytes() - before) if reset else 0
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    arrays = list(batch.inputs) + list(batch.labels) + ([] if batch.weights is None else [batch.weights])
    row_bytes = sum(np.asarray(a).nbytes for a in arrays) // max(1, len(batch))
    return Measurement(rows=len(batch), gradient_seconds=best, activation_bytes=int(grown),
                       process_bytes=memory.resident_bytes(), row_bytes=int(row_bytes),
                       threads=tf.config.threading.get_intra_op_parallelism_threads(),
                       trace_seconds=trace_seconds(engine, batch))


def trace_seconds(engine: CurvatureEngine, batch) -> float:
    """Seconds to trace the loss-and-gradient function afresh for ``batch``'s signature, as each
    worker does on its first batch (the unit of the plan's tracing estimate). Cost: one trace."""
    core = engine.core
    objective = core.objective
    fresh = tf.function(lambda a, b, c: core.loss_and_gradient(objective, a, b, c),
                        input_signature=core.specs(batch.inputs, batch.labels))
    start = time.perf_counter()
    fresh.get_concrete_function()
    return time.perf_counter() - start
