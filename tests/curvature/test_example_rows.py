"""Per-example rows (``example_rows``) against the truth, without Ray: per-example gradients taken
one example at a time by a ``GradientTape`` of the Keras loss, and the NumPy references of the
influence package (``Preconditioner.self_influence``, ``projection.project``), on models that
take every route: layers with one position (the outer-product forms), layers with several
positions (Dense layers on a masked sequence, a Conv2D: ``G_i`` formed), and variables of no
factored layer (an Embedding, BatchNormalization's scale and shift: per-example Jacobians)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import cases
from pipeline.curvature.engine import CurvatureEngine
from pipeline.curvature.example_rows import ExampleRows
from pipeline.curvature.losses import resolve_loss
from pipeline.curvature.requests import RowsRequest
from pipeline.influence import projection
from pipeline.influence.preconditioner import Preconditioner
from pipeline.job import LossSpec

LOSS = LossSpec(name="sparse_categorical_crossentropy", options={"from_logits": True}, function=None)
N, T, VOCAB = 7, 5, 6


def tagger():
    """Embedding(mask_zero) -> Dense per position -> Dense per position (Dense layers keep the mask)."""
    with cases._Policy("float64"):
        keras.utils.set_random_seed(3)
        tokens = keras.Input((T,), dtype="int32")
        h = keras.layers.Embedding(VOCAB, 3, mask_zero=True, name="embed")(tokens)
        h = keras.layers.Dense(4, activation="tanh", name="seq")(h)
        return keras.Model(tokens, keras.layers.Dense(3, name="tag")(h), name="tagger")


def tokens(seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, T + 1, N)
    x = np.zeros((N, T), np.int64)
    for i, n in enumerate(lengths):
        x[i, :n] = rng.integers(1, VOCAB, n)
    return x, rng.integers(0, 3, (N, T))


def reference(model, x, y, masked: bool):
    """``[N, P]`` per-example gradients and ``[N]`` losses of ``l_i`` (a masked sequence's
    masked sum), one example at a time."""
    grads, losses = [], []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            values = keras.losses.sparse_categorical_crossentropy(y[i:i + 1], model(x[i:i + 1], training=False),
                                                                  from_logits=True)
            if masked:
                values = values * tf.cast(x[i:i + 1] != 0, values.dtype)
            value = tf.reduce_sum(values)
        g = tape.gradient(value, model.trainable_variables)
        grads.append(np.concatenate([np.asarray(tf.convert_to_tensor(v)).ravel() for v in g]))
        losses.append(float(value))
    return np.array(grads), np.array(losses)


def random_preconditioner(layout, seed=0):
    """Random positive factors for every layer block and a random GGN diagonal for the rest."""
    rng = np.random.default_rng(seed)

    def spd(n):
        m = rng.normal(size=(n, n))
        return m @ m.T / n + 0.1 * np.eye(n)

    factors = {"A": {}, "S": {}, "positions": {}}
    for layer in layout.layers:
        factors["A"][layer.path], factors["S"][layer.path] = spd(layer.d_a), spd(layer.d_s)
        factors["positions"][layer.path] = 3.0
    return Preconditioner.kronecker("kfac", layout, 0.1, factors, rng.uniform(0.1, 2.0, layout.parameters))


CASES = {
    "tagger": lambda: (tagger(), *tokens(), True),
    "cnn": lambda: (cases.cnn(), *cases.batch_for(cases.cnn())[:2], False),
    "batchnorm": lambda: (cases.batchnorm(), *cases.batch_for(cases.batchnorm())[:2], False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rows_equal_per_example_gradients_taken_one_at_a_time(name):
    model, x, y, masked = CASES[name]()
    x, y = (x[0], y[0]) if isinstance(x, list) else (x, y)
    engine = CurvatureEngine(model, resolve_loss(LOSS), precision="float64")
    assert isinstance(engine.example_rows, ExampleRows)
    g, losses = reference(model, x, y, masked)
    layout = engine.example_rows.layout(True)[0]
    assert layout.layers and (layout.rest_size > 0) == (name != "cnn")
    pre = random_preconditioner(layout)
    vectors = np.random.default_rng(5).normal(size=(4, engine.parameters))
    got = engine.rows([x], [y], RowsRequest(projection=24, seed=3, self_influence=True, arrays=pre.worker_arrays(),
                                            vectors=vectors))
    np.testing.assert_allclose(got["loss"], losses, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got["gradient_norm"], np.linalg.norm(g, axis=1), rtol=1e-10)
    np.testing.assert_allclose(got["scores"], g @ vectors.T, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got["self_influence"], pre.self_influence(g), rtol=1e-9)
    np.testing.assert_allclose(got["projection"], projection.project(layout, 24, 3, g), rtol=1e-9, atol=1e-12)
    whole = engine.rows([x], [y], RowsRequest(gradients=True, structured=False))
    np.testing.assert_allclose(whole["gradients"], g, rtol=1e-10, atol=1e-12)
    # The identity curvature: the self-influence is the squared norm.
    plain = engine.rows([x], [y], RowsRequest(self_influence=True))
    np.testing.assert_allclose(plain["self_influence"], np.sum(g * g, axis=1), rtol=1e-10)


def test_rows_in_chunks_equal_rows_at_once():
    model, x, y, _ = CASES["tagger"]()
    engine = CurvatureEngine(model, resolve_loss(LOSS), precision="float64", vjp_budget=40)
    small = engine.rows([x], [y], RowsRequest(projection=8))
    whole = CurvatureEngine(model, resolve_loss(LOSS), precision="float64").rows([x], [y], RowsRequest(projection=8))
    for key in ("loss", "gradient_norm", "projection"):
        np.testing.assert_allclose(small[key], whole[key], rtol=1e-12, atol=1e-14)
