"""``ModelAdapter`` and ``KerasLoss``: per-example losses against Keras' loss functions called
directly on the model's outputs; the logits read behind a softmax; label ranks; float64; masks
(the token-weighted sum and its counts); input structures and the model's signature."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest
import tensorflow as tf

import cases
from pipeline.curvature.adapter import KerasLoss, ModelAdapter, model_signature
from pipeline.curvature.losses import PerExampleLoss
from pipeline.errors import InputError


def _x(model, n=6, seed=1):
    inputs, _, _ = cases.batch_for(model, n=n, seed=seed)
    return [tf.constant(a) for a in inputs]


def test_sparse_cross_entropy_per_example_as_keras_computes_it():
    model = cases.mlp()
    adapter = ModelAdapter(model, cases.resolved("sparse_categorical_crossentropy", from_logits=True), tf.float64)
    x = _x(model)
    y = np.array([0, 2, 1, 1, 0, 2])
    outputs, masks = adapter.forward(x)
    assert masks == [None] and adapter.masked is False and adapter.logit_outputs == (False,)
    got = adapter.per_example_loss([y], outputs, masks)
    expected = keras.losses.sparse_categorical_crossentropy(y, model(x[0]), from_logits=True)
    assert got.dtype == tf.float64 and tuple(got.shape) == (6,)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-13)
    np.testing.assert_array_equal(adapter.loss_of_inputs(x, [y]).numpy(), got.numpy())
    assert adapter.position_counts([y], outputs, masks) is None


def test_a_float64_model_gets_a_float64_loss():
    """A Keras ``Loss`` object would compute in float32 (PITFALLS.md): errors ~1e-7, not ~1e-16."""
    model = cases.mlp()
    adapter = ModelAdapter(model, cases.resolved("mse"), tf.float64)
    x = _x(model)
    y = np.random.default_rng(2).normal(size=(6, 3))
    got = adapter.loss_of_inputs(x, [y]).numpy()
    expected = np.mean((model(x[0]).numpy() - y) ** 2, axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-14)
    as_keras_does = keras.losses.MeanSquaredError(reduction=None)(y, model(x[0])).numpy()
    assert np.abs(as_keras_does - expected).max() > 1e-12  # the float32 a Loss object would give


def test_softmax_outputs_are_read_as_their_logits():
    model = cases.mlp(activation="softmax")
    twin = cases.mlp()  # the same weights with a linear output: its outputs are the logits
    twin.set_weights(model.get_weights())
    adapter = ModelAdapter(model, cases.resolved("sparse_categorical_crossentropy"), tf.float64)
    x = _x(model)
    y = np.array([0, 1, 2, 0, 1, 2])
    outputs, masks = adapter.forward(x)
    assert adapter.logit_outputs == (True,)
    np.testing.assert_allclose(outputs[0].numpy(), twin(x[0]).numpy(), rtol=1e-12)
    probabilities = model(x[0]).numpy()
    expected = -np.log(probabilities[np.arange(6), y])
    np.testing.assert_allclose(adapter.per_example_loss([y], outputs, masks).numpy(), expected, rtol=1e-10)


def test_a_saturated_softmax_is_not_clipped():
    """Probabilities of 1e-30 are clipped to 1e-7 by a cross-entropy on probabilities: the loss
    taken at the logits keeps the example's true, large loss (and its curvature)."""
    model = cases.mlp(activation="softmax")
    kernel, bias = model.get_layer("out").get_weights()
    model.get_layer("out").set_weights([kernel * 200.0, bias])
    twin = cases.mlp()
    twin.set_weights(model.get_weights())
    adapter = ModelAdapter(model, cases.resolved("sparse_categorical_crossentropy"), tf.float64)
    x = _x(model)
    logits = twin(x[0])
    y = np.argmin(logits.numpy(), axis=1)  # the least likely class of each row
    got = adapter.loss_of_inputs(x, [y]).numpy()
    expected = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True).numpy()
    assert expected.max() > 30  # beyond -log(1e-7) = 16.1, where clipping would stop it
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_a_sigmoid_output_is_read_as_its_logits():
    model = cases.mlp(activation="sigmoid")
    twin = cases.mlp()
    twin.set_weights(model.get_weights())
    adapter = ModelAdapter(model, cases.resolved("binary_crossentropy"), tf.float64)
    x = _x(model)
    y = (np.random.default_rng(0).uniform(size=(6, 3)) > 0.5).astype(np.float64)
    got = adapter.loss_of_inputs(x, [y]).numpy()
    assert adapter.logit_outputs == (True,)
    expected = keras.losses.binary_crossentropy(y, twin(x[0]), from_logits=True).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def _focal(activation, name, labels, compiled):
    """The adapter's per-example focal loss on a softmax/sigmoid model, and Keras' on its output."""
    model = cases.mlp(activation=activation)
    adapter = ModelAdapter(model, cases.resolved(name), tf.float64)
    x = _x(model)
    if compiled:
        got = tf.function(lambda a, b: adapter.loss_of_inputs([a], [b]))(x[0], tf.constant(labels)).numpy()
    else:
        got = adapter.loss_of_inputs(x, [labels]).numpy()
    return got, getattr(keras.losses, name)(labels, model(x[0])).numpy(), adapter.logit_outputs


