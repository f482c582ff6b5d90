"""Trust, round two (issue 24): kinds of model that once gave silently wrong numbers are now
either right (the zoo, ``tests/zoo``, checks their values) or refused at ``validate`` with the
cause and the way out. Each test here failed before its fix. Run with ``-s`` to see the lines.
"""

from __future__ import annotations

import subprocess
import sys

import keras
import numpy as np
import pytest

import cases
import jobs
from pipeline.curvature.engine import CurvatureEngine
from pipeline.curvature.requests import BatchWork
from pipeline.errors import InputError
from pipeline.job import load_job
from pipeline.plan import make_plan

CLUSTER = {"CPU": 2}


@keras.saving.register_keras_serializable(package="trust")
class Offset(keras.layers.Layer):
    """Adds ``self.shift``, state that is neither a weight nor in the config (as a LoRA scale or
    a vocabulary set by hand would be): a copy rebuilt from the config loses it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.shift = 0.0

    def call(self, x):
        return x + self.shift


def _offset_model():
    keras.utils.set_random_seed(3)
    x = keras.Input((6,))
    offset = Offset(name="offset")
    h = keras.layers.Dense(4, activation="tanh", name="hidden")(offset(x))
    model = keras.Model(x, keras.layers.Dense(3, name="out")(h))
    offset.shift = 3.0
    return model


def _batch(n=8):
    rng = np.random.default_rng(0)
    return [rng.normal(size=(n, 6)).astype(np.float32)], [rng.integers(0, 3, n)]


def test_a_copy_that_loses_layer_state_is_refused_naming_the_layer():
    engine = CurvatureEngine(_offset_model(), cases.resolved("sparse_categorical_crossentropy", from_logits=True),
                             precision="float64")
    x, _ = _batch()
    with pytest.raises(InputError) as raised:
        engine.check_copy(x)
    print(f"\nerror: {raised.value}")
    assert "layer 'offset'" in str(raised.value) and "precision: float32" in str(raised.value)


def test_an_adapted_normalization_computes_in_float64_as_keras_does(tmp_path):
    """The issue's case: loss 6.55 instead of 1.215. The copy is checked and right."""
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, size=(32, 4)).astype(np.float32)
    y = rng.integers(0, 3, 32)
    norm = keras.layers.Normalization()
    norm.adapt(x)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3)(norm(inputs)))
    model.save(tmp_path / "norm.keras")
    loaded = keras.models.load_model(tmp_path / "norm.keras")
    expected = float(np.mean(keras.losses.sparse_categorical_crossentropy(y, loaded(x), from_logits=True)))
    engine = CurvatureEngine(loaded, cases.resolved("sparse_categorical_crossentropy", from_logits=True),
                             precision="float64")
    engine.check_copy([x[:8]])
    part = engine.partial([x], [y], None, np.arange(32), BatchWork(gradient=True))
    assert part.sums["loss"] / part.weight_sum == pytest.approx(expected, rel=1e-6)


def test_lora_in_float64_names_the_real_cause():
    keras.utils.set_random_seed(4)
    inputs = keras.Input((6,))
    lora = keras.layers.Dense(4, name="lora")
    model = keras.Model(inputs, keras.layers.Dense(3)(lora(inputs)))
    lora.enable_lora(2)
    with pytest.raises(InputError) as raised:
        CurvatureEngine(model, cases.resolved("sparse_categorical_crossentropy", from_logits=True), precision="float64")
    message = str(raised.value)
    print(f"\nerror: {message}")
    assert "LoRA" in message and "remove fixed dtypes" not in message


