"""Exports (contract 6.3): ``export --format npz|weights``, the diagonal Laplace approximation
against the closed form of a linear-Gaussian model, Fisher-weighted ``merge`` against its
formula, and the EWC regularizer in a real Keras training loop. Every run is a real one: real
Parquet, real saved models, the pipeline on a local Ray. The last tests call ``commands`` and
``models`` directly on a run published by hand (``handmade.py``), without Ray."""

from __future__ import annotations

import hashlib
import io
import os
import re

import keras
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cases
import jobs
import pipeline
from handmade import publish
from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.exports import commands, models
from pipeline.exports import laplace as laplace_math
from pipeline.exports.ewc import EWC, attach
from pipeline.exports.merge import fisher_weighted

SIGMA, DELTA = 0.7, 3.0
SCALES = np.array([3.0, 2.0, 1.0, 0.5])


def cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def _linear_gaussian(folder):
    """``y = X w + sigma eps`` with orthogonal columns of ``X`` (so that the diagonal Laplace
    is exact), and a one-Dense model holding the MAP weights for prior precision ``DELTA``."""
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(64, 4)))
    x = q * SCALES
    y = x @ np.array([1.0, -0.5, 0.25, 2.0]) + SIGMA * rng.normal(size=64)
    precision = x.T @ x / SIGMA ** 2 + DELTA * np.eye(4)
    w_map = np.linalg.solve(precision, x.T @ y / SIGMA ** 2)
    os.makedirs(folder / "data", exist_ok=True)
    pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 4), "y": pa.array(y)}),
                   folder / "data" / "part-0.parquet")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,), dtype="float64"),
                              keras.layers.Dense(1, use_bias=False, dtype="float64", name="linear")])
    model.get_layer("linear").kernel.assign(w_map.reshape(4, 1))
    model.save(folder / "linear.keras")
    return x, y, w_map


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_local):
    """``{"linear": Run, "a": Run, "b": Run, "root": folder}``: a linear-Gaussian run (exact GGN
    diagonal) and two runs of two MLPs of one architecture (Fisher and GGN diagonals)."""
    root = tmp_path_factory.mktemp("exports")
    x, y, w_map = _linear_gaussian(root)
    linear = pipeline.run({
        "name": "linear", "model": str(root / "linear.keras"), "loss": "mse", "precision": "float64",
        "data": {"path": str(root / "data"), "features": "x", "labels": "y", "batch_size": 16},
        "quantities": {"ggn_diagonal": {"method": "exact"}}, "output": str(root / "results")},
        run_id="linear", stream=io.StringIO())
    jobs.write_data(root / "mlp-data", rows=120, files=2)
    made = {}
    for name, seed in (("a", 0), ("b", 5)):
        cases.mlp(seed=seed).save(root / f"{name}.keras")
        spec = jobs.job(root, {"fisher_diagonal": {}, "ggn_diagonal": {"method": "exact"}, "gradient": {}},
                        model=str(root / f"{name}.keras"), data={"path": str(root / "mlp-data")}, name="mlp")
        made[name] = pipeline.run(spec, run_id=name, stream=io.StringIO())
    return {"linear": linear, "x": x, "y": y, "w_map": w_map, "root": root, **made}


def test_npz_export_holds_every_diagonal_shaped_like_its_variable(runs, tmp_path):
    run = runs["a"]
    status, out, err = cli("export", run.run_dir, "--out", str(tmp_path / "a.npz"))
    assert status == 0 and err == "" and out == f"{tmp_path / 'a.npz'}\n"
    saved = np.load(tmp_path / "a.npz")
    expected = {f"{q}/{name}" for q in ("fisher_diagonal", "ggn_diagonal", "gradient") for name, _ in run.variables}
    assert set(saved.files) == expected | {"examples", "weight_sum"}
    for quantity in ("fisher_diagonal", "ggn_diagonal", "gradient"):
        for name, array in run.arrays(quantity).items():
            assert saved[f"{quantity}/{name}"].shape == array.shape and saved[f"{quantity}/{name}"].dtype == np.float64
            np.testing.assert_array_equal(saved[f"{quantity}/{name}"], array)
    assert int(saved["examples"]) == 120 and float(saved["weight_sum"]) == pytest.approx(run.manifest["weight_sum"])
    assert sorted(os.listdir(tmp_path)) == ["a.npz"]  # no temporary left beside it
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "a.npz").st_mode & 0o777 == 0o666 & ~umask  # as any new file, not private


