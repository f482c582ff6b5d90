"""Per-layer rules for summed squares of per-example gradients (Fisher and GGN diagonals).

The engine's Fisher and GGN diagonals are ``sum_r w_r (J_r^T u_r)**2``: for each row r (an
example i and a cotangent u in its output space), the square of the gradient of the scalar
``c_r = <f_i, u>``. For the layers that carry most parameters, that per-example gradient is a
product of two tensors one backward pass gives for the whole batch at once, the layer's input
``x_i`` and the gradient ``dz_i = dc_r/dz_i`` of its (pre-activation) output (examples do not
mix in inference):

- ``Dense`` ``z = x W + b``, any rank of ``x`` ``[B, ..., n_in]``:
  ``dW_i = sum_t x_it^T dz_it``, ``db_i = sum_t dz_it``. With a ``[B, n_in]`` input and one call,
  ``sum_i w_i dW_i**2 = (w x**2)^T (dz**2)``: no per-example gradient is ever formed.
- ``Conv1D``/``Conv2D`` (channels last, one group): the same on the input's patches
  (``tf.image.extract_patches``, the layer's strides, dilation and padding),
  ``dK_i = sum_p patch_ip^T dz_ip``.
- ``Embedding``: ``dE_i[v] = sum_{t: id_it = v} dz_it``, summed per (example, id) pair, never a
  ``[B, V, d]`` tensor.
- The scale and shift of ``LayerNormalization``/``BatchNormalization`` (inference):
  ``z = x_hat * gamma + beta``; ``x_hat`` is the layer's own output with gamma = 1 and beta = 0
  (``keras.StatelessScope``), ``dgamma_i = sum_t dz_it * x_hat_it``, ``dbeta_i = sum_t dz_it``.

Cost per batch: one forward pass, one backward pass to the layer outputs per cotangent column
(1 for the Fisher and the Monte Carlo GGN, C for the exact GGN) and, per layer, a product of its
input and output gradients: about 1 + C/2 gradients for the exact GGN instead of ~4C.
Memory: the activations of one pass and, for rank > 2 inputs and convolutions, one layer's
per-example gradients for the rows of a chunk (``B_chunk x layer size``).

Which layers a model's variables take is decided per model, once (``CurvatureEngine.
layer_routes``): a layer is used only when its class is exactly one of the above with its
standard ``call`` (no LoRA, no quantisation) and its variables are among those selected, and, on
batches of 3 and 5 of the first rows: an example's output does not depend on its batch, the
tapped model gives the same outputs, the layer's tensors have one row per example, the sum of its
per-example gradients equals the batch gradient of its variables, and no op outside its own
calls reads them in the traced graph (``reads_elsewhere``). Every other variable keeps the
vectorised per-example route, so weight tying, layers applied to positions folded into the batch
axis, custom layers and layers inside loops are still right.

Source: Dangel, Kunstner and Hennig (2020), "BackPACK: Packing more into backprop" (its
per-layer extensions for ``DiagGGN``, ``DiagGGNMC`` and ``SumGradSquared``); Goodfellow (2015),
"Efficient per-example gradient computations".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

_CONVOLUTIONS = (keras.layers.Conv1D, keras.layers.Conv2D)
_AFFINE = (keras.layers.LayerNormalization, keras.layers.BatchNormalization)


@dataclass
class Record:
    """One call of a tapped layer: what the rule reads (``x``) and the tensor whose gradient it
    takes (``z``)."""

    x: tf.Tensor
    z: tf.Tensor


@dataclass
class Rule:
    """A layer whose variables have a per-layer rule.

    ``variables``: (attribute, position in the engine's variables) for each selected variable
    of the layer; ``records``: its calls during the last tapped forward pass.
    """

    kind: str
    layer: object
    variables: list[tuple[str, int]]
    records: list[Record] = field(default_factory=list)
    # Names of the graph ops its calls created while traced (``reads_elsewhere``).
    inside: set = field(default_factory=set)
    # Whether squares need per-example gradients of the kernel (set once the rule is checked:
    # inputs of rank > 2, convolutions, or a layer called more than once).
    materialises: bool = True

    @property
    def positions(self) -> list[int]:
        return [position for _, position in self.variables]

    # ------------------------------------------------------------------ the tap
    def wrapped(self, original):
        """The layer's ``call``, recording ``(x, z)`` and returning what it returned; while
        traced, also the ops it creates (``inside``)."""
        call = self._recording(original)

        def traced(*args, **kwargs):
            graph = None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()
            start = len(graph.get_operations()) if graph is not None else 0
            try:
                return call(*args, **kwargs)
            finally:
                if graph is not None:
                    self.inside.update(op.name for op in graph.get_operations()[start:])
        return traced

    def _recording(self, original):
        layer, records = self.layer, self.records

        if self.kind in ("dense", "conv", "einsum"):
            def call(inputs, *args, **kwargs):
                # z is the pre-activation output: the activation is applied here, after it.
                activation = layer.activation
                object.__setattr__(layer, "activation", None)
                try:
                    z = original(inputs, *args, **kwargs)
                finally:
                    object.__setattr__(layer, "activation", activation)
                records.append(Record(tf.convert_to_tensor(inputs), z))
                return activation(z) if activation is not None else z
        elif self.kind == "embedding":
            def call(inputs, *args, **kwargs):
                z = original(inputs, *args, **kwargs)
                records.append(Record(tf.convert_to_tensor(inputs), z))
                return z
        else:  # affine: scale and shift of a normalisation
            gamma, beta = getattr(layer, "gamma", None), getattr(layer, "beta", None)

            def call(inputs, *args, **kwargs):
                mapping = [(v, tf.ones(v.shape, v.dtype)) for v in (gamma,) if v is not None]
                mapping += [(v, tf.zeros(v.shape, v.dtype)) for v in (beta,) if v is not None]
                with keras.StatelessScope(state_mapping=mapping):
                    x_hat = original(inputs, *args, **kwargs)
                z = x_hat
                if gamma is not None:
                    z = z * self._broadcast(gamma, z)
                if beta is not None:
                    z = z + self._broadcast(beta, z)
                records.append(Record(x_hat, z))
                return z
        return call

    # ------------------------------------------------------------------ per-example gradients
    def per_example(self, dzs) -> dict[str, tf.Tensor]:
        """``{attribute: [B, *shape]}``: each example's gradient of each variable, summed over
        the layer's calls. ``dzs``: the gradient of each record's ``z``."""
        out: dict[str, tf.Tensor] = {}
        for record, dz in zip(self.records, dzs):
            for attribute, value in self._one_call(record, dz).items():
                out[attribute] = value if attribute not in out else out[attribute] + value
        return out

    def _one_call(self, record, dz) -> dict[str, tf.Tensor]:
        names = {attribute for attribute, _ in self.variables}
        out = {}
        if self.kind == "dense":
            n_in, n_out = self.layer.kernel.shape
            x = tf.reshape(tf.cast(record.x, dz.dtype), [tf.shape(dz)[0], -1, n_in])
            d = tf.reshape(dz, [tf.shape(dz)[0], -1, n_out])
            if "kernel" in names:
                out["kernel"] = tf.linalg.matmul(x, d, transpose_a=True)
            if "bias" in names:
                out["bias"] = tf.reduce_sum(d, axis=1)
        elif self.kind == "conv":
            shape = self.layer.kernel.shape  # [*window, c_in, c_out]
            patches = unfold(self.layer, tf.cast(record.x, dz.dtype))
            d = tf.reshape(dz, [tf.shape(dz)[0], -1, shape[-1]])
            if "kernel" in names:
                product = tf.linalg.matmul(tf.reshape(patches, [tf.shape(dz)[0], -1, int(np.prod(shape[:-1]))]), d,
                                           transpose_a=True)
                out["kernel"] = tf.reshape(product, [-1, *shape])
            if "bias" in names:
                out["bias"] = tf.reduce_sum(d, axis=1)
        elif self.kind == "affine":
            # Sum over every axis but the batch and the normalisation's own axes.
            axes = [a for a in range(1, dz.shape.rank) if a not in self._axes(dz.shape.rank)]
            for attribute, value in (("gamma", dz * record.x), ("beta", dz)):
                if attribute in names:
                    summed = tf.reduce_sum(value, axis=axes) if axes else value
                    out[attribute] = tf.reshape(summed, [-1, *getattr(self.layer, attribute).shape])
        else:
            raise ValueError(f"no per-example gradient for {self.kind}")
        return out

    def _axes(self, rank: int) -> list[int]:
        """The normalisation's axes (those its scale and shift span), in increasing order; a
        ValueError when given in another order (the variables' layout then differs)."""
        axis = self.layer.axis
        axes = [a % rank for a in (axis if isinstance(axis, (list, tuple)) else [axis])]
        if axes != sorted(set(axes)):
            raise ValueError(f"{self.layer.name}: axes {axis} are not in increasing order")
        return axes

    def _broadcast(self, variable, z):
        """A scale or shift shaped to multiply ``z``: its axes in place, ones elsewhere."""
        axes = self._axes(z.shape.rank)
        shape = [z.shape[a] if a in axes else 1 for a in range(z.shape.rank)]
        return tf.reshape(tf.cast(variable.value, z.dtype), shape)

    def shapes_fit(self) -> bool:
        """Whether the recorded calls have the shapes the rule assumes (read while tracing):
        the scale and shift of a normalisation have the sizes of its axes."""
        if self.kind != "affine":
            return True
        for attribute in ("gamma", "beta"):
            variable = getattr(self.layer, attribute, None)
            for record in self.records:
                rank = record.z.shape.rank
                if variable is not None and (rank is None or [record.z.shape[a] for a in self._axes(rank)]
                                             != list(variable.shape)):
                    return False
        return True

    # ------------------------------------------------------------------ sums
    def summed(self, dzs) -> dict[str, tf.Tensor]:
        """``{attribute: sum_i dW_i}``: the batch gradient by this rule (the check)."""
        if self.kind == "embedding":
            return {"embeddings": self._embedding_rows(dzs, by_example=False)[2]}
        return {a: tf.reduce_sum(g, axis=0) for a, g in self.per_example(dzs).items()}

    def squares(self, dzs, w, moments: bool, uniform: bool = False) -> dict[str, tuple]:
        """``{attribute: (sum_i w_i dW_i**2, sum_i w_i**2 dW_i**2, sum_i w_i**2 dW_i**4)}``
        (only the first, three times, unless ``moments``). ``w``: [B] row weights; ``uniform``:
        they are all equal, so the second sum is the first times ``w_0`` (one product less)."""
        if self.kind == "embedding":
            example, ids, rows = self._embedding_rows(dzs, by_example=True)
            vocabulary = self.layer.embeddings.shape[0]
            return {"embeddings": _moments(rows, tf.gather(w, example), moments,
                                           lambda v: tf.math.unsorted_segment_sum(v, ids, vocabulary), uniform)}
        if self.kind == "dense" and not self.materialises:
            (record,), (dz,) = self.records, dzs
            x2, d2 = tf.square(tf.cast(record.x, dz.dtype)), tf.square(dz)
            out = {}
            for attribute, _ in self.variables:
                left = x2 if attribute == "kernel" else None
                out[attribute] = _outer_moments(left, d2, w, moments, uniform)
            return out
        return {a: _moments(g, w, moments, lambda v: tf.reduce_sum(v, axis=0), uniform)
                for a, g in self.per_example(dzs).items()}

    def squares_of_summed(self, weighted) -> dict[str, tf.Tensor]:
        """A Dense on [B, n_in] inputs, one call: ``{attribute: sum_i x_i**2 (outer) D_i}`` from
        ``D = sum_m W_m * dz_m**2`` [B, n_out], the squares of every cotangent column at once."""
        (record,) = self.records
        x2 = tf.square(tf.cast(record.x, weighted.dtype))
        ones = tf.ones(tf.shape(weighted)[:1], weighted.dtype)
        return {attribute: _outer_moments(x2 if attribute == "kernel" else None, weighted, ones, False)[0]
                for attribute, _ in self.variables}

    def _embedding_rows(self, dzs, by_example: bool):
        """(example, id, row) of the gradient rows of the embedding matrix, summed per
        (example, id) pair when ``by_example``; else (None, None, the batch gradient [V, d])."""
        vocabulary, width = self.layer.embeddings.shape
        ids, grads, examples = [], [], []
        for record, dz in zip(self.records, dzs):
            flat_ids = tf.reshape(tf.cast(record.x, tf.int64), [-1])
            positions = tf.size(flat_ids) // tf.maximum(tf.shape(dz)[0], 1)
            ids.append(flat_ids)
            grads.append(tf.reshape(dz, [-1, width]))
            examples.append(tf.repeat(tf.range(tf.shape(dz)[0], dtype=tf.int64), positions))
        ids, grads, examples = tf.concat(ids, 0), tf.concat(grads, 0), tf.concat(examples, 0)
        if not by_example:
            return None, None, tf.math.unsorted_segment_sum(grads, ids, vocabulary)
        keys, index = tf.unique(examples * vocabulary + ids)
        rows = tf.math.unsorted_segment_sum(grads, index, tf.size(keys))
        return keys // vocabulary, keys % vocabulary, rows


def _moments(per_row, w, moments, total, uniform=False):
    """(sum w q, sum w^2 q, sum w^2 q^2) with q = per_row**2, reduced by ``total``; with
    ``uniform`` (all w equal) the second is the first times w_0."""
    shape = [-1] + [1] * (per_row.shape.rank - 1)
    q = tf.square(per_row)
    first = total(q * tf.reshape(w, shape))
    if not moments:
        return first, first, first
    w2 = tf.reshape(w * w, shape)
    second = first * _first(w) if uniform else total(q * w2)
    return first, second, total(q * q * w2)


def _outer_moments(x2, d2, w, moments, uniform=False):
    """The moments of q = x_i^2 (outer) d_i^2 (or d_i^2 alone when ``x2`` is None) without
    forming the per-example outer products; with ``uniform`` (all w equal) the second is the
    first times w_0, one matrix product less."""
    def total(weights, power):
        right = tf.pow(d2, power) if power != 1 else d2
        if x2 is None:
            return tf.linalg.matvec(right, weights, transpose_a=True)
        left = tf.pow(x2, power) if power != 1 else x2
        return tf.linalg.matmul(left * weights[:, None], right, transpose_a=True)

    first = total(w, 1)
    if not moments:
        return first, first, first
    second = first * _first(w) if uniform else total(w * w, 1)
    return first, second, total(w * w, 2)


def _first(w):
    """w_0 (0 for an empty batch)."""
    return tf.reduce_sum(w[:1])


def unfold(layer, x):
    """The input patches of a channels-last Conv1D/Conv2D: ``[B, *out_positions, window * c_in]``."""
    kernel = list(layer.kernel.shape[:-2])
    strides, dilation = list(layer.strides), list(layer.dilation_rate)
    if len(kernel) == 1:  # a Conv1D is a Conv2D of height 1
        x, kernel, strides, dilation = x[:, None], [1] + kernel, [1] + strides, [1] + dilation
    return tf.image.extract_patches(x, sizes=[1, *kernel, 1], strides=[1, *strides, 1],
                                    rates=[1, *dilation, 1], padding=layer.padding.upper())


# ---------------------------------------------------------------------- discovery
def _kind(layer) -> str | None:
    """The rule a layer takes, or None: exact classes only (a subclass may change ``call``)."""
    if "call" in vars(layer) or getattr(layer, "lora_enabled", False) \
            or getattr(layer, "quantization_mode", None) is not None:
        return None
    cls = type(layer)
    if cls is keras.layers.Dense:
        return "dense"
    if cls in _CONVOLUTIONS and layer.data_format == "channels_last" and getattr(layer, "groups", 1) == 1 \
            and layer.padding in ("valid", "same"):
        return "conv"
    if cls is keras.layers.Embedding:
        return "embedding"
    if cls in _AFFINE:
        return "affine"
    return None


_ATTRIBUTES = {"dense": ("kernel", "bias"), "conv": ("kernel", "bias"), "embedding": ("embeddings",),
               "affine": ("gamma", "beta")}


def find_rules(model, names: list[str]) -> list[Rule]:
    """The layers of ``model`` (nested ones included) with a rule for at least one of the
    selected variables ``names`` (Keras variable paths, in the engine's order)."""
    position = {name: k for k, name in enumerate(names)}
    rules = []
    for layer in model._flatten_layers(include_self=False, recursive=True):  # Keras has no public walk
        kind = _kind(layer)
        if kind is None:
            continue
        chosen = []
        for attribute in _ATTRIBUTES[kind]:
            variable = getattr(layer, attribute, None)
            if variable is not None and getattr(variable, "trainable", False) and variable.path in position:
                chosen.append((attribute, position[variable.path]))
        if chosen:
            rules.append(Rule(kind, layer, chosen))
    return rules


def reads_elsewhere(rules: list[Rule], graph, ops, handles: dict) -> set[int]:
    """``id`` of each rule one of whose variables feeds an op of ``ops`` (those of a traced,
    tapped forward pass) created outside the rule's own calls: a weight tied to another layer,
    read by a custom layer, or passed into a loop. Data-independent, unlike the gradient check
    (a second use whose gradient is zero on the first rows). ``handles``: the engine's variable
    position -> its ``tf.Variable.handle``. A variable whose captured handle cannot be found
    counts as read elsewhere."""
    internal = {id(external): placeholder.name for external, placeholder in graph.captures}
    bad = set()
    for rule in rules:
        names = {internal.get(id(handles[k])) for k in rule.positions}
        if None in names or any(op.name not in rule.inside and any(t.name in names for t in op.inputs)
                                for op in ops):
            bad.add(id(rule))
    return bad


class Taps:
    """While open, every rule's layer records its calls (``Rule.records``); the layers are
    restored on exit, whatever happened."""

    def __init__(self, rules: list[Rule]):
        self.rules = rules

    def __enter__(self):
        for rule in self.rules:
            rule.records.clear()
            rule.inside.clear()
            # An instance attribute shadows the class's ``call``; Keras' ``Layer.__call__``
            # looks ``self.call`` up on each call.
            object.__setattr__(rule.layer, "call", rule.wrapped(type(rule.layer).call.__get__(rule.layer)))
        return self

    def __exit__(self, *exc):
        for rule in self.rules:
            if "call" in vars(rule.layer):
                object.__delattr__(rule.layer, "call")
        return False

    def outputs(self) -> list[tf.Tensor]:
        return [record.z for rule in self.rules for record in rule.records]

    def split(self, grads) -> list[list]:
        """The flat list of gradients of ``outputs()`` split per rule."""
        out, start = [], 0
        for rule in self.rules:
            out.append(list(grads[start:start + len(rule.records)]))
            start += len(rule.records)
        return out
