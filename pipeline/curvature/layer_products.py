"""Per-layer products: the Fisher's and the GGN's squared per-example gradients of the
variables whose layer has a rule (``layer_rules``), from the layer's input and the gradient of
its pre-activation output, which one backward pass gives for the whole batch at once.

Per cotangent column (1 for the Fisher and the Monte Carlo GGN, C for the exact GGN): one
backward pass to the layer outputs and, per layer, a product of its inputs and output
gradients, about 0.8 gradients each, against ~4 for per-example products of the whole model.
Which layers take a rule is decided once per model on its first rows (``routes``, checked by
``rule_checks``); the other variables are the per-example family's. Two fused passes answer
a batch alone: the Fisher with the loss and the gradient (``loss_gradient_fisher``) and the Monte
Carlo GGN with them (``monte_carlo``).

Source: Dangel, Kunstner and Hennig (2020), "BackPACK: Packing more into backprop"; Goodfellow
(2015), "Efficient per-example gradient computations".
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from pipeline.curvature import layer_rules, sampling
from pipeline.curvature.core import Core
from pipeline.curvature.passes import Pass
from pipeline.curvature.rule_checks import checked_rules
from pipeline.curvature.requests import BatchWork
from pipeline.curvature.tensors import (as_dtype, batch_tensor, dense, flat_outputs, row_slices, take_rows,
                                        valid_fraction)
from pipeline.partial import Partial
from pipeline.probes import row_uniforms


class LayerProducts:
    """The layer-rule family. ``rules``: the checked rules (``layer_rules.Rule``), None until the
    first batch decides them, [] when the engine was built with ``layer_rule=False``."""

    def __init__(self, core: Core, enabled: bool = True):
        self.core = core
        self.rules = None if enabled else []

    def squares(self, raw_inputs, cotangents, row_weights, moments: bool, totals: list) -> None:
        """Adds ``sum_{i,m} W[i,m] (J_i^T U[i,m])**2`` of the rules' variables (with ``moments``
        also the sums with ``W**2`` of q and q**2) into ``totals`` ([P] float64 arrays, zero
        elsewhere), for cotangents U [B, M, C] and row weights W [B, M], ``rule_rows`` rows per
        call (``_layer_squares``)."""
        rules, columns = self.rules, cotangents.shape[1]
        in_specs = self.core.specs(raw_inputs, [])[0]
        fn = self.core.compiled(("layer-squares", moments, columns),
                                lambda a, u, w: self._layer_squares(rules, a, u, w, moments, columns),
                                (in_specs, tf.TensorSpec([None, columns, None], self.core.dtype),
                                 tf.TensorSpec([None, columns], self.core.dtype)))
        chunk = self.rule_rows(len(cotangents))
        for start in range(0, len(cotangents), chunk):
            pick = slice(start, start + chunk)
            self.add_sums(totals, fn([batch_tensor(np.asarray(a)[pick], self.core.dtype) for a in raw_inputs],
                                     as_dtype(cotangents[pick], self.core.dtype),
                                     as_dtype(row_weights[pick], self.core.dtype)))

    def routes(self, raw_inputs) -> dict[str, str]:
        """Per variable name, how its Fisher and GGN products are formed: "layer rule"
        (``layer_rules``) or "per-example" (vectorised products of the whole model). Decided
        once per model, on the first rows that reach it."""
        if self.rules is None:
            found = layer_rules.find_rules(self.core.model, self.core.names)
            self.rules = checked_rules(self.core, found, raw_inputs) if found else []
        covered = {k for rule in self.rules for k in rule.positions}
        return {name: "layer rule" if k in covered else "per-example" for k, name in enumerate(self.core.names)}

    def _flat_layout(self, out) -> tuple:
        """In a traced layer-rule function: what the rules computed (per variable of
        ``rules``, in rule order, a tuple of sums) as one [P] tensor per sum, in the flat
        parameter layout, zero at the variables without a rule. One transfer and one addition
        per sum then (``add_sums``), instead of one per variable and sum."""
        by_position = {k: sums for k, sums in zip((k for rule in self.rules for k in rule.positions), out)}
        count = len(out[0])
        return tuple(
            tf.concat([tf.reshape(tf.cast(by_position[k][j], self.core.dtype), [-1]) if k in by_position
                       else tf.zeros([size], self.core.dtype) for k, size in enumerate(self.core.sizes)], axis=0)
            for j in range(count))

    @staticmethod
    def add_sums(totals: list, flats) -> None:
        """Adds [P] tensors (``_flat_layout``'s sums, a gradient) into the float64 arrays
        ``totals`` in place; an entry that is None takes the first tensor's values (no zeros
        to allocate and add to: at P entries per sum, that costs as much as a small batch)."""
        for j, flat in enumerate(flats):
            value = flat.numpy()
            totals[j] = (value.astype(np.float64, copy=False) if totals[j] is None
                         else np.add(totals[j], value, out=totals[j]))

    def rule_rows(self, batch: int) -> int:
        """Rows per call of the layer rules: a layer that forms per-example gradients (a
        convolution, a Dense on sequences) holds rows x its size, kept under ``vjp_budget``; each
        call repeats the forward and backward passes, so the plan counts them."""
        held = max([self.core.sizes[k] for rule in self.rules or [] if rule.materialises for k in rule.positions],
                   default=0)
        return max(1, min(batch, self.core.vjp_budget // held)) if held else batch

    def _layer_squares(self, rules, inputs, cotangents, row_weights, moments: bool, columns: int):
        """``_sum_sq_vjp`` for the variables of ``rules`` by their per-layer rules
        (``layer_rules``): one forward pass, one backward pass to the layer outputs per column
        m of ``cotangents`` [B, columns, C] (row weights [B, columns]). Returns, per variable of
        the rules (in rule order), its flat sums: the first only, or all three with ``moments``."""
        with layer_rules.Taps(rules) as taps:
            with tf.GradientTape(persistent=columns > 1) as tape:
                outputs, _ = self.core.adapter.forward(list(inputs))
                flat = flat_outputs(outputs, self.core.dtype)
        tapped = taps.outputs()
        # A Dense on [B, n_in] inputs sums its columns before its one product:
        # sum_{i,m} W_im x_i**2 (outer) dz_im**2 = (x**2)^T (sum_m W_im dz_im**2).
        summed = {id(rule): None for rule in rules if rule.kind == "dense" and not rule.materialises and not moments}
        sums = {id(rule): None for rule in rules if id(rule) not in summed}
        for m in range(columns):  # static: one backward pass each
            grads = tape.gradient(flat, tapped, output_gradients=cotangents[:, m, :],
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
            for rule, dzs in zip(rules, taps.split(grads)):
                dzs = [tf.cast(d, self.core.dtype) for d in dzs]
                if id(rule) in summed:
                    weighted = row_weights[:, m, None] * tf.square(dzs[0])
                    summed[id(rule)] = weighted if summed[id(rule)] is None else summed[id(rule)] + weighted
                    continue
                got = rule.squares(dzs, row_weights[:, m], moments)
                got = [got[attribute] for attribute, _ in rule.variables]
                previous = sums[id(rule)]
                sums[id(rule)] = got if previous is None else [tuple(a + b for a, b in zip(x, y))
                                                               for x, y in zip(previous, got)]
        out = []
        for rule in rules:
            if id(rule) in summed:
                got = rule.squares_of_summed(summed[id(rule)])
                out += [(got[attribute],) for attribute, _ in rule.variables]
            else:
                out += sums[id(rule)]
        del tape
        count = 3 if moments else 1
        return self._flat_layout([part[:count] for part in out])

    def _layer_fisher(self, rules, inputs, labels, weights, with_gradient: bool):
        """(objective, gradient or [0], the Fisher's squares per rule variable) in one forward
        and one backward pass: the backward pass from ``sum_i s_i l_i`` reaches the layer
        outputs as ``s_i dz_i`` (``dz_i = J^T dl_i/df_i``), so the squares take row weights
        ``1/s_i`` (0 where ``s_i = 0``): ``sum_i s_i dW_i**2``."""
        with layer_rules.Taps(rules) as taps:
            with tf.GradientTape() as tape:
                value = self.core.objective(inputs, labels, weights)
        tapped = taps.outputs()
        grads = tape.gradient(value, tapped + (self.core.variables if with_gradient else []),
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        inverse = tf.math.divide_no_nan(tf.ones_like(weights), weights)
        out = []
        for rule, dzs in zip(rules, taps.split(grads[:len(tapped)])):
            got = rule.squares([tf.cast(d, self.core.dtype) for d in dzs], inverse, False)
            out += [got[attribute][:1] for attribute, _ in rule.variables]
        dtype = self.core.dtype
        gradient = (self.core.flatten([tf.cast(g, dtype) for g in dense(grads[len(tapped):])]) if with_gradient
                    else tf.zeros([0], self.core.dtype))
        return value, gradient, self._flat_layout(out)

    def _layer_mc(self, rules, inputs, labels, weights, uniforms, row_weights, samples: int, with_gradient: bool,
                  uniform: bool):
        """The Monte Carlo GGN by layer rules in one forward pass: ``(objective, gradient or
        [0], the three sums per rule variable)``.

        The pass records the loss at the data's labels (its gradient, if asked) and, per sample,
        labels drawn from its own outputs (``sampling.draw_labels``, with ``uniforms`` given per
        sample and output); the backward pass from ``sum_o sum_i scale_io l_io(y'_i)`` reaches
        the layer outputs as ``J_i^T (scale_i * dl_i(y'_i)/df_i)``, whose per-example squares
        (weights ``row_weights``) each rule sums. Cost: one forward pass, one backward pass to
        the variables if ``with_gradient``, and per sample one backward pass to the layer
        outputs and the rules' three sums."""
        outputs_count = len(self.core.signature.outputs)
        with layer_rules.Taps(rules) as taps:
            with tf.GradientTape(persistent=True) as tape:
                outputs, masks = self.core.adapter.forward(list(inputs))
                losses = self.core.adapter.per_example_loss(list(labels), outputs, masks)
                value = tf.reduce_sum(weights * tf.cast(losses, self.core.dtype))
                with tape.stop_recording():
                    flat = flat_outputs(outputs, tf.float64)
                    valid = tf.stack([valid_fraction(m, o, tf.float64) for o, m in zip(outputs, masks)], axis=1)
                shapes, from_logits = self.core.output_shapes(None), self.core.from_logits()
                # One scale per output and example: its first column.
                starts = np.cumsum([0] + [int(np.prod(shape)) for shape in shapes])[:-1]
                sampled_values = []
                for sample in range(samples):
                    with tape.stop_recording():
                        drawn, scale = sampling.draw_labels(
                            self.core.loss.family, flat, valid,
                            uniforms[sample * outputs_count:(sample + 1) * outputs_count],
                            shapes, from_logits)
                        drawn = [tf.cast(d, self.core.dtype) if d.dtype.is_floating else d for d in drawn]
                        scales = [tf.cast(scale[:, int(k)], self.core.dtype) for k in starts]
                    losses = self.core.adapter.output_losses(drawn, outputs, masks)
                    sampled_values.append(tf.add_n([tf.reduce_sum(c * l) for c, l in zip(scales, losses)]))
        tapped = taps.outputs()
        sums = None
        for sampled in sampled_values:  # static: one backward pass each
            grads = tape.gradient(sampled, tapped, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            got = []
            for rule, dzs in zip(rules, taps.split(grads)):
                squares = rule.squares([tf.cast(d, self.core.dtype) for d in dzs], row_weights, True, uniform)
                got += [squares[attribute] for attribute, _ in rule.variables]
            sums = got if sums is None else [tuple(a + b for a, b in zip(x, y)) for x, y in zip(sums, got)]
        gradient = tf.zeros([0], self.core.dtype)
        if with_gradient:
            grads = tape.gradient(value, self.core.variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            gradient = self.core.flatten([tf.cast(g, self.core.dtype) for g in dense(grads)])
        del tape
        return value, gradient, self._flat_layout(sums)

    def monte_carlo(self, part: Partial, batch: Pass, work: BatchWork, with_loss: bool) -> None:
        """``_layer_mc`` over the batch in chunks (every variable has a layer rule): the Monte
        Carlo GGN's sums, and the loss and gradient too when ``with_loss``."""
        rules = self.rules
        family = self.core.predictive_family()
        shapes = self.core.output_shapes(None)
        x, y, s, specs, rows = batch.x, batch.y, batch.s, batch.specs, batch.rows
        counts = [sampling.uniform_count(family, shape) for shape in shapes]
        with_gradient = with_loss and work.gradient
        in_specs, label_specs, vector = specs
        uniform_specs = [tf.TensorSpec([None, c], tf.float64) for _ in range(work.ggn_samples) for c in counts]
        weights = s.numpy().astype(np.float64)
        row_weights = weights / work.ggn_samples
        uniform = bool(np.all(row_weights == row_weights[0]))
        fn = self.core.compiled(("layer-mc", work.ggn_samples, with_gradient, uniform),
                                lambda a, b, c, u, w: self._layer_mc(rules, a, b, c, u, w, work.ggn_samples,
                                                                     with_gradient, uniform),
                                (in_specs, label_specs, vector, uniform_specs, vector))
        uniforms = [tf.constant(row_uniforms(work.seed, sampling.stream(sample, position), rows, c), tf.float64)
                    for sample in range(work.ggn_samples) for position, c in enumerate(counts)]
        n = len(rows)
        loss, gradient, totals = 0.0, [None], [None] * 3
        for pick in row_slices(n, self.rule_rows(n)):
            value, grad, out = fn(take_rows(x, pick), take_rows(y, pick), take_rows([s], pick)[0],
                                  take_rows(uniforms, pick),
                                  as_dtype(row_weights[pick or slice(None)], self.core.dtype))
            loss += float(value.numpy())
            if with_gradient:
                self.add_sums(gradient, [grad])
            self.add_sums(totals, out)
        if with_loss:
            part.sums["loss"] = np.asarray(loss, dtype=np.float64)
            if with_gradient:
                part.sums["gradient"] = gradient[0]
        part.sums["ggn_mc"], part.sums["ggn_mc_w2q"], part.sums["ggn_mc_w2q2"] = totals
        part.sums["ggn_mc_w2"] = np.asarray(work.ggn_samples * np.sum(row_weights ** 2))

    def take_monte_carlo(self, raw_inputs) -> bool:
        """Whether the Monte Carlo GGN takes ``_layer_mc``: every variable has a layer rule and
        the outputs' shapes are static (the uniforms are drawn before the pass)."""
        return self.core.static_outputs and self.core.loss.family is not None and self.cover_every_variable(raw_inputs)

    def cover_every_variable(self, raw_inputs) -> bool:
        """Whether every variable has a layer rule (decided on ``raw_inputs`` the first time)."""
        return set(self.routes(raw_inputs).values()) == {"layer rule"}

    def loss_gradient_fisher(self, part: Partial, batch: Pass, with_gradient: bool) -> None:
        """The loss, the gradient (``with_gradient``) and the empirical Fisher's squares
        (``"sum_grad_squared"``) of ``batch`` in one forward and one backward pass per chunk of
        ``rule_rows`` (``_layer_fisher``): every variable has a layer rule."""
        rules = self.rules
        x, y, s, specs = batch.x, batch.y, batch.s, batch.specs
        fn = self.core.compiled(("layer-fisher", with_gradient),
                                lambda a, b, c: self._layer_fisher(rules, a, b, c, with_gradient), specs)
        n = int(s.shape[0])
        loss, gradient, total = 0.0, [None], [None]
        for pick in row_slices(n, self.rule_rows(n)):
            value, grad, out = fn(take_rows(x, pick), take_rows(y, pick), take_rows([s], pick)[0])
            loss += float(value.numpy())
            if with_gradient:
                self.add_sums(gradient, [grad])
            self.add_sums(total, out)
        part.sums["loss"] = np.asarray(loss, dtype=np.float64)
        if with_gradient:
            part.sums["gradient"] = gradient[0]
        part.sums["sum_grad_squared"] = total[0]
