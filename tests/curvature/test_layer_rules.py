"""Per-layer rules for the Fisher and GGN diagonals (``pipeline.curvature.layer_rules``) give the
numbers of the per-example route, and are refused per layer where they would be wrong.

The per-example route (``layer_rule=False``) is itself checked against dense references by the
model zoo (``tests/zoo``), which runs with the rules on."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.curvature.engine import CurvatureEngine
from pipeline.curvature.layer_rules import Taps, find_rules
from pipeline.curvature.losses import resolve_loss
from pipeline.curvature.requests import BatchWork
from pipeline.job import LossSpec

WORK = BatchWork(sum_grad_squared=True, ggn_diagonal="exact")
MC = BatchWork(ggn_diagonal="mc", ggn_samples=2, seed=3)


def _loss():
    return resolve_loss(LossSpec(name="sparse_categorical_crossentropy", options={"from_logits": True}, function=None))


def convolutions():
    """Strided 'same', dilated 'valid' and 1-D convolutions, a Dense on a rank-3 input."""
    keras.utils.set_random_seed(1)
    x = keras.Input((11, 12, 3))
    h = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="strided")(x)
    h = keras.layers.Conv2D(3, (2, 3), dilation_rate=(1, 2), activation="tanh", name="dilated")(h)  # [5, 2, 3]
    h = keras.layers.Reshape((5 * 2, 3))(h)
    h = keras.layers.Conv1D(5, 3, strides=2, padding="same", activation="tanh", name="conv1d")(h)
    h = keras.layers.Dense(4, activation="tanh", name="per_position")(h)  # [B, 5, 4]
    h = keras.layers.GlobalAveragePooling1D()(h)
    out = keras.layers.Dense(3, name="out")(h)
    return keras.Model(x, out), [np.random.default_rng(0).normal(size=(6, 11, 12, 3))]


class TiedOutput(keras.layers.Layer):
    """Logits by the transposed embedding matrix: the Embedding's variable is used twice."""

    def __init__(self, embedding, **kwargs):
        super().__init__(**kwargs)
        self.embedding = embedding

    def call(self, h):
        return tf.matmul(h, self.embedding.embeddings, transpose_b=True)


class FoldedDense(keras.layers.Layer):
    """A Dense applied to the positions folded into the batch axis: its rows are not examples."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(units, activation="tanh", name="rows")

    def call(self, h):
        shape = tf.shape(h)
        out = self.dense(tf.reshape(h, [-1, h.shape[-1]]))
        return tf.reshape(out, [shape[0], shape[1], out.shape[-1]])


def sequences():
    """Embedding with repeated ids, LayerNormalization over two axes, TimeDistributed (Keras
    calls its Dense once per position), a Dense on positions folded into the batch axis, a
    BatchNormalization over the positions (not the last axis); a second Embedding tied to the
    output."""
    keras.utils.set_random_seed(2)
    tokens = keras.Input((5,), dtype="int32")
    e = keras.layers.Embedding(7, 4, name="embed")(tokens)
    h = keras.layers.Dense(6, activation="tanh", name="dense3d")(e)
    h = keras.layers.LayerNormalization(axis=[-2, -1], name="ln2")(h)
    h = keras.layers.TimeDistributed(keras.layers.Dense(4, activation="tanh", name="inner"), name="td")(h)
    h = FoldedDense(3, name="folded")(h)
    h = keras.layers.BatchNormalization(axis=1, name="bn_first")(h)  # over the 5 positions
    h = keras.layers.Flatten()(h)
    tied = keras.layers.Embedding(7, 15, name="tied")
    tied(tokens)  # builds it (its output is not used)
    out = TiedOutput(tied, name="logits")(h)
    model = keras.Model(tokens, out)
    bn = model.get_layer("bn_first")
    bn.moving_mean.assign(np.linspace(-0.2, 0.3, 5))
    bn.moving_variance.assign(np.linspace(0.5, 1.5, 5))
    ids = np.random.default_rng(1).integers(0, 7, size=(8, 5))
    return model, [ids]


def _built(build, precision):
    """The model built under a ``precision`` policy (the engine then uses it as it is; a custom
    layer like ``TiedOutput`` cannot be copied), float32 with the float64 model's weights."""
    previous, previous_floatx = keras.config.dtype_policy(), keras.config.floatx()
    keras.config.set_dtype_policy("float64")
    keras.config.set_floatx("float64")
    try:
        model, inputs = build()
    finally:
        keras.config.set_floatx(previous_floatx)
        keras.config.set_dtype_policy(previous)
    if precision == "float32":
        weights = model.get_weights()
        model, _ = build()
        model.set_weights([w.astype(np.float32) for w in weights])
    return model, inputs


