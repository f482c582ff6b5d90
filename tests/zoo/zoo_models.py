"""The model zoo: small Keras models of many kinds, and a float64 dense reference for each.

The reference never touches ``pipeline``: the per-example losses are written out by hand
(log-sum-exp, log-softmax, softplus... in float64), masks are recomputed from the tokens
(``x != 0``), the Hessian is ``tape.jacobian`` of the whole-batch gradient, and the per-example
gradients, output Jacobians ``J_i`` and output Hessians ``Lambda_i`` come from one forward pass
per example. That the hand-written losses are the losses Keras trains on is checked separately,
against ``model.evaluate`` on one example at a time (``evaluate_losses``).

Every case is built twice from the same code: the model handed to the engine (float32, or a
mixed-precision one) and a float64 copy with the same weights. Where Keras' cross-entropy
reads the logits behind a softmax/sigmoid output (``from_logits=False``), the reference
differentiates a "logits twin": the same model and weights with a linear last layer, and
the ``from_logits=True`` loss.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

import zoo_losses
from cases import _Policy  # sets the global dtype policy while building, and restores it

# (case name, precision) -> {quantity: max |engine - reference| / max |reference|}; printed by
# conftest.py at the end of the run.
MEASURED: dict = {}




# ----------------------------------------------------------------------------- hand losses
# Each maps (label, output) to the loss per position, the last (class/feature) axis reduced.
# They compute in the output's dtype (float64 in the reference).

def sparse_ce_logits(y, z):
    onehot = tf.one_hot(tf.cast(y, tf.int32), int(z.shape[-1]), dtype=z.dtype)
    return tf.reduce_logsumexp(z, axis=-1) - tf.reduce_sum(onehot * z, axis=-1)


def categorical_ce_logits(y, z):
    return -tf.reduce_sum(tf.cast(y, z.dtype) * tf.nn.log_softmax(z, axis=-1), axis=-1)


def binary_ce_logits(y, z):
    y = tf.cast(y, z.dtype)
    return tf.reduce_mean(tf.nn.relu(z) - z * y + tf.math.log1p(tf.exp(-tf.abs(z))), axis=-1)


def mse(y, z):
    return tf.reduce_mean(tf.square(z - tf.cast(y, z.dtype)), axis=-1)


def huber(y, z, delta=1.0):
    a = tf.abs(z - tf.cast(y, z.dtype))
    return tf.reduce_mean(tf.where(a <= delta, 0.5 * a * a, delta * a - 0.5 * delta * delta), axis=-1)


def softplus_squared(y, z):  # zoo_losses.softplus_squared, written again
    return tf.reduce_mean(tf.square(tf.math.log1p(tf.exp(-tf.abs(z))) + tf.nn.relu(z) - tf.cast(y, z.dtype)),
                          axis=-1)


def binary_focal_logits(y, z, gamma=2.0):
    """Keras' binary focal cross-entropy of a sigmoid output, from its logits z: the
    cross-entropy term from the logits (Keras reads them behind the sigmoid), the focal factor
    from the probabilities."""
    y = tf.cast(y, z.dtype)
    p = tf.math.sigmoid(z)
    p_t = y * p + (1 - y) * (1 - p)
    bce = tf.nn.relu(z) - z * y + tf.math.log1p(tf.exp(-tf.abs(z)))
    return tf.reduce_mean(tf.pow(1.0 - p_t, gamma) * bce, axis=-1)


@dataclass(frozen=True)
class LossDef:
    """A loss as the engine gets it (``spec``), as Keras compiles it (``keras_loss``) and by hand."""

    spec: SimpleNamespace
    keras_loss: Callable  # () -> a float64 keras.losses.Loss (or a function), for model.evaluate
    hand: Callable  # (y, f) -> per-position loss, last axis reduced; f = logits where Keras reads them


def _named(name, cls, hand, **options):
    return LossDef(SimpleNamespace(name=name, options=dict(options), function=None),
                   lambda: cls(dtype="float64", **options), hand)


LOSSES = {
    "sparse_ce_logits": _named("sparse_categorical_crossentropy", keras.losses.SparseCategoricalCrossentropy,
                               sparse_ce_logits, from_logits=True),
    "sparse_ce_probs": _named("sparse_categorical_crossentropy", keras.losses.SparseCategoricalCrossentropy,
                              sparse_ce_logits),
    "categorical_ce_logits": _named("categorical_crossentropy", keras.losses.CategoricalCrossentropy,
                                    categorical_ce_logits, from_logits=True),
    "categorical_ce_probs": _named("categorical_crossentropy", keras.losses.CategoricalCrossentropy,
                                   categorical_ce_logits),
    "binary_ce_logits": _named("binary_crossentropy", keras.losses.BinaryCrossentropy, binary_ce_logits,
                               from_logits=True),
    "binary_ce_probs": _named("binary_crossentropy", keras.losses.BinaryCrossentropy, binary_ce_logits),
    "binary_focal_probs": _named("binary_focal_crossentropy", keras.losses.BinaryFocalCrossentropy,
                                 binary_focal_logits),
    "mse": _named("mse", keras.losses.MeanSquaredError, mse),
    "huber": _named("huber", keras.losses.Huber, huber),
    "user": LossDef(SimpleNamespace(name=None, options={}, function="zoo_losses:softplus_squared"),
                    lambda: zoo_losses.softplus_squared,
                    softplus_squared),
}


def token_mask(tokens):
    """The mask Embedding(mask_zero=True) makes, recomputed from the tokens."""
    return tf.cast(tf.not_equal(tokens, 0), tf.float64)


def per_example_loss(hand, labels, outputs, mask=None, label_fix=None):
    """l_i: per output, the per-position loss averaged over positions (with a mask: summed over
    the unmasked positions, the token-weighted objective's term), summed over outputs.
    ``label_fix[k]`` reshapes label k as Keras reconciles it."""
    total = 0.0
    for k, (y, z) in enumerate(zip(labels, outputs)):
        if label_fix and label_fix[k]:
            y = label_fix[k](y)
        per = hand(y, z)
        if per.shape.rank > 1:
            if mask is not None:
                m = tf.cast(mask, per.dtype)
                per = tf.reduce_sum(m * per, axis=1)
            else:
                per = tf.reduce_mean(per, axis=list(range(1, per.shape.rank)))
        total = total + per
    return total


# ----------------------------------------------------------------------------- cases

@dataclass
class Case:
    name: str
    model: keras.Model  # handed to the engine
    model64: keras.Model  # the same model in float64, same weights (model.evaluate check)
    reference_model: keras.Model  # what the reference differentiates (model64 or its logits twin)
    loss: LossDef
    inputs: list  # engine order
    labels: list  # engine order
    weights: np.ndarray
    pack_inputs: Callable = lambda xs: xs[0] if len(xs) == 1 else list(xs)
    unpack_outputs: Callable = lambda out: list(out) if isinstance(out, (list, tuple)) else [out]
    pack_labels: Callable = lambda ys: ys[0] if len(ys) == 1 else list(ys)
    mask: Callable | None = None  # engine-ordered inputs -> [N, T] mask
    label_fix: list | None = None
    pfor: bool = True  # False for recurrent layers
    builder: Callable | None = None
    notes: str = ""
    reference_of: str | None = None  # another case with the same float64 model and batch

    def hand_loss(self, labels, outputs, inputs):
        mask = self.mask(inputs) if self.mask is not None else None
        return per_example_loss(self.loss.hand, labels, outputs, mask, self.label_fix)


def _float_input(shape, dt, name=None):
    return keras.Input(shape, dtype=dt, name=name)


def _pair(build, seed, post=None, twin=None, mixed=None):
    """(model for the engine, float64 copy, float64 reference model), all with one set of weights.

    ``build(dt, last_activation=...)`` makes the model under the current policy with float
    inputs of dtype ``dt``. ``twin``: the last activation to drop for the logits twin.
    ``mixed``: build the engine's model under that mixed-precision policy.
    """
    keras.utils.set_random_seed(seed)
    with _Policy(mixed or "float32"):
        model = build("float32")
    if post is not None:
        post(model)
    with _Policy("float64"):
        model64 = build("float64")
        model64.set_weights(model.get_weights())
        reference = model64
        if twin is not None:
            reference = build("float64", last_activation=None)
            reference.set_weights(model.get_weights())
    return model, model64, reference


def _weights(rng, n):
    return rng.uniform(0.5, 2.0, size=n)


# -- 1. residual MLP with LayerNormalization
def residual_mlp(dt, last_activation=None, classes=4):
    x = _float_input((6,), dt, "x")
    h = keras.layers.Dense(10, activation="tanh", name="h1")(x)
    h2 = keras.layers.Dense(10, activation="tanh", name="h2")(h)
    h = keras.layers.Add(name="skip")([h, h2])
    h = keras.layers.LayerNormalization(name="ln")(h)
    out = keras.layers.Dense(classes, activation=last_activation, name="out")(h)
    return keras.Model(x, out, name="residual_mlp")


def case_residual_mlp(mixed=None, name="residual_mlp_layernorm"):
    model, model64, ref = _pair(residual_mlp, 1, mixed=mixed)
    rng = np.random.default_rng(11)
    n = 10
    x = rng.normal(size=(n, 6))
    return Case(name, model, model64, ref, LOSSES["sparse_ce_logits"], [x], [rng.integers(0, 4, n)],
                _weights(rng, n))


# -- 2. CNN with BatchNormalization (non-trivial moving stats), Dropout, MaxPooling2D
def cnn_bn(dt, last_activation=None):
    x = _float_input((8, 8, 2), dt, "image")
    h = keras.layers.Conv2D(4, 3, name="conv")(x)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Activation("tanh")(h)
    h = keras.layers.MaxPooling2D(2, name="pool")(h)
    h = keras.layers.Dropout(0.3, name="drop")(h)
    h = keras.layers.Flatten()(h)
    out = keras.layers.Dense(3, activation=last_activation, name="out")(h)
    return keras.Model(x, out, name="cnn_bn")


def _bn_stats(model):
    bn = model.get_layer("bn")
    rng = np.random.default_rng(2)
    bn.moving_mean.assign(rng.normal(size=4) * 0.5)
    bn.moving_variance.assign(rng.uniform(0.3, 3.0, size=4))
    bn.gamma.assign(rng.uniform(0.5, 1.5, size=4))
    bn.beta.assign(rng.normal(size=4) * 0.2)


def case_cnn_batchnorm():
    model, model64, ref = _pair(cnn_bn, 2, post=_bn_stats)
    rng = np.random.default_rng(12)
    n = 10
    return Case("cnn_batchnorm_dropout_pool", model, model64, ref, LOSSES["categorical_ce_logits"],
                [rng.normal(size=(n, 8, 8, 2))], [np.eye(3)[rng.integers(0, 3, n)]], _weights(rng, n))


# -- 3. SeparableConv2D / DepthwiseConv2D
def separable(dt, last_activation=None):
    x = _float_input((7, 7, 3), dt, "image")
    h = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, activation="tanh", name="depthwise")(x)
    h = keras.layers.SeparableConv2D(4, 3, activation="tanh", name="separable")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    out = keras.layers.Dense(2, activation=last_activation, name="out")(h)
    return keras.Model(x, out, name="separable")


def case_separable():
    model, model64, ref = _pair(separable, 3)
    rng = np.random.default_rng(13)
    n = 10
    return Case("separable_depthwise_conv", model, model64, ref, LOSSES["mse"],
                [rng.normal(size=(n, 7, 7, 3))], [rng.normal(size=(n, 2))], _weights(rng, n))


# -- 4. Transformer block
def transformer(dt, last_activation=None):
    tokens = keras.Input((6,), dtype="int32", name="tokens")
    e = keras.layers.Embedding(12, 8, name="embed")(tokens)
    a = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, name="mha")(e, e)
    h = keras.layers.LayerNormalization(name="ln")(keras.layers.Add()([e, a]))
    h = keras.layers.GlobalAveragePooling1D()(h)
    out = keras.layers.Dense(3, activation=last_activation, name="out")(h)
    return keras.Model(tokens, out, name="transformer")


def case_transformer():
    model, model64, ref = _pair(transformer, 4)
    rng = np.random.default_rng(14)
    n = 10
    return Case("transformer_block", model, model64, ref, LOSSES["sparse_ce_logits"],
                [rng.integers(0, 12, size=(n, 6)).astype(np.int32)], [rng.integers(0, 3, n)], _weights(rng, n))


# -- 5. frozen layer and a shared layer used twice
def frozen_shared(dt, last_activation=None):
    x = _float_input((5,), dt, "x")
    frozen = keras.layers.Dense(6, activation="tanh", name="frozen")
    frozen.trainable = False
    shared = keras.layers.Dense(6, activation="tanh", name="shared")
    h = frozen(x)
    h = shared(h)
    h = shared(h)
    out = keras.layers.Dense(3, activation=last_activation, name="out")(h)
    return keras.Model(x, out, name="frozen_shared")


def case_frozen_shared():
    model, model64, ref = _pair(frozen_shared, 5)
    assert len(model.trainable_variables) == 4  # shared kernel/bias once, out kernel/bias
    rng = np.random.default_rng(15)
    n = 10
    return Case("frozen_and_shared_layer", model, model64, ref, LOSSES["mse"],
                [rng.normal(size=(n, 5))], [rng.normal(size=(n, 3))], _weights(rng, n))


# -- 6. two inputs (list) and two outputs (list)
def two_in_two_out(dt, last_activation=None):
    a = _float_input((3,), dt, "a")
    b = _float_input((4,), dt, "b")
    h = keras.layers.Concatenate()([keras.layers.Dense(5, activation="tanh", name="ha")(a),
                                    keras.layers.Dense(5, activation="tanh", name="hb")(b)])
    o1 = keras.layers.Dense(2, name="o1")(h)
    o2 = keras.layers.Dense(3, name="o2")(h)
    return keras.Model([a, b], [o1, o2], name="two_in_two_out")


def case_two_in_two_out():
    model, model64, ref = _pair(two_in_two_out, 6)
    rng = np.random.default_rng(16)
    n = 10
    return Case("two_inputs_two_outputs", model, model64, ref, LOSSES["mse"],
                [rng.normal(size=(n, 3)), rng.normal(size=(n, 4))],
                [rng.normal(size=(n, 2)), rng.normal(size=(n, 3))], _weights(rng, n))


# -- 7. dict inputs whose keys differ from the Input names (and sort the other way)
def dict_inputs(dt, last_activation=None):
    in_a = _float_input((4,), dt, "zz_first")
    in_b = _float_input((4,), dt, "aa_second")
    hb = keras.layers.Dense(4, activation="tanh", name="hb")(in_b)
    h = keras.layers.Dense(6, activation="tanh", name="h")(keras.layers.Concatenate()([in_a, hb]))
    out = keras.layers.Dense(2, activation=last_activation, name="out")(h)
    return keras.Model({"a": in_a, "b": in_b}, out, name="dict_inputs")


def case_dict_inputs():
    model, model64, ref = _pair(dict_inputs, 7)
    rng = np.random.default_rng(17)
    n = 10
    return Case("dict_inputs", model, model64, ref, LOSSES["binary_ce_logits"],
                [rng.normal(size=(n, 4)), 2.0 * rng.normal(size=(n, 4))],  # sorted keys: a, b
                [rng.integers(0, 2, size=(n, 2)).astype(np.float64)], _weights(rng, n),
                pack_inputs=lambda xs: {"a": xs[0], "b": xs[1]})


# -- 8. dict outputs of equal widths, keys sorting against the layer order
def dict_outputs(dt, last_activation=None):
    x = _float_input((5,), dt, "x")
    h = keras.layers.Dense(6, activation="tanh", name="h")(x)
    return keras.Model(x, {"zeta": keras.layers.Dense(2, name="first")(h),
                           "alpha": keras.layers.Dense(2, name="second")(h)}, name="dict_outputs")


def case_dict_outputs():
    model, model64, ref = _pair(dict_outputs, 8)
    rng = np.random.default_rng(18)
    n = 10
    alpha = rng.normal(size=(n, 2)) + 2.0  # apart, so a swapped pairing changes every number
    zeta = 0.5 * rng.normal(size=(n, 2)) - 1.0
    return Case("dict_outputs", model, model64, ref, LOSSES["mse"], [rng.normal(size=(n, 5))], [alpha, zeta],
                _weights(rng, n), unpack_outputs=lambda out: [out["alpha"], out["zeta"]],
                pack_labels=lambda ys: {"alpha": ys[0], "zeta": ys[1]})


# -- 9./10. softmax / sigmoid outputs with from_logits=False and saturated examples
def probs_mlp(dt, last_activation="softmax", width=4):
    x = _float_input((5,), dt, "x")
    h = keras.layers.Dense(8, activation="softplus", name="h")(x)  # asymptotically linear
    out = keras.layers.Dense(width, activation=last_activation, name="out")(h)
    return keras.Model(x, out, name="probs_mlp")


def _saturate(reference, x, margin_ok, scale=4.0):
    """Scales examples 0 and 1 up until ``margin_ok(logits0, logits1)``."""
    x = x.copy()
    for _ in range(20):
        z = reference(x[:2], training=False).numpy()
        if margin_ok(z[0], z[1]):
            return x, z
        x[:2] *= scale
    raise AssertionError("could not saturate the examples")


def case_softmax_saturated():
    model, model64, ref = _pair(probs_mlp, 9, twin="softmax")
    rng = np.random.default_rng(19)
    n = 10
    x = rng.normal(size=(n, 5))

    def margin(z0, z1):  # example 0 right with p > 1 - 1e-8, example 1 wrong with p_true < 1e-8
        return (np.sort(z0)[-1] - np.sort(z0)[-2] > 20 + np.log(4)) and (np.max(z1) - np.min(z1) > 20 + np.log(4))

    x, z = _saturate(ref, x, margin)
    y = rng.integers(0, 4, n)
    y[0], y[1] = np.argmax(z[0]), np.argmin(z[1])
    p = tf.nn.softmax(z).numpy()
    assert p[0, y[0]] > 1 - 1e-8 and p[1, y[1]] < 1e-8
    return Case("softmax_sparse_ce_saturated", model, model64, ref, LOSSES["sparse_ce_probs"], [x], [y],
                _weights(rng, n), notes="reference: logits twin + from_logits=True")


def _sigmoid_saturated(name, loss, model_seed, data_seed, n, notes):
    """A two-unit sigmoid MLP whose examples 0 and 1 are saturated, confidently right and
    confidently wrong; the reference is its logits twin."""
    model, model64, ref = _pair(lambda dt, last_activation="sigmoid": probs_mlp(dt, last_activation, width=2),
                                model_seed, twin="sigmoid")
    rng = np.random.default_rng(data_seed)
    x = rng.normal(size=(n, 5))
    x, z = _saturate(ref, x, lambda z0, z1: np.abs(z0).min() > 20 and np.abs(z1).min() > 20)
    y = rng.integers(0, 2, size=(n, 2)).astype(np.float64)
    y[0] = (z[0] > 0)  # confidently right
    y[1] = (z[1] < 0)  # confidently wrong
    return Case(name, model, model64, ref, LOSSES[loss], [x], [y], _weights(rng, n), notes=notes)


def case_sigmoid_saturated():
    return _sigmoid_saturated("sigmoid_binary_ce_saturated", "binary_ce_probs", 10, 20, 10,
                              "reference: logits twin + from_logits=True")


def case_focal_saturated():
    """Binary focal cross-entropy on a sigmoid output with saturated examples: Keras reads the
    logits for its cross-entropy term and the probabilities for its focal factor."""
    return _sigmoid_saturated("sigmoid_binary_focal_saturated", "binary_focal_probs", 18, 30, 8,
                              "reference: logits twin, focal factor from sigmoid(logits)")


# -- 11. every loss family on a small MLP
def small_mlp(dt, last_activation=None, width=3):
    x = _float_input((5,), dt, "x")
    h = keras.layers.Dense(7, activation="tanh", name="h")(x)
    out = keras.layers.Dense(width, activation=last_activation, name="out")(h)
    return keras.Model(x, out, name="small_mlp")


def case_loss_family(key):
    twin = "softmax" if key == "categorical_ce_probs" else None
    build = (lambda dt, last_activation="softmax": small_mlp(dt, last_activation)) if twin else small_mlp
    model, model64, ref = _pair(build, 11, twin=twin)
    rng = np.random.default_rng(21)
    n = 10
    x = rng.normal(size=(n, 5))
    if key == "sparse_ce_logits":
        y = rng.integers(0, 3, n)
    elif key.startswith("categorical"):
        y = np.eye(3)[rng.integers(0, 3, n)]
    elif key == "binary_ce_logits":
        y = rng.integers(0, 2, size=(n, 3)).astype(np.float64)
    elif key == "huber":
        y = 2.0 * rng.normal(size=(n, 3))  # residuals on both sides of delta = 1
    elif key == "user":
        y = rng.uniform(0.0, 2.0, size=(n, 3))
    else:
        y = rng.normal(size=(n, 3))
    return Case(f"loss_{key}", model, model64, ref, LOSSES[key], [x], [y], _weights(rng, n))


# -- 12. label shapes Keras reconciles
def case_binary_scalar_labels():
    model, model64, ref = _pair(lambda dt, last_activation=None: small_mlp(dt, last_activation, width=1), 12)
    rng = np.random.default_rng(22)
    n = 10
    y = rng.integers(0, 2, n).astype(np.float64)  # [N] against a [N, 1] output
    return Case("binary_ce_labels_N_output_Nx1", model, model64, ref, LOSSES["binary_ce_logits"],
                [rng.normal(size=(n, 5))], [y], _weights(rng, n),
                label_fix=[lambda t: tf.reshape(t, [-1, 1])])


def case_sparse_column_labels():
    model, model64, ref = _pair(small_mlp, 13)
    rng = np.random.default_rng(23)
    n = 10
    y = rng.integers(0, 3, size=(n, 1))  # sparse labels [N, 1]
    return Case("sparse_ce_labels_Nx1", model, model64, ref, LOSSES["sparse_ce_logits"],
                [rng.normal(size=(n, 5))], [y], _weights(rng, n), label_fix=[lambda t: tf.reshape(t, [-1])])


# -- 13. masked LSTM, per-timestep classes
def masked_lstm(dt, last_activation=None):
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    e = keras.layers.Embedding(VOCAB, 3, mask_zero=True, name="embed")(tokens)
    h = keras.layers.LSTM(3, return_sequences=True, name="lstm")(e)
    out = keras.layers.Dense(3, activation=last_activation, name="out")(h)
    return keras.Model(tokens, out, name="masked_lstm")


VOCAB = 6


def padded_tokens(rng, n, length, lengths=None):
    if lengths is None:
        lengths = rng.integers(1, length + 1, n)
        lengths[0], lengths[1] = length, 1
    tokens = np.zeros((n, length), dtype=np.int32)
    for i, t in enumerate(lengths):
        tokens[i, :t] = rng.integers(1, VOCAB, t)
    labels = rng.integers(0, 3, size=(n, length))  # padded positions too: they must not count
    return tokens, labels


def _lstm_case(name, model, model64, ref, rng, n, length):
    tokens, labels = padded_tokens(rng, n, length)
    return Case(name, model, model64, ref, LOSSES["sparse_ce_logits"], [tokens], [labels], _weights(rng, n),
                mask=lambda xs: token_mask(xs[0]), pfor=False)


def case_masked_lstm():
    model, model64, ref = _pair(masked_lstm, 14)
    return _lstm_case("masked_lstm_sequence", model, model64, ref, np.random.default_rng(24), 6, 5)


def case_variable_length():
    """The masked LSTM of ``masked_lstm_sequence`` (the same model objects) on another batch,
    padded to another length (8 against 5): one engine runs both batches."""
    base = get_case("masked_lstm_sequence")
    return _lstm_case("variable_length_sequences", base.model, base.model64, base.reference_model,
                      np.random.default_rng(28), 5, 8)


# -- 14. GRU without mask, mse
def gru(dt, last_activation=None):
    x = _float_input((4, 2), dt, "series")
    h = keras.layers.GRU(3, name="gru")(x)
    out = keras.layers.Dense(2, activation=last_activation, name="out")(h)
    return keras.Model(x, out, name="gru")


def case_gru():
    model, model64, ref = _pair(gru, 15)
    rng = np.random.default_rng(25)
    n = 8
    return Case("gru_mse", model, model64, ref, LOSSES["mse"], [rng.normal(size=(n, 4, 2))],
                [rng.normal(size=(n, 2))], _weights(rng, n), pfor=False)


# -- 15. mixed precision
def case_mixed(policy_name):
    """The residual MLP built under a mixed policy: the same seed gives the same (float32)
    variables, so its float64 reference is the residual MLP's (``reference_of``)."""
    case = case_residual_mlp(mixed=policy_name, name=f"mixed_precision_{policy_name}")
    assert case.model.layers[1].compute_dtype != "float32"  # really built mixed
    assert case.model.layers[1].variable_dtype == "float32"
    case.reference_of = "residual_mlp_layernorm"
    return case


# -- 17. grouped convolution (TensorFlow 2.21's pfor Jacobian of it is silently wrong)
def grouped_conv(dt, last_activation=None):
    x = _float_input((5, 5, 4), dt, "image")
    h = keras.layers.Conv2D(4, 3, groups=2, activation="tanh", name="grouped")(x)
    h = keras.layers.Flatten()(h)
    out = keras.layers.Dense(3, activation=last_activation, name="out")(h)
    return keras.Model(x, out, name="grouped_conv")


def case_grouped_conv():
    model, model64, ref = _pair(grouped_conv, 17)
    rng = np.random.default_rng(27)
    n = 6
    # The reference's Hessian by TensorFlow's while_loop Jacobian: pfor is what is under test.
    return Case("grouped_conv2d", model, model64, ref, LOSSES["sparse_ce_logits"], [rng.normal(size=(n, 5, 5, 4))],
                [rng.integers(0, 3, n)], _weights(rng, n), pfor=False)


# -- 18. preprocessing layers whose state set_weights does not carry (adapted Normalization,
# StringLookup vocabulary, Discretization boundaries); the reference is built with that state
# given explicitly (mean/variance, vocabulary, boundaries), not through the engine's copy.
PREPROCESSING_WORDS = np.array(["ant", "bee", "cat", "dog", "eel", "fox"])


def preprocessing(dt, state=None, mixed=False):
    x = keras.Input((4,), dtype=dt, name="x")
    words = keras.Input((1,), dtype="string", name="words")
    if state is None:  # adapted later
        norm, bins = keras.layers.Normalization(name="norm"), keras.layers.Discretization(num_bins=4, name="bins")
        lookup = keras.layers.StringLookup(name="lookup")
    else:
        norm = keras.layers.Normalization(mean=state["mean"], variance=state["variance"], name="norm")
        bins = keras.layers.Discretization(bin_boundaries=state["boundaries"], name="bins")
        lookup = keras.layers.StringLookup(vocabulary=state["vocabulary"], name="lookup")
    h = keras.layers.Dense(5, activation="tanh", name="h")(norm(x))
    b = keras.layers.Flatten()(keras.layers.Embedding(4, 2, name="bin_embed")(bins(x)))
    w = keras.layers.Flatten()(keras.layers.Embedding(len(PREPROCESSING_WORDS) + 1, 2, name="word_embed")(lookup(words)))
    h = keras.layers.Concatenate()([h, b, w])
    out = keras.layers.Dense(3, name="out", **({"dtype": "float32"} if mixed else {}))(h)
    return keras.Model([x, words], out, name="preprocessing")


def case_preprocessing(policy="float32", name="preprocessing_state_float64"):
    rng = np.random.default_rng(31)
    n = 10
    # float32 values: the adapted bin boundaries are quantiles of these very numbers, and a
    # float32 run must put each value in the bin the float64 reference puts it in.
    x = rng.normal(2.0, 3.0, size=(n, 4)).astype(np.float32).astype(np.float64)
    words = rng.choice(PREPROCESSING_WORDS, size=(n, 1))
    keras.utils.set_random_seed(31)
    with _Policy(policy):
        model = preprocessing("float32", mixed=policy != "float32")
    model.get_layer("norm").adapt(x.astype(np.float32))
    model.get_layer("bins").adapt(x.astype(np.float32))
    model.get_layer("lookup").adapt(words)
    norm = model.get_layer("norm")
    state = {"mean": np.asarray(norm.adapt_mean, np.float64), "variance": np.asarray(norm.adapt_variance, np.float64),
             "boundaries": list(model.get_layer("bins").bin_boundaries),
             "vocabulary": model.get_layer("lookup").get_vocabulary()[1:]}  # without the OOV token
    with _Policy("float64"):
        reference = preprocessing("float64", state)
    for layer in ("h", "bin_embed", "word_embed", "out"):
        reference.get_layer(layer).set_weights([np.asarray(w, np.float64) for w in model.get_layer(layer).get_weights()])
    assert model.layers[-1].compute_dtype == "float32" and (policy == "float32") == (
        model.get_layer("h").compute_dtype == "float32")
    return Case(name, model, reference, reference, LOSSES["sparse_ce_logits"], [x, words],
                [rng.integers(0, 3, n)], _weights(rng, n))


# -- 16. subclassed model with a builder
class ZooSubclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.d1 = keras.layers.Dense(8, activation="tanh", name="d1")
        self.d2 = keras.layers.Dense(8, activation="tanh", name="d2")
        self.d3 = keras.layers.Dense(3, name="d3")

    def call(self, x, training=False):
        h = self.d1(x)
        h = h + self.d2(h)
        return self.d3(h)


def build_subclassed():
    """A fresh, built ZooSubclassed in the current dtype policy (the engine's builder)."""
    model = ZooSubclassed(name="zoo_subclassed")
    dt = keras.config.dtype_policy().variable_dtype
    model(np.zeros((1, 5), dtype=dt))
    return model


def case_subclassed():
    keras.utils.set_random_seed(16)
    with _Policy("float32"):
        model = build_subclassed()
    with _Policy("float64"):
        model64 = build_subclassed()
    model64.set_weights(model.get_weights())
    rng = np.random.default_rng(26)
    n = 10
    return Case("subclassed_with_builder", model, model64, model64, LOSSES["sparse_ce_logits"],
                [rng.normal(size=(n, 5))], [rng.integers(0, 3, n)], _weights(rng, n), builder=build_subclassed)


# -- 20. a stateful SimpleRNN (turn 4): Keras carries its state between calls; the engine
# computes every example from a zero state (contract 1), so the reference is its stateless twin.
def stateful_rnn(dt, stateful, batch):
    x = keras.Input((4, 2), batch_size=batch if stateful else None, dtype=dt, name="series")
    h = keras.layers.SimpleRNN(3, stateful=stateful, name="rnn")(x)
    return keras.Model(x, keras.layers.Dense(2, activation="tanh", name="out")(h), name="stateful")


def case_stateful_rnn():
    n = 8
    keras.utils.set_random_seed(30)
    with _Policy("float32"):
        model = stateful_rnn("float32", True, n)
    rng = np.random.default_rng(31)
    x = rng.normal(size=(n, 4, 2))
    model(x.astype(np.float32))  # a state Keras carries into the next call, as a used model has
    with _Policy("float64"):
        model64 = stateful_rnn("float64", False, n)
        model64.set_weights(model.get_weights())
    return Case("stateful_rnn", model, model64, model64, LOSSES["mse"], [x], [rng.normal(size=(n, 2))],
                _weights(rng, n), pfor=False)


# -- 21. an int8-quantized Dense first (turn 4): Keras quantizes its inputs per row and divides
# the int8 product by both scales. The reference writes that forward pass out by hand in float64
# from the int8 kernel and its scale (the layer's inputs are data: no straight-through gradient).
def int8_first(dt, last_activation=None):
    x = _float_input((5,), dt, "x")
    h = keras.layers.Dense(4, activation="tanh", name="quantized")(x)
    return keras.Model(x, keras.layers.Dense(3, name="head")(h), name="int8_first")


class Int8Reference(keras.Model):
    """``int8_first`` with its quantized Dense computed by hand in float64."""

    def __init__(self, kernel, kernel_scale, bias, head):
        super().__init__(dtype="float64")
        self.kernel = tf.constant(kernel, tf.float64)
        self.kernel_scale = tf.constant(kernel_scale, tf.float64)
        self.bias = self.add_weight(shape=bias.shape, dtype="float64", name="bias")
        self.bias.assign(bias)
        self.head = head

    def call(self, x, training=False):
        scale = 127.0 / (tf.reduce_max(tf.abs(x), axis=-1, keepdims=True) + 1e-7)
        quantized = tf.clip_by_value(tf.round(x * scale), -127.0, 127.0)
        return self.head(tf.tanh(quantized @ self.kernel / (self.kernel_scale * scale) + self.bias))


def case_int8():
    keras.utils.set_random_seed(32)
    with _Policy("float32"):
        model = int8_first("float32")
    model.get_layer("quantized").quantize("int8")
    layer = model.get_layer("quantized")
    with _Policy("float64"):
        model64 = int8_first("float64")
        model64.get_layer("quantized").quantize("int8")
        model64.set_weights(model.get_weights())
        head = keras.layers.Dense(3, name="head")
        head.build((None, 4))
        head.set_weights(model.get_layer("head").get_weights())
        reference = Int8Reference(np.asarray(layer._kernel), np.asarray(layer.kernel_scale), np.asarray(layer.bias),
                                  head)
    # The reference's trainable variables in the model's order: quantized/bias, head/kernel, head/bias.
    assert [v.path for v in model.trainable_variables] == ["quantized/bias", "head/kernel", "head/bias"]
    rng = np.random.default_rng(33)
    n = 8
    return Case("int8_dense", model, model64, reference, LOSSES["sparse_ce_logits"], [rng.normal(size=(n, 5))],
                [rng.integers(0, 3, n)], _weights(rng, n))


CASES = {
    "residual_mlp_layernorm": case_residual_mlp,
    "cnn_batchnorm_dropout_pool": case_cnn_batchnorm,
    "separable_depthwise_conv": case_separable,
    "transformer_block": case_transformer,
    "frozen_and_shared_layer": case_frozen_shared,
    "two_inputs_two_outputs": case_two_in_two_out,
    "dict_inputs": case_dict_inputs,
    "dict_outputs": case_dict_outputs,
    "softmax_sparse_ce_saturated": case_softmax_saturated,
    "sigmoid_binary_ce_saturated": case_sigmoid_saturated,
    **{f"loss_{k}": (lambda k=k: case_loss_family(k)) for k in
       ["sparse_ce_logits", "categorical_ce_logits", "categorical_ce_probs", "binary_ce_logits", "mse", "huber",
        "user"]},
    "binary_ce_labels_N_output_Nx1": case_binary_scalar_labels,
    "sparse_ce_labels_Nx1": case_sparse_column_labels,
    "masked_lstm_sequence": case_masked_lstm,
    "gru_mse": case_gru,
    "mixed_precision_mixed_float16": lambda: case_mixed("mixed_float16"),
    "mixed_precision_mixed_bfloat16": lambda: case_mixed("mixed_bfloat16"),
    "subclassed_with_builder": case_subclassed,
    "variable_length_sequences": case_variable_length,
    "grouped_conv2d": case_grouped_conv,
    "sigmoid_binary_focal_saturated": case_focal_saturated,
    "preprocessing_state_float64": case_preprocessing,
    "mixed_float16_preprocessing_state": lambda: case_preprocessing("mixed_float16",
                                                                    "mixed_float16_preprocessing_state"),
    "stateful_rnn": case_stateful_rnn,
    "int8_dense": case_int8,
}

_CASES: dict = {}
_REFERENCES: dict = {}


def get_case(name) -> Case:
    if name not in _CASES:
        _CASES[name] = CASES[name]()
    return _CASES[name]


# ----------------------------------------------------------------------------- the reference

def _flat(tensors):
    return tf.concat([tf.reshape(tf.convert_to_tensor(t), [-1]) for t in tensors], 0)


def reference(case: Case, inputs=None, labels=None, weights=None) -> SimpleNamespace:
    """Dense float64 sums over the batch: loss, gradient, Hessian, Fisher and GGN diagonals."""
    inputs = case.inputs if inputs is None else inputs
    labels = case.labels if labels is None else labels
    weights = case.weights if weights is None else weights
    model = case.reference_model
    variables = list(model.trainable_variables)
    assert all(v.dtype == "float64" for v in variables)
    P = int(sum(np.prod(v.shape) for v in variables))
    x = [tf.constant(a) for a in inputs]
    y = [tf.constant(a) for a in labels]
    s = tf.constant(weights, tf.float64)

    def outputs(xs):
        outs = case.unpack_outputs(model(case.pack_inputs(list(xs)), training=False))
        assert all(o.dtype == tf.float64 for o in outs)
        return outs

    def hessian_blocks(blocks):
        return tf.concat([tf.reshape(tf.convert_to_tensor(h), [tf.shape(h)[0], -1]) for h in blocks], 1)

    @tf.function
    def whole(xs, ys):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                per = case.hand_loss(ys, outputs(xs), xs)
                total = tf.reduce_sum(s * per)
            grad = _flat(inner.gradient(total, variables))
        hess = outer.jacobian(grad, variables, experimental_use_pfor=case.pfor)
        return per, total, grad, hessian_blocks(hess)

    @tf.function
    def one(xs, ys):
        with tf.GradientTape(persistent=True) as tape:
            outs = outputs(xs)
            f = tf.concat([tf.reshape(o, [-1]) for o in outs], 0)
            li = case.hand_loss(ys, outs, xs)[0]
        g = _flat(tape.gradient(li, variables))
        J = hessian_blocks(tape.jacobian(f, variables, experimental_use_pfor=case.pfor))
        del tape
        fc = tf.identity(tf.stop_gradient(f))
        shapes = [o.shape for o in outs]
        sizes = [int(np.prod(sh)) for sh in shapes]
        with tf.GradientTape() as t2:
            t2.watch(fc)
            with tf.GradientTape() as t1:
                t1.watch(fc)
                parts = [tf.reshape(p, sh) for p, sh in zip(tf.split(fc, sizes), shapes)]
                l2 = case.hand_loss(ys, parts, xs)[0]
            d1 = t1.gradient(l2, fc)
        lam = t2.jacobian(d1, fc)
        return li, g, J, lam

    per, total, grad, hessian = (t.numpy() for t in whole(x, y))
    assert hessian.shape == (P, P)
    fisher = np.zeros(P)
    ggn = np.zeros(P)
    gradients = []
    for i in range(len(weights)):
        li, g, J, lam = (t.numpy() for t in one([t[i:i + 1] for t in x], [t[i:i + 1] for t in y]))
        np.testing.assert_allclose(li, per[i], rtol=1e-12, atol=1e-300)  # one example alone = in the batch
        fisher += weights[i] * g * g
        ggn += weights[i] * np.einsum("cp,cd,dp->p", J, lam, J)
        gradients.append(g)
    return SimpleNamespace(per_example=per, loss=float(total), gradient=grad, hessian=hessian, fisher=fisher,
                           ggn=ggn, weight_sum=float(np.sum(weights * positions(case, inputs))),
                           gradients=np.array(gradients))


def positions(case: Case, inputs=None) -> np.ndarray:
    """n_i: the unmasked positions of each example (1 each without a mask): the token-weighted
    objective divides by ``sum_i s_i n_i``."""
    inputs = case.inputs if inputs is None else inputs
    if case.mask is None:
        return np.ones(len(inputs[0]))
    return np.asarray(case.mask([tf.constant(a) for a in inputs])).reshape(len(inputs[0]), -1).sum(axis=1)


def get_reference(name) -> SimpleNamespace:
    if name not in _REFERENCES:
        case = get_case(name)
        if case.reference_of:  # shared, once the weights, batch and loss are checked equal
            other = get_case(case.reference_of)
            assert case.loss is other.loss
            for a, b in zip([*case.model.get_weights(), *case.inputs, *case.labels, case.weights],
                            [*other.model.get_weights(), *other.inputs, *other.labels, other.weights]):
                np.testing.assert_array_equal(a, b)
            _REFERENCES[name] = get_reference(case.reference_of)
        else:
            _REFERENCES[name] = reference(case)
    return _REFERENCES[name]


# ----------------------------------------------------------------------------- the engine

EVERYTHING = dict(gradient=True, hessian_diagonal="exact", ggn_diagonal="exact", sum_grad_squared=True)
CURVATURE_ONLY = dict(gradient=True, hessian_diagonal="exact")  # no per-example products


def unit_vectors(parameters, k=2, seed=5):
    v = np.random.default_rng(seed).normal(size=(k, parameters))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def run_engine(case: Case, precision, engine=None, inputs=None, labels=None, weights=None, work=None):
    """(engine, partial sums of one batch, the HVP vectors): every quantity unless ``work``."""
    from pipeline.curvature.engine import CurvatureEngine
    from pipeline.curvature.losses import resolve_loss
    from pipeline.curvature.requests import BatchWork

    inputs = case.inputs if inputs is None else inputs
    labels = case.labels if labels is None else labels
    weights = case.weights if weights is None else weights
    if engine is None:
        engine = CurvatureEngine(case.model, resolve_loss(case.loss.spec), precision=precision,
                                 builder=case.builder)
    vectors = unit_vectors(engine.parameters)
    # The full Hessian as one dense block (quantities.hessian) beside the other quantities.
    work = BatchWork(hvp_vectors=vectors, hessian_blocks=(tuple(range(len(engine.variables))),),
                     **(work or EVERYTHING))
    part = engine.partial(inputs, labels, weights, np.arange(len(weights)), work)
    return engine, part, vectors


def evaluate_losses(case: Case, inputs=None, labels=None) -> np.ndarray:
    """l_i as Keras evaluates example i alone (batch size 1, float64 loss), on the float64 copy
    of the engine's model (the softmax/sigmoid model itself, not its logits twin). With a
    sequence mask Keras gives the example's masked mean: times its n_i, the masked sum that is
    the token-weighted objective's term.

    ``model.test_on_batch`` on each example (Keras' test step on one batch of one), and
    ``model.evaluate(batch_size=1)`` on the first example to tie the two together.
    """
    inputs = case.inputs if inputs is None else inputs
    labels = case.labels if labels is None else labels
    model = case.model64
    floatx = keras.config.floatx()
    # float64 throughout: the loss tracker (a Mean metric), a function loss's wrapper, and the
    # data adapter (it casts float arrays to floatx) all follow floatx.
    keras.config.set_floatx("float64")
    try:
        model.compile(loss=case.loss.keras_loss())
        values = []
        for i in range(len(inputs[0])):
            xi = case.pack_inputs([_keras_array(a[i:i + 1]) for a in inputs])
            yi = case.pack_labels([b[i:i + 1] for b in labels])
            values.append(float(np.ravel(model.test_on_batch(xi, yi))[0]))
            if i == 0:
                evaluated = model.evaluate(xi, yi, batch_size=1, verbose=0, return_dict=True)["loss"]
                assert evaluated == values[0], (evaluated, values[0])
    finally:
        keras.config.set_floatx(floatx)
    return np.asarray(values, dtype=np.float64) * positions(case, inputs)


def _keras_array(array):
    """Text as a tf.string tensor (Keras' data adapter refuses numpy strings), else as it is."""
    return tf.constant(array.astype(object)) if np.asarray(array).dtype.kind in "OSU" else array


def evaluate_batch(case: Case) -> float:
    """Keras' ``evaluate`` over the whole batch, without weights (float64): with a mask, the
    token-weighted ``sum_it m_it l_it / sum_it m_it``."""
    floatx = keras.config.floatx()
    keras.config.set_floatx("float64")
    try:
        case.model64.compile(loss=case.loss.keras_loss())
        return float(case.model64.evaluate(case.pack_inputs([_keras_array(a) for a in case.inputs]), case.pack_labels(list(case.labels)),
                                           batch_size=len(case.weights), verbose=0, return_dict=True)["loss"])
    finally:
        keras.config.set_floatx(floatx)
