"""Per-example rows: for each example i of a batch, the numbers of contract section 7 (its loss,
the norm of its gradient ``g_i``, a projection ``Phi g_i``, its self-influence and its scores
against preconditioned query gradients), computed without summing over examples.

A factored layer (``layout.LayerBlock``: Dense, EinsumDense, Conv1D/2D whose kernel is selected)
takes the layer route: one tapped forward pass and one backward pass of ``sum_i l_i`` give each
example's inputs ``x_ip`` ``[B, R, d_A]`` and output gradients ``s_ip`` ``[B, R, d_S]`` (examples
are independent in inference mode), and its per-example gradient is ``G_i = sum_p x_ip s_ip^T``,
used without being formed where one position per example allows it:

    |G_i|^2            = |x_i|^2 |s_i|^2                         (R = 1; else sum of G_i**2)
    <G_i, V_q>         = x_i^T V_q s_i                           (R = 1; else <G_i, V_q>)
    Phi_in^T G_i Phi_out = sum_p (Phi_in^T x_ip)(Phi_out^T s_ip)^T   (LoGra; always)
    g^T (C + lambda)^-1 g = sum (Q_A^T x_i)**2 M (Q_S^T s_i)**2  (K-FAC/EK-FAC eigenbasis, R = 1)

Every other selected variable (the ``rest``) takes per-example gradients of the whole model,
``tape.jacobian`` of ``[l_1..l_B]`` (vectorised, or a loop where the plan found the vectorised
per-example route wrong: ``routes``). Cost per batch: a gradient, plus ``B x P_rest`` for the rest,
plus per layer ``B R (d_A + d_S) k`` for the projection and ``B Q d_A d_S`` for Q scores.
Rows are taken in chunks that keep ``rows x (P_rest, or d_A d_S of a layer with several
positions)`` under ``vjp_budget``.

Sources: Koh and Liang (2017); Grosse et al. (2023), "Studying large language model
generalization with influence functions" (EK-FAC influence, per-layer query gradients); Choe et
al. (2024), "What is your data worth to GPT?" (LoGra's Kronecker projection); Park et al. (2023),
TRAK (projected gradients).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from pipeline.curvature import layer_rules
from pipeline.curvature.core import Core
from pipeline.curvature.kronecker_factors import KroneckerFactors
from pipeline.curvature.requests import RowsRequest
from pipeline.curvature.tensors import as_dtype, dense
from pipeline.errors import InputError
from pipeline.influence import projection
from pipeline.influence.layout import REST, Layout


class ExampleRows:
    """The rows family: ``rows(inputs, labels, request)`` -> per-example arrays by column."""

    def __init__(self, core: Core, kronecker: KroneckerFactors):
        self.core = core
        self.kronecker = kronecker
        self._layouts: dict = {}
        self._phi: dict = {}
        self._positions = None
        self._converted = None  # (request, its arrays as tensors): ``_tensors``

    # ------------------------------------------------------------------ the blocks
    def layout(self, structured: bool) -> tuple[Layout, list]:
        """``(Layout, [(FactorLayer, keras layer)] of its layer blocks, in order)``."""
        if structured not in self._layouts:
            try:
                found = self.kronecker.layers() if structured else []
            except InputError:  # none, or none it can factor (grouped, int8, LoRA): all are the rest's
                found = []
            facts = [(info.path, info.inputs, info.outputs, 1, info.bias) for info, _ in found]
            lay = Layout.of(self.core.names, self.core.shapes, facts, structured)
            chosen = {block.path for block in lay.layers}
            self._layouts[structured] = (lay, [(info, layer) for info, layer in found if info.path in chosen])
        return self._layouts[structured]

    def projection_matrices(self, request: RowsRequest) -> dict[str, np.ndarray]:
        """``Phi`` (``projection.matrices``), drawn once per worker and request."""
        key = (request.structured, request.projection, request.seed)
        if key not in self._phi:
            self._phi = {key: projection.matrices(self.layout(request.structured)[0], request.projection,
                                                  request.seed)}
        return self._phi[key]

    # ------------------------------------------------------------------ per batch
    def rows(self, inputs, labels, request: RowsRequest, cast=None) -> dict[str, np.ndarray]:
        """Per-example arrays of the batch (``inputs``/``labels`` as the engine takes them,
        ``cast`` their tensors ``(x, y)`` when the caller has them): ``loss`` [B],
        ``gradient_norm`` [B], and as asked ``projection`` [B, k], ``self_influence`` [B],
        ``scores`` [B, Q], ``gradients`` [B, P]; float64."""
        lay, found = self.layout(request.structured and not request.gradients)
        tensors = self._tensors(request, lay)
        x, y = cast if cast is not None else self.core.cast_batch(inputs, labels, None)[:2]
        in_specs, label_specs, _ = self.core.specs(inputs, labels)
        param_specs = {name: tf.TensorSpec(value.shape, self.core.dtype) for name, value in tensors.items()}
        loop = self.core.routes.per_example == "loop"
        key = ("rows", request, loop, tuple(sorted((n, tuple(v.shape)) for n, v in tensors.items())))
        fn = self.core.compiled(key, lambda a, b, p: self._rows(a, b, p, request, lay, found, loop),
                                (in_specs, label_specs, param_specs))
        n = len(np.asarray(inputs[0]))
        chunk = self._chunk(lay, found, n, inputs, request)
        out: dict[str, list] = {}
        for start in range(0, n, chunk):
            pick = slice(start, start + chunk)
            if chunk < n:  # the pass's own tensors when one call takes the batch: no second copy
                x, y, _ = self.core.cast_batch([np.asarray(a)[pick] for a in inputs],
                                               [np.asarray(a)[pick] for a in labels], None)
            got = fn(x, y, tensors)
            for name, value in got.items():  # the projection stays in the compute dtype: it is stored in 32 or 16 bits
                out.setdefault(name, []).append(value.numpy() if name == "projection" else
                                                value.numpy().astype(np.float64))
        result = {name: np.concatenate(parts, axis=0) for name, parts in out.items()}
        result["gradient_norm"] = np.sqrt(np.maximum(result.pop("squared_norm"), 0.0))
        return result

    def _params(self, request: RowsRequest, lay: Layout) -> dict[str, np.ndarray]:
        """The arrays the traced function takes: the projection, the preconditioner's parts
        and the query vectors split by block."""
        params = {}
        if request.projection:
            params.update({f"phi/{name}": value for name, value in self.projection_matrices(request).items()})
        if request.self_influence:
            params.update({f"pre/{name}": value for name, value in request.arrays.items()})
        if request.vectors is not None and len(request.vectors):
            vectors = np.asarray(request.vectors, np.float64)
            for layer in lay.layers:  # as [d_A, Q, d_S]: x_i times V is then one matrix product
                params[f"v/{layer.path}"] = np.ascontiguousarray(lay.matrix(vectors, layer).transpose(1, 0, 2))
            if lay.rest_size:
                params[f"v/{REST}"] = lay.rest_of(vectors)
        return params

    def _tensors(self, request: RowsRequest, lay: Layout) -> dict:
        """``_params`` as tensors of the compute dtype, laid out and converted once per request
        (a shard's batches share it; doing it per batch cost as much as a gradient)."""
        if self._converted is None or self._converted[0] is not request:
            self._converted = (request, {name: as_dtype(value, self.core.dtype)
                                         for name, value in self._params(request, lay).items()})
        return self._converted[1]

    def _chunk(self, lay: Layout, found, n: int, inputs, request: RowsRequest) -> int:
        """Rows per call: ``rows x held`` under ``vjp_budget``, ``held`` the larger of the rest's
        size and a multi-position layer's ``d_A d_S`` (its ``G_i`` is formed)."""
        held = lay.rest_size if not request.gradients else lay.parameters
        if found and self._positions is None:
            self._positions = self.kronecker.positions([np.asarray(a)[:1] for a in inputs])
        for layer, (info, _) in zip(lay.layers, found):
            if self._positions.get(info.path, 1) > 1:
                held = max(held, layer.size)
        return max(1, min(n, self.core.vjp_budget // max(1, held)))

    # ------------------------------------------------------------------ traced
    def _rows(self, inputs, labels, params, request: RowsRequest, lay: Layout, found, loop: bool):
        core, dtype = self.core, self.core.dtype
        rules = [layer_rules.Rule("einsum" if info.kind == "einsum" else info.kind, layer, []) for info, layer in found]
        with layer_rules.Taps(rules) as taps:
            with tf.GradientTape(persistent=True) as tape:
                outputs, masks = core.adapter.forward(list(inputs))
                losses = tf.cast(core.adapter.per_example_loss(list(labels), outputs, masks), dtype)
                total = tf.reduce_sum(losses)
        batch = tf.shape(losses)[0]
        squared = tf.zeros([batch], dtype)
        self_influence = tf.zeros([batch], dtype)
        scores = None
        projected = []
        if rules:
            grads = tape.gradient(total, taps.outputs(), unconnected_gradients=tf.UnconnectedGradients.ZERO)
            for layer, (info, keras_layer), rule, dzs in zip(lay.layers, found, rules, taps.split(grads)):
                x = tf.concat([self.kronecker.rows_of(info, keras_layer, r.x) for r in rule.records], axis=1)
                if layer.bias is not None:
                    x = tf.concat([x, tf.ones(tf.concat([tf.shape(x)[:2], [1]], 0), dtype)], axis=2)
                s = tf.concat([self.kronecker.outputs_of(info, keras_layer, tf.cast(d, dtype)) for d in dzs], axis=1)
                one = self.kronecker.one_position(info, rule)
                formed = None if one else tf.einsum("bra,brc->bac", x, s)  # G_i, [B, d_A, d_S]
                if one:
                    squared += tf.reduce_sum(tf.square(x[:, 0]), 1) * tf.reduce_sum(tf.square(s[:, 0]), 1)
                else:
                    squared += tf.reduce_sum(tf.square(formed), [1, 2])
                name = layer.path
                if f"v/{name}" in params:
                    v = params[f"v/{name}"]  # [d_A, Q, d_S]
                    if one:  # x_i^T V_q s_i: one product with V as [d_A, Q d_S], then a dot with s_i
                        xv = tf.reshape(x[:, 0] @ tf.reshape(v, [layer.d_a, -1]), [batch, -1, layer.d_s])
                        part = tf.reduce_sum(xv * s[:, 0, None, :], axis=2)
                    else:
                        part = tf.einsum("bac,aqc->bq", formed, v)
                    scores = part if scores is None else scores + part
                if f"phi/{name}/in" in params:
                    left = tf.einsum("bra,ak->brk", x, params[f"phi/{name}/in"])
                    right = tf.einsum("brc,cl->brl", s, params[f"phi/{name}/out"])
                    projected.append(tf.reshape(tf.einsum("brk,brl->bkl", left, right), [batch, -1]))
                if f"pre/{name}/M" in params:
                    q_a, q_s, inverse = (params[f"pre/{name}/{part}"] for part in ("QA", "QS", "M"))
                    if one:
                        self_influence += tf.einsum("ba,ac,bc->b", tf.square(x[:, 0] @ q_a), inverse,
                                                    tf.square(s[:, 0] @ q_s))
                    else:
                        rotated = tf.einsum("xa,bxy,yc->bac", q_a, formed, q_s)  # Q_A^T G_i Q_S
                        self_influence += tf.reduce_sum(tf.square(rotated) * inverse, [1, 2])
        out = {"loss": losses}
        if lay.rest or request.gradients:
            variables = [core.variables[k] for k in (range(len(core.variables)) if request.gradients else lay.rest)]
            jacobians = tape.jacobian(losses, variables, experimental_use_pfor=not loop,
                                      unconnected_gradients=tf.UnconnectedGradients.ZERO)
            g = tf.concat([tf.reshape(tf.cast(j, dtype), [batch, -1]) for j in dense(jacobians)], axis=1)
            squared += tf.reduce_sum(tf.square(g), 1)
            if request.gradients:
                out["gradients"] = g
            elif lay.rest_size:
                if f"v/{REST}" in params:
                    part = tf.linalg.matmul(g, params[f"v/{REST}"], transpose_b=True)
                    scores = part if scores is None else scores + part
                if f"phi/{REST}" in params:
                    projected.append(g @ params[f"phi/{REST}"])
                if f"pre/{REST}/diagonal" in params:
                    self_influence += tf.reduce_sum(tf.square(g) * params[f"pre/{REST}/diagonal"], 1)
                elif f"pre/{REST}/dense" in params:
                    self_influence += tf.reduce_sum((g @ params[f"pre/{REST}/dense"]) * g, 1)
        del tape
        out["squared_norm"] = squared
        if projected:
            out["projection"] = tf.concat(projected, axis=1)
        if request.self_influence:
            # identity (C = 0, lambda = 1): the squared norm itself
            out["self_influence"] = self_influence if request.arrays else squared
        if scores is not None:
            out["scores"] = scores
        return out
