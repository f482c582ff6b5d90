"""End to end on a real local Ray: job -> shards -> workers -> reduce -> published Parquet."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

import jobs
from pipeline.curvature.engine import CurvatureEngine
from pipeline.curvature.losses import resolve_loss
from pipeline.curvature.model import load_model
from pipeline.curvature.requests import BatchWork
from pipeline.job import load_job
from pipeline.probes import PROBE_STREAM, rademacher
from pipeline.quantities.registry import finalize
from pipeline.driver import run

pytestmark = pytest.mark.slow

QUANTITIES = {
    "hessian_diagonal": {"method": "exact"},
    "ggn_diagonal": {"method": "exact"},
    "fisher_diagonal": {},
    "gradient": {},
    "hvp": {"random": 2},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    x, labels, weights = jobs.write_data(root / "data")
    jobs.write_model(str(root / "model.keras"))
    return root, x, labels, weights


def _in_process(root, x, labels, weights, work, use_weights=False, rows=None):
    spec = load_job(jobs.job(root, {"gradient": {}}))
    engine = CurvatureEngine(load_model(spec.model), resolve_loss(spec.loss), precision="float64")
    n = len(labels) if rows is None else rows
    part = engine.partial([x[:n]], [labels[:n]], weights[:n] if use_weights else None, np.arange(n), work)
    return engine, finalize(part)


def _read(run_dir, name):
    return pq.read_table(os.path.join(run_dir, name))


def test_published_numbers_equal_the_in_process_engine(ray_local, files):
    root, x, labels, weights = files
    spec = load_job(jobs.job(root, QUANTITIES))
    result = run(spec, run_id="whole")
    run_dir = result.run_dir
    manifest = json.load(open(os.path.join(run_dir, "manifest.json")))
    assert manifest["status"] == "complete" and manifest["examples"] == 230
    assert sorted(manifest["files"]) == ["diagonals.parquet", "hvp.parquet", "hvp_vectors.parquet", "summary.parquet"]
    for key in ("run_id", "date", "job", "examples", "loss", "shards", "workers", "parameters", "started_at",
                "finished_at", "seconds", "versions", "model", "data", "files"):
        assert key in manifest, key
    assert len(manifest["model"]["sha256"]) == 64 and manifest["data"]["rows"] == 230

    vectors = rademacher(0, range(2), 53, stream=1)
    engine, expected = _in_process(root, x, labels, weights,
                                   BatchWork(hessian_diagonal="exact", ggn_diagonal="exact", sum_grad_squared=True,
                                             hvp_vectors=vectors))
    diagonals = _read(run_dir, "diagonals.parquet").to_pydict()
    assert diagonals["variable"][0] == engine.names[0] and len(diagonals["index"]) == engine.parameters
    for column in ("hessian_diagonal", "ggn_diagonal", "fisher_diagonal", "gradient"):
        np.testing.assert_allclose(diagonals[column], expected[column], rtol=1e-9, atol=1e-13, err_msg=column)
    assert manifest["loss"] == pytest.approx(float(expected["loss"]), rel=1e-12)
    hvp = _read(run_dir, "hvp.parquet").to_pydict()
    np.testing.assert_allclose(np.reshape(hvp["value"], (2, -1)), expected["hvp"], rtol=1e-9, atol=1e-13)
    used = _read(run_dir, "hvp_vectors.parquet").to_pydict()
    np.testing.assert_array_equal(np.reshape(used["value"], (2, -1)), vectors)
    # Provenance travels in every Parquet file.
    meta = _read(run_dir, "summary.parquet").schema.metadata[b"hessian_pipeline"]
    assert json.loads(meta)["run_id"] == "whole"


def test_selected_variables_give_the_sub_block_of_the_whole_model(ray_local, files, tmp_path):
    """``variables: ["out/*"]`` (contract 5.1): every quantity is taken with respect to the output
    layer only, the rest held constant: its diagonals are the whole model's entries for those
    variables, its HVPs are ``H_ss v_s`` (the selected rows and columns of H), and the manifest
    lists and counts only them."""
    root, x, labels, weights = files
    quantities = {"hessian_diagonal": {"method": "exact"}, "ggn_diagonal": {"method": "exact"},
                  "fisher_diagonal": {}, "gradient": {}, "hvp": {"random": 2}}
    spec = load_job(jobs.job(root, quantities, variables=["out/*"], output=str(tmp_path)))
    run_dir = run(spec, run_id="selected").run_dir
    manifest = json.load(open(os.path.join(run_dir, "manifest.json")))
    assert [v["name"] for v in manifest["variables"]] == ["out/kernel", "out/bias"]
    assert manifest["parameters"] == 18 and manifest["job"]["variables"] == ["out/*"]
    selected = slice(53 - 18, 53)  # hidden/kernel (6, 5) and hidden/bias (5,) come first
    used = np.reshape(_read(run_dir, "hvp_vectors.parquet").to_pydict()["value"], (2, 18))
    whole = np.zeros((2, 53))
    whole[:, selected] = used
    _, expected = _in_process(root, x, labels, weights, BatchWork(hessian_diagonal="exact", ggn_diagonal="exact",
                                                                  sum_grad_squared=True, hvp_vectors=whole))
    diagonals = _read(run_dir, "diagonals.parquet").to_pydict()
    assert set(diagonals["variable"]) == {"out/kernel", "out/bias"}
    for column in ("hessian_diagonal", "ggn_diagonal", "fisher_diagonal", "gradient"):
        np.testing.assert_allclose(diagonals[column], expected[column][selected], rtol=1e-9, atol=1e-13,
                                   err_msg=column)
    hvp = np.reshape(_read(run_dir, "hvp.parquet").to_pydict()["value"], (2, 18))
    np.testing.assert_allclose(hvp, expected["hvp"][:, selected], rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("layout", [{"shards": 1, "workers": 1}, {"shards": 7, "workers": 1},
                                    {"shards": 7, "workers": 2}])
def test_result_does_not_depend_on_shards_or_workers(ray_local, files, layout, tmp_path):
    root, x, labels, weights = files
    quantities = {"hessian_diagonal": {"method": "hutchinson", "probes": 5},
                  "ggn_diagonal": {"method": "mc", "samples": 2}, "fisher_diagonal": {}, "gradient": {}}
    spec = load_job(jobs.job(root, quantities, data={"weights": "weight"}, output=str(tmp_path), **layout))
    result = run(spec, run_id="layout")
    assert result.manifest["shards"] == layout["shards"]
    probes = rademacher(0, range(5), 53, stream=PROBE_STREAM)
    _, expected = _in_process(root, x, labels, weights,
                              BatchWork(probes=probes, ggn_diagonal="mc",
                                        ggn_samples=2, sum_grad_squared=True), use_weights=True)
    diagonals = _read(result.run_dir, "diagonals.parquet").to_pydict()
    for column in ("hessian_diagonal", "hessian_diagonal_stderr", "ggn_diagonal", "ggn_diagonal_stderr",
                   "fisher_diagonal", "gradient"):
        np.testing.assert_allclose(diagonals[column], expected[column], rtol=1e-9, atol=1e-13, err_msg=column)


def test_hutchinson_probes_in_passes_of_their_own_equal_one_pass(ray_local, files, tmp_path):
    """``probes_per_pass: 3`` of 7 probes: 3 in the main pass, then passes of 3 and 1, each folded
    into running moments. Mean and standard error equal those of all 7 per-probe estimates
    (the in-process engine, every probe at once)."""
    root, x, labels, weights = files
    quantities = {"hessian_diagonal": {"method": "hutchinson", "probes": 7, "probes_per_pass": 3}, "gradient": {}}
    spec = load_job(jobs.job(root, quantities, data={"weights": "weight"}, output=str(tmp_path), shards=3,
                             workers=2))
    result = run(spec, run_id="passes")
    assert result.manifest["passes"] == 3
    probes = rademacher(0, range(7), 53, stream=PROBE_STREAM)
    _, expected = _in_process(root, x, labels, weights, BatchWork(probes=probes), use_weights=True)
    diagonals = _read(result.run_dir, "diagonals.parquet").to_pydict()
    for column in ("hessian_diagonal", "hessian_diagonal_stderr"):
        np.testing.assert_allclose(diagonals[column], expected[column], rtol=1e-9, atol=1e-13, err_msg=column)
    assert np.all(np.asarray(diagonals["hessian_diagonal_stderr"]) > 0)


def test_streaming_with_limit_uneven_batches_and_weights(ray_local, files, tmp_path):
    root, x, labels, weights = files
    spec = load_job(jobs.job(root, {"gradient": {}, "fisher_diagonal": {}}, shards=4,
                             data={"limit": 203, "batch_size": 10, "weights": "weight"}, output=str(tmp_path)))
    result = run(spec, run_id="limit")
    assert result.manifest["examples"] == 203
    assert result.manifest["weight_sum"] == pytest.approx(weights[:203].sum())
    _, expected = _in_process(root, x, labels, weights, BatchWork(sum_grad_squared=True), use_weights=True, rows=203)
    diagonals = _read(result.run_dir, "diagonals.parquet").to_pydict()
    np.testing.assert_allclose(diagonals["gradient"], expected["gradient"], rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(diagonals["fisher_diagonal"], expected["fisher_diagonal"], rtol=1e-9, atol=1e-13)
    # Weights change the answer: the test above could fail.
    _, unweighted = _in_process(root, x, labels, weights, BatchWork(), rows=203)
    assert not np.allclose(unweighted["gradient"], expected["gradient"])
