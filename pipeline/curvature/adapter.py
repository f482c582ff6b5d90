"""The one place that knows how Keras calls a model and its loss.

Every quantity of the engine (loss, gradient, HVPs, Hessian diagonals, GGN, Fisher) goes
through ``ModelAdapter.forward`` and ``ModelAdapter.per_example_loss``, so the output-space
derivatives of the GGN and Fisher differentiate exactly the per-example loss whose gradient
and Hessian the other quantities take. What it reproduces of Keras (3.15, TensorFlow backend),
each found in Keras' own code (``Functional.call``, ``Loss.__call__``, ``LossFunctionWrapper``,
``backend.tensorflow.nn._get_logits``, ``losses.loss.apply_mask``):

- **Inputs** in the structure the model was built with: one tensor, a list in
  ``model.inputs`` order, or a dict keyed as in ``model.input`` (Keras 3 refuses other
  structures). Subclassed models (no ``model.inputs``) get one tensor, or a dict by name.
- **Outputs** flattened as ``keras.tree.flatten`` flattens them (``model.outputs`` order;
  sorted keys for dict outputs), named by ``model.output_names`` (dict keys are accepted as
  well, ``signature.output_aliases``).
- **Logits.** Keras' cross-entropies, given probabilities (``from_logits: false``) made by a
  softmax or sigmoid, read the logits behind them (``_keras_logits``, or the input of the
  Softmax/Sigmoid op) and compute the loss from those. The adapter does the same, explicitly:
  the output ``f`` handed to the loss is then the logits and the loss is taken with
  ``from_logits=True``. The GGN and Fisher are taken at that tensor (a copy of the
  probabilities would lose the logits and be clipped: saturated examples would drop out).
- **Label ranks** as ``model.fit`` reconciles them (``LossFunctionWrapper`` squeezes or
  expands a trailing 1 when ranks differ by one): a ``[B]`` label column with a ``[B, 1]``
  output; sparse labels stored as ``[B, 1]`` (Keras' sparse cross-entropy squeezes them).
- **Dtypes.** The loss computes in the model's compute dtype (a Keras ``Loss`` would cast a
  float64 model's output to float32, PITFALLS.md); labels are converted as ``Loss.__call__``
  converts them.
- **Masks** (``_keras_mask``, from ``Embedding(mask_zero=True)``, ``Masking``...): the
  objective is token-weighted, ``L = sum_it s_i m_it l_it / sum_it s_i m_it`` (what Keras
  ``evaluate`` returns over the whole dataset, and what training minimises), so the
  per-example term is the masked *sum* ``l_i = sum_t m_it l_it`` and the example counts
  ``n_i = sum_t m_it`` towards the divisor (``position_counts``). Without a mask, ``l_i`` is
  the mean over every axis after the batch axis, as Keras reduces, and ``n_i = 1``. A masked
  output beside other outputs is refused (each would need its own divisor).
- **Other Keras cross-entropies** (the focal ones: any Keras loss that takes ``from_logits``)
  read the logits behind a softmax/sigmoid output too (``_get_logits``) while computing other
  terms from the probabilities: ``f`` is then the logits and the loss is applied to a fresh
  softmax/sigmoid of ``f`` that carries them, so every route computes Keras' very loss.

Several outputs: ``l_i`` is the sum of the per-output losses, as Keras sums them.
"""

from __future__ import annotations

import inspect

import keras
import numpy as np
import tensorflow as tf

from pipeline.errors import InputError
from pipeline.signature import ModelSignature, TensorSpec

# Keras' cross-entropies and the op whose input they read as logits (``_get_logits``).
_LOGIT_OPS = {"categorical_sparse": "Softmax", "categorical_onehot": "Softmax", "bernoulli": "Sigmoid"}


