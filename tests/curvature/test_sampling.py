"""Labels drawn from the model's predictive distribution (Monte Carlo GGN): the draws follow
the distribution, and the scaled loss gradient at them has the output Hessian as its second
moment, ``E[(scale g)(scale g)^T] = Lambda``, checked against Keras' own losses."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.curvature.sampling import STREAMS_PER_SAMPLE, draw_labels, stream, uniform_count

DRAWS = 40000
SIGMAS = 5.0  # a check within 5 standard errors fails by chance about once in 1.7 million


def _within(samples, expected, axis=0):
    """Means of ``samples`` along ``axis`` against ``expected``, within SIGMAS standard errors."""
    mean = samples.mean(axis=axis)
    error = samples.std(axis=axis) / np.sqrt(samples.shape[axis])
    assert np.all(np.abs(mean - expected) <= SIGMAS * error + 1e-12), (mean, expected, error)


@pytest.mark.parametrize("family,shape,count", [
    ("categorical_sparse", (5,), 1), ("categorical_onehot", (4, 3), 4), ("categorical_sparse", (2, 3, 7), 6),
    ("bernoulli", (3,), 3), ("bernoulli", (2, 3), 6), ("gaussian", (3,), 6), ("gaussian", (2, 2), 8)])
def test_uniforms_per_row(family, shape, count):
    assert uniform_count(family, shape) == count


def test_each_output_of_each_sample_has_its_own_stream():
    assert stream(0, 0) == 0 and stream(3, 2) == 3 * STREAMS_PER_SAMPLE + 2
    seen = {stream(s, p) for s in range(4) for p in range(STREAMS_PER_SAMPLE)}
    assert len(seen) == 4 * STREAMS_PER_SAMPLE


def _uniforms(family, shape, n=DRAWS, seed=0):
    return np.random.default_rng(seed).uniform(size=(n, uniform_count(family, shape)))


def _repeat(row, n=DRAWS):
    return tf.constant(np.tile(np.asarray(row, np.float64), (n, 1)))


@pytest.mark.parametrize("logits", [True, False])
def test_categorical_draws_follow_the_predicted_probabilities(logits):
    f = np.array([1.0, -0.5, 0.3, 2.0])
    p = np.exp(f) / np.exp(f).sum()
    given = f if logits else p
    labels, scale = draw_labels("categorical_sparse", _repeat(given), tf.ones([DRAWS, 1], tf.float64),
                                [_uniforms("categorical_sparse", (4,))], [(4,)], [logits])
    drawn = labels[0].numpy()
    assert labels[0].dtype == tf.int64 and drawn.shape == (DRAWS,)
    _within(np.eye(4)[drawn], p)
    np.testing.assert_array_equal(scale.numpy(), np.ones((DRAWS, 4)))


def test_one_hot_labels_per_position_and_the_scale_counts_the_positions():
    logits = np.array([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]])  # two positions of three classes
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels, scale = draw_labels("categorical_onehot", _repeat(logits.ravel()), tf.ones([DRAWS, 1], tf.float64),
                                [_uniforms("categorical_onehot", (2, 3))], [(2, 3)], [True])
    onehot = labels[0].numpy()
    assert labels[0].dtype == tf.float64 and onehot.shape == (DRAWS, 2, 3)
    np.testing.assert_array_equal(onehot.sum(axis=2), np.ones((DRAWS, 2)))
    _within(onehot, p)
    # Keras averages over the 2 positions: the gradient is scaled by sqrt(2); with a mask the
    # positions are summed (valid = 1 / positions) and it is not.
    np.testing.assert_allclose(scale.numpy(), np.full((DRAWS, 6), np.sqrt(2.0)))
    _, masked = draw_labels("categorical_onehot", _repeat(logits.ravel(), 3), tf.fill([3, 1], tf.constant(0.5, tf.float64)),
                            [_uniforms("categorical_onehot", (2, 3), n=3)], [(2, 3)], [True])
    np.testing.assert_allclose(masked.numpy(), np.ones((3, 6)))


def test_a_uniform_at_the_top_of_the_range_still_draws_a_class():
    # Cumulative probabilities may end a rounding below 1: the last class is the most a draw can be.
    labels, _ = draw_labels("categorical_sparse", _repeat([0.0, 0.0, 0.0], 2), tf.ones([2, 1], tf.float64),
                            [np.array([[1.0], [0.0]])], [(3,)], [True])
    assert labels[0].numpy().tolist() == [2, 0]


@pytest.mark.parametrize("logits", [True, False])
def test_bernoulli_draws_follow_the_sigmoid(logits):
    f = np.array([-1.0, 0.2, 3.0])
    p = 1.0 / (1.0 + np.exp(-f))
    labels, scale = draw_labels("bernoulli", _repeat(f if logits else p), tf.ones([DRAWS, 1], tf.float64),
                                [_uniforms("bernoulli", (3,))], [(3,)], [logits])
    assert labels[0].dtype == tf.float64 and set(np.unique(labels[0].numpy())) <= {0.0, 1.0}
    _within(labels[0].numpy(), p)
    np.testing.assert_allclose(scale.numpy(), np.full((DRAWS, 3), np.sqrt(3.0)))


def test_gaussian_draws_are_centred_on_the_output_with_variance_m_over_two():
    f = np.array([0.5, -2.0, 1.0, 4.0])
    labels, scale = draw_labels("gaussian", _repeat(f), tf.ones([DRAWS, 1], tf.float64),
                                [_uniforms("gaussian", (4,))], [(4,)], [False])
    y = labels[0].numpy()
    _within(y, f)
    _within((y - f) ** 2, np.full(4, 2.0))  # m = 4 units: variance m / 2
    np.testing.assert_array_equal(scale.numpy(), np.ones((DRAWS, 4)))


def _keras_loss(family, labels, outputs):
    """Keras' per-example loss (mean over the positions/units), on float64 tensors."""
    if family == "categorical_sparse":
        values = keras.losses.sparse_categorical_crossentropy(labels, outputs, from_logits=True)
    elif family == "categorical_onehot":
        values = keras.losses.categorical_crossentropy(labels, outputs, from_logits=True)
    elif family == "bernoulli":
        values = keras.losses.binary_crossentropy(labels, outputs, from_logits=True)
    else:
        values = keras.losses.mean_squared_error(labels, outputs)
    return tf.reduce_mean(tf.reshape(values, [tf.shape(values)[0], -1]), axis=1)


