"""Hessian-vector products: ``sum_i s_i H_i v_k`` for K vectors, and Hutchinson's
``z_k * (H z_k)``, sharing one forward pass and one gradient per batch.

Reverse-over-reverse: one persistent tape records the gradient, then each vector costs one
backward pass through it, about 1 + 0.9 K gradients for K vectors; this ordering measured
fastest in TensorFlow on CPU (``benchmarks/engine_bench.py``, PITFALLS.md). The loss and the
gradient come with the products (recorded on the ``Pass``). Where a GPU is visible (or
``xla="on"``), each compiled function may run under XLA, kept only where it agrees with the
plain graph and is faster (``XlaTrial``).

Source: Pearlmutter (1994), "Fast exact multiplication by the Hessian"; Hutchinson (1989), "A
stochastic estimator of the trace of the influence matrix for Laplacian smoothing splines".
"""

from __future__ import annotations

import time

import numpy as np
import tensorflow as tf

from pipeline.curvature.core import Core
from pipeline.curvature.passes import Pass
from pipeline.curvature.requests import BatchWork
from pipeline.curvature.tensors import dense, vector_spec
from pipeline.partial import Partial


class HvpProducts:
    """The HVP family: answers ``BatchWork.hvp_vectors`` (sums ``"hvp"`` [K, P]) and
    ``BatchWork.probes`` (``"hessian_probes"`` [K, P]), ``hvp_block`` vectors per compiled call.

    ``xla``: whether its functions may run compiled by XLA; ``xla_trials`` holds what each try
    measured (``XlaTrial``).
    """

    def __init__(self, core: Core, xla: bool):
        self.core = core
        self.xla = xla
        self.xla_trials: dict = {}
        # The vectors of the pass under way, converted once for all batches of a shard.
        self.vectors: dict = {}

    def answer(self, part: Partial, batch: Pass, work: BatchWork) -> None:
        """Adds this batch's products to ``part`` and records the loss (and, if ``work`` asks
        for it, the gradient) on ``batch``. Nothing when ``work`` asks for no vectors."""
        # Only this batch's vectors stay converted: a later pass's vectors replace an earlier
        # pass's (else a worker would keep every pass of a Lanczos run or of Hutchinson probes).
        live = {id(v) for v in (work.hvp_vectors, work.probes) if v is not None}
        self.vectors = {key: value for key, value in self.vectors.items() if key[0] in live}
        blocks = []  # (key, vectors): everything that needs Hessian-vector products
        if work.hvp_vectors is not None and len(work.hvp_vectors):
            blocks.append(("hvp", np.asarray(work.hvp_vectors)))
        if work.probes is not None and len(work.probes):
            blocks.append(("hessian_probes", np.asarray(work.probes)))
        hvp_block = self.core.hvp_block
        for key, vectors in blocks:
            results = []
            for start in range(0, len(vectors), hvp_block):
                chunk = vectors[start:start + hvp_block]
                with_gradient = work.gradient and batch.gradient is None
                fn = self.function(batch.specs, len(chunk), with_gradient, key == "hessian_probes",
                                   batch.objective, batch.tag)
                value, grad, products = fn(*batch.batch, self._vector_tensor(vectors, start, len(chunk)))
                batch.loss = value
                if with_gradient:
                    batch.gradient = grad
                results.append(products.numpy())
                del products  # before the float64 copy below: one fewer [K, P] at the peak
            part.sums[key] = (results[0] if len(results) == 1 else np.concatenate(results, axis=0)).astype(np.float64)

    def products(self, objective, inputs, labels, weights, vectors, with_gradient: bool, probe_products: bool):
        """(objective, gradient or None, H v_k for each row of ``vectors`` [K, P]).

        Reverse-over-reverse: the forward pass and the gradient are recorded once on a
        persistent tape; each vector then costs one backward pass through the gradient
        computation. Returning the gradient itself costs extra weight-gradient products, so
        it is computed only ``with_gradient``. With ``probe_products`` the rows are
        ``v_k * (H v_k)`` (Hutchinson), formed here in the compute dtype.
        """
        # Persistent only for several vectors: a persistent tape keeps what a single backward
        # pass would free (measured up to 0.1 gradient slower on the CNN of engine_bench.py).
        with tf.GradientTape(persistent=vectors.shape[0] > 1) as outer:
            with tf.GradientTape() as inner:
                value = objective(inputs, labels, weights)
            # Densified on the outer tape: an Embedding's gradient is IndexedSlices, which a
            # second backward pass cannot take (PITFALLS.md).
            grads = dense(inner.gradient(value, self.core.variables,
                                          unconnected_gradients=tf.UnconnectedGradients.ZERO))
        products = []
        for k in range(vectors.shape[0]):  # K is static: one backward pass each
            vector = vectors[k]
            if products:
                # One backward pass at a time: run side by side, the K passes each held their
                # own intermediates (13 probes on the CNN of benchmarks/probes_bench.py: 150 MiB
                # more, at the same speed).
                with tf.control_dependencies([products[-1]]):
                    vector = tf.identity(vector)
            v = self.core.unflatten(tf.cast(vector, grads[0].dtype))
            hv = outer.gradient(grads, self.core.variables, output_gradients=v,
                                unconnected_gradients=tf.UnconnectedGradients.ZERO)
            hv = self.core.flatten([tf.cast(h, self.core.dtype) for h in hv])
            products.append(hv * vectors[k] if probe_products else hv)
        del outer
        dtype = self.core.dtype
        gradient = self.core.flatten([tf.cast(g, dtype) for g in grads]) if with_gradient else tf.zeros([0], dtype)
        # One vector: a reshape, not a copy (Pack copies; P floats are ~0.05 of an MLP gradient).
        return value, gradient, (products[0][None] if len(products) == 1 else tf.stack(products))

    def function(self, specs, count: int, with_gradient: bool = False, probe_products: bool = False,
                 objective=None, tag: str = "data"):
        """The compiled ``(inputs, labels, weights, V[count, P]) -> (loss, gradient, HV)``."""
        objective = objective or self.core.objective
        key = (tag, "hvp", count, with_gradient, probe_products)
        signature = (*specs, vector_spec(count, self.core.parameters, self.core.dtype))

        def build(a, b, c, v):
            return self.products(objective, a, b, c, v, with_gradient, probe_products)

        plain = self.core.compiled(key, build, signature)
        if not self.xla:
            return plain
        trial = self.core.cached(key + ("xla",))
        if trial is None:
            xla = tf.function(build, input_signature=signature, reduce_retracing=True, jit_compile=True)
            trial = XlaTrial(plain, xla, 1e-10 if self.core.dtype == tf.float64 else 1e-4,
                             lambda report: self.xla_trials.__setitem__(key, report))
            self.core.keep(key + ("xla",), trial)
        return trial

    def _vector_tensor(self, vectors, start, count):
        """Vectors as tensors of the compute dtype, converted once for all batches of a shard."""
        key = (id(vectors), vectors.shape, start, count)
        if key not in self.vectors:
            if len(self.vectors) > 64:
                self.vectors.clear()
            # Any real dtype: Hutchinson's probes arrive as int8.
            tensor = tf.constant(np.asarray(vectors[start:start + count], dtype=self.core.dtype.as_numpy_dtype))
            self.vectors[key] = (vectors, tensor)  # holding ``vectors`` keeps its id unique
        return self.vectors[key][1]