class ModelAdapter:
    """Calls ``model`` and ``loss`` the way ``model.fit``/``model.evaluate`` do.

    Parameters:
        model: a built Keras 3 model, already computing in ``dtype``.
        loss: a ``pipeline.curvature.losses.PerExampleLoss``.
        dtype: the compute dtype (``tf.float32`` or ``tf.float64``).

    Example::

        adapter = ModelAdapter(model, resolve_loss(spec), tf.float64)
        outputs, masks = adapter.forward([x])          # f (logits where Keras reads them), masks
        l = adapter.per_example_loss([y], outputs, masks)   # [B]
    """

    def __init__(self, model, loss, dtype):
        self.model = model
        self.loss = loss
        self.dtype = tf.as_dtype(dtype)
        self.signature = model_signature(model)
        self._input_structure = _input_structure(model)
        # Whether output k is handed to the loss as logits read behind a softmax/sigmoid. It
        # is decided while tracing (the tensors carry it) and read by the Monte Carlo GGN
        # sampler, which always runs after a forward pass has been traced.
        self.logit_outputs: tuple[bool, ...] | None = None
        # Whether an output carries a sequence mask (token-weighted objective); None until traced.
        self.masked: bool | None = None
        self.keras_loss = KerasLoss(loss, self.dtype)

    # ------------------------------------------------------------------ the model
    def call(self, inputs) -> list:
        """The model's outputs (inference mode) as a flat list in ``signature.outputs`` order."""
        out = self.model(self._pack(list(inputs)), training=False)
        return keras.tree.flatten(out)

    def _pack(self, inputs: list):
        structure = self._input_structure
        if structure == "single":
            return inputs[0]
        if structure == "list":
            return inputs
        return dict(zip(structure, inputs))

    def forward(self, inputs) -> tuple[list, list]:
        """``(f, masks)``: per output, the tensor the loss differentiates and its mask (or None).

        ``f`` is in the compute dtype; where Keras' cross-entropy would read the logits behind
        a softmax/sigmoid output, ``f`` is those logits (see the module docstring).
        """
        outputs, masks, logits = [], [], []
        for raw in self.call(inputs):
            masks.append(getattr(raw, "_keras_mask", None))
            behind, activation = self._logits_behind(raw)
            # True: a cross-entropy family takes f with from_logits; an op name: the loss is
            # applied to that activation of f (``KerasLoss._keras_values``).
            logits.append(activation if behind is not None and self.loss.family not in _LOGIT_OPS
                          else behind is not None)
            tensor = behind if behind is not None else raw
            outputs.append(tensor if tensor.dtype == self.dtype else tf.cast(tensor, self.dtype))
        if len(masks) > 1 and any(m is not None for m in masks):
            raise InputError(
                f"output(s) {[n.name for n, m in zip(self.signature.outputs, masks) if m is not None]} carry a "
                "sequence mask beside other outputs: the token-weighted objective (sum of masked losses over the "
                "count of unmasked positions) needs one divisor for the whole model; compute the masked output "
                "alone (a model with that output only), or remove the mask")
        self.logit_outputs = tuple(logits)
        self.masked = any(m is not None for m in masks)
        return outputs, masks

    def _logits_behind(self, tensor):
        """``(logits, op name)`` Keras' cross-entropy would read instead of ``tensor``, or
        ``(None, None)``."""
        if not self._reads_logits():
            return None, None
        ops = (_LOGIT_OPS[self.loss.family],) if self.loss.family in _LOGIT_OPS else ("Softmax", "Sigmoid")
        op = getattr(tensor, "op", None)
        graph_op = op is not None and not isinstance(tensor, tf.__internal__.EagerTensor) and len(op.inputs) == 1
        behind = getattr(tensor, "_keras_logits", None)
        if behind is not None:
            if graph_op and op.type in ("Softmax", "Sigmoid"):
                return behind, op.type
            if len(ops) > 1 and isinstance(tensor, tf.__internal__.EagerTensor):
                # An eager tensor keeps no op: which activation made it is read from its values
                # (a focal loss on a sigmoid output, called outside a tf.function).
                sigmoid = tf.sigmoid(tf.cast(behind, tensor.dtype))
                return behind, "Sigmoid" if np.allclose(sigmoid, tensor, rtol=1e-5, atol=1e-6) else "Softmax"
            return behind, ops[0]
        if graph_op and op.type in ops:
            return op.inputs[0], op.type
        return None, None

    def _reads_logits(self) -> bool:
        """Whether the loss reads the logits behind a softmax/sigmoid output, as Keras'
        ``_get_logits`` does: the cross-entropy families always (even with from_logits=True,
        Keras reads the logits and warns), other Keras losses that take ``from_logits`` (the
        focal cross-entropies) when it is false. A user function gets the output as it is."""
        if self.loss.user_function:
            return False
        if self.loss.family in _LOGIT_OPS:
            return True
        return _takes_from_logits(self.loss.fn) and not self.loss.from_logits

    def position_counts(self, labels, outputs, masks):
        """``n_i`` [B]: the unmasked positions example i counts in the token-weighted objective's
        divisor (the mask broadcast to the loss's per-position values, summed), or None when no
        output carries a mask (every example counts 1)."""
        if all(m is None for m in masks):
            return None
        return self.keras_loss.output_losses(labels, outputs, masks, self.logit_outputs, counts=True)[0]

    # ------------------------------------------------------------------ the loss
    def output_losses(self, labels, outputs, masks) -> list:
        """Per output, the per-example loss ``[B]`` of ``forward``'s outputs and masks."""
        return self.keras_loss.output_losses(labels, outputs, masks, self.logit_outputs)

    def per_example_loss(self, labels, outputs, masks):
        """``l_i`` for the batch, ``[B]``: the sum over outputs of each output's loss."""
        return self.keras_loss.per_example_loss(labels, outputs, masks, self.logit_outputs)

    def loss_of_inputs(self, inputs, labels):
        """``l_i`` straight from inputs: ``per_example_loss(labels, *forward(inputs))``."""
        outputs, masks = self.forward(inputs)
        return self.per_example_loss(labels, outputs, masks)


