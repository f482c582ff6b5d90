"""The dense GGN ``sum_i s_i J_i^T Lambda_i J_i`` ``[P, P]`` of a small model (influence with
``curvature: ggn``, contract 7.2): per chunk of rows the Jacobians ``J_i`` ``[C, P]`` of the
outputs handed to the loss (the logits behind a softmax, as ``ExampleProducts`` takes them) by
``tape.jacobian``, and ``Lambda_i`` from the pass's output-space derivatives.

Cost per batch: C backward passes per example (vectorised), ``B C P`` floats per chunk (kept
under ``vjp_budget``) and ``B C P^2`` flops; the sum is ``P^2`` float64, which the plan bounds
by ``max_dimension``. Source: Martens (2014); Schraudolph (2002), the Gauss-Newton matrix.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from pipeline.curvature.core import Core
from pipeline.curvature.passes import Pass
from pipeline.curvature.tensors import as_dtype, batch_tensor, dense, flat_outputs
from pipeline.partial import Partial

#: Its key in ``Partial.sums``.
KEY = "ggn_matrix"


def answer(core: Core, examples, part: Partial, batch: Pass) -> None:
    """Adds ``sum_i s_i J_i^T Lambda_i J_i`` of ``batch`` to ``part.sums[KEY]``."""
    examples.check(batch)
    _, _, lam, _ = examples.batch_derivatives(batch, True)
    lam = lam.numpy().astype(np.float64) * batch.weight_values[:, None, None]
    loop = core.routes.per_example == "loop"
    in_specs = core.specs(batch.inputs, [])[0]
    fn = core.compiled(("dense-ggn", loop), lambda a, m: _sum(core, a, m, loop),
                       (in_specs, tf.TensorSpec([None, None, None], core.dtype)))
    columns = max(1, lam.shape[1])
    chunk = max(1, min(batch.size, core.vjp_budget // max(1, columns * core.parameters)))
    total = part.sums.get(KEY)
    for start in range(0, batch.size, chunk):
        pick = slice(start, start + chunk)
        value = fn([batch_tensor(np.asarray(a)[pick], core.dtype) for a in batch.inputs],
                   as_dtype(lam[pick], core.dtype)).numpy().astype(np.float64)
        total = value if total is None else total + value
    part.sums[KEY] = total


def _sum(core: Core, inputs, lam, loop: bool):
    with tf.GradientTape() as tape:
        outputs, _ = core.adapter.forward(list(inputs))
        flat = flat_outputs(outputs, core.dtype)  # [B, C]
    jacobians = tape.jacobian(flat, core.variables, experimental_use_pfor=not loop,
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
    batch, columns = tf.shape(flat)[0], tf.shape(flat)[1]
    j = tf.concat([tf.reshape(tf.cast(g, core.dtype), [batch, columns, -1]) for g in dense(jacobians)], axis=2)
    return tf.einsum("bcp,bcd,bdq->pq", j, lam, j)
