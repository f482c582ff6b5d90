"""What ``layer_inputs`` and ``kfac`` share: their factored layers as the plan found them, the
cost of per-layer ``d x d`` factors, the plan's lines about them, and reading their sums.

A factored layer is ``(path, d_in, d_out, positions per example, bias)`` (``Workload.
factor_layers``, found on the first rows by ``pipeline.curvature.kronecker_factors``).
"""

from __future__ import annotations

import numpy as np

from pipeline import cost
from pipeline.errors import InputError
from pipeline.memory import gib
from pipeline.options import Option, positive_int
from pipeline.reduce import Sums

#: A tapped forward pass, in gradients: the forward is about a third of a gradient.
FORWARD_GRADIENTS = 1.0 / 3.0

MAX_DIMENSION = Option(positive_int(8192), 8192, "widest factor allowed (d x d float64 sums per layer)")

#: Copies of each factor held: a worker's running sum and its float64 copy; the driver's running
#: sum, an arriving partial, staging's copy, the mean, its eigendecomposition and the table.
WORKER_COPIES, DRIVER_COPIES = 3, 6


def widths(layer: tuple, append: bool) -> tuple[int, int]:
    """``(d_A, d_S)``: the factors' widths of a factored layer, a 1 appended to the input or not."""
    _, inputs, outputs, _, _ = layer
    return inputs + (1 if append else 0), outputs


def check_widths(name: str, layers, append, limit: int) -> None:
    """Refuses a factor wider than ``limit`` (``max_dimension``) with its size and memory."""
    for layer in layers:
        for width in widths(layer, append(layer)):
            if width > limit:
                raise InputError(
                    f"quantities.{name}: layer {layer[0]!r} has a factor of {width:,} x {width:,} (float64 sums: "
                    f"{gib(8.0 * width * width)} per copy, {DRIVER_COPIES} in the driver), wider than "
                    f"max_dimension={limit:,}: leave the layer out with variables: [...], or raise "
                    f"quantities.{name}.max_dimension")


def factor_cost(name: str, w: cost.Workload, m: cost.Measurement, main: float, factors: int,
                append, passes: int = 0) -> cost.QuantityCost:
    """The cost of ``factors`` (1: A; 2: A and S) per factored layer: ``main`` gradients per batch
    in the main pass, ``passes`` more, and the factors' float64 copies in a worker and the driver
    (beside one batch's ``B x R x d`` rows per layer in the compute dtype)."""
    entries = 0.0
    rows = 0.0
    for layer in w.factor_layers:
        d_a, d_s = widths(layer, append(layer))
        entries += d_a * d_a + (d_s * d_s if factors > 1 else 0)
        rows += w.batch_size * max(1, layer[3]) * (d_a + (d_s if factors > 1 else 0))
    return cost.QuantityCost(name, main=main, passes=passes,
                             worker_bytes=8.0 * entries * WORKER_COPIES + rows * w.itemsize + m.activation_bytes,
                             driver_bytes=8.0 * entries * DRIVER_COPIES)


def layer_lines(name: str, layers, append, factors: str) -> list[str]:
    """The plan's line per factored layer: its factors' sizes, memory and positions."""
    shown = []
    for layer in layers:
        path, _, _, positions, _ = layer
        d_a, d_s = widths(layer, append(layer))
        sizes = [f"A {d_a:,} x {d_a:,}"] + ([f"S {d_s:,} x {d_s:,}"] if factors == "AS" else [])
        held = 8.0 * (d_a * d_a + (d_s * d_s if factors == "AS" else 0))
        shown.append(f"{path}: {', '.join(sizes)} ({gib(held)} float64), {positions:,} position"
                     f"{'' if positions == 1 else 's'} per example")
    return [f"{name}: {len(shown)} layer{'' if len(shown) == 1 else 's'}: " + "; ".join(shown)] if shown else []


def layer_sums(sums: Sums, kind: str, factor: str) -> dict[str, np.ndarray]:
    """``{layer path: sum}`` of one factor of one request kind, in the order summed (model order)."""
    prefix, suffix = f"{kind}/", f"/{factor}"
    return {key[len(prefix):-len(suffix)]: sums.raw(key) for key in sums.total.sums
            if key.startswith(prefix) and key.endswith(suffix)}


def symmetric(matrix: np.ndarray) -> np.ndarray:
    """``(M + M^T) / 2``: a sum of outer products, symmetric up to float rounding."""
    return (matrix + matrix.T) / 2
