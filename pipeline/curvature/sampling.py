"""Labels drawn from the model's predictive distribution, for the Monte Carlo GGN.

For a loss that is the negative log-likelihood of a distribution p(y | f) over the outputs f,
the GGN's output Hessian is ``Lambda = E_{y' ~ p(y | f)}[g g^T]`` with ``g = dl(f, y')/df``
(Martens 2020, "New insights and perspectives on the natural gradient method", section 9;
BackPACK's ``DiagGGNMC``). One backward pass of the loss at a drawn label y' then gives a
rank-one, unbiased sample of ``J^T Lambda J``.

The draws are TensorFlow ops, so they can run inside the compiled pass that also takes the
gradient (``CurvatureEngine``'s one-pass Monte Carlo GGN), or eagerly. Their randomness is
not TensorFlow's: the uniforms come in from ``pipeline.probes.row_uniforms``, a pure function
of ``(seed, sample, row, j)``, so a row draws the same label whatever its shard or batch.
"""

from __future__ import annotations

import math

import tensorflow as tf

# Outputs of one model share a (seed, sample) stream, told apart by their position.
STREAMS_PER_SAMPLE = 1024


def uniform_count(family: str, shape) -> int:
    """How many uniforms one row needs for an output of ``shape`` (without the batch axis):
    one per categorical position, one per Bernoulli unit, two per Gaussian unit (Box-Muller)."""
    size = math.prod(shape)
    if family.startswith("categorical"):
        return size // shape[-1]
    return 2 * size if family == "gaussian" else size


def stream(sample: int, position: int) -> int:
    """The ``row_uniforms`` sample index of output ``position`` in Monte Carlo sample ``sample``."""
    return sample * STREAMS_PER_SAMPLE + position


def draw_labels(family: str, flat, valid, uniforms, shapes, from_logits):
    """``(labels, scale)``: one label tensor per output and the scale ``[B, C]`` of the loss
    gradient at those labels, such that ``E[(scale * g)(scale * g)^T] = Lambda``.

    ``flat``: the outputs ``f`` flattened and concatenated, ``[B, C]`` float64 (the draws
    compare cumulative probabilities with uniforms: float64 keeps them as exact as the
    uniforms); ``valid``: ``[B, outputs]``, the fraction of each output's positions the loss averages
    over (1 without a mask; ``1 / positions`` with one, whose positions the token-weighted
    objective sums); ``uniforms``: per output, ``[B, uniform_count(...)]``;
    ``shapes``: per output, its shape without the batch axis; ``from_logits``: per output,
    whether ``f`` is logits (else probabilities).

    - categorical (softmax of logits, or the probabilities themselves): a class per position
      of the last axis, the first whose cumulative probability reaches the uniform; labels are
      int64 class ids (``categorical_sparse``) or one-hot float64;
    - Bernoulli (sigmoid), per unit: ``y' = [u < p]``;
    - Gaussian (mean squared error): ``y' = f + sqrt(m / 2) N(0, 1)``, N by Box-Muller.

    Keras averages the loss over the m positions (or units) of an output, so
    ``Lambda = Lambda_position / m`` while ``E[g g^T] = Lambda_position / m**2``: the gradient
    is scaled by ``sqrt(m)`` (for the Gaussian the noise variance does it). With a mask the
    positions are summed, not averaged: m counts one position (the units of its last axis for
    Bernoulli and Gaussian outputs). Cost: O(B C) elementwise ops.
    """
    labels, scales = [], []
    n = tf.shape(flat)[0]
    offset = 0
    for position, (shape, logits, u) in enumerate(zip(shapes, from_logits, uniforms)):
        size = math.prod(shape)
        f = flat[:, offset:offset + size]
        offset += size
        u = tf.convert_to_tensor(u, tf.float64)
        if family.startswith("categorical"):
            classes = shape[-1]
            positions = size // classes
            m = valid[:, position] * positions
            values = tf.reshape(f, [n, positions, classes])
            if logits:
                p = tf.exp(values - tf.reduce_max(values, axis=2, keepdims=True))
            else:
                p = tf.maximum(values, 0.0)
            p = p / tf.reduce_sum(p, axis=2, keepdims=True)
            below = tf.cast(tf.cumsum(p, axis=2) < u[:, :, None], tf.int64)
            drawn = tf.minimum(tf.reduce_sum(below, axis=2), classes - 1)
            if family == "categorical_sparse":
                labels.append(tf.reshape(drawn, [n, *shape[:-1]]))
            else:
                labels.append(tf.reshape(tf.one_hot(drawn, classes, dtype=tf.float64), [n, *shape]))
            scales.append(tf.repeat(tf.sqrt(m)[:, None], size, axis=1))
        elif family == "bernoulli":
            m = valid[:, position] * size
            p = 1.0 / (1.0 + tf.exp(-f)) if logits else f
            labels.append(tf.reshape(tf.cast(u < p, tf.float64), [n, *shape]))
            scales.append(tf.repeat(tf.sqrt(m)[:, None], size, axis=1))
        else:  # gaussian
            m = valid[:, position] * size
            normal = tf.sqrt(-2.0 * tf.math.log(u[:, 0::2])) * tf.cos(2.0 * math.pi * u[:, 1::2])
            labels.append(tf.reshape(f + tf.sqrt(m / 2.0)[:, None] * normal, [n, *shape]))
            scales.append(tf.ones([n, size], tf.float64))
    return labels, tf.concat(scales, axis=1)
