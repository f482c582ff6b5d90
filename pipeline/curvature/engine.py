"""One batch in, additive float64 partial sums out: the heart of hessian-pipeline.

Notation (``../shared/CONTRACT.md`` section 1): ``l_i`` the per-example loss, ``s_i`` its
weight (1 without a weights column), ``w`` the trainable variables flattened into P entries,
``H_i`` the Hessian of ``l_i``, ``g_i`` its gradient, ``f_i`` the model output handed to the
loss, ``J_i = df_i/dw``, ``Lambda_i = d2 l_i / d f_i2``.

Every method returns *sums over the batch* (``sum_i s_i * ...``); the reducer divides once by
``sum_i s_i`` over the whole dataset. The building blocks, and their cost for a batch of B
examples (one "gradient" = one forward and one backward pass over the batch):

- ``hvp``: ``sum_i s_i H_i v`` for K vectors by reverse-over-reverse (one persistent tape
  records the gradient, then one backward pass per vector): about 1 + 0.9 K gradients. This
  ordering measured fastest in TensorFlow (``benchmarks/engine_bench.py``).
- Hutchinson diagonal: ``z * (H z)`` for K Rademacher probes, built on ``hvp``.
- exact Hessian diagonal: the rows of ``H`` restricted to one variable, by a vectorised
  (``pfor``) Jacobian of a block of gradient entries: P Hessian-vector products in all.
- ``sum_sq_vjp``: ``sum_r w_r (J_r^T u_r)**2`` over rows r. It gives the empirical Fisher
  (``u = dl_i/df``), the exact GGN (``u`` = columns of a square root of ``Lambda_i``,
  cost grows with the output size C) and the Monte Carlo GGN (``u = dl(y'_i)/df`` with
  ``y'`` sampled from the model's predictive distribution). Per variable, by the per-layer
  rules of ``layer_rules`` (one backward pass per column for the whole batch, about 0.8
  gradients each) where its layer has one and they pass their check on the first rows
  (``layer_routes``), else by per-example vector-Jacobian products of the whole model
  vectorised with ``tf.vectorized_map`` (about 4 gradients per chunk of rows).
"""

from __future__ import annotations

import os
import time

import numpy as np
import tensorflow as tf

from pipeline.curvature import layer_rules, sampling
from pipeline.curvature.adapter import ModelAdapter, model_signature
from pipeline.curvature.model import copy_mismatch, to_precision
from pipeline.curvature.requests import BatchWork
from pipeline.errors import InputError
from pipeline.partial import Partial
from pipeline.probes import row_uniforms


def set_threads(threads: int | None) -> None:
    """TensorFlow's pools can be sized once per process, before any op runs."""
    if not threads:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(int(threads))
        tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, int(threads))))
    except RuntimeError:
        pass  # already initialised in this (reused) process: keep what it has


