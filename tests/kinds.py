"""Models and datasets of the kinds people actually have, for end-to-end runs.

The builders are importable as ``kinds:NAME`` from a job file (tests put this folder on
``PYTHONPATH`` so the Ray workers import it too).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow as tf

VOCAB = 7
TAGS = 3


def masked_tagger(seed=0):
    """Embedding(mask_zero) -> LSTM -> per-timestep Dense: a sequence tagger on padded tokens."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    h = keras.layers.Embedding(VOCAB, 2, mask_zero=True, name="embed")(tokens)
    h = keras.layers.LSTM(2, return_sequences=True, name="lstm")(h)
    out = keras.layers.Dense(TAGS, name="tag")(h)
    return keras.Model(tokens, out, name="tagger")


def write_sequences(folder, rows=30, seed=0, files=2):
    """Variable-length token lists (no zeros inside: 0 is padding) and per-token tags."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 7, rows)
    tokens = [rng.integers(1, VOCAB, n).tolist() for n in lengths]
    tags = [rng.integers(0, TAGS, n).tolist() for n in lengths]
    os.makedirs(folder, exist_ok=True)
    for index, part in enumerate(np.array_split(np.arange(rows), files)):
        table = pa.table({"tokens": pa.array([tokens[i] for i in part], pa.list_(pa.int64())),
                          "tags": pa.array([tags[i] for i in part], pa.list_(pa.int64()))})
        pq.write_table(table, os.path.join(folder, f"part-{index}.parquet"), row_group_size=7)
    return tokens, tags


class Residual(keras.Model):
    """A subclassed model (no ``model.inputs``): a residual tanh block and a linear head."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(6, activation="tanh", name="inner")
        self.head = keras.layers.Dense(3, name="head")

    def call(self, x):
        return self.head(x + self.inner(x))


def subclassed():
    keras.utils.set_random_seed(1)
    model = Residual(name="residual")
    model(np.zeros((1, 6), dtype="float32"))  # built, so its weights can be loaded
    return model


def with_lambda():
    """A functional model with a Lambda layer: refused by safe_mode in a .keras file."""
    keras.utils.set_random_seed(2)
    x = keras.Input((6,), name="x")
    h = keras.layers.Dense(4, name="hidden")(x)
    h = keras.layers.Lambda(lambda t: tf.sin(t) * t, name="sinx")(h)
    return keras.Model(x, keras.layers.Dense(3, name="out")(h), name="lambda_model")


def unbuilt():
    return Residual(name="never_called")


def two_heads():
    """Dict outputs of equal width whose sorted keys are not the layer order."""
    keras.utils.set_random_seed(3)
    x = keras.Input((6,), name="x")
    h = keras.layers.Dense(5, activation="tanh", name="trunk")(x)
    return keras.Model(x, {"zeta": keras.layers.Dense(2, name="first")(h),
                           "alpha": keras.layers.Dense(2, name="second")(h)}, name="heads")


def text_classifier(words):
    """StringLookup on a string column -> Embedding -> Dense: fed tf.string."""
    keras.utils.set_random_seed(4)
    text = keras.Input((1,), dtype="string", name="word")
    ids = keras.layers.StringLookup(vocabulary=list(words), name="lookup")(text)
    h = keras.layers.Embedding(len(words) + 1, 3, name="embed")(ids)
    h = keras.layers.Flatten()(h)
    return keras.Model(text, keras.layers.Dense(2, name="out")(h), name="text")


def binary_head():
    """A Dense(1) sigmoid output for binary cross-entropy with a scalar label column."""
    keras.utils.set_random_seed(5)
    x = keras.Input((6,), name="x")
    h = keras.layers.Dense(4, activation="tanh", name="hidden")(x)
    return keras.Model(x, keras.layers.Dense(1, activation="sigmoid", name="p")(h), name="binary")


def picky_loss(y_true, y_pred):
    """Fails (a TensorFlow assertion) on any label above 1: a deterministic input problem."""
    tf.debugging.assert_less_equal(tf.reduce_max(y_true), tf.cast(1, y_true.dtype), message="label above 1")
    return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)


def exits():
    """A builder that calls sys.exit: must not end validate with exit status 0."""
    raise SystemExit(0)


def three_arguments(y_true, y_pred, scale):
    """A loss function whose signature Keras cannot call."""
    return scale * tf.reduce_mean(tf.square(y_pred - y_true), axis=-1)


def kink_loss(y_true, y_pred):
    """|f - y|**1.5: finite loss and gradient everywhere, an infinite second derivative where
    f == y exactly."""
    return tf.reduce_mean(tf.abs(y_pred - y_true) ** 1.5, axis=-1)


def zero_regressor():
    """Predicts 0 for every input: a label of exactly 0 sits on the kink of ``kink_loss``."""
    x = keras.Input((6,), name="x")
    return keras.Model(x, keras.layers.Dense(1, kernel_initializer="zeros", name="out")(x), name="zero")


def aborts():
    """A builder that ends its process (as a crash in native code would): no Python exception."""
    import os

    os.abort()


def warns_then_builds():
    """A builder whose model is fine but that warns as Keras does (a UserWarning): paired with
    weights that do not fit, the warning must not reach stderr beside the error line."""
    import warnings

    warnings.warn("Skipping variable loading for layer 'out': a library's own warning", UserWarning)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, name="out")])
