"""How a model's products are formed, "vectorised" (``pfor``) or "loop": decided once per model
on its first batch, and a vectorised route checked against its loop there, since ``pfor`` can be
silently wrong (a grouped convolution's Hessian rows, 100% off in TensorFlow 2.21).

The chooser sets ``Core.routes``; the exact family (Hessian rows) and the per-example family
(squared vector-Jacobian products) read it. It is handed their row functions, so neither family
knows the other or this module.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from pipeline.curvature.core import Core
from pipeline.curvature.tensors import flat_outputs


# The routes a vectorised (``pfor``) computation can take, each checked once against its loop:
# "route", the exact family's rows of H (exact diagonal, Hessian blocks); "per_example_route",
# the per-example products of the Fisher and GGN.
ROUTES = ("route", "per_example_route")



# Ops whose vectorised per-example products TensorFlow 2.21's oneDNN CPU kernels run into heap
# corruption (``RouteChooser.choose``): an einsum, and the batched matmuls Keras writes for one.
BATCHED_PRODUCTS = frozenset({"Einsum", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3"})

class RouteChooser:
    """Decides ``core.routes`` (``choose``) and keeps why each vectorised route was kept or
    dropped after its check (``checks``: ``{"route": ..., "per_example_route": ...}``).

    ``hessian_rows(objective, x, y, s, rows, block, loop)``: rows of ``H`` (``ExactBlocks``);
    ``sum_sq_vjp(x, u, w, moments, loop)``: squared per-example products (``ExampleProducts``).
    """

    def __init__(self, core: Core, hessian_rows, sum_sq_vjp):
        self.core = core
        self.hessian_rows = hessian_rows
        self.sum_sq_vjp = sum_sq_vjp
        self.checks: dict = {}
        self._unchecked = {"route": False, "per_example_route": False}

    def choose(self, objective, specs, batch=None, needs=ROUTES) -> str:
        """"vectorised" or "loop": how this model's exact diagonal is formed; also decides
        ``per_example``, for the Fisher and GGN products (both once per model).

        ``pfor`` cannot vectorise the ``while`` loops of recurrent layers (LSTM, GRU: it fails,
        or falls back to a loop inside a loop that runs for many minutes, PITFALLS.md). A model
        whose gradient graph holds one takes the loops: its exact diagonal by TensorFlow's
        ``while_loop`` Jacobian, its per-example products by ``tf.map_fn`` over the examples.
        Per-example products through an ``Einsum`` (``MultiHeadAttention``, ``EinsumDense``)
        in float32 on a CPU also take ``tf.map_fn``: vectorised, TensorFlow 2.21's oneDNN
        kernels corrupt the heap and the process dies (tests/zoo/repro_mha_onednn.py). Keras'
        TensorFlow backend writes many einsums with static shapes as ``BatchMatMulV2`` (a
        KerasHub BERT with LoRA had no ``Einsum`` op left and crashed 4 times in 9): those count too.
        A vectorised route chosen here is checked against its loop on ``batch`` the first time
        one is given and the caller ``needs`` it (``_check``): a job that never forms the
        exact family's rows of ``H`` (a Fisher alone) never pays for their check.
        """
        routes = self.core.routes
        if routes.route is None or routes.per_example is None:
            traced = tf.function(lambda a, b, c: self.core.loss_and_gradient(objective, a, b, c))
            kinds = {op.type for op in traced.get_concrete_function(*specs).graph.get_operations()}
            loops = bool(kinds & {"While", "StatelessWhile"})
            batched = bool(kinds & BATCHED_PRODUCTS)
            onednn = (self.core.dtype != tf.float64 and os.environ.get("TF_ENABLE_ONEDNN_OPTS") != "0"
                      and not tf.config.list_logical_devices("GPU"))
            # Chosen here (not given): a vectorised route is checked on the first batch.
            self._unchecked = {"route": routes.route is None and not loops,
                               "per_example_route": routes.per_example is None and not loops
                               and not (batched and onednn)}
            routes.route = routes.route or ("loop" if loops else "vectorised")
            routes.per_example = routes.per_example or (
                "loop" if loops or (batched and onednn) else "vectorised")
        if batch is not None and any(self._unchecked[name] for name in needs):
            self._check(objective, specs, batch, needs)
        return routes.route

    def _check(self, objective, specs, batch, needs=ROUTES) -> None:
        """Checks each vectorised (``pfor``) route chosen by ``choose`` against its loop on
        ``batch`` (at most 4 rows), once per model; a route that fails or disagrees takes the
        loop, and ``checks`` says why (the plan prints it).

        ``pfor`` can be silently wrong: TensorFlow 2.21's vectorised Jacobian of a grouped
        convolution (``Conv2D(groups=2)``) gave the second group's Hessian entries 100% off.
        The exact diagonal and the Hessian blocks are checked on rows of ``H`` (the first,
        middle and last entry of each variable, at most 48 rows: 2 x rows HVPs); the per-example
        products on every parameter of 4 rows' squared vector-Jacobian products.
        """
        x, y, s = [t[:4] for t in batch[0]], [t[:4] for t in batch[1]], batch[2][:4]
        tolerance = 1e-8 if self.core.dtype == tf.float64 else 1e-4
        if self._unchecked["route"] and "route" in needs:
            self._unchecked["route"] = False
            offsets = self.core.offsets
            picks = np.unique(np.concatenate([[o, o + (n - 1) // 2, o + n - 1]
                                              for o, n in zip(offsets, self.core.sizes)]))
            picks = tf.constant(picks[:48].astype(np.int32))
            block = tuple(range(len(self.core.variables)))

            def rows_of(loop):
                rows = tf.function(lambda a, b, c: self.hessian_rows(objective, a, b, c, picks, block, loop))
                return rows(x, y, s)

            self.core.routes.route, self.checks["route"] = _checked_route(
                lambda: rows_of(False), lambda: rows_of(True), tolerance, "vectorised Jacobian of H's rows")
        if self._unchecked["per_example_route"] and "per_example_route" in needs:
            self._unchecked["per_example_route"] = False
            width = int(flat_outputs(self.core.adapter.forward(list(x))[0], self.core.dtype).shape[1])
            # Any fixed, non-trivial cotangents: the check compares two routes to the same products.
            u = tf.constant(np.cos(np.arange(int(s.shape[0]) * width) + 0.3).reshape(-1, width), self.core.dtype)
            w = tf.ones([u.shape[0]], self.core.dtype)

            def squares(loop):
                return tf.function(lambda a: self.sum_sq_vjp(a, u, w, False, loop)[0])(x)

            self.core.routes.per_example, self.checks["per_example_route"] = _checked_route(
                lambda: squares(False), lambda: squares(True), tolerance, "vectorised per-example products")


def _checked_route(vectorised, loop, tolerance: float, what: str) -> tuple[str, str]:
    """``(route, reason)``: "vectorised" when ``vectorised()`` runs and agrees with ``loop()``
    within ``tolerance`` relative to the loop's largest entry, else "loop" and why."""
    want = loop().numpy().astype(np.float64)
    try:
        got = vectorised().numpy().astype(np.float64)
    except (ValueError, TypeError, NotImplementedError, LookupError, tf.errors.OpError) as error:
        return "loop", f"{what} failed ({type(error).__name__}): one product at a time"
    scale = max(float(np.abs(want).max(initial=0.0)), 1e-300)
    error = float(np.abs(got - want).max(initial=0.0)) / scale
    if not error <= tolerance:
        return "loop", f"{what} disagreed with the loop by {error:.2g} (relative) on the first rows: one at a time"
    return "vectorised", f"{what} checked against the loop on the first rows (relative error {error:.1g})"