ONE_HOT = np.eye(3)[[0, 1, 2, 0, 1, 2]]
BITS = (np.random.default_rng(0).uniform(size=(6, 3)) > 0.5).astype(np.float64)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_focal_loss_on_a_softmax_is_kerass_own(compiled):
    """Other Keras cross-entropies read the logits behind the softmax too, and compute other terms
    from the probabilities: the adapter applies the loss to a fresh softmax that carries them."""
    got, expected, flags = _focal("softmax", "categorical_focal_crossentropy", ONE_HOT, compiled)
    assert flags == ("Softmax",)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_a_focal_loss_on_a_sigmoid_is_kerass_own_when_compiled():
    got, expected, flags = _focal("sigmoid", "binary_focal_crossentropy", BITS, compiled=True)
    assert flags == ("Sigmoid",)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_a_focal_loss_on_a_sigmoid_is_kerass_own_when_eager():
    got, expected, flags = _focal("sigmoid", "binary_focal_crossentropy", BITS, compiled=False)
    np.testing.assert_allclose(got, expected, rtol=1e-12)  # off by up to ~0.15 on this batch
    assert flags == ("Sigmoid",)


def test_a_user_function_gets_the_output_as_it_is():
    model = cases.mlp(activation="softmax")

    def first_probability(label, output):
        return output[:, 0]

    adapter = ModelAdapter(model, PerExampleLoss(first_probability, "first", {}, None, True), tf.float64)
    x = _x(model)
    outputs, masks = adapter.forward(x)
    assert adapter.logit_outputs == (False,)
    np.testing.assert_allclose(adapter.per_example_loss([np.zeros(6)], outputs, masks).numpy(),
                               model(x[0]).numpy()[:, 0], rtol=1e-14)


def _binary_model():
    keras.utils.set_random_seed(3)
    with cases._Policy("float64"):
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="out")], name="binary")


def test_a_label_column_of_rank_one_beside_an_output_of_width_one():
    """``keras.losses.binary_crossentropy`` refuses labels [B] with an output [B, 1] (PITFALLS.md);
    ``model.fit`` reconciles them, and so does the adapter."""
    model = _binary_model()
    adapter = ModelAdapter(model, cases.resolved("binary_crossentropy", from_logits=True), tf.float64)
    x = _x(model)
    y = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    got = adapter.loss_of_inputs(x, [y]).numpy()
    expected = keras.losses.binary_crossentropy(y[:, None], model(x[0]), from_logits=True).numpy()
    assert got.shape == (6,)
    np.testing.assert_allclose(got, expected, rtol=1e-13)


