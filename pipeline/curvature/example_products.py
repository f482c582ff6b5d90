"""Per-example products: ``sum_r w_r (J_r^T u_r)**2`` over rows r, each an example i and a
cotangent ``u_r`` in its output space, for every variable without a per-layer rule.

The empirical Fisher takes ``u = dl_i/df_i``, the exact GGN the columns of a square root of
``Lambda_i = d2 l_i/df_i2`` (C columns for C outputs), the Monte Carlo GGN ``dl_i(y'_i)/df_i``
with ``y'`` drawn from the model's predictive distribution (``sampling``). Each row's
vector-Jacobian product of the whole model is formed by ``tf.vectorized_map`` (about 4
gradients per chunk of rows) or, on the loop route, ``tf.map_fn``; rows x (variables' size)
floats stay within ``vjp_budget``. The output-space derivatives come from the very loss the
gradient differentiates (``check`` proves it once per model).

Source: Martens (2014), "New insights and perspectives on the natural gradient method" (GGN,
Fisher); Dangel, Kunstner and Hennig (2020), "BackPACK" (``DiagGGNExact``, ``DiagGGNMC``,
``SumGradSquared``).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from pipeline.curvature import sampling
from pipeline.curvature.core import Core
from pipeline.curvature.passes import Pass
from pipeline.curvature.tensors import as_dtype, batch_tensor, dense, flat_outputs, valid_fraction
from pipeline.errors import InputError
from pipeline.probes import row_uniforms


class ExampleProducts:
    """The per-example family: output-space derivatives and the squared per-example products
    of the variables given (the engine combines them with the layer rules' sums)."""

    def __init__(self, core: Core):
        self.core = core
        self._checked = False  # ``check`` runs once

    def batch_derivatives(self, batch: Pass, hessian: bool):
        """``derivatives`` of ``batch`` at its own labels, computed once per pass (as numpy-able
        tensors): ``(f [B, C], dl [B, C], Lambda [B, C, C] or empty, valid [B, outputs])``."""
        if not hessian and True in batch.derivatives:
            return batch.derivatives[True]  # the same f, dl and valid, with Lambda beside them
        if hessian not in batch.derivatives:
            fn = self.core.compiled(("outputs", hessian), lambda a, b: self.derivatives(a, b, hessian),
                                    batch.specs[:2])
            batch.derivatives[hessian] = fn(batch.x, batch.y)
        return batch.derivatives[hessian]

    def sampled_gradient(self, batch: Pass, labels):
        """``dl_i(y'_i)/df_i`` [B, C] at the labels ``labels`` (one array per output)."""
        fn = self.core.compiled(("outputs", False), lambda a, b: self.derivatives(a, b, False), batch.specs[:2])
        return fn(batch.x, labels)[1]

    def derivatives(self, inputs, labels, hessian: bool):
        """Flattened outputs f [B, C], dl_i/df_i [B, C], if asked Lambda_i [B, C, C], and the
        fraction of each output's positions the loss averages over, [B, outputs] (``_valid_fraction``)."""
        outputs, masks = self.core.adapter.forward(list(inputs))
        static = [o.shape[1:] for o in outputs]
        if all(d is not None for shape in static for d in shape):
            shapes = [list(shape) for shape in static]
            sizes = [int(np.prod(shape)) for shape in static]
        else:  # open axes (sequence lengths): sizes known only when the batch runs
            shapes = [tf.shape(o)[1:] for o in outputs]
            sizes = [tf.reduce_prod(shape) for shape in shapes]
        flat = tf.concat([tf.reshape(o, [tf.shape(o)[0], -1]) for o in outputs], axis=1)

        def loss_of(f):
            outs = []
            for part, shape, known in zip(tf.split(f, sizes, axis=1), shapes, static):
                shape = shape if isinstance(shape, tf.Tensor) else tf.constant(shape, tf.int32, [len(shape)])
                out = tf.reshape(part, tf.concat([tf.shape(part)[:1], shape], axis=0))
                out.set_shape([None, *known])
                outs.append(out)
            # The very loss the gradient differentiates (same f, same masks, same wrapper).
            losses = self.core.adapter.per_example_loss(list(labels), outs, masks)
            return tf.reduce_sum(tf.cast(losses, self.core.dtype))

        with tf.GradientTape() as second:
            second.watch(flat)
            with tf.GradientTape() as first:
                first.watch(flat)
                value = loss_of(flat)
            dl = first.gradient(value, flat)  # per example: l_i depends on f_i only
        valid = tf.stack([valid_fraction(m, o, self.core.dtype) for o, m in zip(outputs, masks)], axis=1)
        if not hessian:
            return flat, dl, tf.zeros([0, 0, 0], self.core.dtype), valid
        return flat, dl, second.batch_jacobian(dl, flat), valid

    def check(self, batch: Pass) -> None:
        """Raises ``InputError`` unless the Fisher and GGN route's output-space derivatives are
        those of the very loss the gradient differentiates: ``sum_i s_i J_i^T dl_i/df_i``
        (``_output_derivatives``, the per-example route) must equal the tape's gradient of the
        objective on this batch. They differ when the loss reads more than the tensor it is
        handed (a loss that looks behind a softmax for its logits, as Keras' cross-entropies
        do, given a copy). Once per engine; cost: two forward and two backward passes."""
        if self._checked:
            return
        self._checked = True
        x, y, s = batch.batch

        def both(a, b, c):
            _, dl, _, _ = self.derivatives(a, b, False)
            with tf.GradientTape() as tape:
                flat = flat_outputs(self.core.adapter.forward(list(a))[0], self.core.dtype)
                value = tf.reduce_sum(flat * tf.stop_gradient(c[:, None] * dl))
            implied = dense(tape.gradient(value, self.core.variables,
                                          unconnected_gradients=tf.UnconnectedGradients.ZERO))
            return self.core.flatten([tf.cast(g, self.core.dtype) for g in implied]), self.core.loss_and_gradient(
                self.core.objective, a, b, c)[1]

        implied, truth = (t.numpy().astype(np.float64) for t in tf.function(both)(x, y, s))
        tolerance = 1e-8 if self.core.dtype == tf.float64 else 1e-3
        error = float(np.abs(implied - truth).max(initial=0.0)) / max(float(np.abs(truth).max(initial=0.0)), 1e-300)
        if not error <= tolerance:
            raise InputError(
                f"the loss {self.core.loss.name or 'function'}'s derivatives with respect to the model's outputs "
                "do not "
                f"reproduce its gradient on the first {int(s.shape[0])} rows (relative error {error:.2g}): the loss "
                "reads more than the output tensor it is given (e.g. the logits behind a softmax/sigmoid output), "
                "so the Fisher and GGN would be wrong; give the model a linear output and the loss "
                "from_logits: true, or ask only for quantities that need no output derivatives (gradient, "
                "hessian_diagonal, hvp, trace, eigenvalues, spectrum, hessian)")

    def sum_sq_vjp(self, inputs, cotangents, row_weights, moments: bool, loop: bool = False, positions=None):
        """sum_r w_r (J_r^T u_r)**2 over rows r (and w^2 q, w^2 q^2 when ``moments``).

        ``inputs`` holds one row per product (an example may repeat), ``cotangents`` [R, C]
        the vectors u_r in the flattened output space. Vectorised over rows. ``positions``:
        the variables (indices into ``self.core.variables``) to differentiate, all when None; the
        result is their entries, in flat order.
        """
        variables = self.core.variables if positions is None else [self.core.variables[k] for k in positions]

        def one(args):
            xs, u = args
            with tf.GradientTape() as tape:
                outputs, _ = self.core.adapter.forward([x[None] for x in xs])
                flat = flat_outputs(outputs, self.core.dtype)
                value = tf.reduce_sum(flat[0] * u)
            grads = tape.gradient(value, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            g = tf.concat([tf.reshape(tf.cast(x, self.core.dtype), [-1]) for x in dense(grads)], axis=0)
            return g * g

        if loop:  # one row after another (see ``routes.RouteChooser``)
            squares = tf.map_fn(one, (list(inputs), cotangents), fn_output_signature=self.core.dtype)
        else:
            squares = tf.vectorized_map(one, (list(inputs), cotangents))  # [R, P]
        weighted = tf.linalg.matvec(squares, row_weights, transpose_a=True)
        if not moments:
            return weighted, weighted, weighted
        w2 = row_weights * row_weights
        return (weighted, tf.linalg.matvec(squares, w2, transpose_a=True),
                tf.linalg.matvec(squares * squares, w2, transpose_a=True))

    def squares(self, raw_inputs, example, cotangents, row_weights, moments, positions):
        """Runs ``_sum_sq_vjp`` for the variables ``positions`` over rows in chunks that keep
        rows x (their size) under the budget: the sums over their entries, in flat order (one,
        or three with ``moments``)."""
        in_specs = self.core.specs(raw_inputs, [])[0]
        loop = self.core.routes.per_example == "loop"
        positions = tuple(positions)
        size = int(sum(self.core.sizes[k] for k in positions))
        dtype = self.core.dtype
        fn = self.core.compiled(("squares", moments, loop, positions),
                                lambda a, u, w: self.sum_sq_vjp(a, u, w, moments, loop, positions),
                                (in_specs, tf.TensorSpec([None, None], dtype), tf.TensorSpec([None], dtype)))
        chunk = max(1, self.core.vjp_budget // max(1, size))
        totals = [np.zeros(size) for _ in range(3 if moments else 1)]
        for start in range(0, len(example), chunk):
            pick = example[start:start + chunk]
            rows_in = [batch_tensor(np.asarray(a)[pick], self.core.dtype) for a in raw_inputs]
            out = fn(rows_in, as_dtype(cotangents[start:start + chunk], self.core.dtype),
                     as_dtype(row_weights[start:start + chunk], self.core.dtype))
            for total, value in zip(totals, out):
                total += value.numpy().astype(np.float64)
        return totals

    def sample_labels(self, flat, valid, rows, seed, sample):
        """Labels y' drawn from the model's predictive distribution (``sampling.draw_labels``,
        run eagerly), one array per output, and the scale [B, C] of the sampled loss gradient.
        ``flat`` [B, C] and ``valid`` [B, outputs] as ``_output_derivatives`` returns them."""
        family = self.core.predictive_family()
        shapes = self.core.output_shapes(flat.shape[1])
        uniforms = [row_uniforms(seed, sampling.stream(sample, position), rows, sampling.uniform_count(family, shape))
                    for position, shape in enumerate(shapes)]
        labels, scale = sampling.draw_labels(family, tf.constant(flat, tf.float64), tf.constant(valid, tf.float64),
                                             uniforms, shapes, self.core.from_logits())
        return [label.numpy() for label in labels], scale.numpy()