def test_export_refuses_an_output_inside_the_run_and_a_missing_quantity(runs, tmp_path):
    run = runs["a"]
    (tmp_path / "folder").mkdir()
    for argv, message in (
            (("export", run.run_dir, "--out", str(tmp_path / "folder")), "is a folder"),
            (("export", run.run_dir, "--out", str(tmp_path) + "/"), "is a folder"),
            (("export", run.run_dir, "--out", str(tmp_path / "x.h5")), "must end with .npz"),
            (("export", run.run_dir, "--format", "weights", "--out", str(tmp_path / "x.npz")),
             "must end with .weights.h5"),
            (("export", run.run_dir, "--prior-precision", "3", "--out", str(tmp_path / "x.npz")),
             "--prior-precision apply only with --laplace"),
            (("export", run.run_dir, "--quantity", "bogus", "--model", "m.keras", "--out", str(tmp_path / "x.npz")),
             "--quantity, --model apply only with --laplace"),
            (("export", run.run_dir, "--laplace", "--sigma-noise", "-1", "--out", str(tmp_path / "x.npz")),
             "--sigma-noise must be a positive number"),
            (("export", run.run_dir, "--laplace", "--model", "README.md", "--out", str(tmp_path / "x.npz")),
             "--model README.md is not a .keras file"),
            (("export", run.run_dir, "--out", os.path.join(run.run_dir, "x.npz")), "inside the published run"),
            (("export", run.run_dir, "--out", str(tmp_path / "no" / "x.npz")), "does not exist"),
            (("export", run.run_dir, "--laplace", "--quantity", "hessian_diagonal", "--out", str(tmp_path / "x.npz")),
             "has no hessian_diagonal"),
            (("export", run.run_dir, "--laplace", "--prior-precision", "-1", "--out", str(tmp_path / "x.npz")),
             "must be a positive number or auto"),
            (("export", run.run_dir, "--laplace", "--model", str(runs["root"] / "b.keras"),
              "--out", str(tmp_path / "x.npz")), "is not the one run a measured")):
        status, out, err = cli(*argv)
        assert status == 2 and out == "" and err.count("\n") == 1 and message in err, err
    assert os.listdir(tmp_path) == ["folder"] and os.listdir(tmp_path / "folder") == []


def test_laplace_equals_the_closed_form_of_a_linear_gaussian_model(runs, tmp_path):
    """With orthogonal inputs the GGN is diagonal and exact, so the diagonal Laplace evidence at
    the MAP is the exact evidence ``log N(y; 0, sigma^2 I + X X^T / delta)`` and the posterior
    variances are ``1 / (x_j^T x_j / sigma^2 + delta)``."""
    x, y = runs["x"], runs["y"]
    path = pipeline.export(runs["linear"].run_dir, out=str(tmp_path / "l.npz"), laplace=True, prior_precision=DELTA,
                           sigma_noise=SIGMA)
    saved = np.load(path)
    exact_variance = 1.0 / (SCALES ** 2 / SIGMA ** 2 + DELTA)
    np.testing.assert_allclose(saved["posterior_variance/linear/kernel"].reshape(-1), exact_variance, rtol=1e-10)
    covariance = SIGMA ** 2 * np.eye(len(y)) + x @ x.T / DELTA
    _, log_det = np.linalg.slogdet(2 * np.pi * covariance)
    exact_evidence = -0.5 * (log_det + y @ np.linalg.solve(covariance, y))
    assert float(saved["laplace/log_marginal_likelihood"]) == pytest.approx(exact_evidence, rel=1e-10)
    assert float(saved["laplace/prior_precision"]) == DELTA and str(saved["laplace/quantity"]) == "ggn_diagonal"
    grid = saved["laplace/grid/prior_precision"]
    assert grid.shape == saved["laplace/grid/log_marginal_likelihood"].shape == (laplace_math.GRID_POINTS,)