def test_sparse_labels_stored_with_a_trailing_one():
    model = cases.mlp()
    adapter = ModelAdapter(model, cases.resolved("sparse_categorical_crossentropy", from_logits=True), tf.float64)
    x = _x(model)
    y = np.array([0, 2, 1, 1, 0, 2])
    np.testing.assert_allclose(adapter.loss_of_inputs(x, [y[:, None]]).numpy(),
                               adapter.loss_of_inputs(x, [y]).numpy(), rtol=1e-15)


def test_several_outputs_sum_their_losses():
    model = cases.two_outputs()
    adapter = ModelAdapter(model, cases.resolved("mse"), tf.float64)
    x = _x(model)
    rng = np.random.default_rng(0)
    y = [rng.normal(size=(6, 2)), rng.normal(size=(6, 1))]
    outputs, masks = adapter.forward(x)
    first, second = model(x[0])
    each = adapter.output_losses(y, outputs, masks)
    np.testing.assert_allclose(each[0].numpy(), np.mean((first.numpy() - y[0]) ** 2, axis=1), rtol=1e-14)
    np.testing.assert_allclose(each[1].numpy(), (second.numpy() - y[1])[:, 0] ** 2, rtol=1e-14)
    np.testing.assert_allclose(adapter.per_example_loss(y, outputs, masks).numpy(),
                               (each[0] + each[1]).numpy(), rtol=1e-15)


def _masked_model(dtype="float64"):
    keras.utils.set_random_seed(5)
    with cases._Policy(dtype):
        tokens = keras.Input((5,), dtype="int32", name="tokens")
        h = keras.layers.Embedding(7, 4, mask_zero=True, name="embed")(tokens)
        out = keras.layers.Dense(3, name="out")(h)
        return keras.Model(tokens, out, name="tagger")


TOKENS = np.array([[3, 1, 4, 0, 0], [2, 6, 5, 1, 3], [1, 0, 0, 0, 0], [4, 4, 0, 2, 0]], np.int32)
TAGS = np.array([[0, 1, 2, 0, 0], [2, 2, 1, 0, 1], [1, 0, 0, 0, 0], [0, 1, 2, 2, 0]])


def test_a_masked_output_sums_its_unmasked_positions_and_counts_them():
    model = _masked_model()
    adapter = ModelAdapter(model, cases.resolved("sparse_categorical_crossentropy", from_logits=True), tf.float64)
    outputs, masks = adapter.forward([tf.constant(TOKENS)])
    assert adapter.masked is True and masks[0] is not None
    mask = TOKENS != 0
    np.testing.assert_array_equal(masks[0].numpy(), mask)
    per_token = keras.losses.sparse_categorical_crossentropy(TAGS, model(TOKENS), from_logits=True).numpy()
    np.testing.assert_allclose(adapter.per_example_loss([TAGS], outputs, masks).numpy(),
                               (per_token * mask).sum(axis=1), rtol=1e-13)
    np.testing.assert_array_equal(adapter.position_counts([TAGS], outputs, masks).numpy(), mask.sum(axis=1))
    # Without the mask, the mean over every position (Keras' reduction), padding included.
    loss = KerasLoss(adapter.loss, tf.float64)
    np.testing.assert_allclose(loss.per_example_loss([TAGS], outputs, [None], adapter.logit_outputs).numpy(),
                               per_token.mean(axis=1), rtol=1e-13)
    assert loss.output_losses([TAGS], outputs, [None], counts=True)[0].numpy().tolist() == [1, 1, 1, 1]


def test_the_token_weighted_objective_is_what_keras_evaluate_returns():
    model = _masked_model()
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64"))
    adapter = ModelAdapter(model, cases.resolved("sparse_categorical_crossentropy", from_logits=True), tf.float64)
    outputs, masks = adapter.forward([tf.constant(TOKENS)])
    total = adapter.per_example_loss([TAGS], outputs, masks).numpy().sum()
    count = adapter.position_counts([TAGS], outputs, masks).numpy().sum()
    # Keras' loss tracker averages in float32.
    assert total / count == pytest.approx(model.evaluate(TOKENS, TAGS, batch_size=4, verbose=0), rel=1e-6)
    # The check can fail: the plain mean over every position, padding included, is another number.
    per_token = keras.losses.sparse_categorical_crossentropy(TAGS, model(TOKENS), from_logits=True).numpy()
    assert abs(per_token.mean() - total / count) > 1e-3


