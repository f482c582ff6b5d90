"""The dense GGN ``sum_i s_i J_i^T Lambda_i J_i`` of a batch (``dense_ggn``) against per-example
Jacobians of the logits taken one example at a time and the softmax's Hessian; its diagonal
equals the engine's exact GGN diagonal."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

import cases
from pipeline.curvature import dense_ggn
from pipeline.curvature.engine import CurvatureEngine
from pipeline.curvature.losses import resolve_loss
from pipeline.curvature.requests import BatchWork
from pipeline.job import LossSpec

LOSS = LossSpec(name="sparse_categorical_crossentropy", options={"from_logits": True}, function=None)


def test_the_dense_ggn_of_a_batch_equals_per_example_jacobians_and_its_diagonal_the_exact_diagonal():
    model = cases.mlp()
    (x,), (y,), weights = cases.batch_for(model)
    engine = CurvatureEngine(model, resolve_loss(LOSS), precision="float64", vjp_budget=200)  # chunks of rows
    part = engine.partial([x], [y], weights, np.arange(len(x)), BatchWork(gradient=False, ggn_matrix=True,
                                                                          ggn_diagonal="exact"))
    expected = 0.0
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            logits = model(x[i:i + 1], training=False)[0]
        j = np.concatenate([g.numpy().reshape(len(logits), -1) for g in tape.jacobian(logits,
                                                                                    model.trainable_variables)], 1)
        p = tf.nn.softmax(logits).numpy()
        expected = expected + weights[i] * j.T @ (np.diag(p) - np.outer(p, p)) @ j
    np.testing.assert_allclose(part.sums[dense_ggn.KEY], expected, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(np.diag(part.sums[dense_ggn.KEY]), part.sums["ggn_diagonal"], rtol=1e-10, atol=1e-14)
