"""``validate``'s trial on a small engine: a good batch gives a ``ProbeReport`` with the mean
loss Keras computes; a column of the wrong shape gives one ``InputError`` that names the column."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest

import tensorflow as tf

import cases
from pipeline.cost import Measurement
from pipeline.curvature.engine import CurvatureEngine
from pipeline.curvature.losses import PerExampleLoss
from pipeline.curvature.probe import ProbeReport, measure, probe, trace_seconds
from pipeline.errors import InputError
from pipeline.storage.dataset import Batch

COLUMNS = (["x"], ["label"])


@pytest.fixture(scope="module")
def engine():
    return CurvatureEngine(cases.mlp(), cases.resolved("sparse_categorical_crossentropy", from_logits=True),
                           precision="float64")


def _batch(n=7, x=None, labels=None, weights=None):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, 6)) if x is None else x
    labels = rng.integers(0, 3, n) if labels is None else labels
    return Batch(inputs=[x], labels=[labels], weights=weights, rows=np.arange(n, dtype=np.int64))


def test_a_good_batch_gives_its_rows_and_mean_loss(engine):
    batch = _batch(weights=np.linspace(0.5, 2.0, 7))
    report = probe(engine, batch, COLUMNS)
    assert isinstance(report, ProbeReport)
    per_example = keras.losses.sparse_categorical_crossentropy(batch.labels[0], engine.model(batch.inputs[0]),
                                                               from_logits=True).numpy()
    expected = np.sum(batch.weights * per_example) / np.sum(batch.weights)
    assert report.rows == 7 and report.loss == pytest.approx(expected, rel=1e-12)
    # Nothing else asked: no routes, layer rules or factors.
    assert (report.route, report.per_example_route, report.layer_routes, report.rule_rows, report.route_checks,
            report.factor_layers) == (None, None, {}, 0, {}, ())
    # The output-space derivatives (Fisher, GGN) agree with the gradient on a good batch.
    assert probe(engine, batch, COLUMNS, output_derivatives=True).loss == report.loss


def test_the_factored_layers_are_listed_when_asked(engine):
    report = probe(engine, _batch(), COLUMNS, factors=True)
    # (path, inputs, outputs, positions per example, bias) per Dense layer
    layers = {path.split("/")[-1]: rest for path, *rest in report.factor_layers}
    assert layers == {"hidden": [6, 5, 1, True], "out": [5, 3, 1, True]}


def test_a_feature_column_of_the_wrong_width_is_one_input_error_naming_it(engine):
    with pytest.raises(InputError) as info:
        probe(engine, _batch(x=np.zeros((7, 5))), COLUMNS)
    message = str(info.value)
    assert message.startswith("the model fails on the first 7 rows of data.features (columns x, shapes (7, 5); "
                              "model inputs ")
    assert "(6,)" in message and message.endswith("fix data.features or the model")


def test_a_label_column_of_the_wrong_shape_is_one_input_error_naming_it(engine):
    with pytest.raises(InputError) as info:
        probe(engine, _batch(labels=np.zeros((7, 4), np.int64)), COLUMNS)
    message = str(info.value)
    assert message.startswith("the loss sparse_categorical_crossentropy fails on output 'output' (shape (7, 3)) "
                              "with labels from column 'label' (shape (7, 4)): ")
    assert message.endswith("fix data.labels or the loss")


def test_a_loss_that_gives_no_value_per_example_is_refused():
    def flattened(label, output):  # [B * C]: one value per output unit, in one vector
        return tf.reshape(output, [-1])

    engine = CurvatureEngine(cases.mlp(), PerExampleLoss(flattened, "flattened", {}, None, True), precision="float64")
    with pytest.raises(InputError) as info:
        probe(engine, _batch(labels=np.zeros(7)), COLUMNS)
    assert str(info.value) == ("the loss flattened gives shape (21,) for output 'output', not one value per example "
                               "(7): return per-example losses")


def test_measure_times_a_gradient_on_the_batch(engine):
    batch = _batch()
    measured = measure(engine, batch, repeats=1)
    assert isinstance(measured, Measurement)
    assert measured.rows == 7 and measured.gradient_seconds > 0 and measured.trace_seconds > 0
    assert measured.row_bytes == (6 + 1) * 8  # six float64 features and an int64 label per row
    assert trace_seconds(engine, batch) > 0
