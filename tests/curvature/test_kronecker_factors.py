"""Kronecker factors and layer-input moments (``kronecker_factors``), against the truth: inputs
captured by Keras sub-models, output gradients by tapes through sub-models split at each layer's
pre-activation output, the exact GGN block where K-FAC is exact, and the dense per-example
projection for EK-FAC."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import cases
from pipeline.curvature.engine import CurvatureEngine
from pipeline.curvature.kronecker_factors import factor_layers
from pipeline.curvature.requests import BatchWork, KroneckerRequest
from pipeline.errors import InputError

N = 6
LOSS = ("sparse_categorical_crossentropy", {"from_logits": True})


def sequence_model():
    """Every factored kind, each followed by its activation as a layer of its own (so that the
    layers up to one end at its pre-activation output): a Dense on a sequence, an EinsumDense, a
    Conv1D with same padding, and a Dense head."""
    with cases._Policy("float64"):
        keras.utils.set_random_seed(4)
        return keras.Sequential([
            keras.Input((5, 4), dtype="float64"), keras.layers.Dense(3, name="seq"), keras.layers.Activation("tanh"),
            keras.layers.EinsumDense("abc,cde->abde", output_shape=(5, 2, 2), bias_axes="de", name="ein"),
            keras.layers.Activation("tanh"), keras.layers.Reshape((5, 4)),
            keras.layers.Conv1D(2, 3, padding="same", name="conv"), keras.layers.Activation("tanh"),
            keras.layers.Flatten(), keras.layers.Dense(3, name="out")])


def _through(layers, h):
    for layer in layers:
        h = layer(h)
    return h


def data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(N, 5, 4)), rng.integers(0, 3, N), rng.uniform(0.5, 2.0, N)


def unfolded(model, name, x):
    """``[B, R, d_in]`` rows of a layer's input, read by the layers before it (a Conv1D's patches
    by hand)."""
    at = [layer.name for layer in model.layers].index(name)
    rows = np.asarray(_through(model.layers[:at], tf.constant(x)))
    if name == "conv":
        padded = np.pad(rows, ((0, 0), (1, 1), (0, 0)))
        rows = np.stack([padded[:, t:t + 3, :].reshape(len(x), -1) for t in range(rows.shape[1])], axis=1)
    return rows.reshape(len(x), -1, rows.shape[-1])


def output_jacobians(model, name, x):
    """Per example ``J_i = df_i/dz_i`` [C, R, k]: the model split at the layer's pre-activation
    output (the layer's own output: its activation is a layer of its own)."""
    at = [layer.name for layer in model.layers].index(name)
    z = _through(model.layers[:at + 1], tf.constant(x))
    out = []
    for i in range(len(x)):
        zi = tf.Variable(z[i:i + 1])
        with tf.GradientTape() as tape:
            f = tf.reshape(_through(model.layers[at + 1:], zi), [-1])
        jacobian = tape.jacobian(f, zi).numpy()[:, 0]
        width = jacobian.shape[-1] if name != "ein" else 4
        out.append(jacobian.reshape(len(f), -1, width))
    return out


def loss_derivatives(loss, f, label):
    """``dl/df`` and ``d2l/df2`` of one example's loss at its output f [C]."""
    fv = tf.constant(f[None])
    with tf.GradientTape() as second:
        second.watch(fv)
        with tf.GradientTape() as first:
            first.watch(fv)
            value = tf.reduce_sum(loss([tf.constant([label])], [fv]))
        gradient = first.gradient(value, fv)
    return gradient.numpy()[0], second.jacobian(gradient, fv).numpy()[0, :, 0]


def explicit_factors(model, loss, x, y, s, fisher_type, reduction="expand"):
    """``{layer: (A, S)}`` summed (not divided) from explicit inputs and output gradients."""
    outputs = np.asarray(model(x))
    factors = {}
    for name in ("seq", "ein", "conv", "out"):
        rows = unfolded(model, name, x)
        rows = np.concatenate([rows, np.ones(rows.shape[:2] + (1,))], axis=2)
        jacobians = output_jacobians(model, name, x)
        k = jacobians[0].shape[-1]
        a, s_factor = np.zeros((rows.shape[2],) * 2), np.zeros((k, k))
        for i in range(N):
            dl, lam = loss_derivatives(loss, outputs[i], y[i])
            left = rows[i].mean(axis=0, keepdims=True) if reduction == "reduce" else rows[i]
            a += s[i] * left.T @ left
            if fisher_type == "empirical":
                g = np.einsum("c,crk->rk", dl, jacobians[i])
                g = g.sum(axis=0, keepdims=True) if reduction == "reduce" else g
                s_factor += s[i] * g.T @ g
            else:  # exact: sum_p J_p^T Lambda J_p (or of the position sums, reduced)
                j = jacobians[i].sum(axis=1, keepdims=True) if reduction == "reduce" else jacobians[i]
                s_factor += s[i] * np.einsum("crk,cd,drl->kl", j, lam, j)
        factors[name] = (a, s_factor)
    return factors


@pytest.fixture(scope="module")
def seq():
    model = sequence_model()
    loss = cases.resolved(LOSS[0], **LOSS[1])
    return model, loss, CurvatureEngine(model, loss, precision="float64")


def _kfac(engine, request, x, y, s, seed=0):
    """The partial sums of ``request``, keyed ``(kind, short layer name, factor)`` (a model built
    in this process prefixes its layers' paths with its own name)."""
    part = engine.partial([x], [y], s, np.arange(len(s)), BatchWork(kronecker=(request,), seed=seed))
    return {_short(key): value for key, value in part.sums.items()}


def _short(key: str) -> tuple:
    parts = key.split("/")
    return (parts[0], parts[-2], parts[-1]) if len(parts) >= 3 else tuple(parts)


@pytest.mark.parametrize("fisher_type", ["empirical", "exact"])
@pytest.mark.parametrize("reduction", ["expand", "reduce"])
def test_kfac_factors_match_explicit_inputs_and_output_gradients(seq, fisher_type, reduction):
    model, loss, engine = seq
    x, y, s = data()
    request = KroneckerRequest("kfac", fisher_type=fisher_type, reduction=reduction)
    part = _kfac(engine, request, x, y, s)
    want = explicit_factors(model, loss, x, y, s, fisher_type, reduction)
    for name, (a, s_factor) in want.items():
        np.testing.assert_allclose(part[("kfac", name, "A")], a, rtol=1e-10, atol=1e-12 * np.abs(a).max())
        np.testing.assert_allclose(part[("kfac", name, "S")], s_factor, rtol=1e-8,
                                   atol=1e-10 * np.abs(s_factor).max())
    assert float(part[("kfac", "weight")]) == pytest.approx(s.sum())


def test_layer_inputs_are_the_gram_of_the_layers_inputs(seq):
    model, _, engine = seq
    x, y, s = data(1)
    for bias in (False, True):
        part = _kfac(engine, KroneckerRequest("layer_inputs", bias=bias), x, y, s)
        for name in ("seq", "ein", "conv", "out"):
            rows = unfolded(model, name, x)
            if bias:
                rows = np.concatenate([rows, np.ones(rows.shape[:2] + (1,))], axis=2)
            want = np.einsum("b,brd,bre->de", s, rows, rows)
            np.testing.assert_allclose(part[("layer_inputs", name, "A")], want, rtol=1e-12, atol=1e-13)
            assert float(part[("layer_inputs", name, "positions")]) == pytest.approx(s.sum() * rows.shape[1])
    positions = {path.rsplit("/", 1)[-1]: count for path, count in engine.kronecker.positions([x]).items()}
    assert positions == {"seq": 5, "ein": 5, "conv": 5, "out": 1}


def test_kfac_is_the_exact_ggn_block_of_one_dense_layer_with_mse_and_one_output():
    """K-FAC is exact there: the GGN of the kernel and bias is ``kron(A, S)`` (S = 2, MSE)."""
    with cases._Policy("float64"):
        keras.utils.set_random_seed(2)
        model = keras.Sequential([keras.Input((4,), dtype="float64"), keras.layers.Dense(1, name="only")])
    loss = cases.resolved("mse")
    inputs, labels, weights = cases.batch_for(model, n=N, regression=True)
    engine = CurvatureEngine(model, loss, precision="float64")
    part = _kfac(engine, KroneckerRequest("kfac", fisher_type="exact"), inputs[0], labels[0], weights)
    a, s_factor = part[("kfac", "only", "A")], part[("kfac", "only", "S")]
    ggn = cases.reference(model, loss, inputs, labels, weights).ggn
    np.testing.assert_allclose(np.kron(a, s_factor) / weights.sum(), ggn, rtol=1e-12, atol=1e-14)
    assert float(s_factor[0, 0]) == pytest.approx(2.0 * weights.sum())


def test_monte_carlo_factors_converge_to_the_exact_ones_within_their_error(seq):
    model, loss, engine = seq
    x, y, s = data(2)
    exact = _kfac(engine, KroneckerRequest("kfac", fisher_type="exact"), x, y, s)
    draws = []
    for seed in range(40):
        part = _kfac(engine, KroneckerRequest("kfac", fisher_type="mc", samples=2), x, y, s, seed)
        draws.append(np.concatenate([part[("kfac", name, "S")].ravel() for name in ("seq", "out")]))
    draws = np.array(draws)
    want = np.concatenate([exact[("kfac", name, "S")].ravel() for name in ("seq", "out")])
    error = draws.std(axis=0, ddof=1) / np.sqrt(len(draws))
    z = np.abs(draws.mean(axis=0) - want) / np.maximum(error, 1e-12 * np.abs(want).max())
    assert np.mean(z < 3) > 0.95 and np.max(z) < 6, z
    # Each draw differs from the exact factor: the check above is of the draws' mean.
    assert np.abs(draws[0] - want).max() > 1e-3 * np.abs(want).max()


def test_ekfac_eigenvalues_are_the_projected_per_example_gradients(seq):
    model, loss, engine = seq
    x, y, s = data(3)
    factors = _kfac(engine, KroneckerRequest("kfac"), x, y, s)
    paths = {info.path.rsplit("/", 1)[-1]: info.path for info, _ in engine.kronecker.layers()}
    bases = {paths[name]: (np.linalg.eigh(factors[("kfac", name, "A")])[1], np.linalg.eigh(factors[("kfac", name, "S")])[1])
             for name in ("seq", "ein", "conv", "out")}
    engine.vjp_budget = engine.core.vjp_budget = 40  # several chunks of rows
    part = _kfac(engine, KroneckerRequest("kfac_eigen", bases=bases), x, y, s)
    outputs = np.asarray(model(x))
    for path, (q_a, q_s) in bases.items():
        name = path.rsplit("/", 1)[-1]
        rows = unfolded(model, name, x)
        rows = np.concatenate([rows, np.ones(rows.shape[:2] + (1,))], axis=2)
        jacobians = output_jacobians(model, name, x)
        want = 0.0
        for i in range(N):
            dl, _ = loss_derivatives(loss, outputs[i], y[i])
            gradient = rows[i].T @ np.einsum("c,crk->rk", dl, jacobians[i])  # [d_in + 1, d_out]
            want = want + s[i] * (q_a.T @ gradient @ q_s) ** 2
        np.testing.assert_allclose(part[("kfac_eigen", name, "eigen")], want.ravel(), rtol=1e-9,
                                   atol=1e-11 * np.abs(want).max())
    engine.vjp_budget = engine.core.vjp_budget = 1 << 24


def test_layers_it_cannot_factor_are_refused_with_the_way_out():
    with cases._Policy("float64"):
        x = keras.Input((6, 6, 4), dtype="float64")
        out = keras.layers.Dense(2, name="head")(keras.layers.Flatten()(keras.layers.Conv2D(4, 3, groups=2,
                                                                                         name="grouped")(x)))
        grouped = keras.Model(x, out)
    with pytest.raises(InputError, match=r"'grouped'.*groups=2.*variables:"):
        factor_layers(grouped, [v.path for v in grouped.trainable_variables])
    assert [info.path for info, _ in factor_layers(grouped, [grouped.trainable_variables[-1].path])] == ["head"]
    with cases._Policy("float64"):
        norm_only = keras.Sequential([keras.Input((3,), dtype="float64"), keras.layers.LayerNormalization()])
    engine = CurvatureEngine(norm_only, cases.resolved("mse"), precision="float64")
    with pytest.raises(InputError, match="need a Dense, EinsumDense, Conv1D or Conv2D layer"):
        engine.kronecker.layers()


def test_float32_factors_are_close_to_float64(seq):
    model, loss, engine = seq
    x, y, s = data(4)
    request = KroneckerRequest("kfac", fisher_type="exact")
    want = _kfac(engine, request, x, y, s)
    got = _kfac(CurvatureEngine(model, loss, precision="float32"), request, x, y, s)
    for key, value in want.items():
        if key[-1] in ("A", "S"):
            scale = np.abs(value).max()
            assert np.abs(got[key] - value).max() <= 1e-4 * scale, key