class CurvatureEngine:
    """Partial sums of curvature quantities of ``loss(y, model(x))`` for one batch at a time.

    Example::

        engine = CurvatureEngine(model, resolve_loss(spec), precision="float64")
        part = engine.partial(inputs=[x], labels=[y], weights=None, rows=np.arange(len(x)),
                              work=BatchWork(hessian_diagonal="exact"))
        diag_h = part.sums["hessian_diagonal"] / part.weight_sum

    Parameters:
        model: a Keras 3 model (called with ``training=False``).
        loss: a ``PerExampleLoss``.
        precision: "float32" or "float64" (a float64 copy of the model is made).
        hvp_block: vectors per compiled HVP call (they share one forward pass and gradient).
        diagonal_block: gradient entries per vectorised Jacobian block (exact diagonal).
        vjp_budget: floats held at once by per-example products (rows x P).
        selected: glob patterns over variable paths (``ModelSignature.select``): the variables
            every quantity is taken with respect to; None or "all" for every trainable variable.
        layer_rule: Fisher and GGN products by per-layer rules where a layer has one
            (``layer_rules``); False for per-example products of the whole model everywhere.
        xla: whether HVP functions may run compiled by XLA (``jit_compile``): "auto" tries it
            where a GPU is visible, "on" everywhere, "off" never. A try (``XlaTrial``) keeps
            XLA for a function only if, on its first batch, it agrees with the plain graph
            and is faster; ``xla_trials`` holds what each try measured.
    """

    def __init__(self, model, loss, precision: str = "float32", hvp_block: int = 16,
                 diagonal_block: int = 512, vjp_budget: int = 1 << 24, threads: int | None = None,
                 builder=None, route: str | None = None, selected=None, layer_rule: bool = True,
                 xla: str = "auto"):
        set_threads(threads)
        self.precision = precision
        self.dtype = tf.float64 if precision == "float64" else tf.float32
        # The model as loaded, kept to check the copy against it (``check_copy``).
        self.original = model
        self.model = to_precision(model, precision, builder)
        self.loss = loss
        # Every call of the model and the loss goes through the adapter (how Keras does it).
        self.adapter = ModelAdapter(self.model, loss, self.dtype)
        # The backend tf.Variables, not the Keras wrappers: TensorFlow's gradient code reads
        # ``.dtype`` as a DType (Keras variables give a string, and unconnected gradients or
        # ForwardAccumulator then fail, see PITFALLS.md).
        variables = [getattr(v, "value", v) for v in self.model.trainable_variables]
        if not variables:
            raise InputError("the model has no trainable variables: nothing to differentiate")
        # The parameters w (job key ``variables``): the others are constants of every quantity.
        chosen, self.signature = self.adapter.signature.select(selected)
        self.variables = [variables[i] for i in chosen]
        self.names = list(self.signature.variables)
        self.shapes = [tuple(s) for s in self.signature.variable_shapes]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.parameters = int(sum(self.sizes))
        self.hvp_block = int(hvp_block)
        self.diagonal_block = int(diagonal_block)
        self.vjp_budget = int(vjp_budget)
        self._functions: dict = {}
        self._vectors: dict = {}
        # How per-parameter (exact diagonal) and per-example (Fisher, GGN) products are formed:
        # "vectorised" (pfor) or "loop". Decided once per model, on the first batch
        # (``route_for``), unless given.
        self.route = route
        self.per_example_route = route
        # Why each route was kept or dropped after its check on the first rows (``_check_routes``).
        self.route_checks: dict = {}
        self._output_route_checked = False  # ``check_output_derivatives`` runs once
        self._unchecked = {"route": False, "per_example_route": False}
        # The layers whose Fisher and GGN products take a per-layer rule (``layer_routes``);
        # None until the first batch decides.
        self._rules = None if layer_rule else []
        if xla not in ("auto", "on", "off"):
            raise ValueError(f"xla must be auto, on or off, not {xla!r}")
        # On CPU, XLA measured slower for HVPs through convolutions (4.2x against 2.7x a
        # gradient) and no faster on an MLP (benchmarks/engine_bench.py): "auto" skips it there.
        self.xla = xla == "on" or (xla == "auto" and bool(tf.config.list_logical_devices("GPU")))
        self.xla_trials: dict = {}

    def check_copy(self, inputs) -> None:
        """Raises ``InputError`` when the copy computing in ``precision`` (``to_precision``) does
        not compute what the loaded model computes on ``inputs`` (batch arrays), naming the
        first layer that differs (``model.copy_mismatch``). Nothing to check when no copy was
        made. Cost: two forward passes over ``inputs``."""
        if self.model is self.original:
            return
        pack = self.adapter._pack
        original = [batch_tensor(a, tf.as_dtype(_input_dtype(spec.dtype))) for a, spec in
                    zip(inputs, model_signature(self.original).inputs)]
        different = copy_mismatch(self.original, self.model, pack(original), pack(
            [batch_tensor(a, self.dtype) for a in inputs]))
        if different:
            raise InputError(
                f"the {self.precision} copy of the model does not compute what the model computes on the first "
                f"{len(inputs[0])} rows: {different}. A layer whose state Keras does not carry in its weights "
                f"(set_weights) cannot be copied to {self.precision}: use precision: {self.original_precision()}, "
                "or give a builder model (model: {builder: ...}) that rebuilds that state")

    def check_regularization(self) -> None:
        """Raises ``InputError`` when ``include_regularization: true`` cannot be honoured: an
        ``activity_regularizer``'s term depends on each example's activations, while
        ``regularization_partial`` adds ``model.losses`` once, as weight regularizers need."""
        for layer in self.model._flatten_layers(include_self=True):
            if getattr(layer, "activity_regularizer", None) is not None:
                raise InputError(
                    f"layer {layer.name!r} has an activity_regularizer: its term depends on each example's "
                    "activations, which include_regularization: true does not cover (it adds model.losses once, "
                    "for weight regularizers): remove the activity regularizer, or set include_regularization: "
                    "false (activity terms are then left out)")

    def original_precision(self) -> str:
        """The precision the loaded model computes in (its variables' dtype for mixed policies)."""
        return "float64" if str(self.original.dtype_policy.variable_dtype) == "float64" else "float32"

    # ------------------------------------------------------------------ plumbing
    def flatten(self, tensors):
        """Concatenates per-variable tensors (leading dims kept) into [..., P], C order."""
        lead = tensors[0].shape[: tensors[0].shape.rank - len(self.shapes[0])]
        return tf.concat([tf.reshape(t, list(lead) + [-1]) for t in tensors], axis=-1)

    def unflatten(self, flat):
        """Splits [..., P] into per-variable tensors of the variables' shapes."""
        lead = list(flat.shape[:-1])
        parts = tf.split(flat, self.sizes, axis=-1)
        return [tf.reshape(p, lead + list(s)) for p, s in zip(parts, self.shapes)]

    def _loss_vector(self, inputs, labels):
        return tf.cast(self.adapter.loss_of_inputs(list(inputs), list(labels)), self.dtype)

    def _objective(self, inputs, labels, weights):
        return tf.reduce_sum(weights * self._loss_vector(inputs, labels))

    def _regularization(self, *_):
        losses = [tf.cast(value, self.dtype) for value in self.model.losses]
        if not losses:
            return tf.constant(0.0, self.dtype)
        return tf.add_n(losses)

    def _gradient_flat(self, tape, value):
        grads = tape.gradient(value, self.variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return self.flatten([tf.cast(g, self.dtype) for g in _dense(grads)])

    def _specs(self, inputs, labels):
        """Signatures of the compiled functions: the batch axis, and every axis the model
        leaves open (sequence lengths), stay open, so batches of other lengths reuse them."""
        inputs_specs = [_tensor_spec(a, spec.shape, self.dtype)
                        for a, spec in zip(inputs, self.signature.inputs)]
        label_specs = [_tensor_spec(a, spec.shape, self.dtype)
                       for a, spec in zip(labels, self.signature.outputs)]
        return inputs_specs, label_specs, tf.TensorSpec([None], self.dtype)

    def _compiled(self, key, build, signature):
        """One ``tf.function`` per kind of call, traced once (batch dimension left open)."""
        fn = self._functions.get(key)
        if fn is None:
            fn = tf.function(build, input_signature=signature, reduce_retracing=True)
            self._functions[key] = fn
        return fn

    def cast_batch(self, inputs, labels, weights):
        def cast(a):
            return batch_tensor(a, self.dtype)

        n = len(inputs[0])
        w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
        return [cast(a) for a in inputs], [cast(a) for a in labels], tf.constant(w, dtype=self.dtype)

    # ------------------------------------------------------------------ building blocks
    def _loss_and_gradient(self, objective, inputs, labels, weights):
        with tf.GradientTape() as tape:
            value = objective(inputs, labels, weights)
        return value, self._gradient_flat(tape, value)

    def _hvp(self, objective, inputs, labels, weights, vectors, with_gradient: bool, probe_products: bool):
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
            grads = _dense(inner.gradient(value, self.variables,
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
            v = self.unflatten(tf.cast(vector, grads[0].dtype))
            hv = outer.gradient(grads, self.variables, output_gradients=v,
                                unconnected_gradients=tf.UnconnectedGradients.ZERO)
            hv = self.flatten([tf.cast(h, self.dtype) for h in hv])
            products.append(hv * vectors[k] if probe_products else hv)
        del outer
        gradient = self.flatten([tf.cast(g, self.dtype) for g in grads]) if with_gradient else tf.zeros([0], self.dtype)
        # One vector: a reshape, not a copy (Pack copies; P floats are ~0.05 of an MLP gradient).
        return value, gradient, (products[0][None] if len(products) == 1 else tf.stack(products))

    def hvp_function(self, specs, count: int, with_gradient: bool = False, probe_products: bool = False,
                     objective=None, tag: str = "data"):
        """The compiled ``(inputs, labels, weights, V[count, P]) -> (loss, gradient, HV)``."""
        objective = objective or self._objective
        key = (tag, "hvp", count, with_gradient, probe_products)
        signature = (*specs, _vector_spec(count, self.parameters, self.dtype))

        def build(a, b, c, v):
            return self._hvp(objective, a, b, c, v, with_gradient, probe_products)

        plain = self._compiled(key, build, signature)
        if not self.xla:
            return plain
        trial = self._functions.get(key + ("xla",))
        if trial is None:
            xla = tf.function(build, input_signature=signature, reduce_retracing=True, jit_compile=True)
            trial = XlaTrial(plain, xla, 1e-10 if self.dtype == tf.float64 else 1e-4,
                             lambda report: self.xla_trials.__setitem__(key, report))
            self._functions[key + ("xla",)] = trial
        return trial

    def _diagonal_block(self, objective, index, size, inputs, labels, weights, start):
        """diag(H) entries [start, start + size) of variable ``index`` (clamped at its end).

        A vectorised Jacobian of ``size`` gradient entries with respect to that variable only:
        ``size`` Hessian-vector products with basis vectors, done by ``pfor`` in one call.
        """
        variable = self.variables[index]
        n = self.sizes[index]
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                value = objective(inputs, labels, weights)
            grad = _dense([inner.gradient(value, variable, unconnected_gradients=tf.UnconnectedGradients.ZERO)])[0]
            positions = tf.minimum(start + tf.range(size), n - 1)
            entries = tf.gather(tf.reshape(grad, [-1]), positions)
        rows = outer.jacobian(entries, variable, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        rows = tf.reshape(tf.cast(rows, self.dtype), [size, n])
        return tf.gather(rows, positions, axis=1, batch_dims=1)

    def _sum_sq_vjp(self, inputs, cotangents, row_weights, moments: bool, loop: bool = False, positions=None):
        """sum_r w_r (J_r^T u_r)**2 over rows r (and w^2 q, w^2 q^2 when ``moments``).

        ``inputs`` holds one row per product (an example may repeat), ``cotangents`` [R, C]
        the vectors u_r in the flattened output space. Vectorised over rows. ``positions``:
        the variables (indices into ``self.variables``) to differentiate, all when None; the
        result is their entries, in flat order.
        """
        variables = self.variables if positions is None else [self.variables[k] for k in positions]

        def one(args):
            xs, u = args
            with tf.GradientTape() as tape:
                outputs, _ = self.adapter.forward([x[None] for x in xs])
                flat = _flat_outputs(outputs, self.dtype)
                value = tf.reduce_sum(flat[0] * u)
            grads = tape.gradient(value, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            g = tf.concat([tf.reshape(tf.cast(x, self.dtype), [-1]) for x in _dense(grads)], axis=0)
            return g * g

        if loop:  # one row after another (see ``route_for``)
            squares = tf.map_fn(one, (list(inputs), cotangents), fn_output_signature=self.dtype)
        else:
            squares = tf.vectorized_map(one, (list(inputs), cotangents))  # [R, P]
        weighted = tf.linalg.matvec(squares, row_weights, transpose_a=True)
        if not moments:
            return weighted, weighted, weighted
        w2 = row_weights * row_weights
        return (weighted, tf.linalg.matvec(squares, w2, transpose_a=True),
                tf.linalg.matvec(squares * squares, w2, transpose_a=True))

    def _layer_squares(self, rules, inputs, cotangents, row_weights, moments: bool, columns: int):
        """``_sum_sq_vjp`` for the variables of ``rules`` by their per-layer rules
        (``layer_rules``): one forward pass, one backward pass to the layer outputs per column
        m of ``cotangents`` [B, columns, C] (row weights [B, columns]). Returns, per variable of
        the rules (in rule order), its flat sums: the first only, or all three with ``moments``."""
        with layer_rules.Taps(rules) as taps:
            with tf.GradientTape(persistent=columns > 1) as tape:
                outputs, _ = self.adapter.forward(list(inputs))
                flat = _flat_outputs(outputs, self.dtype)
        tapped = taps.outputs()
        # A Dense on [B, n_in] inputs sums its columns before its one product:
        # sum_{i,m} W_im x_i**2 (outer) dz_im**2 = (x**2)^T (sum_m W_im dz_im**2).
        summed = {id(rule): None for rule in rules if rule.kind == "dense" and not rule.materialises and not moments}
        sums = {id(rule): None for rule in rules if id(rule) not in summed}
        for m in range(columns):  # static: one backward pass each
            grads = tape.gradient(flat, tapped, output_gradients=cotangents[:, m, :],
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
            for rule, dzs in zip(rules, taps.split(grads)):
                dzs = [tf.cast(d, self.dtype) for d in dzs]
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
                value = self._objective(inputs, labels, weights)
        tapped = taps.outputs()
        grads = tape.gradient(value, tapped + (self.variables if with_gradient else []),
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        inverse = tf.math.divide_no_nan(tf.ones_like(weights), weights)
        out = []
        for rule, dzs in zip(rules, taps.split(grads[:len(tapped)])):
            got = rule.squares([tf.cast(d, self.dtype) for d in dzs], inverse, False)
            out += [got[attribute][:1] for attribute, _ in rule.variables]
        gradient = (self.flatten([tf.cast(g, self.dtype) for g in _dense(grads[len(tapped):])]) if with_gradient
                    else tf.zeros([0], self.dtype))
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
        outputs_count = len(self.signature.outputs)
        with layer_rules.Taps(rules) as taps:
            with tf.GradientTape(persistent=True) as tape:
                outputs, masks = self.adapter.forward(list(inputs))
                value = tf.reduce_sum(weights * tf.cast(self.adapter.per_example_loss(list(labels), outputs, masks),
                                                        self.dtype))
                with tape.stop_recording():
                    flat = _flat_outputs(outputs, tf.float64)
                    valid = tf.stack([_valid_fraction(m, o, tf.float64) for o, m in zip(outputs, masks)], axis=1)
                shapes, from_logits = self._output_shapes(None), self._from_logits()
                # One scale per output and example: its first column.
                starts = np.cumsum([0] + [int(np.prod(shape)) for shape in shapes])[:-1]
                sampled_values = []
                for sample in range(samples):
                    with tape.stop_recording():
                        drawn, scale = sampling.draw_labels(
                            self.loss.family, flat, valid, uniforms[sample * outputs_count:(sample + 1) * outputs_count],
                            shapes, from_logits)
                        drawn = [tf.cast(d, self.dtype) if d.dtype.is_floating else d for d in drawn]
                        scales = [tf.cast(scale[:, int(k)], self.dtype) for k in starts]
                    losses = self.adapter.output_losses(drawn, outputs, masks)
                    sampled_values.append(tf.add_n([tf.reduce_sum(c * l) for c, l in zip(scales, losses)]))
        tapped = taps.outputs()
        sums = None
        for sampled in sampled_values:  # static: one backward pass each
            grads = tape.gradient(sampled, tapped, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            got = []
            for rule, dzs in zip(rules, taps.split(grads)):
                squares = rule.squares([tf.cast(d, self.dtype) for d in dzs], row_weights, True, uniform)
                got += [squares[attribute] for attribute, _ in rule.variables]
            sums = got if sums is None else [tuple(a + b for a, b in zip(x, y)) for x, y in zip(sums, got)]
        gradient = tf.zeros([0], self.dtype)
        if with_gradient:
            grads = tape.gradient(value, self.variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            gradient = self.flatten([tf.cast(g, self.dtype) for g in _dense(grads)])
        del tape
        return value, gradient, self._flat_layout(sums)

    def _mc_by_rules(self, part: Partial, raw_inputs, x, y, s, specs, rows, work: BatchWork, with_loss: bool) -> None:
        """``_layer_mc`` over the batch in chunks (every variable has a layer rule): the Monte
        Carlo GGN's sums, and the loss and gradient too when ``with_loss``."""
        rules = self._rules
        family = self._family()
        shapes = self._output_shapes(None)
        counts = [sampling.uniform_count(family, shape) for shape in shapes]
        with_gradient = with_loss and work.gradient
        in_specs, label_specs, vector = specs
        uniform_specs = [tf.TensorSpec([None, c], tf.float64) for _ in range(work.ggn_samples) for c in counts]
        weights = s.numpy().astype(np.float64)
        row_weights = weights / work.ggn_samples
        uniform = bool(np.all(row_weights == row_weights[0]))
        fn = self._compiled(("layer-mc", work.ggn_samples, with_gradient, uniform),
                            lambda a, b, c, u, w: self._layer_mc(rules, a, b, c, u, w, work.ggn_samples,
                                                                 with_gradient, uniform),
                            (in_specs, label_specs, vector, uniform_specs, vector))
        uniforms = [tf.constant(row_uniforms(work.seed, sampling.stream(sample, position), rows, c), tf.float64)
                    for sample in range(work.ggn_samples) for position, c in enumerate(counts)]
        n = len(rows)
        loss, gradient, totals = 0.0, [None], [None] * 3
        for pick in _row_slices(n, self.rule_rows(n)):
            value, grad, out = fn(_rows(x, pick), _rows(y, pick), _rows([s], pick)[0], _rows(uniforms, pick),
                                  _as_dtype(row_weights[pick or slice(None)], self.dtype))
            loss += float(value.numpy())
            if with_gradient:
                self._add_rule_sums(gradient, [grad])
            self._add_rule_sums(totals, out)
        if with_loss:
            part.sums["loss"] = np.asarray(loss, dtype=np.float64)
            if with_gradient:
                part.sums["gradient"] = gradient[0]
        part.sums["ggn_mc"], part.sums["ggn_mc_w2q"], part.sums["ggn_mc_w2q2"] = totals
        part.sums["ggn_mc_w2"] = np.asarray(work.ggn_samples * np.sum(row_weights ** 2))

    def _mc_takes_rules(self, raw_inputs) -> bool:
        """Whether the Monte Carlo GGN takes ``_layer_mc``: every variable has a layer rule and
        the outputs' shapes are static (the uniforms are drawn before the pass)."""
        static = all(d is not None for spec in self.signature.outputs for d in spec.shape)
        return static and self.loss.family is not None and self._every_variable_has_a_rule(raw_inputs)

    def _every_variable_has_a_rule(self, raw_inputs) -> bool:
        return set(self.layer_routes(raw_inputs).values()) == {"layer rule"}

    def _fisher_in_gradient_pass(self, raw_inputs, work: BatchWork, weights) -> bool:
        """Whether the Fisher comes with the loss and gradient in one pass: it is the only
        curvature asked, every variable has a layer rule, and the weights ``s_i`` are such that
        ``(s_i dz_i)**2 / s_i`` stays in the compute dtype's range."""
        if weights is not None:
            sizes = np.abs(np.asarray(weights, dtype=np.float64))
            sizes = sizes[sizes > 0]
            limit = 1e100 if self.dtype == tf.float64 else 1e6
            if sizes.size and (sizes.max() > limit or sizes.min() < 1.0 / limit):
                return False
        return _curvature_asked(work) == {"fisher"} and self._every_variable_has_a_rule(raw_inputs)

    def _loss_gradient_fisher(self, part: Partial, x, y, s, specs, with_gradient: bool) -> None:
        rules = self._rules
        fn = self._compiled(("layer-fisher", with_gradient),
                            lambda a, b, c: self._layer_fisher(rules, a, b, c, with_gradient), specs)
        n = int(s.shape[0])
        loss, gradient, total = 0.0, [None], [None]
        for pick in _row_slices(n, self.rule_rows(n)):
            value, grad, out = fn(_rows(x, pick), _rows(y, pick), _rows([s], pick)[0])
            loss += float(value.numpy())
            if with_gradient:
                self._add_rule_sums(gradient, [grad])
            self._add_rule_sums(total, out)
        part.sums["loss"] = np.asarray(loss, dtype=np.float64)
        if with_gradient:
            part.sums["gradient"] = gradient[0]
        part.sums["sum_grad_squared"] = total[0]

    def _check_rules(self, rules, raw_inputs) -> list:
        """The rules that are right for this model, checked on its first rows (see
        ``layer_rules``), on batches of 3 and of 5 rows (the first rows, repeated when the batch
        is shorter: two sizes no model axis can both share):

        - the model's output for a row must not depend on the other rows of its batch (else no
          rule: per-example products compute each example alone);
        - with the layers tapped, the model's outputs are unchanged;
        - per rule: its tensors have one row per example; the sum of its per-example gradients
          equals the tape's batch gradient of its variables; no op outside its calls reads
          them (a tied weight, found from the traced graph, whatever the data); its shapes are
          the ones it assumes.

        When the rules together cannot be traced or change the outputs, each is checked alone."""
        n = len(raw_inputs[0])
        batches = [[batch_tensor(np.asarray(a)[np.arange(size) % n], self.dtype) for a in raw_inputs]
                   for size in (3, 5)]
        # Row 0 replaced by row 1: rows 1-4 must give the same outputs.
        swapped = [batch_tensor(np.asarray(a)[np.array([1, 1, 2, 3, 4]) % n], self.dtype) for a in raw_inputs]
        specs = self._specs(raw_inputs, [])[0]
        outputs = tf.function(lambda a: _flat_outputs(self.adapter.forward(list(a))[0], self.dtype),
                              input_signature=(specs,))
        tolerance = 1e-9 if self.dtype == tf.float64 else 1e-4
        try:
            alone, mixed = outputs(batches[1]).numpy()[1:], outputs(swapped).numpy()[1:]
        except (ValueError, TypeError, NotImplementedError, LookupError, tf.errors.OpError):
            return []
        if np.max(np.abs(alone - mixed), initial=0.0) > tolerance * max(np.max(np.abs(alone), initial=0.0), 1e-30):
            return []
        kept = self._checked(rules, batches, specs, tolerance)
        if kept is None:
            kept = [rule for rule in rules if self._checked([rule], batches, specs, tolerance)]
        return kept

    def _checked(self, rules, batches, specs, tolerance):
        """``_check_rules`` for one set of rules: the ones that pass, or None when the set fails
        to trace or changes the model's outputs."""
        facts: list = []
        handles = {k: v.handle for k, v in enumerate(self.variables)}

        def check(inputs):
            plain = _flat_outputs(self.adapter.forward(list(inputs))[0], self.dtype)
            graph = tf.compat.v1.get_default_graph()
            start = len(graph.get_operations())
            with layer_rules.Taps(rules) as taps:
                with tf.GradientTape() as tape:
                    outputs, _ = self.adapter.forward(list(inputs))
                    flat = _flat_outputs(outputs, self.dtype)
                    end = len(graph.get_operations())
                    # Any fixed, non-trivial cotangent: the check compares two routes to one number.
                    index = tf.cast(tf.reshape(tf.range(tf.size(flat)), tf.shape(flat)), self.dtype)
                    value = tf.reduce_sum(flat * tf.cos(0.7 * index + 0.3))
            shared = layer_rules.reads_elsewhere(rules, graph, graph.get_operations()[start:end], handles)
            tapped = taps.outputs()
            grads = tape.gradient(value, tapped + self.variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            truth = _dense(grads[len(tapped):])
            out = []
            facts.clear()
            for rule, dzs in zip(rules, taps.split(grads[:len(tapped)])):
                usable = bool(rule.records) and rule.shapes_fit() and id(rule) not in shared
                facts.append((usable, len(rule.records) == 1 and rule.records[0].x.shape.rank == 2))
                if not usable:
                    out.append(([], [], tf.zeros([0], tf.int32)))
                    continue
                summed = rule.summed([tf.cast(d, self.dtype) for d in dzs])
                sizes = tf.stack([tf.shape(r.x)[0] for r in rule.records] + [tf.shape(r.z)[0] for r in rule.records])
                out.append(([tf.cast(summed[a], self.dtype) for a, _ in rule.variables],
                            [tf.cast(truth[k], self.dtype) for _, k in rule.variables], sizes))
            return tf.reduce_max(tf.abs(flat - plain)), tf.reduce_max(tf.abs(plain)), out

        traced = tf.function(check, input_signature=(specs,))
        try:
            results = [traced(batch) for batch in batches]
        except (ValueError, TypeError, NotImplementedError, LookupError, tf.errors.OpError):
            return None
        if any(float(changed) > tolerance * max(float(scale), 1e-30) for changed, scale, _ in results):
            return None
        kept = []
        for number, (rule, (usable, plain)) in enumerate(zip(rules, facts)):
            if not usable:
                continue
            right = True
            for batch, (_, _, out) in zip(batches, results):
                summed, truth, sizes = out[number]
                right = right and np.all(sizes.numpy() == int(batch[0].shape[0])) and all(
                    np.max(np.abs(a.numpy() - b.numpy()), initial=0.0)
                    <= tolerance * max(np.max(np.abs(b.numpy()), initial=0.0), 1e-30)
                    for a, b in zip(summed, truth))
            if right:
                # One call on [B, n_in] inputs: a Dense's squares need no per-example gradient.
                rule.materialises = not (rule.kind == "dense" and plain)
                kept.append(rule)
        return kept

    def _output_derivatives(self, inputs, labels, hessian: bool):
        """Flattened outputs f [B, C], dl_i/df_i [B, C], if asked Lambda_i [B, C, C], and the
        fraction of each output's positions the loss averages over, [B, outputs] (``_valid_fraction``)."""
        outputs, masks = self.adapter.forward(list(inputs))
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
            return tf.reduce_sum(tf.cast(self.adapter.per_example_loss(list(labels), outs, masks), self.dtype))

        with tf.GradientTape() as second:
            second.watch(flat)
            with tf.GradientTape() as first:
                first.watch(flat)
                value = loss_of(flat)
            dl = first.gradient(value, flat)  # per example: l_i depends on f_i only
        valid = tf.stack([_valid_fraction(m, o, self.dtype) for o, m in zip(outputs, masks)], axis=1)
        if not hessian:
            return flat, dl, tf.zeros([0, 0, 0], self.dtype), valid
        return flat, dl, second.batch_jacobian(dl, flat), valid

    def check_output_derivatives(self, x, y, s) -> None:
        """Raises ``InputError`` unless the Fisher and GGN route's output-space derivatives are
        those of the very loss the gradient differentiates: ``sum_i s_i J_i^T dl_i/df_i``
        (``_output_derivatives``, the per-example route) must equal the tape's gradient of the
        objective on this batch. They differ when the loss reads more than the tensor it is
        handed (a loss that looks behind a softmax for its logits, as Keras' cross-entropies
        do, given a copy). Once per engine; cost: two forward and two backward passes."""
        if self._output_route_checked:
            return
        self._output_route_checked = True

        def both(a, b, c):
            _, dl, _, _ = self._output_derivatives(a, b, False)
            with tf.GradientTape() as tape:
                flat = _flat_outputs(self.adapter.forward(list(a))[0], self.dtype)
                value = tf.reduce_sum(flat * tf.stop_gradient(c[:, None] * dl))
            implied = _dense(tape.gradient(value, self.variables, unconnected_gradients=tf.UnconnectedGradients.ZERO))
            return self.flatten([tf.cast(g, self.dtype) for g in implied]), self._loss_and_gradient(
                self._objective, a, b, c)[1]

        implied, truth = (t.numpy().astype(np.float64) for t in tf.function(both)(x, y, s))
        tolerance = 1e-8 if self.dtype == tf.float64 else 1e-3
        error = float(np.abs(implied - truth).max(initial=0.0)) / max(float(np.abs(truth).max(initial=0.0)), 1e-300)
        if not error <= tolerance:
            raise InputError(
                f"the loss {self.loss.name or 'function'}'s derivatives with respect to the model's outputs do not "
                f"reproduce its gradient on the first {int(s.shape[0])} rows (relative error {error:.2g}): the loss "
                "reads more than the output tensor it is given (e.g. the logits behind a softmax/sigmoid output), "
                "so the Fisher and GGN would be wrong; give the model a linear output and the loss "
                "from_logits: true, or ask only for quantities that need no output derivatives (gradient, "
                "hessian_diagonal, hvp, trace, eigenvalues, spectrum, hessian)")

    # ------------------------------------------------------------------ per batch
    def partial(self, inputs, labels, weights, rows, work: BatchWork) -> Partial:
        """Float64 partial sums of every quantity ``work`` asks for, over one batch.

        ``inputs``/``labels``: lists of arrays in ``model.inputs``/``model.outputs`` order;
        ``weights``: [B] or None; ``rows``: the examples' global row indices (they key the
        Monte Carlo label draws, so the result does not depend on the sharding).
        """
        x, y, s = self.cast_batch(inputs, labels, weights)
        specs = self._specs(inputs, labels)
        part = Partial(examples=len(rows), weight_sum=self._weight_sum(x, y, s, specs), batches=1)
        if self._fisher_in_gradient_pass(inputs, work, weights):
            self._loss_gradient_fisher(part, x, y, s, specs, work.gradient)
            return part
        if _curvature_asked(work) == {"ggn_mc"} and self._mc_takes_rules(inputs):
            self._mc_by_rules(part, inputs, x, y, s, specs, rows, work, with_loss=True)
            return part
        self._curvature(part, self._objective, (x, y, s), specs, work, data=True)
        if work.sum_grad_squared or work.ggn_diagonal:
            self._outer_products(part, inputs, x, y, s, specs, rows, work)
        return part

    def _weight_sum(self, x, y, s, specs) -> float:
        """The batch's share of the objective's divisor: ``sum_i s_i``, or with a sequence mask
        ``sum_i s_i n_i`` (``ModelAdapter.position_counts``: the token-weighted objective).
        Cost for a masked model: one forward pass of the batch (none otherwise, once known)."""
        weights = s.numpy().astype(np.float64)
        if self.adapter.masked is False:
            return float(np.sum(weights, dtype=np.float64))

        def counts(a, b):
            outputs, masks = self.adapter.forward(list(a))
            n = self.adapter.position_counts(list(b), outputs, masks)
            return tf.ones(tf.shape(outputs[0])[:1], self.dtype) if n is None else tf.cast(n, self.dtype)

        n = self._compiled(("counts",), counts, specs[:2])(x, y).numpy().astype(np.float64)
        return float(np.sum(weights * n, dtype=np.float64))

    def regularization_partial(self, work: BatchWork) -> Partial:
        """The regularization terms (``model.losses``), computed once for the whole dataset.

        Not divided by the example count: the reducer adds them after dividing (the contract
        adds regularization once to L). Fisher and GGN are defined over the data loss only.
        """
        inputs = [np.zeros((1, *[d or 1 for d in spec.shape]), dtype=np.float32) for spec in self.signature.inputs]
        x = [tf.constant(a, dtype=self.dtype) for a in inputs]
        y = [tf.constant(np.zeros((1,), dtype=np.float32), dtype=self.dtype)]
        s = tf.constant(np.ones(1), dtype=self.dtype)
        specs = ([tf.TensorSpec([None, *a.shape[1:]], self.dtype) for a in inputs],
                 [tf.TensorSpec([None], self.dtype)], tf.TensorSpec([None], self.dtype))
        part = Partial()
        self._curvature(part, self._regularization, (x, y, s), specs, work, data=False)
        return part

    def _curvature(self, part: Partial, objective, batch, specs, work: BatchWork, data: bool):
        """Loss, gradient, HVPs and Hessian diagonals of ``objective`` on one batch."""
        # Only this batch's vectors stay converted: a later pass's vectors replace an earlier
        # pass's (else a worker would keep every pass of a Lanczos run or of Hutchinson probes).
        live = {id(v) for v in (work.hvp_vectors, work.probes) if v is not None}
        self._vectors = {key: value for key, value in self._vectors.items() if key[0] in live}
        blocks = []  # (key, vectors): everything that needs Hessian-vector products
        if work.hvp_vectors is not None and len(work.hvp_vectors):
            blocks.append(("hvp", np.asarray(work.hvp_vectors)))
        if work.probes is not None and len(work.probes):
            blocks.append(("hessian_probes", np.asarray(work.probes)))
        tag = "data" if data else "reg"
        loss_value = gradient = None
        for key, vectors in blocks:
            results = []
            for start in range(0, len(vectors), self.hvp_block):
                chunk = vectors[start:start + self.hvp_block]
                with_gradient = work.gradient and gradient is None
                fn = self.hvp_function(specs, len(chunk), with_gradient, key == "hessian_probes", objective, tag)
                value, grad, products = fn(*batch, self._vector_tensor(vectors, start, len(chunk)))
                loss_value = value
                if with_gradient:
                    gradient = grad
                results.append(products.numpy())
                del products  # before the float64 copy below: one fewer [K, P] at the peak
            part.sums[key] = (results[0] if len(results) == 1 else np.concatenate(results, axis=0)).astype(np.float64)
        if loss_value is None or (work.gradient and gradient is None):
            fn = self._compiled((tag, "gradient"),
                                lambda a, b, c: self._loss_and_gradient(objective, a, b, c), specs)
            loss_value, gradient = fn(*batch)
        part.sums["loss"] = np.asarray(loss_value.numpy(), dtype=np.float64)
        if work.gradient:
            part.sums["gradient"] = gradient.numpy().astype(np.float64)
        if work.hessian_diagonal == "exact":
            part.sums["hessian_diagonal"] = self._exact_diagonal(objective, batch, specs, tag)
        for number, block in enumerate(work.hessian_blocks):
            part.sums[f"hessian_block_{number}"] = self._hessian_block(objective, batch, specs, tag, tuple(block))

    def _vector_tensor(self, vectors, start, count):
        """Vectors as tensors of the compute dtype, converted once for all batches of a shard."""
        key = (id(vectors), vectors.shape, start, count)
        if key not in self._vectors:
            if len(self._vectors) > 64:
                self._vectors.clear()
            # Any real dtype: Hutchinson's probes arrive as int8.
            tensor = tf.constant(np.asarray(vectors[start:start + count], dtype=self.dtype.as_numpy_dtype))
            self._vectors[key] = (vectors, tensor)  # holding ``vectors`` keeps its id unique
        return self._vectors[key][1]

    def route_for(self, objective, specs, batch=None) -> str:
        """"vectorised" or "loop": how this model's exact diagonal is formed; also decides
        ``per_example_route``, for the Fisher and GGN products (both once per model).

        ``pfor`` cannot vectorise the ``while`` loops of recurrent layers (LSTM, GRU: it fails,
        or falls back to a loop inside a loop that runs for many minutes, PITFALLS.md). A model
        whose gradient graph holds one takes the loops: its exact diagonal by TensorFlow's
        ``while_loop`` Jacobian, its per-example products by ``tf.map_fn`` over the examples.
        Per-example products through an ``Einsum`` (``MultiHeadAttention``, ``EinsumDense``)
        in float32 on a CPU also take ``tf.map_fn``: vectorised, TensorFlow 2.21's oneDNN
        kernels corrupt the heap and the process dies (tests/zoo/repro_mha_onednn.py).
        A vectorised route chosen here is checked against its loop on ``batch`` the first time
        one is given (``_check_routes``).
        """
        if self.route is None or self.per_example_route is None:
            traced = tf.function(lambda a, b, c: self._loss_and_gradient(objective, a, b, c))
            kinds = {op.type for op in traced.get_concrete_function(*specs).graph.get_operations()}
            loops = bool(kinds & {"While", "StatelessWhile"})
            onednn = (self.dtype != tf.float64 and os.environ.get("TF_ENABLE_ONEDNN_OPTS") != "0"
                      and not tf.config.list_logical_devices("GPU"))
            # Chosen here (not given): a vectorised route is checked on the first batch.
            self._unchecked = {"route": self.route is None and not loops,
                               "per_example_route": self.per_example_route is None and not loops
                               and not ("Einsum" in kinds and onednn)}
            self.route = self.route or ("loop" if loops else "vectorised")
            self.per_example_route = self.per_example_route or (
                "loop" if loops or ("Einsum" in kinds and onednn) else "vectorised")
        if batch is not None and any(self._unchecked.values()):
            self._check_routes(objective, specs, batch)
        return self.route

    def _check_routes(self, objective, specs, batch) -> None:
        """Checks each vectorised (``pfor``) route chosen by ``route_for`` against its loop on
        ``batch`` (at most 4 rows), once per model; a route that fails or disagrees takes the
        loop, and ``route_checks`` says why (the plan prints it).

        ``pfor`` can be silently wrong: TensorFlow 2.21's vectorised Jacobian of a grouped
        convolution (``Conv2D(groups=2)``) gave the second group's Hessian entries 100% off.
        The exact diagonal and the Hessian blocks are checked on rows of ``H`` (the first,
        middle and last entry of each variable, at most 48 rows: 2 x rows HVPs); the per-example
        products on every parameter of 4 rows' squared vector-Jacobian products.
        """
        x, y, s = [t[:4] for t in batch[0]], [t[:4] for t in batch[1]], batch[2][:4]
        tolerance = 1e-8 if self.dtype == tf.float64 else 1e-4
        if self._unchecked["route"]:
            self._unchecked["route"] = False
            offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
            picks = np.unique(np.concatenate([[o, o + (n - 1) // 2, o + n - 1] for o, n in zip(offsets, self.sizes)]))
            picks = tf.constant(picks[:48].astype(np.int32))
            block = tuple(range(len(self.variables)))

            def rows_of(loop):
                return tf.function(lambda a, b, c: self._hessian_rows(objective, a, b, c, picks, block, loop))(x, y, s)

            self.route, self.route_checks["route"] = _checked_route(lambda: rows_of(False), lambda: rows_of(True),
                                                                    tolerance, "vectorised Jacobian of H's rows")
        if self._unchecked["per_example_route"]:
            self._unchecked["per_example_route"] = False
            width = int(_flat_outputs(self.adapter.forward(list(x))[0], self.dtype).shape[1])
            # Any fixed, non-trivial cotangents: the check compares two routes to the same products.
            u = tf.constant(np.cos(np.arange(int(s.shape[0]) * width) + 0.3).reshape(-1, width), self.dtype)
            w = tf.ones([u.shape[0]], self.dtype)

            def squares(loop):
                return tf.function(lambda a: self._sum_sq_vjp(a, u, w, False, loop)[0])(x)

            self.per_example_route, self.route_checks["per_example_route"] = _checked_route(
                lambda: squares(False), lambda: squares(True), tolerance, "vectorised per-example products")

    def vectorisation_routes(self, inputs, labels) -> tuple[str, str]:
        """``(route, per_example_route)`` for batches like this one (for the plan), each
        vectorised route checked against its loop on these rows (``route_checks``)."""
        x, y, s = self.cast_batch(inputs, labels, None)
        self.route_for(self._objective, self._specs(inputs, labels), (x, y, s))
        return self.route, self.per_example_route

    def _exact_diagonal(self, objective, batch, specs, tag):
        if self.route_for(objective, specs, batch) == "vectorised":
            try:
                return self._diagonal_vectorised(objective, batch, specs, tag)
            except (ValueError, NotImplementedError, tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
                # pfor could not vectorise an op of this model: the loop computes the same numbers.
                self.route = "loop"
        return self._diagonal_loop(objective, batch, specs, tag)

    def _diagonal_vectorised(self, objective, batch, specs, tag):
        pieces = []
        for index, n in enumerate(self.sizes):
            size = min(n, self.diagonal_block)
            fn = self._compiled(
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
        size = max(1, min(self.parameters, self.diagonal_block, self.vjp_budget // self.parameters))
        fn = self._compiled((tag, "diagonal-loop", size),
                            lambda a, b, c, start: self._diagonal_rows(objective, a, b, c, start, size),
                            (*specs, tf.TensorSpec([], tf.int32)))
        pieces = []
        for start in range(0, self.parameters, size):
            block = fn(*batch, tf.constant(start, tf.int32)).numpy()
            pieces.append(block[: min(size, self.parameters - start)].astype(np.float64))
        return np.concatenate(pieces)

    def _diagonal_rows(self, objective, inputs, labels, weights, start, size):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                value = objective(inputs, labels, weights)
            grads = _dense(inner.gradient(value, self.variables, unconnected_gradients=tf.UnconnectedGradients.ZERO))
            positions = tf.minimum(start + tf.range(size), self.parameters - 1)
            entries = tf.gather(self.flatten(grads), positions)
        rows = outer.jacobian(entries, self.variables, unconnected_gradients=tf.UnconnectedGradients.ZERO,
                              experimental_use_pfor=False)
        rows = self.flatten([tf.cast(r, self.dtype) for r in rows])  # [size, P]
        return tf.gather(rows, positions, axis=1, batch_dims=1)

    def _hessian_block(self, objective, batch, specs, tag, block: tuple[int, ...]):
        """``H_bb`` [b, b] of the variables ``block`` (positions in ``self.variables``), their
        entries in flat order: the rows of the block's gradient entries, differentiated with
        respect to the block's variables only, ``diagonal_block`` rows per call (vectorised by
        ``pfor``; TensorFlow's ``while_loop`` Jacobian on the loop route): b HVPs in all."""
        if self.route_for(objective, specs, batch) == "vectorised":
            try:
                return self._hessian_block_rows(objective, batch, specs, tag, block, loop=False)
            except (ValueError, NotImplementedError, tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
                self.route = "loop"  # pfor could not vectorise an op of this model: the same numbers
        return self._hessian_block_rows(objective, batch, specs, tag, block, loop=True)

    def _hessian_block_rows(self, objective, batch, specs, tag, block, loop: bool):
        offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        positions = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in block]).astype(np.int32)
        size = max(1, min(len(positions), self.diagonal_block))
        fn = self._compiled((tag, "hessian-block", block, size, loop),
                            lambda a, b, c, rows: self._hessian_rows(objective, a, b, c, rows, block, loop),
                            (*specs, tf.TensorSpec([size], tf.int32)))
        pieces = []
        for start in range(0, len(positions), size):
            rows = positions[start:start + size]
            padded = np.concatenate([rows, np.full(size - len(rows), rows[-1], np.int32)])
            pieces.append(fn(*batch, tf.constant(padded)).numpy()[:len(rows)].astype(np.float64))
        return np.concatenate(pieces)

    def _hessian_rows(self, objective, inputs, labels, weights, rows, block, loop: bool):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                value = objective(inputs, labels, weights)
            grads = _dense(inner.gradient(value, self.variables, unconnected_gradients=tf.UnconnectedGradients.ZERO))
            entries = tf.gather(self.flatten(grads), rows)
        columns = outer.jacobian(entries, [self.variables[i] for i in block],
                                 unconnected_gradients=tf.UnconnectedGradients.ZERO, experimental_use_pfor=not loop)
        return tf.concat([tf.reshape(tf.cast(c, self.dtype), [tf.shape(rows)[0], -1]) for c in columns], axis=1)

    # ------------------------------------------------------------------ Fisher and GGN
    def _outer_products(self, part, raw_inputs, x, y, s, specs, rows, work):
        self.route_for(self._objective, specs, (x, y, s))
        self.check_output_derivatives(x, y, s)
        weights = s.numpy().astype(np.float64)
        if work.ggn_diagonal == "mc" and self._mc_takes_rules(raw_inputs):
            self._mc_by_rules(part, raw_inputs, x, y, s, specs, rows, work, with_loss=False)
            if not work.sum_grad_squared:
                return
        need_hessian = work.ggn_diagonal == "exact"
        fn = self._compiled(("outputs", need_hessian),
                            lambda a, b: self._output_derivatives(a, b, need_hessian), specs[:2])
        flat, dl, lam, valid = fn(x, y)
        if work.sum_grad_squared:
            part.sums["sum_grad_squared"] = self._example_squares(raw_inputs, dl.numpy()[:, None, :],
                                                                 weights[:, None], moments=False)[0]
        if work.ggn_diagonal == "exact":
            values, vectors = np.linalg.eigh(lam.numpy().astype(np.float64))  # [B, C], [B, C, C]
            scale = np.abs(values).max(initial=0.0)
            keep = np.abs(values) > 1e-12 * max(scale, 1e-300)
            # u = q_c sqrt|e_c| and sign(e_c): Lambda = sum_c sign_c u_c u_c^T
            cotangents = np.transpose(vectors, (0, 2, 1)) * np.sqrt(np.abs(values))[:, :, None]  # [B, C, C]
            row_weights = np.where(keep, weights[:, None] * np.sign(values), 0.0)
            part.sums["ggn_diagonal"] = self._example_squares(raw_inputs, cotangents, row_weights, moments=False)[0]
        elif work.ggn_diagonal == "mc" and "ggn_mc" not in part.sums:
            flat_np = flat.numpy().astype(np.float64)
            sums = None
            grad_fn = self._compiled(("outputs", False), lambda a, b: self._output_derivatives(a, b, False),
                                     specs[:2])
            for sample in range(work.ggn_samples):
                sampled, scale = self._sample_labels(flat_np, valid.numpy().astype(np.float64), rows,
                                                     work.seed, sample)
                sampled = [tf.constant(l, dtype=self.dtype if l.dtype.kind == "f" else l.dtype) for l in sampled]
                _, dl_sampled, _, _ = grad_fn(x, sampled)
                got = self._example_squares(raw_inputs, (dl_sampled.numpy() * scale)[:, None, :],
                                            (weights / work.ggn_samples)[:, None], moments=True)
                sums = got if sums is None else [a + b for a, b in zip(sums, got)]
            part.sums["ggn_mc"], part.sums["ggn_mc_w2q"], part.sums["ggn_mc_w2q2"] = sums
            part.sums["ggn_mc_w2"] = np.asarray(work.ggn_samples * np.sum((weights / work.ggn_samples) ** 2))

    def layer_routes(self, raw_inputs) -> dict[str, str]:
        """Per variable name, how its Fisher and GGN products are formed: "layer rule"
        (``layer_rules``) or "per-example" (vectorised products of the whole model). Decided
        once per model, on the first rows that reach it."""
        if self._rules is None:
            found = layer_rules.find_rules(self.model, self.names)
            self._rules = self._check_rules(found, raw_inputs) if found else []
        covered = {k for rule in self._rules for k in rule.positions}
        return {name: "layer rule" if k in covered else "per-example" for k, name in enumerate(self.names)}

    def _flat_layout(self, out) -> tuple:
        """In a traced layer-rule function: what the rules computed (per variable of
        ``self._rules``, in rule order, a tuple of sums) as one [P] tensor per sum, in the flat
        parameter layout, zero at the variables without a rule. One transfer and one addition
        per sum then (``_add_rule_sums``), instead of one per variable and sum."""
        by_position = {k: sums for k, sums in zip((k for rule in self._rules for k in rule.positions), out)}
        count = len(out[0])
        return tuple(
            tf.concat([tf.reshape(tf.cast(by_position[k][j], self.dtype), [-1]) if k in by_position
                       else tf.zeros([size], self.dtype) for k, size in enumerate(self.sizes)], axis=0)
            for j in range(count))

    @staticmethod
    def _add_rule_sums(totals: list, flats) -> None:
        """Adds [P] tensors (``_flat_layout``'s sums, a gradient) into the float64 arrays
        ``totals`` in place; an entry that is None takes the first tensor's values (no zeros
        to allocate and add to: at P entries per sum, that costs as much as a small batch)."""
        for j, flat in enumerate(flats):
            value = flat.numpy()
            totals[j] = value.astype(np.float64, copy=False) if totals[j] is None else np.add(totals[j], value, out=totals[j])

    def rule_rows(self, batch: int) -> int:
        """Rows per call of the layer rules: a layer that forms per-example gradients (a
        convolution, a Dense on sequences) holds rows x its size, kept under ``vjp_budget``; each
        call repeats the forward and backward passes, so the plan counts them."""
        held = max([self.sizes[k] for rule in self._rules or [] if rule.materialises for k in rule.positions],
                   default=0)
        return max(1, min(batch, self.vjp_budget // held)) if held else batch

    def _example_squares(self, raw_inputs, cotangents, row_weights, moments):
        """``sum_{i,m} W[i,m] (J_i^T U[i,m])**2`` ([P]; with ``moments`` also the sums with
        ``W**2`` of q and q**2, else the first sum three times) for cotangents U [B, M, C] and
        row weights W [B, M]: the variables with a layer rule by it, the others by per-example
        products of their rows (``W != 0``)."""
        routes = self.layer_routes(raw_inputs)
        count = 3 if moments else 1
        totals = [np.zeros(self.parameters) for _ in range(count)]
        offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        columns = cotangents.shape[1]
        # Several columns (the exact GGN) need a static output size: with an open axis (a
        # sequence length) their count changes per batch, and each count would be traced anew.
        static = all(d is not None for spec in self.signature.outputs for d in spec.shape)
        rules = self._rules if columns == 1 or static else []
        if not rules:
            routes = {name: "per-example" for name in self.names}
        if rules:
            in_specs = self._specs(raw_inputs, [])[0]
            fn = self._compiled(("layer-squares", moments, columns),
                                lambda a, u, w: self._layer_squares(rules, a, u, w, moments, columns),
                                (in_specs, tf.TensorSpec([None, columns, None], self.dtype),
                                 tf.TensorSpec([None, columns], self.dtype)))
            chunk = self.rule_rows(len(cotangents))
            for start in range(0, len(cotangents), chunk):
                pick = slice(start, start + chunk)
                self._add_rule_sums(totals, fn([batch_tensor(np.asarray(a)[pick], self.dtype) for a in raw_inputs],
                                               _as_dtype(cotangents[pick], self.dtype),
                                               _as_dtype(row_weights[pick], self.dtype)))
        rest = [k for k, name in enumerate(self.names) if routes[name] != "layer rule"]
        if rest:
            example, column = np.nonzero(row_weights)
            got = self._squares(raw_inputs, example, cotangents[example, column], row_weights[example, column],
                                moments, rest)
            where = np.concatenate([np.arange(offsets[k], offsets[k + 1]) for k in rest])
            for total, value in zip(totals, got):
                total[where] += value
        return totals if moments else totals * 3

    def _squares(self, raw_inputs, example, cotangents, row_weights, moments, positions):
        """Runs ``_sum_sq_vjp`` for the variables ``positions`` over rows in chunks that keep
        rows x (their size) under the budget: the sums over their entries, in flat order (one,
        or three with ``moments``)."""
        in_specs = self._specs(raw_inputs, [])[0]
        loop = self.per_example_route == "loop"
        positions = tuple(positions)
        size = int(sum(self.sizes[k] for k in positions))
        fn = self._compiled(("squares", moments, loop, positions),
                            lambda a, u, w: self._sum_sq_vjp(a, u, w, moments, loop, positions),
                            (in_specs, tf.TensorSpec([None, None], self.dtype), tf.TensorSpec([None], self.dtype)))
        chunk = max(1, self.vjp_budget // max(1, size))
        totals = [np.zeros(size) for _ in range(3 if moments else 1)]
        for start in range(0, len(example), chunk):
            pick = example[start:start + chunk]
            rows_in = [batch_tensor(np.asarray(a)[pick], self.dtype) for a in raw_inputs]
            out = fn(rows_in, _as_dtype(cotangents[start:start + chunk], self.dtype),
                     _as_dtype(row_weights[start:start + chunk], self.dtype))
            for total, value in zip(totals, out):
                total += value.numpy().astype(np.float64)
        return totals

    def _sample_labels(self, flat, valid, rows, seed, sample):
        """Labels y' drawn from the model's predictive distribution (``sampling.draw_labels``,
        run eagerly), one array per output, and the scale [B, C] of the sampled loss gradient.
        ``flat`` [B, C] and ``valid`` [B, outputs] as ``_output_derivatives`` returns them."""
        family = self._family()
        shapes = self._output_shapes(flat.shape[1])
        uniforms = [row_uniforms(seed, sampling.stream(sample, position), rows, sampling.uniform_count(family, shape))
                    for position, shape in enumerate(shapes)]
        labels, scale = sampling.draw_labels(family, tf.constant(flat, tf.float64), tf.constant(valid, tf.float64),
                                             uniforms, shapes, self._from_logits())
        return [label.numpy() for label in labels], scale.numpy()

    def _family(self) -> str:
        """The loss's predictive distribution, or an InputError when it has none (Monte Carlo GGN)."""
        if self.loss.family is None:
            raise InputError(
                f"ggn_diagonal method 'mc' needs a loss with a known predictive distribution "
                f"(crossentropy or mse), not {self.loss.name!r}: use method: exact"
            )
        return self.loss.family

    def _from_logits(self) -> tuple[bool, ...]:
        """Per output, whether the loss reads it as logits (read once the model has been called)."""
        logit_outputs = self.adapter.logit_outputs or (False,) * len(self.signature.outputs)
        return tuple(bool(flag or self.loss.from_logits) for flag in logit_outputs)

    def _output_shapes(self, width: int) -> list[tuple[int, ...]]:
        """Each output's shape in this batch (open axes, e.g. a sequence length, filled in)."""
        shapes = [tuple(spec.shape) for spec in self.signature.outputs]
        if all(d is not None for shape in shapes for d in shape):
            return shapes
        if len(shapes) > 1 or sum(d is None for d in shapes[0]) > 1:
            raise InputError("ggn_diagonal method 'mc' supports one output with at most one open axis "
                             "(a sequence length): use method: exact")
        known = int(np.prod([d for d in shapes[0] if d is not None]))
        return [tuple(width // known if d is None else d for d in shapes[0])]


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


def _row_slices(n: int, chunk: int) -> list:
    """Row ranges of at most ``chunk`` rows over a batch of n; ``[None]`` when one takes all
    (``_rows`` then passes the tensors as they are: no slicing op per call)."""
    if chunk >= n:
        return [None]
    return [slice(start, start + chunk) for start in range(0, n, chunk)]


def _rows(tensors, pick):
    return list(tensors) if pick is None else [t[pick] for t in tensors]


def _curvature_asked(work: BatchWork) -> set[str]:
    """The curvature quantities ``work`` asks for beside the loss and gradient."""
    asked = {"fisher": work.sum_grad_squared, "hessian_diagonal": bool(work.hessian_diagonal),
             "hessian_blocks": bool(work.hessian_blocks), f"ggn_{work.ggn_diagonal}": bool(work.ggn_diagonal),
             "hvp": work.hvp_vectors is not None and len(work.hvp_vectors) > 0,
             "probes": work.probes is not None and len(work.probes) > 0}
    return {name for name, wanted in asked.items() if wanted}


def _vector_spec(count, parameters, dtype):
    return tf.TensorSpec([count, parameters], dtype)


def _flat_outputs(outputs, dtype):
    """The model's outputs as one [B, C] tensor in the compute dtype (C order per output)."""
    return tf.concat([tf.reshape(tf.cast(o, dtype), [tf.shape(o)[0], -1]) for o in outputs], axis=1)


def _dense(gradients):
    """Gradients as dense tensors (an Embedding's gradient is ``tf.IndexedSlices``)."""
    return [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in gradients]


def _valid_fraction(mask, output, dtype):
    """[B]: the fraction of an output's positions the loss averages over (``sampling.draw_labels``'s
    ``valid``): all of them without a mask (ones); one with a mask, whose positions the
    token-weighted objective sums (``1 / positions``, positions = every axis but the batch and
    the last)."""
    batch = tf.shape(output)[0]
    if mask is None:
        return tf.ones([batch], dtype)
    positions = tf.cast(tf.reduce_prod(tf.shape(output)[1:-1]), dtype)
    return tf.fill([batch], 1.0 / positions)


def _input_dtype(name: str) -> str:
    """The dtype a model input takes floats in (other inputs keep their own)."""
    return name if name.startswith(("float", "bfloat")) else "float32"


def _is_text(array) -> bool:
    return np.asarray(array).dtype.kind in "OSU"


def batch_tensor(array, dtype):
    """A batch array as a tensor: floats in the compute dtype, text as tf.string."""
    array = np.asarray(array)
    if array.dtype.kind == "f":
        return tf.constant(array, dtype=dtype)
    if _is_text(array):
        return tf.constant(array.astype(object), dtype=tf.string)
    return tf.constant(array)


def _tensor_spec(array, model_shape, dtype):
    """TensorSpec for a batch array: axes the model leaves open (None) stay open."""
    array = np.asarray(array)
    # Leading axes line up with the model's (a sparse label [T] beside an output [T, C]).
    shape = [None if k < len(model_shape) and model_shape[k] is None else d
             for k, d in enumerate(array.shape[1:])]
    if array.dtype.kind == "f":
        kind = dtype
    elif _is_text(array):
        kind = tf.string
    else:
        kind = tf.as_dtype(array.dtype)
    return tf.TensorSpec([None, *shape], kind)


def _as_dtype(array, dtype):
    return tf.constant(np.asarray(array), dtype=dtype)
