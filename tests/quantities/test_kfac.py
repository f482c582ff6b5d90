"""``layer_inputs`` and ``kfac`` end to end (real Ray, real Parquet, a saved Keras model): shard
invariance, the Gram of the inputs read by a Keras sub-model, EK-FAC against the per-layer
Monte Carlo GGN of the same draws, the files, the API, the report; and Keras' own GPTQ fed by the
published matrix against GPTQ fed by its own."""

from __future__ import annotations

import os

import keras
import numpy as np
import pyarrow.parquet as pq
import pytest

import cases
import jobs
import pipeline
from keras.src.quantizers.gptq import GPTQ
from keras.src.quantizers.gptq_config import GPTQConfig
from pipeline.curvature.engine import CurvatureEngine
from pipeline.curvature.requests import BatchWork, KroneckerRequest
from pipeline.errors import InputError
from pipeline.job import load_job
from pipeline.plan import make_plan
from pipeline.read.report import write_report

QUANTITIES = {"layer_inputs": {"bias": True}, "kfac": {"fisher_type": "mc", "samples": 2, "eigen_correction": True},
              "ggn_diagonal": {"method": "mc", "samples": 2}}


@pytest.fixture(scope="module")
def published(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("kronecker")
    x, _, _ = jobs.write_data(root / "data", rows=120, files=2)
    jobs.write_model(str(root / "model.keras"))
    runs = {}
    for label, extra in (("one", {"shards": 1, "workers": 1}), ("seven", {"shards": 7, "workers": 2})):
        spec = load_job(jobs.job(root, QUANTITIES, **extra))
        runs[label] = pipeline.run(spec, run_id=label, stream=open(os.devnull, "w"))
    return root, x, runs


@pytest.mark.slow
def test_factors_are_shard_invariant_and_the_inputs_gram_of_a_keras_sub_model(published):
    root, x, runs = published
    one, seven = runs["one"], runs["seven"]
    assert one.blocks("kfac") == one.blocks("layer_inputs") == ["hidden", "out"]
    model = keras.models.load_model(str(root / "model.keras"))
    for layer in ("hidden", "out"):
        rows = np.asarray(keras.Model(model.inputs[0], model.get_layer(layer).input)(x.astype(np.float32)),
                          dtype=np.float64)
        rows = np.concatenate([rows, np.ones((len(rows), 1))], axis=1)
        want = rows.T @ rows / len(rows)  # the sub-model computes in float32, the run in float64
        np.testing.assert_allclose(one.layer_inputs(layer), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
        np.testing.assert_allclose(seven.layer_inputs(layer), one.layer_inputs(layer), rtol=1e-12, atol=1e-15)
        for got, want in zip(seven.kfac(layer), one.kfac(layer)):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-15)
        np.testing.assert_allclose(seven.kfac_eigen(layer), one.kfac_eigen(layer), rtol=1e-10, atol=1e-15)
        np.testing.assert_array_equal(one.kfac(layer)[0], one.layer_inputs(layer))  # both with the bias's 1
    assert one.manifest["layer_positions"] == {"hidden": 1.0, "out": 1.0}


@pytest.mark.slow
def test_ekfac_eigenvalues_sum_to_the_monte_carlo_ggn_of_the_same_draws(published):
    """``sum_ac (Q_A^T G Q_S)**2 = ||G||**2``: each layer's EK-FAC eigenvalues add up to the sum of
    its Monte Carlo GGN diagonal, whose per-layer rules draw the same labels from (seed, sample,
    row) by another route."""
    _, _, runs = published
    run = runs["one"]
    for layer in ("hidden", "out"):
        eigen = run.kfac_eigen(layer)
        a, s = run.kfac(layer)
        assert eigen.shape == (len(a), len(s)) and eigen.min() >= 0
        ggn = sum(float(run.arrays("ggn_diagonal")[f"{layer}/{v}"].sum()) for v in ("kernel", "bias"))
        assert eigen.sum() == pytest.approx(ggn, rel=1e-10)
        # K-FAC's own eigenvalues (kron of the factors') differ: EK-FAC corrects them.
        assert not np.allclose(np.sort(np.outer(np.linalg.eigvalsh(a), np.linalg.eigvalsh(s)).ravel()),
                               np.sort(eigen.ravel()), rtol=1e-3)


@pytest.mark.slow
def test_files_api_and_report(published, tmp_path):
    _, _, runs = published
    run = runs["one"]
    names = {name: pq.read_schema(os.path.join(run.run_dir, f"{name}.parquet")).names
             for name in ("layer_inputs", "kfac", "kfac_eigen")}
    assert names == {"layer_inputs": ["block", "index", "row"], "kfac": ["block", "factor", "index", "row"],
                     "kfac_eigen": ["block", "index", "value"]}
    with pytest.raises(InputError, match=r"no block 'nope' in kfac.parquet \(blocks: hidden, out\)"):
        run.kfac("nope")
    report = write_report(run, out=str(tmp_path / "report"))
    assert "factors.png" in report.plots
    page = open(report.html, encoding="utf-8").read()
    largest = np.linalg.eigvalsh(run.kfac("hidden")[1])[-1]
    assert "<h2>Kronecker factors</h2>" in page and f"{largest:.6g}" in page


def test_the_plan_lists_each_layers_factors_and_refuses_what_it_cannot_factor(tmp_path):
    jobs.write_data(tmp_path / "data", rows=20, files=1)
    jobs.write_model(str(tmp_path / "model.keras"))
    plan = make_plan(load_job(jobs.job(tmp_path, {"kfac": {"eigen_correction": True}})), cluster={"CPU": 1})
    assert "kfac: 2 layers: hidden: A 7 x 7, S 5 x 5 (0 MiB float64), 1 position per example; out: A 6 x 6, S 3 x 3" \
        in "\n".join(plan.notes)
    assert plan.passes == 2 and plan.cost.quantities[0].driver_bytes > 0
    with pytest.raises(InputError, match=r"quantities.kfac: layer 'hidden' has a factor of 7 x 7 .* wider than "
                                         r"max_dimension=6: leave the layer out with variables"):
        make_plan(load_job(jobs.job(tmp_path, {"kfac": {"max_dimension": 6}})), cluster={"CPU": 1})
    with cases._Policy("float32"):
        keras.Sequential([keras.Input((6,)), keras.layers.Dense(6, name="twin")]).save(str(tmp_path / "twin.keras"))
    huber = jobs.job(tmp_path, {"kfac": {"fisher_type": "mc"}}, model=str(tmp_path / "twin.keras"), loss="huber",
                     data={"labels": "x"})
    with pytest.raises(InputError, match=r"quantities.kfac: fisher_type mc draws labels .* use fisher_type: "
                                         r"empirical or exact"):
        make_plan(load_job(huber), cluster={"CPU": 1})
    with cases._Policy("float32"):
        keras.Sequential([keras.Input((6,)), keras.layers.LayerNormalization(name="norm"),
                          keras.layers.Activation("softmax")]).save(str(tmp_path / "norm.keras"))
    with pytest.raises(InputError, match="need a Dense, EinsumDense, Conv1D or Conv2D layer among the selected"):
        make_plan(load_job(jobs.job(tmp_path, {"layer_inputs": {}}, model=str(tmp_path / "norm.keras"))),
                  cluster={"CPU": 1})


def test_keras_gptq_fed_by_layer_inputs_quantizes_as_it_does_from_its_own_hessian():
    """Keras' GPTQ (``keras/src/quantizers/gptq.py``) builds ``H = 2 X^T X / n`` over the n rows of
    every position; ``H = 2 A / R`` from ``layer_inputs`` (R positions per example) must give the
    same quantized kernel, and a wrong H (the identity) another."""
    rng = np.random.default_rng(0)
    sequences = rng.normal(size=(40, 7, 16)).astype(np.float32) * rng.uniform(0.1, 3.0, size=16).astype(np.float32)
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((7, 16)), keras.layers.Dense(24, name="proj")])
    engine = CurvatureEngine(model, cases.resolved("mse"), precision="float64")
    part = engine.partial([sequences], [np.zeros((40, 7, 24))], None, np.arange(40),
                          BatchWork(kronecker=(KroneckerRequest("layer_inputs"),)))
    (path,) = [key for key in part.sums if key.endswith("/A")]
    inputs = part.sums[path] / part.sums["layer_inputs/weight"]  # A, as layer_inputs publishes it
    positions = part.sums[path.replace("/A", "/positions")] / 40

    def quantized(hessian=None):
        keras.utils.set_random_seed(1)
        layer = keras.layers.Dense(24)
        layer.build((None, 16))
        layer.set_weights(model.get_layer("proj").get_weights())
        config = GPTQConfig(dataset=None, tokenizer=None, weight_bits=4, symmetric=False, group_size=-1)
        layer.quantize("gptq", config=config)
        gptq = GPTQ(layer, config)
        if hessian is None:
            gptq.update_hessian_with_batch(sequences)  # Keras' own, from the same rows
            own = np.asarray(gptq.hessian, dtype=np.float64)
        else:
            gptq.hessian = keras.ops.convert_to_tensor(hessian.astype(np.float32))
            own = None
        gptq.quantize_and_correct_layer()
        return np.asarray(layer.quantized_kernel), own

    theirs, their_hessian = quantized()
    ours, _ = quantized(2.0 * inputs / positions)
    np.testing.assert_allclose(2.0 * inputs / positions, their_hessian, rtol=1e-5, atol=1e-6)
    assert positions == 7.0
    assert np.mean(ours == theirs) > 0.99, np.mean(ours == theirs)
    wrong, _ = quantized(np.eye(16))
    assert np.mean(wrong != theirs) > 0.05
