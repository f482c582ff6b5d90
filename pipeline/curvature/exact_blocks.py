"""Exact second derivatives: the Hessian diagonal and dense Hessian blocks, row by row.

``diag(H)`` and ``H_bb`` (the block of a set of variables) are rows of ``H``, each one
Hessian-vector product with a basis vector: P products for the diagonal, b for a block of b
entries. Rows come ``diagonal_block`` at a time from a vectorised (``pfor``) Jacobian of the
gradient's entries, or, on the loop route (recurrent layers, or a ``pfor`` that failed its
check, ``routes.RouteChooser``), from TensorFlow's ``while_loop`` Jacobian: the same
numbers. Memory: ``diagonal_block x P`` floats per call (within ``vjp_budget`` on the loop).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from pipeline.curvature.core import Core
from pipeline.curvature.passes import Pass
from pipeline.curvature.requests import BatchWork
from pipeline.curvature.tensors import dense
from pipeline.partial import Partial


class ExactBlocks:
    """The exact family: answers ``BatchWork.hessian_diagonal="exact"`` (sums
    ``"hessian_diagonal"`` [P]) and ``BatchWork.hessian_blocks`` (``"hessian_block_<k>"``
    [b_k, b_k]), on the route ``core.routes.route`` (decided before it is asked)."""

    def __init__(self, core: Core):
        self.core = core

    def answer(self, part: Partial, batch: Pass, work: BatchWork) -> None:
        if work.hessian_diagonal == "exact":
            part.sums["hessian_diagonal"] = self.diagonal(batch)
        for number, block in enumerate(work.hessian_blocks):
            part.sums[f"hessian_block_{number}"] = self.block(batch, tuple(block))

    def diagonal(self, batch: Pass):
        """``sum_i s_i diag(H_i)`` [P] of ``batch.objective`` (float64), P Hessian-vector products
        with basis vectors: by blocks of ``diagonal_block`` gradient entries per variable,
        vectorised by ``pfor``, or TensorFlow's ``while_loop`` Jacobian on the loop route."""
        objective, specs, tag, tensors = batch.objective, batch.specs, batch.tag, batch.batch
        if self.core.routes.route == "vectorised":
            try:
                return self._diagonal_vectorised(objective, tensors, specs, tag)
            except (ValueError, NotImplementedError, tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
                # pfor could not vectorise an op of this model: the loop computes the same numbers.
                self.core.routes.route = "loop"
        return self._diagonal_loop(objective, tensors, specs, tag)

    def _diagonal_vectorised(self, objective, batch, specs, tag):
        pieces = []
        for index, n in enumerate(self.core.sizes):
            size = min(n, self.core.diagonal_block)
            fn = self.core.compiled(
                (tag, "diagonal", index),
                lambda a, b, c, start, index=index, size=size: self._diagonal_block(
                    objective, index, size, a, b, c, start),
                (*specs, tf.TensorSpec([], tf.int32)))
            for start in range(0, n, size):
                block = fn(*batch, tf.constant(start, tf.int32)).numpy()
                pieces.append(block[: min(size, n - start)].astype(np.float64))
        return np.concatenate(pieces)

    def _diagonal_loop(self, objective, batch, specs, tag):
        """diag(H) by TensorFlow's ``while_loop`` Jacobian of blocks of the flat gradient.

        One traced function for every variable (tracing backward passes through recurrent
        layers is what costs here); each block holds ``size x P`` numbers, within
        ``vjp_budget``. P backward passes in all.
        """
        size = max(1, min(self.core.parameters, self.core.diagonal_block, self.core.vjp_budget // self.core.parameters))
        fn = self.core.compiled((tag, "diagonal-loop", size),
                                lambda a, b, c, start: self._diagonal_rows(objective, a, b, c, start, size),
                                (*specs, tf.TensorSpec([], tf.int32)))
        pieces = []
        for start in range(0, self.core.parameters, size):
            block = fn(*batch, tf.constant(start, tf.int32)).numpy()
            pieces.append(block[: min(size, self.core.parameters - start)].astype(np.float64))
        return np.concatenate(pieces)

    def _diagonal_rows(self, objective, inputs, labels, weights, start, size):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                value = objective(inputs, labels, weights)
            grads = dense(inner.gradient(value, self.core.variables,
                                         unconnected_gradients=tf.UnconnectedGradients.ZERO))
            positions = tf.minimum(start + tf.range(size), self.core.parameters - 1)
            entries = tf.gather(self.core.flatten(grads), positions)
        rows = outer.jacobian(entries, self.core.variables, unconnected_gradients=tf.UnconnectedGradients.ZERO,
                              experimental_use_pfor=False)
        rows = self.core.flatten([tf.cast(r, self.core.dtype) for r in rows])  # [size, P]
        return tf.gather(rows, positions, axis=1, batch_dims=1)

    def _diagonal_block(self, objective, index, size, inputs, labels, weights, start):
        """diag(H) entries [start, start + size) of variable ``index`` (clamped at its end).

        A vectorised Jacobian of ``size`` gradient entries with respect to that variable only:
        ``size`` Hessian-vector products with basis vectors, done by ``pfor`` in one call.
        """
        variable = self.core.variables[index]
        n = self.core.sizes[index]
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                value = objective(inputs, labels, weights)
            grad = dense([inner.gradient(value, variable, unconnected_gradients=tf.UnconnectedGradients.ZERO)])[0]
            positions = tf.minimum(start + tf.range(size), n - 1)
            entries = tf.gather(tf.reshape(grad, [-1]), positions)
        rows = outer.jacobian(entries, variable, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        rows = tf.reshape(tf.cast(rows, self.core.dtype), [size, n])
        return tf.gather(rows, positions, axis=1, batch_dims=1)

    def block(self, batch: Pass, block: tuple[int, ...]):
        """``H_bb`` [b, b] of the variables ``block`` (positions in ``core.variables``), their
        entries in flat order: the rows of the block's gradient entries, differentiated with
        respect to the block's variables only, ``diagonal_block`` rows per call (vectorised by
        ``pfor``; TensorFlow's ``while_loop`` Jacobian on the loop route): b HVPs in all."""
        objective, specs, tag, tensors = batch.objective, batch.specs, batch.tag, batch.batch
        if self.core.routes.route == "vectorised":
            try:
                return self._hessian_block_rows(objective, tensors, specs, tag, block, loop=False)
            except (ValueError, NotImplementedError, tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
                self.core.routes.route = "loop"  # pfor could not vectorise an op of this model: the same numbers
        return self._hessian_block_rows(objective, tensors, specs, tag, block, loop=True)

    def _hessian_block_rows(self, objective, batch, specs, tag, block, loop: bool):
        offsets = self.core.offsets
        positions = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in block]).astype(np.int32)
        size = max(1, min(len(positions), self.core.diagonal_block))
        fn = self.core.compiled((tag, "hessian-block", block, size, loop),
                                lambda a, b, c, rows: self.hessian_rows(objective, a, b, c, rows, block, loop),
                                (*specs, tf.TensorSpec([size], tf.int32)))
        pieces = []
        for start in range(0, len(positions), size):
            rows = positions[start:start + size]
            padded = np.concatenate([rows, np.full(size - len(rows), rows[-1], np.int32)])
            pieces.append(fn(*batch, tf.constant(padded)).numpy()[:len(rows)].astype(np.float64))
        return np.concatenate(pieces)

    def hessian_rows(self, objective, inputs, labels, weights, rows, block, loop: bool):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                value = objective(inputs, labels, weights)
            grads = dense(inner.gradient(value, self.core.variables,
                                         unconnected_gradients=tf.UnconnectedGradients.ZERO))
            entries = tf.gather(self.core.flatten(grads), rows)
        columns = outer.jacobian(entries, [self.core.variables[i] for i in block],
                                 unconnected_gradients=tf.UnconnectedGradients.ZERO, experimental_use_pfor=not loop)
        return tf.concat([tf.reshape(tf.cast(c, self.core.dtype), [tf.shape(rows)[0], -1]) for c in columns], axis=1)
