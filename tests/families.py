"""One family of products on its own: a ``Core`` over a small float64 model of ``cases`` and a
``Pass`` over one batch, with the dense float64 reference of ``cases.reference`` (the oracle
the engine's own tests use)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

import cases
from pipeline.curvature.core import Core
from pipeline.curvature.passes import Pass

LOGITS = ("sparse_categorical_crossentropy", {"from_logits": True}, None)


def setup(model_name="mlp", loss=LOGITS, n=7, seed=1, selected=None):
    """(core, batch, reference) for ``model_name`` under ``loss`` (name, options, label kind)."""
    name, options, kind = loss
    model = cases.MODELS[model_name]()
    resolved = cases.resolved(name, **options)
    if kind == "regression":
        inputs, labels, weights = cases.batch_for(model, n=n, seed=seed, regression=True)
    else:
        inputs, labels, weights = cases.batch_for(model, n=n, seed=seed, classes=kind)
    core = Core(model, resolved, tf.float64, selected=selected, hvp_block=2, diagonal_block=8)
    return core, new_pass(core, inputs, labels, weights), cases.reference(model, resolved, inputs, labels, weights)


def new_pass(core, inputs, labels, weights):
    x, y, s = core.cast_batch(inputs, labels, weights)
    return Pass(list(inputs), list(labels), weights, np.arange(len(inputs[0])), x, y, s,
                core.specs(inputs, labels), core.objective)


def ggn_cotangents(batch, lam):
    """The exact GGN's cotangents [B, C, C] and row weights [B, C] from Lambda [B, C, C]:
    ``Lambda_i = sum_c sign_c u_c u_c^T`` (the square root the engine takes, rebuilt here)."""
    values, vectors = np.linalg.eigh(lam)
    cotangents = np.transpose(vectors, (0, 2, 1)) * np.sqrt(np.abs(values))[:, :, None]
    return cotangents, batch.weight_values[:, None] * np.sign(values)


def scale_of(reference) -> float:
    return max(1.0, float(np.abs(reference.hessian).max()))