def _sums(build, precision, work, layer_rule):
    model, inputs = _built(build, precision)
    labels = [np.random.default_rng(4).integers(0, model.output.shape[-1], size=len(inputs[0]))]
    weights = np.random.default_rng(5).uniform(0.5, 2.0, size=len(inputs[0]))
    engine = CurvatureEngine(model, _loss(), precision=precision, layer_rule=layer_rule, vjp_budget=4096)
    part = engine.partial(inputs, labels, weights, np.arange(len(weights)), work)
    return engine, part.sums, inputs


@pytest.mark.parametrize("build", [convolutions, sequences])
def test_layer_rules_give_the_per_example_numbers_in_float64_and_float32(build):
    engine, ruled, inputs = _sums(build, "float64", WORK, True)
    _, plain, _ = _sums(build, "float64", WORK, False)
    for key in ("sum_grad_squared", "ggn_diagonal"):
        np.testing.assert_allclose(ruled[key], plain[key], rtol=1e-10, atol=1e-13 * np.abs(plain[key]).max())
    _, single, _ = _sums(build, "float32", WORK, True)
    for key in ("sum_grad_squared", "ggn_diagonal"):
        np.testing.assert_allclose(single[key], plain[key], rtol=2e-3, atol=1e-5 * np.abs(plain[key]).max())
    # Monte Carlo GGN: the same draws, and the moment sums behind its standard error.
    _, ruled_mc, _ = _sums(build, "float64", MC, True)
    _, plain_mc, _ = _sums(build, "float64", MC, False)
    for key in ("ggn_mc", "ggn_mc_w2q", "ggn_mc_w2q2"):
        np.testing.assert_allclose(ruled_mc[key], plain_mc[key], rtol=1e-10, atol=1e-13 * np.abs(plain_mc[key]).max())
    assert engine.layer_routes(inputs)  # decided once, on the first batch


def test_each_variable_takes_the_rule_only_where_it_is_right():
    engine, _, inputs = _sums(convolutions, "float64", BatchWork(sum_grad_squared=True), True)
    assert set(engine.layer_routes(inputs).values()) == {"layer rule"}
    # The convolutions and the Dense on [B, 5, 4] form per-example gradients; the last Dense does not.
    assert [rule.materialises for rule in engine.layers.rules] == [True, True, True, True, False]

    engine, _, inputs = _sums(sequences, "float64", BatchWork(sum_grad_squared=True), True)
    routes = engine.layer_routes(inputs)
    assert routes["embed/embeddings"] == routes["dense3d/kernel"] == routes["ln2/gamma"] == "layer rule"
    assert routes["bn_first/gamma"] == routes["bn_first/beta"] == "layer rule"  # not on the last axis
    assert routes["td/inner/kernel"] == "layer rule"  # five calls, their gradients summed
    # The folded Dense sees [B * T, n] rows (rows are not examples); the tied Embedding's matrix
    # is also used by another layer: the per-example route for each.
    folded = [name for name in routes if name.startswith("folded/")]
    assert len(folded) == 2 and {routes[name] for name in folded + ["tied/embeddings"]} == {"per-example"}, routes


def test_layer_rules_cover_only_the_selected_variables():
    model, inputs = convolutions()
    labels = [np.zeros(len(inputs[0]), dtype=np.int64)]
    engine = CurvatureEngine(model, _loss(), precision="float64", selected=["strided/*", "out/kernel"])
    part = engine.partial(inputs, labels, None, np.arange(len(labels[0])), BatchWork(sum_grad_squared=True))
    reference = CurvatureEngine(model, _loss(), precision="float64", layer_rule=False)
    full = reference.partial(inputs, labels, None, np.arange(len(labels[0])), BatchWork(sum_grad_squared=True))
    names = list(reference.names)
    offsets = np.concatenate([[0], np.cumsum(reference.sizes)])
    picked = np.concatenate([np.arange(offsets[names.index(n)], offsets[names.index(n) + 1])
                             for n in engine.names])
    assert engine.names == ["strided/kernel", "strided/bias", "out/kernel"]
    np.testing.assert_allclose(part.sums["sum_grad_squared"], full.sums["sum_grad_squared"][picked], rtol=1e-10)