def test_auto_prior_precision_maximises_the_evidence(runs, tmp_path):
    status, out, err = cli("export", runs["linear"].run_dir, "--out", str(tmp_path / "auto.npz"), "--laplace",
                           "--sigma-noise", str(SIGMA))
    assert status == 0 and err == ""
    saved = np.load(tmp_path / "auto.npz")
    best = float(saved["laplace/prior_precision"])
    curve = saved["laplace/grid/log_marginal_likelihood"]
    assert float(saved["laplace/log_marginal_likelihood"]) >= curve.max() - 1e-9
    run = runs["linear"]
    f = run.arrays("ggn_diagonal")["linear/kernel"].reshape(-1)
    like = laplace_math.likelihood("gaussian", 1, SIGMA)
    precision = laplace_math.data_precision(f, run.manifest["weight_sum"], like)
    near = laplace_math.log_marginal_likelihood([best / 1.001, best, best * 1.001], precision, runs["w_map"], run.loss,
                                                run.manifest["weight_sum"], like)
    assert near[1] >= near[0] and near[1] >= near[2]


def test_laplace_math_units():
    assert laplace_math.likelihood("categorical_sparse", 10) == laplace_math.Likelihood(1.0, 0.0)
    assert laplace_math.likelihood("bernoulli", 3) == laplace_math.Likelihood(3.0, 0.0)
    with pytest.raises(InputError, match="negative log-likelihood"):
        laplace_math.likelihood("", 1)
    with pytest.raises(InputError, match="no maximum"):
        laplace_math.fit(np.ones(3), np.zeros(3), 0.1, 10, laplace_math.Likelihood(1.0, 0.0))
    fitted = laplace_math.fit(np.array([-1.0, 2.0]), np.array([1.0, 1.0]), 0.1, 10, laplace_math.Likelihood(1.0, 0.0),
                              prior_precision=2.0)
    np.testing.assert_allclose(fitted.posterior_variance, [1 / 2.0, 1 / 22.0])  # a negative entry clipped to 0


def test_merge_is_the_fisher_weighted_average(runs, tmp_path):
    root = runs["root"]
    status, out, err = cli("merge", "--model", str(root / "a.keras"), "--run", runs["a"].run_dir,
                           "--model", str(root / "b.keras"), "--run", runs["b"].run_dir, "--out", str(tmp_path / "m.keras"))
    assert status == 0 and err == "" and out == f"{tmp_path / 'm.keras'}\n"
    merged = keras.models.load_model(tmp_path / "m.keras")
    models = [keras.models.load_model(root / f"{n}.keras") for n in "ab"]
    for k, variable in enumerate(merged.variables):
        fa, fb = (runs[n].arrays("fisher_diagonal")[variable.path] for n in "ab")
        wa, wb = (m.variables[k].numpy() for m in models)
        np.testing.assert_allclose(variable.numpy(), (fa * wa + fb * wb) / (fa + fb), rtol=1e-12)
    assert sorted(os.listdir(tmp_path)) == ["m.keras"]


def test_fisher_weighted_average_where_every_fisher_is_zero_is_the_plain_mean():
    w = [{"k": np.array([1.0, 2.0, 4.0])}, {"k": np.array([3.0, 6.0, 0.0])}]
    f = [{"k": np.array([0.0, 1.0, 0.0])}, {"k": np.array([0.0, 3.0, 2.0])}]
    np.testing.assert_allclose(fisher_weighted(w, f)["k"], [2.0, (2 + 18) / 4, 0.0])
    np.testing.assert_allclose(fisher_weighted(w, [{}, {}])["k"], [2.0, 4.0, 2.0])  # unmeasured: plain mean
    with pytest.raises(InputError, match="negative"):
        fisher_weighted(w, [{"k": -np.ones(3)}, {"k": np.ones(3)}])