def test_a_vectorised_route_that_disagrees_with_its_loop_is_dropped():
    """Conv2D(groups=2): TensorFlow 2.21's pfor Jacobian is wrong (float32) or fails (float64);
    the engine checks it against the loop on the first rows and takes the loop."""
    keras.utils.set_random_seed(5)
    inputs = keras.Input((5, 5, 4))
    h = keras.layers.Conv2D(4, 3, groups=2, activation="tanh")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(h)))
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(6, 5, 5, 4)).astype(np.float32), rng.integers(0, 3, 6)
    engine = CurvatureEngine(model, cases.resolved("sparse_categorical_crossentropy", from_logits=True),
                             precision="float32")
    assert engine.vectorisation_routes([x], [y])[0] == "loop"
    # Where the CPU's oneDNN kernels make pfor's Jacobian wrong, the check says it disagreed; on
    # the 2026-12-08 machine pfor fails outright (InvalidArgumentError): dropped all the same.
    said = engine.route_checks["route"]
    assert "disagreed with the loop" in said or "failed (InvalidArgumentError)" in said, engine.route_checks
    # A model pfor gets right keeps the vectorised route, and says it was checked.
    plain = CurvatureEngine(cases.mlp(dtype="float32"), cases.resolved("sparse_categorical_crossentropy",
                                                                       from_logits=True), precision="float32")
    inputs_, labels, _ = cases.batch_for(plain.model, n=6)
    assert plain.vectorisation_routes(inputs_, labels) == ("vectorised", "vectorised")
    assert "checked against the loop" in plain.route_checks["route"]


def reads_logits(y, p):
    """A user loss that reads the logits behind a softmax (as Keras' cross-entropy does)."""
    return keras.losses.sparse_categorical_crossentropy(y, p)


def test_output_derivatives_that_do_not_reproduce_the_gradient_are_refused():
    keras.utils.set_random_seed(6)
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(keras.layers.Dense(4)(inputs)))
    x, y = _batch()
    x[0][:2] *= 60.0  # saturated rows: the clipped probabilities and the logits disagree there
    engine = CurvatureEngine(model, cases.resolved(f"{__name__}:reads_logits"), precision="float64")
    with pytest.raises(InputError) as raised:
        engine.partial(x, y, None, np.arange(8), BatchWork(sum_grad_squared=True, gradient=True,
                                                            hessian_diagonal="exact"))
    print(f"\nerror: {raised.value}")
    assert "do not reproduce its gradient" in str(raised.value)


def test_a_masked_output_beside_another_output_is_refused():
    tokens = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(6, 3, mask_zero=True)(tokens)
    tags = keras.layers.Dense(3, name="tags")(h)
    pooled = keras.layers.Dense(2, name="pooled")(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model(tokens, [tags, pooled])
    engine = CurvatureEngine(model, cases.resolved("sparse_categorical_crossentropy", from_logits=True),
                             precision="float64")
    t = np.array([[1, 2, 0], [3, 0, 0]])
    with pytest.raises(InputError) as raised:
        engine.partial([t], [np.zeros((2, 3), int), np.zeros(2, int)], None, np.arange(2), BatchWork(gradient=True))
    assert "sequence mask beside other outputs" in str(raised.value)


def test_activity_regularizer_with_include_regularization_is_refused_at_validate(tmp_path):
    jobs.write_data(tmp_path / "data", rows=40, files=2)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(4, activation="tanh", activity_regularizer="l2", name="hidden")(inputs)
    keras.Model(inputs, keras.layers.Dense(3)(hidden)).save(tmp_path / "model.keras")
    path = tmp_path / "job.yaml"
    import yaml
    path.write_text(yaml.safe_dump(jobs.job(tmp_path, {"gradient": {}}, include_regularization=True)))
    done = subprocess.run([sys.executable, "-m", "pipeline", "validate", str(path)], capture_output=True, text=True,
                          timeout=600)
    print(done.stderr)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [line for line in done.stderr.strip().splitlines()
                                                if line.startswith("error:")]
    assert "layer 'hidden' has an activity_regularizer" in done.stderr
    # Without include_regularization the activity term is left out, as the contract says.
    make_plan(load_job(jobs.job(tmp_path, {"gradient": {}})), cluster=CLUSTER)
