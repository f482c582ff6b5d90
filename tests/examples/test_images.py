"""The bundled image jobs end to end on a real local Ray (contract 5.4): PNG bytes decoded by a
transform give the results of the same images as a numeric column; the same rows as GZIP
TFRecord files give identical results; both are shard-invariant and resume after a failure."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

import paths
from pipeline.driver import run
from pipeline.errors import ComputeError
from pipeline.examples.digits import make_data
from pipeline.examples.images import quantised
from pipeline.job import load_job
from pipeline.storage.dataset import write_columns

pytestmark = pytest.mark.slow
REPO = paths.REPO
ROWS = 1200  # data.limit: the first 1,200 of the bundled 4,000 digits keep each run short
QUANTITIES = {"gradient": {}, "fisher_diagonal": {}, "ggn_diagonal": {"method": "mc"},
              "trace": {"method": "hutch++", "probes": 12}}
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
ENV.pop("HESSIAN_PIPELINE_FAULT", None)


@pytest.fixture(scope="module")
def numeric(tmp_path_factory):
    """The PNGs' images as a numeric column: 8-bit levels / 255 in float32, computed from the
    generator, not by decoding the PNGs."""
    folder = tmp_path_factory.mktemp("numeric") / "data"
    pixels, labels, _ = make_data()
    write_columns(str(folder), {"pixels": quantised(pixels).reshape(-1, 64).astype(np.float32) / np.float32(255),
                                "label": labels}, files=3, row_group_size=200)
    return str(folder)


def _job(name, output, shards=4, **data):
    """The bundled job ``jobs/<name>.yaml`` with lighter quantities, in float64."""
    overrides = [f"output={output}", f"shards={shards}", "workers=2", "precision=float64",
                 f"data.limit={ROWS}", "data.batch_size=100"]
    spec = load_job(os.path.join(REPO, "jobs", f"{name}.yaml"), overrides)
    raw = spec.to_dict()
    raw["quantities"] = QUANTITIES
    raw["data"].update(data)
    return load_job(raw)


def _tables(run_dir):
    return {os.path.basename(p): pq.read_table(p) for p in sorted(glob.glob(os.path.join(run_dir, "*.parquet")))}


def _assert_same(a, b, rtol):
    ta, tb = _tables(a.run_dir), _tables(b.run_dir)
    assert sorted(ta) == sorted(tb) and {"diagonals.parquet", "trace.parquet"} <= set(ta)
    for name in ta:
        for column in ta[name].column_names:
            x, y = ta[name].column(column).to_pylist(), tb[name].column(column).to_pylist()
            if isinstance(x[0], float):
                np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-15, err_msg=f"{name}:{column}")
            elif column not in ("matvecs",):
                assert x == y, f"{name}:{column}"
    assert a.manifest["examples"] == b.manifest["examples"] == ROWS
    assert a.manifest["loss"] == pytest.approx(b.manifest["loss"], rel=rtol)


@pytest.fixture(scope="module")
def png_run(ray_local, tmp_path_factory):
    return run(_job("images", str(tmp_path_factory.mktemp("png"))), quiet=True)


def test_png_bytes_give_the_results_of_the_numeric_column(ray_local, png_run, numeric, tmp_path):
    job = _job("images", str(tmp_path), path=numeric, transform=None)
    assert job.data.transform is None and job.data.features == "pixels"
    _assert_same(png_run, run(job, quiet=True), rtol=1e-12)
    recorded = png_run.manifest["job"]["data"]
    assert recorded["transform"] == "pipeline.examples.images:decode" and recorded["format"] == "parquet"


def test_tfrecord_gives_identical_results(ray_local, png_run, tmp_path):
    records = run(_job("records", str(tmp_path)), quiet=True)
    _assert_same(png_run, records, rtol=1e-13)
    recorded = records.manifest["job"]["data"]
    assert recorded["format"] == "tfrecord" and recorded["schema"]["png"] == {"dtype": "string", "shape": [],
                                                                             "default": None}


@pytest.mark.parametrize("name,shards", [("images", 7), ("records", 1)])
def test_shard_invariance(ray_local, png_run, tmp_path, name, shards):
    other = run(_job(name, str(tmp_path), shards=shards), quiet=True)
    assert other.manifest["shards"] == shards
    _assert_same(png_run, other, rtol=1e-9)


@pytest.mark.parametrize("name", ["images", "records"])
def test_failed_shard_then_resume(ray_local, png_run, tmp_path, monkeypatch, name):
    monkeypatch.setenv("HESSIAN_PIPELINE_FAULT_DIR", str(tmp_path))
    monkeypatch.setenv("HESSIAN_PIPELINE_FAULT", "fail-shard:shard=2")
    job = _job(name, str(tmp_path / "out"), shards=5)
    with pytest.raises(ComputeError, match=r"shard 2 .* failed after its retries.*--run-id again to resume"):
        run(job, run_id="again", quiet=True)
    monkeypatch.delenv("HESSIAN_PIPELINE_FAULT")
    resumed = run(job, run_id="again", quiet=True)
    assert 1 <= resumed.manifest["resumed_shards"] < 5
    _assert_same(png_run, resumed, rtol=1e-9)


def test_a_failing_transform_is_one_error_line_and_exit_2(numeric, tmp_path):
    """The transform reads a column this data lacks: validate names the function and the row."""
    job = os.path.join(REPO, "jobs", "images.yaml")
    result = subprocess.run([sys.executable, "-m", "pipeline", "validate", job, "--set", f"data.path={numeric}"],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "error: data.transform 'pipeline.examples.images:decode' failed on row 0: KeyError: 'png': fix the function "
        "or the data"]
    assert result.stdout == ""