class KerasLoss:
    """A ``PerExampleLoss`` applied to output tensors as Keras applies it (ranks, dtype, masks).

    ``logit_outputs[k]`` says that output k is the logits read behind a softmax/sigmoid, so
    the cross-entropy is taken with ``from_logits=True`` there.
    """

    def __init__(self, loss, dtype):
        self.loss = loss
        self.dtype = tf.as_dtype(dtype)

    def _keras_values(self, label, output, logits):
        """Per-position values of a Keras loss function, as its ``LossFunctionWrapper`` computes them.

        ``logits``: True to take ``output`` as logits (``from_logits``), an op name
        (``"Softmax"``/``"Sigmoid"``) to apply that activation to ``output`` first, as the
        model did, leaving the logits on the result for Keras to read."""
        options = dict(self.loss.options)
        if logits is True:
            options["from_logits"] = True
        elif logits:
            output = _activation_of_logits(output, logits)
        label, output = _same_rank(label, output)
        return self.loss.fn(label, output, **options)

    def output_losses(self, labels, outputs, masks, logit_outputs=None, counts: bool = False) -> list:
        """Per output, the per-example loss ``[B]`` (masked sum over positions); with ``counts``,
        per output the masked positions' count ``[B]`` instead (ones without a mask)."""
        logit_flags = logit_outputs or (False,) * len(outputs)
        if self.loss.user_function and len(outputs) > 1:
            # A user function for several outputs gets the lists (documented in docs/definitions.md).
            values = tf.convert_to_tensor(self.loss.fn([self._label(y) for y in labels], list(outputs)))
            return [_reduce_per_example(tf.cast(values, self.dtype), None, self.dtype, counts)]
        losses = []
        for label, output, mask, logits in zip(labels, outputs, masks, logit_flags):
            label = self._label(label)
            if self.loss.user_function:
                label, output = _same_rank(label, output)
                values = tf.convert_to_tensor(self.loss.fn(label, output))
            else:
                values = self._keras_values(label, output, logits)
            losses.append(_reduce_per_example(tf.cast(values, self.dtype), mask, self.dtype, counts))
        return losses

    def per_example_loss(self, labels, outputs, masks, logit_outputs=None):
        """``l_i``, ``[B]``: the sum over outputs of each output's per-example loss."""
        losses = self.output_losses(labels, outputs, masks, logit_outputs)
        return losses[0] if len(losses) == 1 else tf.add_n(losses)

    def _label(self, label):
        # Loss.__call__ converts labels to the loss dtype (integer class ids included).
        label = tf.convert_to_tensor(label)
        return label if label.dtype == self.dtype else tf.cast(label, self.dtype)


