"""Model kinds people actually have, end to end on a real local Ray, against references that
do not go through the engine: each example run on its own, at its own length, through Keras.

- a masked sequence tagger fed variable-length Parquet lists (padded per batch), whose results
  must not depend on how the rows are batched or sharded;
- a subclassed model and a model with a Lambda layer, both through ``{builder, weights}`` in
  float64;
- dict outputs with labels mapped by output name;
- a string column into ``StringLookup``;
- binary cross-entropy with a scalar label column and a sigmoid output;
- a loss that refuses a later row: an input error (exit 2), never retried.
"""

from __future__ import annotations

import io
import os

import keras
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

import cases
import jobs
import kinds
import paths
from pipeline.errors import InputError
from pipeline.job import load_job
from pipeline.driver import run
from pipeline.plan import make_plan

pytestmark = pytest.mark.slow

TESTS = paths.TESTS
CLUSTER = {"CPU": 2}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    path = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": path}})
    yield ray
    ray.shutdown()


def _job(root, model, loss, data, quantities, **extra):
    spec = {"name": "kinds", "model": model, "loss": loss, "data": data, "precision": "float64",
            "quantities": quantities, "output": str(root / "results"), "workers": 1}
    spec.update(extra)
    return load_job(spec)


def _diagonals(result):
    import pyarrow.parquet as pq

    return pq.read_table(os.path.join(result.run_dir, "diagonals.parquet")).to_pandas()


def _reference(model, example_losses, count, total_loss=None, divisor=None):
    """Mean loss, gradient, Hessian (dense, float64) and Fisher diagonal of
    ``L = sum_i l_i / divisor`` (``divisor`` = count by default), ``example_losses(i)`` building
    ``l_i`` from ``model`` alone (``total_loss()``, if given, builds ``sum_i l_i`` in fewer
    model calls)."""
    divisor = count if divisor is None else divisor
    variables = model.trainable_variables

    def flat(tensors):
        return tf.concat([tf.reshape(tf.convert_to_tensor(t), [-1]) for t in tensors], 0)

    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            summed = total_loss() if total_loss else tf.add_n([example_losses(i) for i in range(count)])
            total = summed / divisor
        grad = flat(inner.gradient(total, variables))
    rows = []
    size = int(grad.shape[0])
    for j in range(size):  # one Hessian row at a time: works through while loops
        row = outer.gradient(grad, variables, output_gradients=tf.one_hot(j, size, dtype=grad.dtype))
        rows.append(flat([g if g is not None else tf.zeros_like(v) for g, v in zip(row, variables)]).numpy())
    del outer
    fisher = np.zeros(int(grad.shape[0]))
    for i in range(count):
        with tf.GradientTape() as tape:
            li = example_losses(i)
        fisher += flat(tape.gradient(li, variables)).numpy() ** 2
    return float(total.numpy()), grad.numpy(), np.array(rows), fisher / divisor


def _float64_copy(build, weights):
    previous = keras.config.floatx()
    keras.config.set_floatx("float64")  # keras.Input((6,)) takes floatx, not the dtype policy
    try:
        with cases._Policy("float64"):
            model = build()
    finally:
        keras.config.set_floatx(previous)
    model.set_weights([np.asarray(w, np.float64) for w in weights])
    return model


# ------------------------------------------------------------------ masked, variable-length
@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    root = tmp_path_factory.mktemp("tagger")
    tokens, tags = kinds.write_sequences(root / "data", rows=14)
    model = kinds.masked_tagger()
    model.save(str(root / "tagger.keras"))
    reference_model = _float64_copy(kinds.masked_tagger, model.get_weights())
    sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none", dtype="float64")

    # The token-weighted objective (what Keras evaluate returns): each example's summed token
    # losses over the count of tokens in the dataset.
    def example_loss(i):
        # Example i alone, unpadded: no mask needed, so this checks padding and masking.
        logits = reference_model(np.array([tokens[i]]), training=False)
        return tf.reduce_sum(sce(np.array([tags[i]]), logits))

    def total_loss():
        # The same sum, examples of one length together (still no padding): fewer LSTM graphs.
        parts = []
        for length in sorted({len(t) for t in tokens}):
            pick = [i for i, t in enumerate(tokens) if len(t) == length]
            logits = reference_model(np.array([tokens[i] for i in pick]), training=False)
            parts.append(tf.reduce_sum(sce(np.array([tags[i] for i in pick]), logits)))
        return tf.add_n(parts)

    return root, _reference(reference_model, example_loss, len(tokens), total_loss,
                            divisor=sum(len(t) for t in tokens))