class XlaTrial:
    """A compiled function and its XLA twin (``jit_compile=True``): the first call runs both,
    and XLA is kept only where it agrees and is faster.

    Agreement: ``max |xla - plain| <= tolerance * max |plain|`` over every output (XLA gave
    second derivatives through max-pooling wrong by ~4e-3, PITFALLS.md). Speed: the faster of
    two timed calls of each, after one that traces or compiles. A twin that fails to compile
    (an op XLA does not have) is dropped. ``record`` receives what was measured: ``{"agrees", "error", "plain_s",
    "xla_s", "chosen"}`` (with ``"failed"`` instead when XLA could not run). Cost: on the
    first batch, three calls of each function and one XLA compilation.
    """

    def __init__(self, plain, xla, tolerance: float, record):
        self.plain, self.xla, self.tolerance, self.record = plain, xla, tolerance, record
        self.chosen = None

    def __call__(self, *args):
        if self.chosen is None:
            self.chosen = self._choose(args)
        return self.chosen(*args)

    def _choose(self, args):
        def timed(fn):
            start = time.perf_counter()
            out = [np.asarray(t) for t in tf.nest.flatten(fn(*args))]
            return time.perf_counter() - start, out

        def fastest(fn):  # the first call traces (or compiles): only the next two are timed
            fn(*args)
            (first, out), (second, _) = timed(fn), timed(fn)
            return min(first, second), out

        plain_s, want = fastest(self.plain)
        try:
            xla_s, got = fastest(self.xla)
        except (tf.errors.OpError, ValueError, TypeError) as error:
            self.record({"failed": f"{type(error).__name__}: {' '.join(str(error).split())[:200]}", "chosen": "plain"})
            return self.plain
        scale = max([float(np.abs(w).max(initial=0.0)) for w in want], default=0.0)
        error = max([float(np.abs(g.astype(np.float64) - w).max(initial=0.0)) for g, w in zip(got, want)], default=0.0)
        agrees = error <= self.tolerance * max(scale, 1e-300)
        chosen = "xla" if agrees and xla_s < plain_s else "plain"
        self.record({"agrees": agrees, "error": error / max(scale, 1e-300), "plain_s": plain_s, "xla_s": xla_s,
                     "chosen": chosen})
        return self.xla if chosen == "xla" else self.plain