def test_merge_refuses_other_architectures_and_unpaired_arguments(runs, tmp_path):
    root = runs["root"]
    keras.utils.set_random_seed(0)
    other = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, name="out")])
    other.save(root / "other.keras")
    for argv, message in (
            (("--model", str(root / "a.keras"), "--run", runs["a"].run_dir, "--model", str(root / "a.keras")),
             "one --run per --model"),
            (("--model", str(root / "a.keras"), "--run", runs["a"].run_dir), "at least two"),
            (("--model", str(root / "a.keras"), "--run", runs["a"].run_dir, "--model", str(root / "other.keras"),
              "--run", runs["b"].run_dir), "is not the one run b measured")):
        status, out, err = cli("merge", *argv, "--out", str(tmp_path / "m.keras"))
        assert status == 2 and out == "" and err.count("\n") == 1 and message in err, err
    before = (root / "b.keras").read_bytes()
    for argv, message in (
            (("--out", str(root / "b.keras")), "is one of the inputs"),
            (("--out", str(tmp_path / "m.h5")), "must end with .keras")):
        status, out, err = cli("merge", "--model", str(root / "a.keras"), "--run", runs["a"].run_dir, "--model",
                               str(root / "b.keras"), "--run", runs["b"].run_dir, *argv)
        assert status == 2 and out == "" and err.count("\n") == 1 and message in err, err
    assert (root / "b.keras").read_bytes() == before
    assert not os.path.exists(tmp_path / "m.keras")


def test_weights_export_loads_into_the_model_as_the_fisher(runs, tmp_path):
    status, out, err = cli("export", runs["a"].run_dir, "--format", "weights", "--out", str(tmp_path / "f.weights.h5"))
    assert status == 0 and err == ""
    model = keras.models.load_model(runs["root"] / "a.keras")
    model.load_weights(tmp_path / "f.weights.h5")
    for variable in model.variables:
        np.testing.assert_allclose(variable.numpy(), runs["a"].arrays("fisher_diagonal")[variable.path], rtol=1e-6)


def test_ewc_penalty_is_the_formula_and_holds_important_weights_in_training(runs, tmp_path):
    """After a few steps of training on new data, EWC keeps the weights with the largest Fisher
    far closer to ``w*`` than the same training without it."""
    export = np.load(pipeline.export(runs["a"].run_dir, out=str(tmp_path / "a.npz")))
    rng = np.random.default_rng(1)
    x_new, y_new = rng.normal(size=(128, 6)), rng.integers(0, 3, 128)

    def train(strength):
        model = keras.models.load_model(runs["root"] / "a.keras")
        anchor = {v.path: v.numpy().copy() for v in model.trainable_variables}
        if strength:
            assert sorted(attach(model, export, strength)) == sorted(anchor)
            # at w* the penalty is 0; moved by d it is strength * sum F d^2
            kernel = model.get_layer("hidden").kernel
            kernel.assign(anchor["hidden/kernel"] + 0.1)
            expected = strength * 0.01 * export["fisher_diagonal/hidden/kernel"].sum()
            assert float(sum(float(loss) for loss in model.losses)) == pytest.approx(expected, rel=1e-6)  # floatx
            kernel.assign(anchor["hidden/kernel"])
        model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x_new, y_new, batch_size=32, epochs=3, verbose=0, shuffle=False)
        return {v.path: v.numpy() - anchor[v.path] for v in model.trainable_variables}

    free = train(0.0)
    fisher = np.concatenate([export[f"fisher_diagonal/{p}"].ravel() for p in free])
    # as strong as SGD with step 0.1 stays stable for: 0.1 * 2 * strength * max F < 1
    held = train(0.8 / (0.1 * 2 * fisher.max()))
    moved_free = np.concatenate([free[p].ravel() for p in free])
    moved_held = np.concatenate([held[p].ravel() for p in free])
    important = fisher >= np.quantile(fisher, 0.9)
    assert np.abs(moved_held[important]).mean() < 0.2 * np.abs(moved_free[important]).mean()
    regularizer = EWC(np.ones((2,)), np.zeros((2,)), 2.0)
    assert float(regularizer(keras.ops.convert_to_tensor(np.array([1.0, 3.0])))) == pytest.approx(20.0)
    with pytest.raises(InputError, match="no variable"):
        attach(keras.Sequential([keras.Input((6,)), keras.layers.Dense(2, name="z")]), export, 1.0)