def _same_rank(label, output):
    """Label and output ranks reconciled as Keras' ``LossFunctionWrapper.call`` does
    (``keras.src.losses.loss.squeeze_or_expand_to_same_rank``, not public API): when the ranks
    differ by one and the longer one ends in a 1, a rank-1 side is expanded, else the 1 is
    squeezed."""
    label_rank, output_rank = label.shape.rank, output.shape.rank
    if label_rank == output_rank + 1 and label.shape[-1] == 1:
        if output_rank == 1:
            output = output[:, None]
        else:
            label = tf.squeeze(label, axis=-1)
    if output_rank == label_rank + 1 and output.shape[-1] == 1:
        if label_rank == 1:
            label = label[:, None]
        else:
            output = tf.squeeze(output, axis=-1)
    return label, output


def _takes_from_logits(fn) -> bool:
    try:
        return "from_logits" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _activation_of_logits(logits, op_type: str):
    """``softmax``/``sigmoid`` of ``logits`` as the op Keras' ``_get_logits`` recognises, with
    the logits attached as Keras' own activations attach them."""
    out = tf.nn.softmax(logits) if op_type == "Softmax" else tf.math.sigmoid(logits)
    try:
        out._keras_logits = logits
    except AttributeError:
        pass  # a tensor that takes no attributes: the op itself still leads Keras to the logits
    return out


def _reduce_per_example(values, mask, dtype, counts: bool = False):
    """``[B, ...]`` per-position losses -> ``[B]``: the mean over every axis after the batch, or
    with a mask the masked *sum* (the token-weighted objective's per-example term)."""
    if values.shape.rank is None:
        raise InputError("the loss returned values of unknown rank: return one value per example")
    if values.shape.rank == 0:
        raise InputError("the loss returned a single number for the batch: return one value per example "
                         "(reduction none)")
    if mask is None:
        if counts:
            return tf.ones(tf.shape(values)[:1], dtype)
        if values.shape.rank == 1:
            return values
        return tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))
    weights = tf.cast(mask, dtype)
    while weights.shape.rank < values.shape.rank:
        weights = weights[..., None]
    if weights.shape.rank > values.shape.rank:
        raise InputError(
            f"the model's output carries a mask of rank {weights.shape.rank} but the loss gives values of rank "
            f"{values.shape.rank}: use a loss with one value per masked position, or remove the mask")
    weights = tf.broadcast_to(weights, tf.shape(values))
    if counts:
        values = tf.ones_like(values)
    if values.shape.rank == 1:
        return values * weights
    return tf.reduce_sum(values * weights, axis=list(range(1, values.shape.rank)))


# ---------------------------------------------------------------------- structure and names
def _input_structure(model):
    """"single", "list", or the tuple of dict keys, in ``signature.inputs`` order."""
    structure = _functional_inputs(model)
    if structure is None:  # subclassed
        shapes = _built_input_shapes(model)
        if isinstance(shapes, dict):
            return tuple(sorted(shapes))
        if isinstance(shapes, (list, tuple)) and shapes and isinstance(shapes[0], (list, tuple)):
            return "list"
        return "single"
    if isinstance(structure, dict):
        return tuple(sorted(structure))
    if isinstance(structure, (list, tuple)):
        return "list"
    return "single"