@pytest.mark.parametrize("family,shape", [("categorical_sparse", (3,)), ("categorical_onehot", (2, 3)),
                                          ("bernoulli", (2, 2)), ("gaussian", (3,))])
def test_the_scaled_gradient_at_drawn_labels_has_the_output_hessian_as_second_moment(family, shape):
    size = int(np.prod(shape))
    f_row = np.random.default_rng(4).normal(size=size)
    labels, scale = draw_labels(family, _repeat(f_row), tf.ones([DRAWS, 1], tf.float64),
                                [_uniforms(family, shape, seed=7)], [shape], [True])
    f = tf.Variable(_repeat(f_row))
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(_keras_loss(family, labels[0], tf.reshape(f, [DRAWS, *shape])))
    g = (tape.gradient(total, f) * scale).numpy()  # rows are independent: row i's gradient of l_i
    products = g[:, :, None] * g[:, None, :]

    # Lambda: the Hessian of one example's loss in f, at its expected label (it does not depend
    # on the label for these losses).
    one = tf.Variable(f_row[None, :])
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = tf.reduce_sum(_keras_loss(family, labels[0][:1], tf.reshape(one, [1, *shape])))
        first = inner.gradient(loss, one)
    lam = tf.reshape(outer.jacobian(first, one), [size, size]).numpy()
    assert np.abs(lam).max() > 0.05
    _within(products, lam)