def test_masked_sequences_of_any_length_match_each_example_alone(ray_local, tagger):
    root, (loss, gradient, hessian, fisher) = tagger
    # HVPs through the LSTM are checked by the zoo (tests/zoo); here the quantities whose routes
    # differ for while loops (exact diagonal, per-example products).
    quantities = {"gradient": {}, "hessian_diagonal": {"method": "exact"}, "fisher_diagonal": {}}
    data = {"path": str(root / "data"), "features": "tokens", "labels": "tags", "batch_size": 4}
    published = []
    for shards, batch_size in ((1, 4), (3, 3)):  # different batches: different padded lengths
        job = _job(root, str(root / "tagger.keras"), {"name": "sparse_categorical_crossentropy",
                                                      "from_logits": True},
                   {**data, "batch_size": batch_size}, quantities, shards=shards)
        plan = make_plan(job, cluster=CLUSTER)
        assert any("cannot be vectorised" in note for note in plan.notes), plan.notes  # the LSTM's loop
        result = run(job, run_id=f"s{shards}", stream=io.StringIO())
        table = _diagonals(result)
        scale = np.abs(hessian).max()
        assert result.manifest["loss"] == pytest.approx(loss, rel=1e-10)
        np.testing.assert_allclose(table["gradient"], gradient, atol=1e-10 * np.abs(gradient).max())
        np.testing.assert_allclose(table["hessian_diagonal"], np.diag(hessian), atol=1e-9 * scale)
        np.testing.assert_allclose(table["fisher_diagonal"], fisher, atol=1e-10 * fisher.max())
        published.append(table)
    np.testing.assert_allclose(published[0]["hessian_diagonal"], published[1]["hessian_diagonal"],
                               rtol=1e-9, atol=1e-13)


# ------------------------------------------------------------------ builder models in float64
@pytest.mark.parametrize("builder", ["subclassed", "with_lambda"])
def test_builder_models_compute_in_float64(ray_local, tmp_path, builder):
    x, labels, _ = jobs.write_data(tmp_path / "data", rows=40, files=2)
    model = getattr(kinds, builder)()
    model.save_weights(str(tmp_path / "w.weights.h5"))
    job = _job(tmp_path, {"builder": f"kinds:{builder}", "weights": str(tmp_path / "w.weights.h5")},
               {"name": "sparse_categorical_crossentropy", "from_logits": True},
               {"path": str(tmp_path / "data"), "features": "x", "labels": "label", "batch_size": 16},
               {"gradient": {}, "hessian_diagonal": {"method": "exact"}})
    result = run(job, stream=io.StringIO())
    reference_model = _float64_copy(getattr(kinds, builder), model.get_weights())
    assert all(v.dtype == "float64" for v in reference_model.weights)

    def example_loss(i):
        logits = reference_model(x[i:i + 1], training=False)
        return keras.losses.sparse_categorical_crossentropy(labels[i:i + 1], logits, from_logits=True)[0]

    loss, gradient, hessian, _ = _reference(reference_model, example_loss, len(labels))
    table = _diagonals(result)
    assert result.manifest["loss"] == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(table["gradient"], gradient, atol=1e-12 * np.abs(gradient).max())
    # float64 all through: float32 would be off by ~1e-7 of the largest entry
    np.testing.assert_allclose(table["hessian_diagonal"], np.diag(hessian), atol=1e-11 * np.abs(hessian).max())


