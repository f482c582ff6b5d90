"""What every family of products reads: the model in its compute dtype, called through its
adapter; the parameters ``w`` (the selected variables, flattened in C order); the objective
``sum_i s_i l_i``; the compiled functions; the routes decided once per model.

One ``Core`` per engine. The families (``hvp_products``, ``exact_blocks``,
``example_products``, ``layer_products``) each hold it and never each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from pipeline.curvature.adapter import ModelAdapter
from pipeline.curvature.tensors import batch_tensor, dense, tensor_spec
from pipeline.errors import InputError


@dataclass
class Routes:
    """How this model's products are formed, "vectorised" (``pfor``) or "loop", decided once
    per model on its first batch (``routes.RouteChooser``), None until then:

    - ``route``: the exact diagonal and the Hessian blocks (a family whose ``pfor`` fails on
      an op sets it to "loop": the loop computes the same numbers);
    - ``per_example``: the per-example products of the Fisher and the GGN.
    """

    route: str | None = None
    per_example: str | None = None


class Core:
    """The model, the loss and the parameters ``w`` every family differentiates.

    ``model``: the Keras model computing in ``dtype`` (already copied to it); ``loss``: a
    ``PerExampleLoss``; ``selected``: glob patterns over variable paths (``ModelSignature.
    select``), None or "all" for every trainable variable. Budgets: ``hvp_block`` vectors per
    compiled HVP call, ``diagonal_block`` gradient entries per vectorised Jacobian block,
    ``vjp_budget`` floats held at once by per-example products (rows x P).

    Raises ``InputError`` when the model has no trainable variable.
    """

    def __init__(self, model, loss, dtype, selected=None, hvp_block: int = 16, diagonal_block: int = 512,
                 vjp_budget: int = 1 << 24, route: str | None = None):
        self.model = model
        self.loss = loss
        self.dtype = dtype
        # Every call of the model and the loss goes through the adapter (how Keras does it).
        self.adapter = ModelAdapter(model, loss, dtype)
        # The backend tf.Variables, not the Keras wrappers: TensorFlow's gradient code reads
        # ``.dtype`` as a DType (Keras variables give a string, and unconnected gradients or
        # ForwardAccumulator then fail, see PITFALLS.md).
        variables = [getattr(v, "value", v) for v in model.trainable_variables]
        if not variables:
            raise InputError("the model has no trainable variables: nothing to differentiate")
        # The parameters w (job key ``variables``): the others are constants of every quantity.
        chosen, self.signature = self.adapter.signature.select(selected)
        self.variables = [variables[i] for i in chosen]
        self.names = list(self.signature.variables)
        self.shapes = [tuple(s) for s in self.signature.variable_shapes]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.parameters = int(sum(self.sizes))
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.hvp_block = int(hvp_block)
        self.diagonal_block = int(diagonal_block)
        self.vjp_budget = int(vjp_budget)
        self.routes = Routes(route, route)
        self._functions: dict = {}

    # ------------------------------------------------------------------ parameters
    def flatten(self, tensors):
        """Concatenates per-variable tensors (leading dims kept) into [..., P], C order."""
        lead = tensors[0].shape[: tensors[0].shape.rank - len(self.shapes[0])]
        return tf.concat([tf.reshape(t, list(lead) + [-1]) for t in tensors], axis=-1)

    def unflatten(self, flat):
        """Splits [..., P] into per-variable tensors of the variables' shapes."""
        lead = list(flat.shape[:-1])
        parts = tf.split(flat, self.sizes, axis=-1)
        return [tf.reshape(p, lead + list(s)) for p, s in zip(parts, self.shapes)]

    def gradient_flat(self, tape, value):
        grads = tape.gradient(value, self.variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return self.flatten([tf.cast(g, self.dtype) for g in dense(grads)])

    # ------------------------------------------------------------------ objectives
    def loss_vector(self, inputs, labels):
        return tf.cast(self.adapter.loss_of_inputs(list(inputs), list(labels)), self.dtype)

    def objective(self, inputs, labels, weights):
        """``sum_i s_i l_i`` over the batch."""
        return tf.reduce_sum(weights * self.loss_vector(inputs, labels))

    def regularization(self, *_):
        """The model's regularization terms (``model.losses``), once."""
        losses = [tf.cast(value, self.dtype) for value in self.model.losses]
        if not losses:
            return tf.constant(0.0, self.dtype)
        return tf.add_n(losses)

    def loss_and_gradient(self, objective, inputs, labels, weights):
        with tf.GradientTape() as tape:
            value = objective(inputs, labels, weights)
        return value, self.gradient_flat(tape, value)

    # ------------------------------------------------------------------ compiled functions
    def specs(self, inputs, labels):
        """Signatures of the compiled functions: the batch axis, and every axis the model
        leaves open (sequence lengths), stay open, so batches of other lengths reuse them."""
        inputs_specs = [tensor_spec(a, spec.shape, self.dtype)
                        for a, spec in zip(inputs, self.signature.inputs)]
        label_specs = [tensor_spec(a, spec.shape, self.dtype)
                       for a, spec in zip(labels, self.signature.outputs)]
        return inputs_specs, label_specs, tf.TensorSpec([None], self.dtype)

    def compiled(self, key, build, signature):
        """One ``tf.function`` per kind of call, traced once (batch dimension left open)."""
        fn = self._functions.get(key)
        if fn is None:
            fn = tf.function(build, input_signature=signature, reduce_retracing=True)
            self._functions[key] = fn
        return fn

    def cached(self, key):
        """A function (or ``XlaTrial``) kept under ``key``, or None."""
        return self._functions.get(key)

    def keep(self, key, function) -> None:
        self._functions[key] = function

    def cast_batch(self, inputs, labels, weights):
        """Batch arrays as tensors: floats in the compute dtype, weights ``s`` (ones when None)."""
        def cast(a):
            return batch_tensor(a, self.dtype)

        n = len(inputs[0])
        w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
        return [cast(a) for a in inputs], [cast(a) for a in labels], tf.constant(w, dtype=self.dtype)

    # ------------------------------------------------------------------ outputs and their loss
    @property
    def static_outputs(self) -> bool:
        """Whether every output's shape is known before a batch runs (no open sequence axis)."""
        return all(d is not None for spec in self.signature.outputs for d in spec.shape)

    def predictive_family(self) -> str:
        """The loss's predictive distribution, or an InputError when it has none (Monte Carlo GGN)."""
        if self.loss.family is None:
            raise InputError(
                f"ggn_diagonal method 'mc' needs a loss with a known predictive distribution "
                f"(crossentropy or mse), not {self.loss.name!r}: use method: exact"
            )
        return self.loss.family

    def from_logits(self) -> tuple[bool, ...]:
        """Per output, whether the loss reads it as logits (read once the model has been called)."""
        logit_outputs = self.adapter.logit_outputs or (False,) * len(self.signature.outputs)
        return tuple(bool(flag or self.loss.from_logits) for flag in logit_outputs)

    def output_shapes(self, width: int) -> list[tuple[int, ...]]:
        """Each output's shape in this batch (open axes, e.g. a sequence length, filled in)."""
        shapes = [tuple(spec.shape) for spec in self.signature.outputs]
        if all(d is not None for shape in shapes for d in shape):
            return shapes
        if len(shapes) > 1 or sum(d is None for d in shapes[0]) > 1:
            raise InputError("ggn_diagonal method 'mc' supports one output with at most one open axis "
                             "(a sequence length): use method: exact")
        known = int(np.prod([d for d in shapes[0] if d is not None]))
        return [tuple(width // known if d is None else d for d in shapes[0])]
