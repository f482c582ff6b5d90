"""``pipeline.api.run`` without Ray: a job or an override that is wrong is an ``InputError``
raised before any work (no Ray started, nothing written), and ``quiet`` sets TensorFlow's C++
log level only where the user has not."""

from __future__ import annotations

import os

import pytest

import ray
from pipeline import api
from pipeline.errors import InputError
from pipeline.job import load_job


def job(tmp_path) -> dict:
    return {"name": "mini", "model": str(tmp_path / "m.keras"), "loss": "mse",
            "data": {"path": str(tmp_path / "data"), "features": "x", "labels": "y"},
            "quantities": {"gradient": {}}, "output": str(tmp_path / "results")}


def refused(source, **options) -> str:
    with pytest.raises(InputError) as info:
        api.run(source, **options)
    assert not ray.is_initialized()
    return str(info.value)


def test_a_wrong_job_is_refused_before_any_work(tmp_path):
    broken = {key: value for key, value in job(tmp_path).items() if key != "loss"}
    assert refused(broken).startswith("loss is required")
    assert "quantities.trace.probes" in refused({**job(tmp_path), "quantities": {"trace": {"probes": 0}}})
    assert refused(str(tmp_path / "missing.yaml")) == f"job file {tmp_path / 'missing.yaml'} not found: check the path"
    assert sorted(os.listdir(tmp_path)) == []  # nothing written, not even the output folder


def test_overrides_apply_to_a_mapping_and_to_a_job_spec(tmp_path):
    spec = load_job(job(tmp_path))
    assert spec.data.batch_size == 256
    for source in (job(tmp_path), spec):
        assert refused(source, overrides=["data.batch_size=0"]).startswith("data.batch_size must be a positive integer")
        assert "unknown key data.batch_sise" in refused(source, overrides=["data.batch_sise=4"])


@pytest.mark.parametrize("quiet, before, after", [(True, None, "3"), (True, "1", "1"), (False, None, None)])
def test_quiet_sets_tensorflows_log_level_only_where_unset(tmp_path, monkeypatch, quiet, before, after):
    if before is None:
        monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", before)
    refused({"name": "x"}, quiet=quiet)
    assert os.environ.get("TF_CPP_MIN_LOG_LEVEL") == after