def test_a_masked_output_beside_another_is_refused():
    keras.utils.set_random_seed(5)
    with cases._Policy("float64"):
        tokens = keras.Input((5,), dtype="int32", name="tokens")
        h = keras.layers.Embedding(7, 4, mask_zero=True, name="embed")(tokens)
        tags = keras.layers.Dense(3, name="tags")(h)
        summary = keras.layers.Dense(2, name="summary")(keras.layers.GlobalAveragePooling1D()(h))
        model = keras.Model(tokens, [tags, summary])
    adapter = ModelAdapter(model, cases.resolved("mse"), tf.float64)
    with pytest.raises(InputError, match=r"output\(s\) \['tags'\] carry a sequence mask beside other outputs"):
        adapter.forward([tf.constant(TOKENS)])


def test_inputs_are_packed_as_the_model_was_built():
    listed = cases.two_inputs()
    adapter = ModelAdapter(listed, cases.resolved("mse"), tf.float64)
    a, b = _x(listed)
    np.testing.assert_array_equal(adapter.call([a, b])[0].numpy(), listed([a, b]).numpy())

    keras.utils.set_random_seed(0)
    with cases._Policy("float64"):
        inputs = {"wide": keras.Input((3,), name="wide"), "narrow": keras.Input((1,), name="narrow")}
        out = keras.layers.Dense(2)(keras.layers.Concatenate()([inputs["wide"], inputs["narrow"]]))
        keyed = keras.Model(inputs, out)
    adapter = ModelAdapter(keyed, cases.resolved("mse"), tf.float64)
    assert [s.name for s in adapter.signature.inputs] == ["narrow", "wide"]  # sorted keys
    narrow, wide = tf.constant(np.ones((2, 1))), tf.constant(np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(adapter.call([narrow, wide])[0].numpy(),
                                  keyed({"wide": wide, "narrow": narrow}).numpy())


def test_the_signature_names_inputs_outputs_and_variables():
    signature = model_signature(cases.mlp())
    assert [(s.shape, s.dtype) for s in signature.inputs] == [((6,), "float64")]
    # A Sequential has no output_names: its one output is "output".
    assert [(s.name, s.shape) for s in signature.outputs] == [("output", (3,))]
    assert signature.variable_shapes == ((6, 5), (5,), (5, 3), (3,))
    assert [v.split("/", 1)[1] for v in signature.variables] == ["hidden/kernel", "hidden/bias", "out/kernel",
                                                                "out/bias"]
    named = model_signature(cases.two_outputs()).outputs
    assert [(s.name, s.shape) for s in named] == [("first", (2,)), ("second", (1,))]


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="sub")
        self.dense = keras.layers.Dense(2)

    def call(self, x):
        return self.dense(x)


def test_a_subclassed_model_is_described_once_built_and_refused_before():
    model = _Subclassed()
    with pytest.raises(InputError, match="subclassed model that was never built"):
        model_signature(model)
    model(np.zeros((1, 4), np.float32))
    adapter = ModelAdapter(model, cases.resolved("mse"), tf.float32)
    assert [(s.shape, s.dtype) for s in adapter.signature.inputs] == [((4,), "float32")]
    assert [s.shape for s in adapter.signature.outputs] == [(2,)]
    x = tf.constant(np.ones((3, 4), np.float32))
    np.testing.assert_array_equal(adapter.call([x])[0].numpy(), model(x).numpy())


def test_a_loss_that_returns_one_number_for_the_batch_is_refused():
    loss = KerasLoss(PerExampleLoss(lambda y, f: tf.reduce_mean(f), "batch_mean", {}, None, True), tf.float64)
    with pytest.raises(InputError, match="a single number for the batch"):
        loss.per_example_loss([np.zeros(3)], [tf.ones([3, 2], tf.float64)], [None])
