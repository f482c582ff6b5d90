"""Kronecker factors and layer-input moments: per layer, the input second moment ``A`` that
GPTQ/SparseGPT call "the Hessian", K-FAC's output-gradient factor ``S``, and EK-FAC's
eigenvalues in the factors' eigenbasis.

For a layer ``z = W^T x (+ b)`` applied at positions p of each example (a Dense on a sequence,
a convolution's output pixels, with ``x_ip`` the unfolded patch), the per-example gradient of
its weights is ``G_i = sum_p x_ip g_ip^T`` (``g_ip = dl_i/dz_ip``), and K-FAC approximates the
layer's GGN/Fisher block ``sum_i s_i vec(G_i) vec(G_i)^T`` by ``A (x) S / R`` (R positions per
example; contract 6.1) with (expand)

    A = sum_i s_i sum_p x_ip x_ip^T,      S = sum_i s_i sum_p g_ip g_ip^T

(the driver divides both by ``sum_i s_i``), or (reduce) the same with ``x_i = mean_p x_ip`` and
``g_i = sum_p g_ip`` (then the block is ``A (x) S``). With the bias as an appended 1 in ``x``, the
parameters ``[W; b]`` of a ``[d_in + 1, d_out]`` matrix in C order are the engine's flat order
(kernel then bias), so the block is ``kron(A, S) / R`` (expand). EK-FAC keeps the eigenbases
``Q_A, Q_S`` and replaces the Kronecker eigenvalues by ``sum_i s_i (Q_A^T G_i Q_S)**2``. Every sum is float64 on the host; the factor
of one layer is ``d x d`` with d its input (or output) width.

Cost per batch: one forward pass with the layers tapped (``layer_inputs`` alone: about a third
of a gradient), plus one backward pass to the layer outputs per cotangent column for ``S`` (1 for
the empirical and Monte Carlo Fisher, C for the exact one), plus ``B x d_in x d_out`` per-example
gradients per chunk of rows for EK-FAC.

Supported: Keras' own ``Dense``, ``EinsumDense`` (an equation ``batch positions contracted,
contracted features -> batch positions features``), ``Conv1D``/``Conv2D`` (channels last, one
group, valid or same padding); other layers owning a selected variable are not factored, and an
int8/int4-quantized or LoRA layer among the selected ones is refused (``_refuse_unfactorable``).
Sequence masks are not applied to ``A``: a padded step's input counts, as in Keras' GPTQ.

Sources: Martens and Grosse (2015), "Optimizing neural networks with Kronecker-factored
approximate curvature"; Grosse and Martens (2016), "A Kronecker-factored approximate Fisher
matrix for convolution layers"; Eschenhagen et al. (2023), "Kronecker-factored approximate
curvature for modern neural network architectures" (expand and reduce); George et al. (2018),
"Fast approximate natural gradient descent in a Kronecker-factored eigenbasis" (EK-FAC); Frantar
et al. (2023), "GPTQ" (``H = 2 X^T X``, Keras' ``keras/src/quantizers/gptq.py``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from pipeline.curvature import layer_rules
from pipeline.curvature.core import Core
from pipeline.curvature.passes import Pass
from pipeline.curvature.requests import KroneckerRequest
from pipeline.curvature.tensors import as_dtype, batch_tensor, flat_outputs
from pipeline.errors import InputError
from pipeline.partial import Partial

_KINDS = {keras.layers.Dense: "dense", keras.layers.EinsumDense: "einsum", keras.layers.Conv1D: "conv",
          keras.layers.Conv2D: "conv"}


@dataclass(frozen=True)
class FactorLayer:
    """A layer with Kronecker factors: ``path`` (its variables' path without the last part, as
    ``blocks: layer`` names it), ``kind`` ("dense" | "einsum" | "conv"), the widths ``inputs``
    (d_in: a convolution's window x input channels) and ``outputs`` (d_out), and whether its
    bias, of d_out entries, is among the selected variables (``bias``)."""

    path: str
    kind: str
    inputs: int
    outputs: int
    bias: bool


def factor_layers(model, names: list[str]) -> list[tuple[FactorLayer, object]]:
    """``(FactorLayer, keras layer)`` of each supported layer of ``model`` (nested ones too)
    owning one of the selected variables ``names``, in model order. Raises ``InputError`` for a
    supported class this family cannot factor (a grouped or channels-first convolution, an
    EinsumDense equation of another form), naming it and the way out."""
    selected = set(names)
    found = []
    for layer in model._flatten_layers(include_self=False, recursive=True):  # Keras has no public walk
        kind = _KINDS.get(type(layer))
        if kind is None or not any(v.path in selected for v in layer.trainable_variables):
            continue  # (a LoRA layer's ``kernel`` is a computed tensor: read it only where selected)
        _refuse_unfactorable(layer)
        kernel = getattr(layer, "kernel", None)
        bias = getattr(layer, "bias", None)
        owned = [v for v in (kernel, bias) if v is not None and v.path in selected]
        if kind is None or kernel is None or not owned:
            continue
        path = kernel.path.rsplit("/", 1)[0]
        shape = [int(d) for d in kernel.shape]
        if kind == "conv":
            why = None
            if layer.data_format != "channels_last":
                why = "is channels_first"
            elif getattr(layer, "groups", 1) != 1:
                why = f"has groups={layer.groups}"
            elif layer.padding not in ("valid", "same"):
                why = f"has padding {layer.padding!r}"
            if why:
                raise InputError(f"layer {path!r} ({type(layer).__name__}) {why}: its Kronecker factors are not "
                                 "supported; leave its variables out with variables: [...] (channels-last, "
                                 "ungrouped, valid or same padding are)")
            inputs, outputs = int(np.prod(shape[:-1])), shape[-1]
        elif kind == "einsum":
            inputs, outputs = _einsum_layout(layer, path)[1::2]
        else:
            inputs, outputs = shape
        # The bias as an appended 1 when it is among the selected variables (its gradient is then
        # the last row of the layer's [d_in + 1, d_out] weight gradient).
        has_bias = bias is not None and bias.path in selected and int(np.prod(bias.shape)) == outputs
        found.append((FactorLayer(path, kind, inputs, outputs, has_bias), layer))
    return found


def _refuse_unfactorable(layer) -> None:
    """An ``InputError`` for a layer whose Kronecker factors would describe no selected weight:
    an int8/int4-quantized one (Keras runs its ``quantized_call``, which the tap does not see,
    and its kernel is integer and not trainable) or one with LoRA (its kernel is computed from
    the frozen kernel and the trainable ``lora_kernel_a``/``lora_kernel_b``)."""
    mode = getattr(layer, "quantization_mode", None)
    if mode:
        why = (f"is {mode}-quantized: Keras runs its quantized_call, and its {mode} kernel is not trainable, so no "
               "Kronecker factor describes its weights")
    elif getattr(layer, "lora_enabled", False):
        why = ("has LoRA enabled: its kernel is computed from lora_kernel_a and lora_kernel_b, which A (x) S does "
               "not describe")
    else:
        return
    raise InputError(f"layer {layer.name!r} {why}: leave its variables out with variables: [...], or ask for "
                     "its GGN or Fisher diagonal, which cover it")


def _einsum_layout(layer, path: str) -> tuple[list[int], int, list[int], int]:
    """For an EinsumDense: the permutation of its input to ``[batch, positions, contracted]``,
    d_in, the permutation of its output to ``[batch, positions, features]``, d_out. Its kernel
    must be ``contracted + features`` (so that its C order is ``[d_in, d_out]``)."""
    equation = layer.equation.replace(" ", "")
    try:
        left, out = equation.split("->")
        source, kernel = left.split(",")
    except ValueError:
        source = kernel = out = ""
    contracted = [c for c in kernel if c in source and c not in out]
    features = [c for c in kernel if c not in contracted]
    positions = [c for c in source[1:] if c not in contracted]
    fits = ("." not in equation and source and out and source[0] == out[0] and source[0] not in kernel
            and list(kernel) == contracted + features and all(c in out for c in features)
            and sorted(out[1:]) == sorted(positions + features) and all(c in out for c in positions))
    if not fits:
        raise InputError(f"layer {path!r} (EinsumDense {layer.equation!r}): its Kronecker factors need an equation "
                         "'batch positions contracted, contracted features -> batch positions features' (as "
                         "'abc,cd->abd' or 'abc,cde->abde'); leave its variables out with variables: [...]")
    shape = [int(d) for d in layer.kernel.shape]
    d_in = int(np.prod(shape[:len(contracted)]))
    d_out = int(np.prod(shape[len(contracted):]))
    into = [source.index(c) for c in [source[0]] + positions + contracted]
    onto = [out.index(c) for c in [out[0]] + positions + features]
    return into, d_in, onto, d_out


class KroneckerFactors:
    """The Kronecker family: answers ``BatchWork.kronecker``. The engine hands it, per request
    with an ``S``, the cotangent columns of its ``fisher_type`` (``U [B, M, C]``, row weights
    ``W [B, M]``): ``S = sum_{i,m} W_im sum_p g_ipm g_ipm^T`` with ``g_ipm`` the backward pass
    of ``U[i, m]`` to the layer's output."""

    def __init__(self, core: Core):
        self.core = core
        self._layers = None
        self._positions = None  # per layer, found on the first EK-FAC batch (``_chunk``)
        self._bases = None  # (the last eigenbases, their digest) (``_digest``)

    def layers(self) -> list[tuple[FactorLayer, object]]:
        """The factored layers (``factor_layers``), found once; ``InputError`` when there are
        none among the selected variables."""
        if self._layers is None:
            found = factor_layers(self.core.model, self.core.names)
            if not found:
                raise InputError("layer_inputs and kfac need a Dense, EinsumDense, Conv1D or Conv2D layer among the "
                                 "selected variables, and the model has none: select one with variables: [...], or "
                                 "ask for diagonal quantities instead")
            self._layers = found
        return self._layers

    def positions(self, inputs) -> dict[str, int]:
        """Positions per example of each factored layer (a tapped forward pass of ``inputs``)."""
        rules = self._taps()
        with layer_rules.Taps(rules):
            self.core.adapter.forward([batch_tensor(a, self.core.dtype) for a in inputs])
            return {info.path: sum(int(self.rows_of(info, rule.layer, r.x).shape[1]) for r in rule.records)
                    for (info, _), rule in zip(self.layers(), rules)}

    def answer(self, part: Partial, batch: Pass, request: KroneckerRequest, columns=()) -> None:
        """Adds the sums of ``request`` over ``batch`` to ``part``: ``A`` of every layer (not
        for ``kfac_eigen``), and per entry ``(U, W)`` of ``columns`` its ``S`` (``kfac``) or its
        squared projected gradients (``kfac_eigen``); the divisor ``sum_i s_i`` and positions."""
        dtype = self.core.dtype
        in_specs = self.core.specs(batch.inputs, [])[0]
        bases = self._digest(request.bases)
        first = True
        for cotangents, row_weights in (columns or [(None, None)]):
            width = 0 if cotangents is None else int(cotangents.shape[1])
            with_inputs = first and request.kind != "kfac_eigen"
            key = ("kronecker", request, bases, width, with_inputs)
            fn = self.core.compiled(key, lambda a, s, u, w: self._sums(a, s, u, w, request, with_inputs),
                                    (in_specs, tf.TensorSpec([None], dtype), tf.TensorSpec([None, width, None], dtype),
                                     tf.TensorSpec([None, width], dtype)))
            n = batch.size
            chunk = self._chunk(request, n, batch.inputs)
            for start in range(0, n, chunk):
                pick = slice(start, start + chunk)
                rows = min(chunk, n - start)
                u = np.zeros((rows, 0, 0)) if cotangents is None else cotangents[pick]
                w = np.zeros((rows, 0)) if row_weights is None else row_weights[pick]
                whole = chunk >= n  # the pass's own tensors: no second copy of the batch
                out = fn(batch.x if whole else [batch_tensor(np.asarray(a)[pick], dtype) for a in batch.inputs],
                         batch.s if whole else as_dtype(batch.weight_values[pick], dtype), as_dtype(u, dtype),
                         as_dtype(w, dtype))
                for name, value in out.items():
                    value = value.numpy().astype(np.float64)
                    part.sums[name] = value if name not in part.sums else part.sums[name] + value
            first = False
        if request.kind != "kfac_eigen":
            total = part.sums.get(request.weight_key, 0.0) + float(np.sum(batch.weight_values))
            part.sums[request.weight_key] = np.asarray(total, dtype=np.float64)

    def _digest(self, bases: dict) -> str:
        """A digest of EK-FAC's eigenbases, which are constants of the traced function (a new
        pass's bases, a new trace): computed once per pass's bases, not per batch (they are
        megabytes), and kept with them so that their ``id`` stays theirs."""
        if not bases:
            return ""
        if self._bases is None or self._bases[0] is not bases:
            digest = hashlib.sha256(b"".join(np.ascontiguousarray(q).tobytes() for pair in bases.values()
                                             for q in pair)).hexdigest()
            self._bases = (bases, digest)
        return self._bases[1]

    def _chunk(self, request: KroneckerRequest, n: int, inputs) -> int:
        """Rows per call: EK-FAC forms ``rows x d_A x d_S`` per-example gradients of each layer
        with several positions per example, kept under ``vjp_budget``."""
        if request.kind == "kfac" and request.fisher_type == "mc":
            # Each example's S_i ([rows, d_out, d_out]) for S's standard error.
            held = max(info.outputs ** 2 for info, _ in self.layers())
            return max(1, min(n, self.core.vjp_budget // held))
        if request.kind != "kfac_eigen":
            return max(1, n)
        if self._positions is None:
            self._positions = self.positions(inputs)
        held = max([(info.inputs + 1) * info.outputs for info, _ in self.layers()
                    if self._positions[info.path] > 1], default=0)
        return max(1, min(n, self.core.vjp_budget // held)) if held else max(1, n)

    @staticmethod
    def one_position(info: FactorLayer, rule) -> bool:
        """One call on ``[B, d_in]`` inputs (read while tracing): one position per example."""
        return info.kind != "conv" and len(rule.records) == 1 and rule.records[0].x.shape.rank == 2

    # ------------------------------------------------------------------ traced
    def _taps(self) -> list:
        return [layer_rules.Rule("einsum" if info.kind == "einsum" else info.kind, layer, [])
                for info, layer in self.layers()]

    def _sums(self, inputs, weights, cotangents, row_weights, request: KroneckerRequest, with_inputs: bool):
        """The batch's sums of one request, by name (see ``answer``)."""
        rules = self._taps()
        columns = cotangents.shape[1]
        with layer_rules.Taps(rules) as taps:
            with tf.GradientTape(persistent=columns > 1) as tape:
                outputs, _ = self.core.adapter.forward(list(inputs))
                flat = flat_outputs(outputs, self.core.dtype)
        out = {}
        layers = self.layers()
        append = {info.path: request.bias if request.kind == "layer_inputs" else info.bias for info, _ in layers}
        rows = {}
        for (info, layer), rule in zip(layers, rules):
            xs = [self.rows_of(info, layer, record.x) for record in rule.records]
            x = tf.concat(xs, axis=1)  # [B, R, d_in]: every call's positions
            if append[info.path]:
                x = tf.concat([x, tf.ones(tf.concat([tf.shape(x)[:2], [1]], 0), x.dtype)], axis=2)
            rows[info.path] = x
            if with_inputs:
                left = tf.reduce_mean(x, axis=1, keepdims=True) if request.reduction == "reduce" else x
                out[request.key(info.path, "A")] = tf.einsum("brd,bre->de", left * weights[:, None, None], left)
                out[request.key(info.path, "positions")] = tf.reduce_sum(
                    weights * tf.cast(tf.shape(x)[1], weights.dtype))
        if request.kind == "layer_inputs" or columns == 0:
            del tape
            return out
        tapped = taps.outputs()
        # fisher_type mc: each example's S_i over its draws, for S's standard error (``s_stderr``).
        per_example = {} if request.kind == "kfac" and request.fisher_type == "mc" else None
        for m in range(columns):  # static: one backward pass each
            grads = tape.gradient(flat, tapped, output_gradients=cotangents[:, m, :],
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
            w = row_weights[:, m]
            for (info, layer), rule, dzs in zip(layers, rules, taps.split(grads)):
                g = tf.concat([self.outputs_of(info, layer, tf.cast(d, self.core.dtype)) for d in dzs], axis=1)
                if request.kind == "kfac":
                    right = tf.reduce_sum(g, axis=1, keepdims=True) if request.reduction == "reduce" else g
                    name = request.key(info.path, "S")
                    if per_example is not None:
                        mine = tf.einsum("brk,brl->bkl", right * w[:, None, None], right)  # s_i S_i's draw m
                        per_example[info.path] = mine + per_example.get(info.path, 0.0)
                        continue
                    value = tf.einsum("brk,brl->kl", right * w[:, None, None], right)
                else:
                    q_a, q_s = (tf.constant(q, self.core.dtype) for q in request.bases[info.path])
                    # Q_A^T G_i Q_S = sum_p (Q_A^T x_ip)(Q_S^T g_ip)^T: each side rotated first.
                    x_a = tf.einsum("brd,da->bra", rows[info.path], q_a)
                    g_s = tf.einsum("brk,kc->brc", g, q_s)
                    name = request.key(info.path, "eigen")
                    if self.one_position(info, rule):
                        # One position: the squared outer product is the outer product of the
                        # squares, summed over the batch by one matrix product (no [B, d_A, d_S]).
                        value = tf.linalg.matmul(tf.square(x_a[:, 0]) * w[:, None], tf.square(g_s[:, 0]),
                                                 transpose_a=True)
                    else:
                        projected = tf.einsum("bra,brc->bac", x_a, g_s)  # [B, d_A, d_S] per chunk of rows
                        value = tf.einsum("b,bac->ac", w, tf.square(projected))
                    value = tf.reshape(value, [-1])
                out[name] = value if name not in out else out[name] + value
        for path, terms in (per_example or {}).items():  # terms: s_i S_i per example
            out[request.key(path, "S")] = tf.reduce_sum(terms, axis=0)
            out[request.key(path, "S_w2q2")] = tf.reduce_sum(tf.square(terms), axis=0)
            out[request.key(path, "S_w2q")] = tf.einsum("b,bkl->kl", weights, terms)
            out[request.key(path, "S_w2")] = tf.reduce_sum(tf.square(weights))
        del tape
        return out

    def rows_of(self, info: FactorLayer, layer, x):
        """A call's input as ``[B, R, d_in]``: its positions, each a row (a convolution's patches)."""
        x = tf.cast(x, self.core.dtype)
        if info.kind == "conv":
            x = layer_rules.unfold(layer, x)
        elif info.kind == "einsum":
            x = tf.transpose(x, _einsum_layout(layer, info.path)[0])
        return tf.reshape(x, [tf.shape(x)[0], -1, info.inputs])

    def outputs_of(self, info: FactorLayer, layer, dz):
        """A call's output gradient as ``[B, R, d_out]``."""
        if info.kind == "einsum":
            dz = tf.transpose(dz, _einsum_layout(layer, info.path)[2])
        return tf.reshape(dz, [tf.shape(dz)[0], -1, info.outputs])