def test_unbuilt_subclassed_model_is_refused_with_the_way_out(tmp_path):
    jobs.write_data(tmp_path / "data", rows=20, files=1)
    job = _job(tmp_path, {"builder": "kinds:unbuilt"}, "mse",
               {"path": str(tmp_path / "data"), "features": "x", "labels": "label"}, {"gradient": {}})
    with pytest.raises(InputError, match="never built: call it once on a batch"):
        make_plan(job, cluster=CLUSTER)


# ------------------------------------------------------------------ outputs by name
def test_dict_outputs_take_labels_by_name(ray_local, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 6))
    ya, yz = rng.normal(size=(24, 2)), rng.normal(size=(24, 2))
    os.makedirs(tmp_path / "data")
    pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 6),
                             "ya": pa.FixedSizeListArray.from_arrays(pa.array(ya.ravel()), 2),
                             "yz": pa.FixedSizeListArray.from_arrays(pa.array(yz.ravel()), 2)}),
                   str(tmp_path / "data" / "part.parquet"))
    model = kinds.two_heads()
    model.save(str(tmp_path / "heads.keras"))
    data = {"path": str(tmp_path / "data"), "features": "x", "batch_size": 8}
    # The layer names (model.output_names) and the dict keys both name outputs.
    by_layer = _job(tmp_path, str(tmp_path / "heads.keras"), "mse", {**data, "labels": {"first": "yz", "second": "ya"}},
                    {"gradient": {}})
    by_key = _job(tmp_path, str(tmp_path / "heads.keras"), "mse", {**data, "labels": {"alpha": "ya", "zeta": "yz"}},
                  {"gradient": {}})
    reference_model = _float64_copy(kinds.two_heads, model.get_weights())

    def example_loss(i):
        out = reference_model(x[i:i + 1], training=False)
        return tf.reduce_mean((out["zeta"] - yz[i]) ** 2) + tf.reduce_mean((out["alpha"] - ya[i]) ** 2)

    loss, gradient, _, _ = _reference(reference_model, example_loss, len(x))
    result = run(by_key, run_id="key", stream=io.StringIO())
    assert result.manifest["loss"] == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(_diagonals(result)["gradient"], gradient, atol=1e-12 * np.abs(gradient).max())
    # Layer names pair the same columns with the same outputs: the same trial loss on the first rows.
    assert make_plan(by_layer, cluster=CLUSTER).notes == make_plan(by_key, cluster=CLUSTER).notes
    wrong = _job(tmp_path, str(tmp_path / "heads.keras"), "mse", {**data, "labels": {"alpha": "ya", "beta": "yz"}},
                 {"gradient": {}})
    with pytest.raises(InputError, match=r"unknown beta; missing first \(key zeta\)"):
        make_plan(wrong, cluster=CLUSTER)


# ------------------------------------------------------------------ strings and scalar labels
def test_string_column_into_string_lookup(ray_local, tmp_path):
    words = ["red", "green", "blue", "cyan"]
    rng = np.random.default_rng(1)
    chosen = [words[i] for i in rng.integers(0, 4, 20)] + ["unknown"]
    labels = rng.integers(0, 2, len(chosen))
    os.makedirs(tmp_path / "data")
    pq.write_table(pa.table({"word": pa.array(chosen), "label": pa.array(labels)}),
                   str(tmp_path / "data" / "part.parquet"))
    model = kinds.text_classifier(words)
    model.save(str(tmp_path / "text.keras"))
    job = _job(tmp_path, str(tmp_path / "text.keras"), {"name": "sparse_categorical_crossentropy",
                                                         "from_logits": True},
               {"path": str(tmp_path / "data"), "features": "word", "labels": "label", "batch_size": 8},
               {"gradient": {}, "fisher_diagonal": {}, "ggn_diagonal": {"method": "exact"}, "hvp": {"random": 1}})
    result = run(job, stream=io.StringIO())
    reference_model = _float64_copy(lambda: kinds.text_classifier(words), model.get_weights())

    def example_loss(i):
        logits = reference_model(tf.constant([[chosen[i]]]), training=False)
        return keras.losses.sparse_categorical_crossentropy(labels[i:i + 1], logits, from_logits=True)[0]

    loss, gradient, _, fisher = _reference(reference_model, example_loss, len(chosen))
    table = _diagonals(result)
    assert result.manifest["loss"] == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(table["gradient"], gradient, atol=1e-12 * np.abs(gradient).max())
    np.testing.assert_allclose(table["fisher_diagonal"], fisher, atol=1e-12 * fisher.max())


