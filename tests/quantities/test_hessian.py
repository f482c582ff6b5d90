"""Dense Hessian blocks (``quantities.hessian``, contract 5.2) against the truth: closed forms, a
float64 ``tape.jacobian`` reference, the sub-blocks of the full matrix, and end to end on Ray
(shard invariance, ``variables:``, the published layout, the plan's refusal)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

import cases
import jobs
import keras
import pipeline
from pipeline.curvature.engine import CurvatureEngine
from pipeline.curvature.requests import BatchWork
from pipeline.errors import InputError
from pipeline.job import load_job
from pipeline.plan import make_plan
from pipeline import blocks
from pipeline.read.report import write_report


def _embedding(dtype="float64", seed=0):
    keras.utils.set_random_seed(seed)
    with cases._Policy(dtype):
        return keras.Sequential([keras.Input((4,), dtype="int32"), keras.layers.Embedding(7, 3, name="embed"),
                                 keras.layers.Flatten(name="flat"), keras.layers.Dense(3, name="out")], name="emb")


MODELS = {**{name: cases.MODELS[name] for name in ("mlp", "cnn", "batchnorm")}, "embedding": _embedding}


def _dense_hessian(model, loss, inputs, labels, weights) -> np.ndarray:
    """sum_i s_i H_i by nested tapes (gradients densified: an Embedding's is IndexedSlices)."""
    variables = model.trainable_variables
    x = [tf.constant(a) if np.asarray(a).dtype.kind == "i" else tf.constant(a, tf.float64) for a in inputs]
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            out = model(x[0] if len(x) == 1 else x, training=False)
            total = tf.reduce_sum(tf.constant(weights, tf.float64) * loss([tf.constant(y) for y in labels], [out]))
        grads = [tf.convert_to_tensor(g) for g in inner.gradient(total, variables)]
        flat = tf.concat([tf.reshape(g, [-1]) for g in grads], 0)
    rows = outer.jacobian(flat, variables, experimental_use_pfor=False)
    size = int(flat.shape[0])
    return np.concatenate([tf.reshape(tf.convert_to_tensor(r), [size, -1]).numpy() for r in rows], axis=1)


def _batch(model, n=7):
    inputs, labels, weights = cases.batch_for(model, n=n, classes=3)
    if model.name == "emb":
        inputs = [np.random.default_rng(2).integers(0, 7, size=(n, 4)).astype(np.int32)]
    return inputs, labels, weights


@pytest.mark.parametrize("name,precision", [(name, "float64") for name in MODELS] +
                         [("mlp", "float32"), ("cnn", "float32"), ("embedding", "float32")])
def test_blocks_equal_the_dense_reference_and_its_sub_blocks(name, precision):
    model = MODELS[name]()
    loss = cases.resolved("sparse_categorical_crossentropy", from_logits=True)
    inputs, labels, weights = _batch(model)
    reference = _dense_hessian(model, loss, inputs, labels, weights)
    engine = CurvatureEngine(model, loss, precision=precision, diagonal_block=8)
    names = engine.names
    shapes = [(size,) for size in engine.sizes]
    wanted = {kind: blocks.of(kind, names, shapes) for kind in ("full", "variable", "layer")}
    every = [block for kind in wanted.values() for block in kind]
    part = engine.partial(inputs, labels, weights, np.arange(len(weights)),
                          BatchWork(hessian_blocks=tuple(block.members for block in every)))
    scale = np.abs(reference).max()
    tolerance = 1e-11 if precision == "float64" else 2e-4
    for number, block in enumerate(every):
        got = part.sums[f"hessian_block_{number}"]
        where = blocks.positions(block, shapes)
        np.testing.assert_allclose(got, reference[np.ix_(where, where)], atol=tolerance * scale, err_msg=block.name)
        # The raw (unsymmetrised) sums are symmetric to float rounding.
        assert np.abs(got - got.T).max() <= (1e-13 if precision == "float64" else 1e-5) * scale
    assert [b.name for b in wanted["full"]] == ["__all__"]
    assert [b.name for b in wanted["variable"]] == names
    assert len(wanted["layer"]) == len({n.rsplit("/", 1)[0] for n in names})


def test_full_block_of_linear_and_logistic_regression_equals_the_closed_form():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3))
    xt = np.hstack([x, np.ones((40, 1))])
    for loss_name, labels in (("mse", rng.normal(size=(40, 1))),
                              ("binary_crossentropy", rng.integers(0, 2, size=(40, 1)).astype(np.float64))):
        keras.utils.set_random_seed(4)
        with cases._Policy("float64"):
            model = keras.Sequential([keras.Input((3,), dtype="float64"), keras.layers.Dense(1)])
        options = {"from_logits": True} if loss_name != "mse" else {}
        engine = CurvatureEngine(model, cases.resolved(loss_name, **options), precision="float64")
        part = engine.partial([x], [labels], None, np.arange(40), BatchWork(hessian_blocks=((0, 1),)))
        if loss_name == "mse":
            closed = 2.0 / 40 * xt.T @ xt
        else:
            kernel, bias = (v.numpy() for v in model.trainable_variables)
            p = 1 / (1 + np.exp(-(x @ kernel + bias)[:, 0]))
            closed = (xt * (p * (1 - p))[:, None]).T @ xt / 40
        np.testing.assert_allclose(part.sums["hessian_block_0"] / part.weight_sum, closed, rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Three runs of one job: the full Hessian on 1 shard and on 7 (two workers), and the
    per-layer blocks of the output layer alone (``variables: ["out/*"]``)."""
    import ray

    root = tmp_path_factory.mktemp("hessian")
    jobs.write_data(root / "data", rows=120, files=2)
    jobs.write_model(str(root / "model.keras"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3"}})
    try:
        runs = {}
        for label, hessian, extra in (("one", {"blocks": "full"}, {"shards": 1, "workers": 1}),
                                      ("seven", {"blocks": "full"}, {"shards": 7, "workers": 2}),
                                      ("head", {"blocks": "layer"}, {"variables": ["out/*"], "shards": 3})):
            spec = load_job(jobs.job(root, {"hessian": hessian, "hessian_diagonal": {}}, **extra))
            runs[label] = pipeline.run(spec, run_id=label, stream=open(os.devnull, "w"))
        yield root, runs
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_the_full_hessian_is_shard_invariant_symmetric_and_read_back(published):
    _, runs = published
    one, seven = runs["one"].hessian(), runs["seven"].hessian()
    assert one.shape == (53, 53)
    np.testing.assert_allclose(seven, one, rtol=1e-12, atol=1e-15 * np.abs(one).max())
    assert np.array_equal(one, one.T)  # published exactly symmetric
    np.testing.assert_allclose(np.diag(one), runs["one"].diagonals["hessian_diagonal"].to_numpy(), rtol=1e-12)
    table = pq.read_table(os.path.join(runs["one"].run_dir, "hessian.parquet"))
    assert table.schema.names == ["block", "variable", "index", "row"]
    row_type = table.schema.field("row").type
    assert pa.types.is_list(row_type) and pa.types.is_float64(row_type.value_type)
    assert table.column("variable").to_pylist()[:2] == ["hidden/kernel", "hidden/kernel"]
    with pytest.raises(InputError, match="no block 'out' in hessian.parquet"):
        runs["one"].hessian("out")


@pytest.mark.slow
def test_report_draws_a_heat_map_and_eigenvalue_histogram_per_block(published, tmp_path):
    from plots import check_plots

    _, runs = published
    report = write_report(runs["head"], out=str(tmp_path / "r"))
    assert [p for p in report.plots if p.startswith("hessian")] == ["hessian-01-out.png"]
    check_plots(report.out_dir, report.plots)
    page = open(report.html, encoding="utf-8").read()
    largest = np.linalg.eigvalsh(runs["head"].hessian("out"))[-1]
    assert "<h2>Hessian blocks</h2>" in page and f"{largest:.6g}" in page


@pytest.mark.slow
def test_a_selected_layer_block_is_the_sub_block_of_the_whole_model(published):
    _, runs = published
    whole, head = runs["one"].hessian(), runs["head"]
    manifest = head.manifest
    assert manifest["parameters"] == 18 and [v["name"] for v in manifest["variables"]] == ["out/kernel", "out/bias"]
    np.testing.assert_allclose(head.hessian("out"), whole[35:, 35:], rtol=1e-12, atol=1e-15 * np.abs(whole).max())
    assert json.loads(pq.read_table(os.path.join(head.run_dir, "hessian.parquet")).schema.metadata[
        b"hessian_pipeline"])["parameters"] == 18


def test_a_block_over_max_parameters_is_refused_at_plan_time(tmp_path):
    jobs.write_data(tmp_path / "data", rows=20, files=1)
    jobs.write_model(str(tmp_path / "model.keras"))
    spec = load_job(jobs.job(tmp_path, {"hessian": {"blocks": "full", "max_parameters": 40}}))
    with pytest.raises(InputError, match=r"block '__all__' has 53 parameters, more than max_parameters=40 .* "
                                         r"use hessian: \{blocks: variable\}"):
        make_plan(spec, cluster={"CPU": 1})
    ok = load_job(jobs.job(tmp_path, {"hessian": {"blocks": "variable", "max_parameters": 40}}))
    plan = make_plan(ok, cluster={"CPU": 1})
    assert [q.name for q in plan.cost.quantities] == ["hessian"] and plan.cost.quantities[0].worker_bytes > 0


def test_a_large_block_is_pooled_to_readable_cells_keeping_sign_and_magnitude():
    """A 2,080-wide block drawn into a few hundred pixels read as noise (rows dropped): pooled,
    each cell is the largest-magnitude entry of its tile, sign kept, so no entry is lost."""
    from pipeline.read.report import HEAT_CELLS, pooled

    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(2080, 2080)) * 1e-3
    matrix[1000, 7] = -5.0  # one entry far larger than the rest, negative
    cells, k = pooled(matrix)
    assert k == 10 and cells.shape == (208, 208) == (HEAT_CELLS, HEAT_CELLS)
    assert cells[1000 // k, 7 // k] == -5.0
    tile = matrix[:k, :k]
    assert cells[0, 0] == tile.flat[np.abs(tile).argmax()]
    small = rng.normal(size=(30, 30))
    assert pooled(small)[1] == 1 and pooled(small)[0] is small