def _functional_inputs(model):
    try:
        return model.input
    except (AttributeError, ValueError):
        return None


def _built_input_shapes(model):
    """Input shapes a subclassed model was built with (Keras records the first call's shapes)."""
    recorded = getattr(model, "_build_shapes_dict", None)
    if not model.built or not recorded:
        raise InputError(
            f"model {model.name!r} is a subclassed model that was never built: call it once on a batch "
            "(or model.build(input_shape)) in the builder, before returning it")
    return next(iter(recorded.values()))


def _dtype_name(dtype) -> str:
    name = getattr(dtype, "name", None) or str(dtype)
    return name.replace("<dtype: '", "").replace("'>", "")


def _spec(name, shape, dtype) -> TensorSpec:
    return TensorSpec(name=name, shape=tuple(None if d is None else int(d) for d in shape[1:]),
                      dtype=_dtype_name(dtype))


def model_signature(model) -> ModelSignature:
    """Names, shapes and dtypes of the model's inputs, outputs and trainable variables.

    Inputs are in the order the adapter packs them (``model.inputs``, or sorted dict keys);
    a dict-structured input is named by its key, a list one by its ``keras.Input`` name.
    Outputs are in ``keras.tree.flatten`` order, named by ``model.output_names``; for dict
    outputs the keys are aliases. Subclassed models are described from the shapes they
    were built with and ``compute_output_spec``.
    """
    structure = _functional_inputs(model)
    if structure is not None:
        if isinstance(structure, dict):
            keys = sorted(structure)
            inputs = tuple(_spec(k, structure[k].shape, structure[k].dtype) for k in keys)
        else:
            tensors = keras.tree.flatten(structure)
            inputs = tuple(_spec(getattr(t, "name", None) or f"input_{i}", t.shape, t.dtype)
                           for i, t in enumerate(tensors))
        output_structure = model.output
    else:
        shapes = _built_input_shapes(model)
        dtype = model.compute_dtype  # a subclassed model takes floats in its own compute dtype
        if isinstance(shapes, dict):
            inputs = tuple(_spec(k, tuple(shapes[k]), dtype) for k in sorted(shapes))
            symbolic = {k: keras.KerasTensor((None, *tuple(shapes[k])[1:]), dtype) for k in sorted(shapes)}
        elif isinstance(shapes, (list, tuple)) and shapes and isinstance(shapes[0], (list, tuple)):
            inputs = tuple(_spec(f"input_{i}", tuple(s), dtype) for i, s in enumerate(shapes))
            symbolic = [keras.KerasTensor((None, *tuple(s)[1:]), dtype) for s in shapes]
        else:
            inputs = (_spec("input", tuple(shapes), dtype),)
            symbolic = keras.KerasTensor((None, *tuple(shapes)[1:]), dtype)
        try:
            output_structure = model.compute_output_spec(symbolic)
        except Exception as exc:  # noqa: BLE001 - any failure here is the model's
            raise InputError(f"cannot infer the outputs of subclassed model {model.name!r} "
                             f"({type(exc).__name__}: {exc}): check the model".replace("\n", " ")) from None
    flat = keras.tree.flatten(output_structure)
    names = list(getattr(model, "output_names", None) or [])
    aliases = tuple(sorted(output_structure)) if isinstance(output_structure, dict) else ()
    if len(names) != len(flat):
        names = list(aliases) if aliases else (["output"] if len(flat) == 1 else
                                                 [f"output_{i}" for i in range(len(flat))])
    outputs = tuple(_spec(n, t.shape, t.dtype) for n, t in zip(names, flat))
    variables = tuple(v.path for v in model.trainable_variables)
    shapes = tuple(tuple(int(d) for d in v.shape) for v in model.trainable_variables)
    return ModelSignature(inputs=inputs, outputs=outputs, variables=variables, variable_shapes=shapes,
                          output_aliases=aliases if len(aliases) == len(flat) else ())
