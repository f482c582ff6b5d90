"""The curvature engine against a dense float64 reference and closed forms."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import cases
import keras
import tensorflow as tf
from pipeline.curvature.engine import CurvatureEngine, XlaTrial
from pipeline.curvature.losses import resolve_loss
from pipeline.curvature.requests import BatchWork
from pipeline.errors import InputError
from pipeline.partial import Partial
from pipeline.quantities.registry import finalize

EVERYTHING = dict(hessian_diagonal="exact", ggn_diagonal="exact", sum_grad_squared=True)

# (model, loss name, loss options, label kind)
COMBINATIONS = [
    ("mlp", "sparse_categorical_crossentropy", {"from_logits": True}, None),
    ("mlp", "categorical_crossentropy", {"from_logits": True}, "onehot"),
    ("mlp_softmax", "sparse_categorical_crossentropy", {}, None),
    ("mlp", "binary_crossentropy", {"from_logits": True}, "binary"),
    ("mlp", "mse", {}, "regression"),
    ("mlp", "huber", {}, "regression"),
    ("cnn", "sparse_categorical_crossentropy", {"from_logits": True}, None),
    ("batchnorm", "sparse_categorical_crossentropy", {"from_logits": True}, None),
    ("two_inputs", "mse", {}, "regression"),
    ("two_outputs", "mse", {}, "regression"),
    ("two_outputs", "binary_crossentropy", {"from_logits": True}, "binary"),
]


def _batch(model, kind, n=7, seed=1):
    if kind == "regression":
        return cases.batch_for(model, n=n, seed=seed, regression=True)
    return cases.batch_for(model, n=n, seed=seed, classes=kind)


@pytest.mark.parametrize("model_name,loss_name,options,kind", COMBINATIONS,
                         ids=[f"{c[0]}-{c[1]}{'-logits' if c[2] else ''}" for c in COMBINATIONS])
def test_every_quantity_matches_dense_reference(model_name, loss_name, options, kind):
    model = cases.MODELS[model_name]()
    loss = cases.resolved(loss_name, **options)
    inputs, labels, weights = _batch(model, kind)
    ref = cases.reference(model, loss, inputs, labels, weights)
    engine = CurvatureEngine(model, loss, precision="float64", hvp_block=2, diagonal_block=8)
    vectors = np.random.default_rng(5).normal(size=(3, engine.parameters))
    part = engine.partial(inputs, labels, weights, np.arange(len(weights)),
                          BatchWork(hvp_vectors=vectors, **EVERYTHING))

    scale = max(1.0, np.abs(ref.hessian).max())
    assert part.weight_sum == pytest.approx(ref.weight_sum)
    assert part.sums["loss"] == pytest.approx(ref.loss, rel=1e-12)
    np.testing.assert_allclose(part.sums["gradient"], ref.gradient, atol=1e-12 * scale)
    np.testing.assert_allclose(part.sums["hessian_diagonal"], np.diag(ref.hessian), atol=1e-11 * scale)
    np.testing.assert_allclose(part.sums["hvp"], vectors @ ref.hessian, atol=1e-10 * scale)
    np.testing.assert_allclose(part.sums["sum_grad_squared"], ref.fisher, atol=1e-11 * scale)
    ggn = ref.ggn
    if model_name == "mlp_softmax":
        # Keras' cross-entropy reads the logits behind a softmax output; the GGN is taken at that
        # tensor, so it equals the GGN of the same model with a linear output and from_logits.
        twin = cases.mlp(seed=0)
        twin.set_weights(model.get_weights())
        ggn = cases.reference(twin, cases.resolved(loss_name, from_logits=True), inputs, labels, weights).ggn
    np.testing.assert_allclose(part.sums["ggn_diagonal"], np.diag(ggn), atol=1e-11 * scale)
    # The checks above must be able to fail: the Hessian diagonal is not its row sums
    # (the popular broken recipe), and the GGN differs from the Hessian for non-linear models.
    assert not np.allclose(np.diag(ref.hessian), ref.hessian.sum(axis=1))


def test_linear_regression_closed_form():
    """l_i = (w.x_i + b - y_i)^2: H = 2/N sum x~ x~^T = GGN, gradient 2/N sum r_i x~_i."""
    keras.utils.set_random_seed(3)
    with cases._Policy("float64"):
        model = keras.Sequential([keras.Input((4,), dtype="float64"), keras.layers.Dense(1)])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4))
    y = rng.normal(size=(50, 1))
    engine = CurvatureEngine(model, cases.resolved("mse"), precision="float64")
    part = engine.partial([x], [y], None, np.arange(50), BatchWork(**EVERYTHING))
    result = finalize(part)
    kernel, bias = (v.numpy() for v in model.trainable_variables)
    xt = np.hstack([x, np.ones((50, 1))])
    residual = (x @ kernel + bias - y)[:, 0]
    hessian = 2.0 / 50 * xt.T @ xt
    np.testing.assert_allclose(result["loss"], np.mean(residual**2), rtol=1e-12)
    np.testing.assert_allclose(result["gradient"], 2.0 / 50 * xt.T @ residual, atol=1e-12)
    np.testing.assert_allclose(result["hessian_diagonal"], np.diag(hessian), rtol=1e-12)
    np.testing.assert_allclose(result["ggn_diagonal"], np.diag(hessian), rtol=1e-12)
    np.testing.assert_allclose(result["fisher_diagonal"], np.mean((2 * residual[:, None] * xt) ** 2, axis=0),
                               rtol=1e-12)


def test_logistic_regression_closed_form():
    """Binary cross-entropy on logits: H = GGN = 1/N sum p(1-p) x~ x~^T."""
    keras.utils.set_random_seed(4)
    with cases._Policy("float64"):
        model = keras.Sequential([keras.Input((3,), dtype="float64"), keras.layers.Dense(1)])
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3))
    y = rng.integers(0, 2, size=(40, 1)).astype(np.float64)
    engine = CurvatureEngine(model, cases.resolved("binary_crossentropy", from_logits=True), precision="float64")
    vectors = rng.normal(size=(2, 4))
    result = finalize(engine.partial([x], [y], None, np.arange(40), BatchWork(hvp_vectors=vectors, **EVERYTHING)))
    kernel, bias = (v.numpy() for v in model.trainable_variables)
    p = 1 / (1 + np.exp(-(x @ kernel + bias)[:, 0]))
    xt = np.hstack([x, np.ones((40, 1))])
    hessian = (xt * (p * (1 - p))[:, None]).T @ xt / 40
    np.testing.assert_allclose(result["hessian_diagonal"], np.diag(hessian), rtol=1e-10)
    np.testing.assert_allclose(result["ggn_diagonal"], np.diag(hessian), rtol=1e-10)
    np.testing.assert_allclose(result["hvp"], vectors @ hessian, rtol=1e-10)
    np.testing.assert_allclose(result["gradient"], xt.T @ (p - y[:, 0]) / 40, atol=1e-12)


def test_sums_are_additive_over_any_split():
    model = cases.cnn()
    loss = cases.resolved("sparse_categorical_crossentropy", from_logits=True)
    inputs, labels, weights = cases.batch_for(model, n=11, seed=2)
    engine = CurvatureEngine(model, loss, precision="float64")
    probes = np.sign(np.random.default_rng(0).normal(size=(3, engine.parameters)))
    work = BatchWork(probes=probes, ggn_diagonal="mc", ggn_samples=2,
                     sum_grad_squared=True, hvp_vectors=probes[:2])
    rows = np.arange(100, 111)
    whole = engine.partial(inputs, labels, weights, rows, work)
    pieces = None
    for a, b in [(0, 1), (1, 5), (5, 11)]:
        part = engine.partial([x[a:b] for x in inputs], [y[a:b] for y in labels], weights[a:b], rows[a:b], work)
        pieces = part if pieces is None else pieces.add(part)
    assert pieces.examples == whole.examples == 11
    assert set(pieces.sums) == set(whole.sums)
    for key in whole.sums:
        np.testing.assert_allclose(pieces.sums[key], whole.sums[key], rtol=1e-10, atol=1e-12, err_msg=key)


def _hutchinson_result(engine, inputs, labels, probes_count, seed=0):
    from pipeline.probes import rademacher

    probes = rademacher(seed, range(probes_count), engine.parameters)
    work = BatchWork(probes=probes)
    return finalize(engine.partial(inputs, labels, None, np.arange(len(inputs[0])), work))


def test_hutchinson_is_calibrated_and_converges():
    model = cases.mlp()
    loss = cases.resolved("sparse_categorical_crossentropy", from_logits=True)
    inputs, labels, _ = cases.batch_for(model, n=20, seed=3)
    engine = CurvatureEngine(model, loss, precision="float64", hvp_block=16)
    exact = finalize(engine.partial(inputs, labels, None, np.arange(20), BatchWork(hessian_diagonal="exact")))
    exact = exact["hessian_diagonal"]
    few = _hutchinson_result(engine, inputs, labels, 40)
    many = _hutchinson_result(engine, inputs, labels, 400)
    inside = np.abs(few["hessian_diagonal"] - exact) <= 3 * few["hessian_diagonal_stderr"] + 1e-12
    assert inside.mean() >= 0.9
    # More probes, smaller error, and the reported error shrinks like 1/sqrt(K).
    err_few = np.linalg.norm(few["hessian_diagonal"] - exact)
    err_many = np.linalg.norm(many["hessian_diagonal"] - exact)
    assert err_many < err_few
    ratio = np.median(few["hessian_diagonal_stderr"] / np.maximum(many["hessian_diagonal_stderr"], 1e-300))
    assert 2.0 < ratio < 4.5  # sqrt(10) ~ 3.2
    # Probes are a function of (seed, k) alone: the same call gives the same numbers.
    again = _hutchinson_result(engine, inputs, labels, 40)
    np.testing.assert_array_equal(again["hessian_diagonal"], few["hessian_diagonal"])


def test_monte_carlo_ggn_converges_within_its_error():
    model = cases.mlp()
    loss = cases.resolved("sparse_categorical_crossentropy", from_logits=True)
    inputs, labels, weights = cases.batch_for(model, n=30, seed=4)
    engine = CurvatureEngine(model, loss, precision="float64")
    rows = np.arange(30)
    exact = finalize(engine.partial(inputs, labels, weights, rows, BatchWork(ggn_diagonal="exact")))["ggn_diagonal"]
    mc = finalize(engine.partial(inputs, labels, weights, rows,
                                 BatchWork(ggn_diagonal="mc", ggn_samples=64, seed=7)))
    stderr = mc["ggn_diagonal_stderr"]
    assert np.all(stderr > 0)
    assert (np.abs(mc["ggn_diagonal"] - exact) <= 3 * stderr).mean() >= 0.9
    assert np.linalg.norm(mc["ggn_diagonal"] - exact) < 0.2 * np.linalg.norm(exact)


@pytest.mark.parametrize("loss_name,kind,options", [
    ("mse", "regression", {}),
    ("binary_crossentropy", "binary", {"from_logits": True}),
    ("categorical_crossentropy", "onehot", {"from_logits": True}),
])
def test_monte_carlo_ggn_other_families(loss_name, kind, options):
    model = cases.mlp()
    loss = cases.resolved(loss_name, **options)
    inputs, labels, _ = _batch(model, kind, n=25, seed=5)
    engine = CurvatureEngine(model, loss, precision="float64")
    rows = np.arange(25)
    exact = finalize(engine.partial(inputs, labels, None, rows, BatchWork(ggn_diagonal="exact")))["ggn_diagonal"]
    mc = finalize(engine.partial(inputs, labels, None, rows, BatchWork(ggn_diagonal="mc", ggn_samples=200)))
    assert np.linalg.norm(mc["ggn_diagonal"] - exact) < 0.15 * np.linalg.norm(exact)


def _masked_tagger(activation=None):
    """Embedding(mask_zero) -> per-timestep Dense: the mask reaches the loss (vectorised route)."""
    keras.utils.set_random_seed(6)
    with cases._Policy("float64"):
        tokens = keras.Input((None,), dtype="int32")
        h = keras.layers.Embedding(6, 3, mask_zero=True)(tokens)
        h = keras.layers.Dense(3, activation="tanh")(h)
        return keras.Model(tokens, keras.layers.Dense(4, activation=activation)(h))


@pytest.mark.parametrize("loss_name,activation,kind", [
    ("sparse_categorical_crossentropy", None, "sparse"),
    ("sparse_categorical_crossentropy", "softmax", "sparse"),  # sampled from the logits Keras reads
    ("categorical_crossentropy", None, "onehot"),
    ("mse", None, "regression"),
])
def test_monte_carlo_ggn_of_masked_sequences_converges(loss_name, activation, kind):
    """With a mask, l_i sums over the example's own positions (the token-weighted objective):
    the sampled gradients are not scaled by a count, and padded positions draw nothing."""
    model = _masked_tagger(activation)
    options = {"from_logits": True} if kind != "regression" and activation is None else {}
    loss = cases.resolved(loss_name, **options)
    rng = np.random.default_rng(8)
    n, length = 20, 5
    tokens = rng.integers(1, 6, size=(n, length))
    for i, keep in enumerate(rng.integers(1, length + 1, n)):
        tokens[i, keep:] = 0
    if kind == "sparse":
        labels = rng.integers(0, 4, size=(n, length))
    elif kind == "onehot":
        labels = np.eye(4)[rng.integers(0, 4, size=(n, length))]
    else:
        labels = rng.normal(size=(n, length, 4))
    engine = CurvatureEngine(model, loss, precision="float64")
    rows = np.arange(n)
    exact = finalize(engine.partial([tokens], [labels], None, rows, BatchWork(ggn_diagonal="exact")))["ggn_diagonal"]
    mc = finalize(engine.partial([tokens], [labels], None, rows,
                                 BatchWork(ggn_diagonal="mc", ggn_samples=300, seed=3)))
    used = exact > 1e-12 * exact.max()  # the padding token's embedding row has no curvature
    assert np.all(mc["ggn_diagonal"][~used] == 0)
    assert np.linalg.norm(mc["ggn_diagonal"] - exact) < 0.1 * np.linalg.norm(exact)
    assert (np.abs(mc["ggn_diagonal"] - exact)[used] <= 4 * mc["ggn_diagonal_stderr"][used]).mean() >= 0.9


def test_padding_and_batching_do_not_change_any_quantity():
    """The same masked sequences as one batch padded to 7, or as two batches each padded only to
    its own longest row: equal sums (Monte Carlo included: an example draws the same labels
    whatever its padded length)."""
    model = _masked_tagger()
    loss = cases.resolved("sparse_categorical_crossentropy", from_logits=True)
    rng = np.random.default_rng(9)
    n = 12
    lengths = np.where(np.arange(n) < 6, rng.integers(1, 4, n), rng.integers(4, 8, n))
    tokens = np.zeros((n, 7), dtype=np.int64)
    labels = np.zeros((n, 7), dtype=np.int64)
    for i, length in enumerate(lengths):
        tokens[i, :length] = rng.integers(1, 6, length)
        labels[i, :length] = rng.integers(0, 4, length)
    engine = CurvatureEngine(model, loss, precision="float64")
    work = BatchWork(hessian_diagonal="exact", ggn_diagonal="mc", ggn_samples=3, sum_grad_squared=True,
                     hvp_vectors=np.random.default_rng(1).normal(size=(2, engine.parameters)), seed=5)
    whole = engine.partial([tokens], [labels], None, np.arange(n), work)
    halves = Partial()
    for part in (slice(0, 6), slice(6, n)):
        width = int(lengths[part].max())
        halves.add(engine.partial([tokens[part, :width]], [labels[part, :width]], None, np.arange(n)[part], work))
    assert lengths[:6].max() < lengths[6:].max()  # the first half really is padded less
    for key, value in whole.sums.items():
        np.testing.assert_allclose(halves.sums[key], value, rtol=1e-10, atol=1e-13, err_msg=key)


def test_float32_precision_is_close_to_float64():
    model = cases.mlp(dtype="float32")
    loss = cases.resolved("sparse_categorical_crossentropy", from_logits=True)
    inputs, labels, weights = cases.batch_for(model, n=9)
    work = BatchWork(**EVERYTHING)
    single = CurvatureEngine(model, loss, precision="float32").partial(inputs, labels, weights, np.arange(9), work)
    double = CurvatureEngine(model, loss, precision="float64").partial(inputs, labels, weights, np.arange(9), work)
    assert single.sums["gradient"].dtype == np.float64
    for key in ("gradient", "hessian_diagonal", "ggn_diagonal", "sum_grad_squared"):
        np.testing.assert_allclose(single.sums[key], double.sums[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert not np.array_equal(single.sums["hessian_diagonal"], double.sums["hessian_diagonal"])


def test_regularization_terms_added_once():
    keras.utils.set_random_seed(0)
    with cases._Policy("float64"):
        model = keras.Sequential([keras.Input((3,), dtype="float64"),
                                  keras.layers.Dense(2, kernel_regularizer=keras.regularizers.L2(0.1))])
    engine = CurvatureEngine(model, cases.resolved("mse"), precision="float64")
    reg = engine.regularization_partial(BatchWork(hessian_diagonal="exact"))
    kernel = model.trainable_variables[0].numpy().ravel()
    assert reg.sums["loss"] == pytest.approx(0.1 * np.sum(kernel**2))
    np.testing.assert_allclose(reg.sums["gradient"][:6], 0.2 * kernel)
    np.testing.assert_allclose(reg.sums["gradient"][6:], 0.0)
    np.testing.assert_allclose(reg.sums["hessian_diagonal"], [0.2] * 6 + [0.0] * 2)


def test_user_loss_function(tmp_path, monkeypatch):
    (tmp_path / "myloss.py").write_text(
        "import tensorflow as tf\n"
        "def squared(y_true, y_pred):\n"
        "    return tf.reduce_sum((tf.cast(y_true, y_pred.dtype) - y_pred) ** 2, axis=-1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from types import SimpleNamespace

    loss = resolve_loss(SimpleNamespace(name=None, options={}, function="myloss:squared"))
    model = cases.mlp()
    inputs, labels, weights = cases.batch_for(model, regression=True)
    ref = cases.reference(model, loss, inputs, labels, weights)
    mse = cases.reference(model, cases.resolved("mse"), inputs, labels, weights)
    np.testing.assert_allclose(ref.hessian, 3 * mse.hessian, rtol=1e-10)  # sum = 3 x mean over 3 outputs
    part = CurvatureEngine(model, loss, precision="float64").partial(
        inputs, labels, weights, np.arange(7), BatchWork(hessian_diagonal="exact"))
    np.testing.assert_allclose(part.sums["hessian_diagonal"], np.diag(ref.hessian), rtol=1e-10)


def test_loss_errors_and_warnings():
    with pytest.raises(InputError, match="unknown loss 'nope'"):
        cases.resolved("nope")
    with pytest.raises(InputError, match="does not take option"):
        cases.resolved("mse", from_logit=True)
    with pytest.warns(UserWarning, match="piecewise linear"):
        cases.resolved("mae")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cases.resolved("huber")


def test_mc_ggn_refuses_loss_without_predictive_distribution():
    model = cases.mlp()
    engine = CurvatureEngine(model, cases.resolved("huber"), precision="float64")
    inputs, labels, _ = cases.batch_for(model, regression=True)
    with pytest.raises(InputError, match="use method: exact"):
        engine.partial(inputs, labels, None, np.arange(7), BatchWork(ggn_diagonal="mc"))


def test_a_worker_keeps_only_the_current_passs_vectors_converted():
    """Each pass of a Lanczos run or of Hutchinson probes sends new vectors: the tensors made
    from earlier passes' vectors are dropped (probes_bench: a worker grew from 1.3 to 7.7 GiB
    over 72 passes of 14 probes before), while the batches of one shard share the current ones."""
    model = cases.MODELS["mlp"]()
    loss = cases.resolved("sparse_categorical_crossentropy", from_logits=True)
    inputs, labels, weights = _batch(model, None)
    engine = CurvatureEngine(model, loss, precision="float64", hvp_block=2)
    rows = np.arange(len(weights))
    for seed in range(5):  # five passes, two batches each
        vectors = np.random.default_rng(seed).normal(size=(3, engine.parameters))
        for _ in range(2):
            engine.partial(inputs, labels, weights, rows, BatchWork(hvp_vectors=vectors))
        assert {key[0] for key in engine.hvps.vectors} == {id(vectors)}
        assert len(engine.hvps.vectors) == 2  # blocks of 2 and 1 of the 3 vectors


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_xla_hvps_are_kept_only_where_they_agree(model_name):
    """With ``xla="on"`` each HVP function is tried under XLA on its first batch; whichever
    is kept, the HVPs equal the plain graph's, and the try says what it measured."""
    model = cases.MODELS[model_name]()
    loss = cases.resolved("sparse_categorical_crossentropy", from_logits=True)
    inputs, labels, weights = _batch(model, None)
    rows = np.arange(len(weights))
    plain = CurvatureEngine(model, loss, precision="float32", xla="off")
    tried = CurvatureEngine(model, loss, precision="float32", xla="on")
    vectors = np.random.default_rng(0).normal(size=(2, plain.parameters))
    work = BatchWork(hvp_vectors=vectors)
    want = plain.partial(inputs, labels, weights, rows, work).sums["hvp"]
    got = tried.partial(inputs, labels, weights, rows, work).sums["hvp"]
    assert plain.xla_trials == {}
    (report,) = tried.xla_trials.values()
    assert report["chosen"] in ("xla", "plain")
    if "failed" not in report:
        assert report["agrees"] == (report["error"] <= 1e-4)
        assert report["plain_s"] > 0 and report["xla_s"] > 0
    if report["chosen"] == "xla":
        assert report["agrees"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_xla_twin_that_disagrees_is_dropped():
    """An XLA twin whose numbers differ (here: a deliberately perturbed function) is never
    chosen, however fast."""
    plain = tf.function(lambda x: tf.reduce_sum(tf.sin(x) * x))
    wrong = tf.function(lambda x: tf.reduce_sum(tf.sin(x) * x) * (1 + 1e-3), jit_compile=True)
    reports = []
    trial = XlaTrial(plain, wrong, 1e-4, reports.append)
    x = tf.constant(np.linspace(0.1, 1.0, 50), tf.float32)
    assert float(trial(x)) == pytest.approx(float(plain(x)))
    assert reports[0]["agrees"] is False and reports[0]["chosen"] == "plain"
    assert reports[0]["error"] == pytest.approx(1e-3, rel=0.1)
    with pytest.raises(ValueError, match="xla must be"):
        CurvatureEngine(cases.MODELS["mlp"](), cases.resolved("mse"), xla="yes")


def _traced_functions(engine):
    """Every ``tf.function`` the engine compiled (an XLA trial holds two)."""
    found = []
    for fn in engine.core._functions.values():
        for candidate in (fn.plain, fn.xla) if isinstance(fn, XlaTrial) else (fn,):
            if hasattr(candidate, "experimental_get_tracing_count"):
                found.append(candidate)
    return found


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "batchnorm", "two_inputs"])
def test_each_compiled_function_is_traced_once_whatever_the_batch_size(model_name):
    """A worker streams full batches and a shorter last one per shard: every function's
    signature leaves the batch axis open, so one trace serves every batch size (no padding, no
    retracing; batch-mixing layers see only real rows)."""
    model = cases.MODELS[model_name]("float32")
    loss = cases.resolved("sparse_categorical_crossentropy", from_logits=True)
    engine = CurvatureEngine(model, loss, precision="float32", hvp_block=2)
    rng = np.random.default_rng(0)
    works = [BatchWork(gradient=True), BatchWork(sum_grad_squared=True), BatchWork(ggn_diagonal="mc", seed=1),
             BatchWork(ggn_diagonal="exact"), BatchWork(probes=rng.choice([-1, 1], size=(2, engine.parameters)).astype(np.int8),
                                                        hvp_vectors=rng.normal(size=(2, engine.parameters)))]
    start = 0
    for n in (8, 8, 3, 8, 5):
        inputs, labels, weights = _batch(model, None, n=n, seed=n)
        for work in works:
            engine.partial(inputs, labels, weights, np.arange(start, start + n), work)
        start += n
    counts = [fn.experimental_get_tracing_count() for fn in _traced_functions(engine)]
    assert len(counts) >= 4 and all(count <= 1 for count in counts), counts


# ------------------------------------------------------------------------------ cotangents