def test_taps_leave_the_model_as_it_was_even_when_the_call_fails():
    model, inputs = convolutions()
    before = model(inputs[0]).numpy()
    rules = find_rules(model, [v.path for v in model.trainable_variables])
    with pytest.raises(ValueError):
        with Taps(rules):
            rules[0].layer(np.zeros((1, 11, 12, 5)))  # 5 channels, not 3: Keras refuses it
    assert all("call" not in vars(rule.layer) for rule in rules)
    np.testing.assert_array_equal(model(inputs[0]).numpy(), before)


# ------------------------------------------------------------------ models that must not take a rule
class TimeMajorDense(keras.layers.Layer):
    """A Dense applied to the time-major tensor [T, B, n]: its rows are positions."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(units, activation="tanh", name="inner")

    def call(self, h):
        return tf.transpose(self.dense(tf.transpose(h, [1, 0, 2])), [1, 0, 2])


class GatedTied(keras.layers.Layer):
    """Another layer's kernel, read again, times a gate column (zero on the first rows)."""

    def __init__(self, other, **kwargs):
        super().__init__(**kwargs)
        self.other = other

    def call(self, h, gate):
        return gate * tf.matmul(h, self.other.kernel)


class Center(keras.layers.Layer):
    """Subtracts the batch mean: an example's output depends on its batch."""

    def call(self, h):
        return h - tf.reduce_mean(h, axis=0, keepdims=True)


def time_major():
    keras.utils.set_random_seed(5)
    x = keras.Input((4, 3))  # T = 4: as many positions as the first rows a check might use
    h = keras.layers.Flatten()(TimeMajorDense(5, name="tmd")(x))
    return keras.Model(x, keras.layers.Dense(3, name="out")(h)), [np.random.default_rng(0).normal(size=(7, 4, 3))]


def tied_behind_a_gate():
    keras.utils.set_random_seed(7)
    x, gate = keras.Input((4,)), keras.Input((1,))
    first = keras.layers.Dense(4, activation="tanh", name="d1")
    h = first(x)
    h = h + GatedTied(first, name="tied")(h, gate)
    gates = np.random.default_rng(1).uniform(0.5, 1.5, size=(7, 1))
    gates[:5] = 0.0  # the second use has no gradient on the rows the check sees
    model = keras.Model([x, gate], keras.layers.Dense(3, name="out")(h))
    return model, [np.random.default_rng(0).normal(size=(7, 4)), gates]


def batch_mixing():
    keras.utils.set_random_seed(6)
    x = keras.Input((4,))
    h = Center()(keras.layers.Dense(5, activation="tanh", name="d1")(x))
    return keras.Model(x, keras.layers.Dense(3, name="out")(h)), [np.random.default_rng(0).normal(size=(7, 4))]


@pytest.mark.parametrize("build,refused", [(time_major, "tmd/"), (tied_behind_a_gate, "d1/"), (batch_mixing, "")],
                         ids=["rows-are-positions", "tied-weight-without-gradient-on-first-rows", "batch-mixing"])
def test_a_rule_that_would_be_wrong_is_refused_whatever_the_first_rows(build, refused):
    """Found by a hostile trial: each gave silently wrong numbers (25-70%) before the check ran
    on two batch sizes, read the traced graph for other uses of a variable, and tested that an
    example's output does not depend on its batch."""
    engine, ruled, inputs = _sums(build, "float64", WORK, True)
    _, plain, _ = _sums(build, "float64", WORK, False)
    routes = engine.layer_routes(inputs)
    assert {how for name, how in routes.items() if name.startswith(refused)} == {"per-example"}, routes
    if refused:
        assert routes["out/kernel"] == "layer rule"
    for key in ("sum_grad_squared", "ggn_diagonal"):
        np.testing.assert_allclose(ruled[key], plain[key], rtol=1e-10, atol=1e-13 * np.abs(plain[key]).max())


def test_the_fisher_with_extreme_weights_stays_finite_in_float32():
    """The one-pass Fisher forms (s_i dz_i)**2 / s_i: out of float32's range it is not used."""
    model, inputs = convolutions()
    labels = [np.zeros(len(inputs[0]), dtype=np.int64)]
    for scale in (1e-25, 1e25):
        weights = np.random.default_rng(2).uniform(0.5, 2.0, size=len(labels[0])) * scale
        got = [CurvatureEngine(model, _loss(), layer_rule=rule).partial(
            inputs, labels, weights, np.arange(len(weights)), BatchWork(sum_grad_squared=True)).sums["sum_grad_squared"]
            for rule in (True, False)]
        assert np.all(np.isfinite(got[0])) and np.abs(got[0]).max() > 0
        np.testing.assert_allclose(got[0], got[1], rtol=1e-3, atol=1e-5 * np.abs(got[1]).max())