# ------------------------------------------------------------------ without Ray: commands and models called directly
def test_export_checks_its_arguments_before_writing(tmp_path):
    run = publish(tmp_path, {"gradient": np.arange(8.0)})
    for options, message in (({"format": "csv"}, "--format must be one of npz, weights, got 'csv'"),
                             ({"format": "weights", "laplace": True}, "--laplace writes into an npz"),
                             ({"laplace": True, "prior_precision": "big"}, "--prior-precision must be a positive"),
                             ({"sigma_noise": float("nan")}, "--sigma-noise must be a positive number"),
                             ({"quantity": "gradient"}, "--quantity apply only with --laplace or --format weights")):
        with pytest.raises(InputError, match="^" + re.escape(message)):
            commands.export(run.run_dir, out=str(tmp_path / "x.npz"), **options)
    assert not os.path.exists(tmp_path / "x.npz")
    path = commands.export(run, out=str(tmp_path / "x.npz"))
    assert path == str(tmp_path / "x.npz")
    with np.load(path) as loaded:
        np.testing.assert_array_equal(loaded["gradient/dense/kernel"], np.arange(6.0).reshape(3, 2))
        assert int(loaded["examples"]) == 40


def test_merge_needs_two_pairs_before_it_loads_anything(tmp_path):
    with pytest.raises(InputError, match="^merge needs at least two --model/--run pairs$"):
        commands.merge([(str(tmp_path / "a.keras"), str(tmp_path / "no-run"))], str(tmp_path / "m.keras"))
    assert commands.FORMATS == ("npz", "weights")


def test_run_model_refuses_a_model_that_is_not_the_runs(tmp_path):
    cases.mlp(seed=0).save(tmp_path / "a.keras")
    cases.mlp(seed=5).save(tmp_path / "b.keras")
    digest = hashlib.sha256((tmp_path / "a.keras").read_bytes()).hexdigest()
    run = publish(tmp_path, {"gradient": np.zeros(8)}, {"model": {"path": str(tmp_path / "a.keras"), "sha256": digest},
                                                        "job": {"name": "toy", "loss": {"name": "mse"}}})
    model = models.run_model(run)  # the manifest's own
    assert [v.path for v in model.trainable_variables] == ["hidden/kernel", "hidden/bias", "out/kernel", "out/bias"]
    with pytest.raises(InputError, match=r"^model .*b.keras is not the one run r1 measured \(sha256 "):
        models.run_model(run, str(tmp_path / "b.keras"))
    with pytest.raises(InputError, match=r"^--model .*a.h5 is not a .keras file"):
        models.run_model(run, str(tmp_path / "a.h5"))
    with pytest.raises(InputError, match=r"^cannot read model .*gone.keras"):
        models.run_model(run, str(tmp_path / "gone.keras"))
    assert models.loss_family(run) == "gaussian"
    assert models.loss_family(publish(tmp_path / "other", {"gradient": np.zeros(8)})) == ""


def test_model_weights_by_path_assigned_and_saved_whole(tmp_path):
    cases.mlp(dtype="float32", seed=1).save(tmp_path / "a.keras")
    model = keras.models.load_model(tmp_path / "a.keras")  # paths as a run names them
    weights = models.weights_by_path(model)
    assert list(weights) == ["hidden/kernel", "hidden/bias", "out/kernel", "out/bias"]
    assert all(w.dtype == np.float64 for w in weights.values()) and weights["out/kernel"].shape == (5, 3)
    np.testing.assert_array_equal(weights["hidden/kernel"], model.get_layer("hidden").kernel.numpy())
    assert models.output_size(model) == 3
    models.assign(model, {"out/bias": np.array([1.0, 2.0, 3.0]), "not/a/variable": np.zeros(1)})
    assert model.get_layer("out").bias.dtype == "float32"
    np.testing.assert_array_equal(model.get_layer("out").bias.numpy(), [1.0, 2.0, 3.0])
    out = models.save_model(model, str(tmp_path / "m.keras"))
    assert out == str(tmp_path / "m.keras") and sorted(os.listdir(tmp_path)) == ["a.keras", "m.keras"]
    np.testing.assert_array_equal(keras.models.load_model(out).get_layer("out").bias.numpy(), [1.0, 2.0, 3.0])
    models.save_model(model, str(tmp_path / "m.weights.h5"), weights_only=True)
    fresh = cases.mlp(dtype="float32", seed=2)
    fresh.load_weights(tmp_path / "m.weights.h5")
    np.testing.assert_array_equal(fresh.get_layer("out").bias.numpy(), [1.0, 2.0, 3.0])
    inputs = keras.Input((2,))
    two = keras.Model(inputs, [keras.layers.Dense(1)(inputs), keras.layers.Dense(2)(inputs)])
    with pytest.raises(InputError, match="^the model has 2 outputs"):
        models.output_size(two)