def test_binary_crossentropy_with_a_scalar_label_column(ray_local, tmp_path):
    x, labels, _ = jobs.write_data(tmp_path / "data", rows=30, files=1, classes=2)
    model = kinds.binary_head()
    model.save(str(tmp_path / "binary.keras"))
    job = _job(tmp_path, str(tmp_path / "binary.keras"), "binary_crossentropy",
               {"path": str(tmp_path / "data"), "features": "x", "labels": "label", "batch_size": 8},
               {"gradient": {}, "fisher_diagonal": {}, "hessian_diagonal": {"method": "exact"}})
    result = run(job, stream=io.StringIO())
    reference_model = _float64_copy(kinds.binary_head, model.get_weights())

    def example_loss(i):
        # The logits behind the sigmoid, with TensorFlow's own loss on logits.
        hidden = reference_model.get_layer("hidden")(x[i:i + 1])
        logit = tf.matmul(hidden, reference_model.get_layer("p").kernel) + reference_model.get_layer("p").bias
        return tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.constant([[float(labels[i])]], tf.float64),
                                                       logits=logit)[0, 0]

    loss, gradient, hessian, fisher = _reference(reference_model, example_loss, len(labels))
    table = _diagonals(result)
    assert result.manifest["loss"] == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(table["gradient"], gradient, atol=1e-12 * np.abs(gradient).max())
    np.testing.assert_allclose(table["hessian_diagonal"], np.diag(hessian), atol=1e-11 * np.abs(hessian).max())
    np.testing.assert_allclose(table["fisher_diagonal"], fisher, atol=1e-12 * fisher.max())


# ------------------------------------------------------------------ refusals
def test_a_loss_that_refuses_a_later_row_is_an_input_error_not_retried(ray_local, tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 6))
    labels = np.where(np.arange(40) < 30, rng.integers(0, 2, 40), 2)  # rows 30+ hold a 2
    os.makedirs(tmp_path / "data")
    pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 6),
                             "label": pa.array(labels)}), str(tmp_path / "data" / "part.parquet"))
    jobs.write_model(str(tmp_path / "model.keras"))
    job = _job(tmp_path, str(tmp_path / "model.keras"), "kinds:picky_loss",
               {"path": str(tmp_path / "data"), "features": "x", "labels": "label", "batch_size": 10},
               {"gradient": {}}, shards=4)
    make_plan(job, cluster=CLUSTER)  # the first rows are fine: only a worker can find it
    log = io.StringIO()
    with pytest.raises(InputError, match=r"the model or the loss failed on shard 3 \(rows 30-39\).*label above 1"):
        run(job, run_id="picky", stream=log)
    assert "trying again" not in log.getvalue()
    left = [d for d, _, _ in os.walk(tmp_path / "results") if os.path.basename(d).startswith(("run=", ".partials"))]
    assert not left, left


def test_non_finite_curvature_names_the_row_even_when_loss_and_gradient_are_finite(ray_local, tmp_path):
    """A loss with a kink: at row 37 (label exactly on the prediction) the loss and gradient are
    finite but the Hessian is not; the row is found by computing the same quantities row by row."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 6))
    y = rng.uniform(0.5, 1.5, size=60)
    y[37] = 0.0
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 6), "y": pa.array(y)}),
                   str(tmp_path / "data" / "part.parquet"))
    kinds.zero_regressor().save(str(tmp_path / "zero.keras"))
    job = _job(tmp_path, str(tmp_path / "zero.keras"), "kinds:kink_loss",
               {"path": str(tmp_path / "data"), "features": "x", "labels": "y", "batch_size": 10},
               {"gradient": {}, "hessian_diagonal": {"method": "exact"}}, shards=3)
    with pytest.raises(InputError, match=r"non-finite hessian_diagonal in shard 1 \(rows 30-39\), first at row 37"):
        run(job, run_id="kink", stream=io.StringIO())
