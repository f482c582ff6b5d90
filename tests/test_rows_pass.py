"""The rows pass's request and manifest entry from a real plan (the pass itself runs on Ray in
``tests/quantities/test_influence.py``)."""

from __future__ import annotations

import jobs
from pipeline import rows_pass
from pipeline.influence.layout import Layout
from pipeline.influence.preconditioner import Preconditioner
from pipeline.job import load_job
from pipeline.plan import make_plan


def test_the_request_follows_the_jobs_options_and_the_entry_names_the_columns(tmp_path):
    jobs.write_data(tmp_path / "data", rows=40, files=2)
    jobs.write_model(str(tmp_path / "model.keras"))
    queries = {"path": str(tmp_path / "data"), "features": "x", "labels": "label", "limit": 3}
    spec = load_job(jobs.job(tmp_path, {"per_example": {"projection": 8, "projection_dtype": "float16"},
                                        "influence": {"queries": queries, "curvature": "ggn", "scores": "dense"}}))
    assert rows_pass.asked(spec.quantities) and not rows_pass.asked({"gradient": {}})
    plan = make_plan(spec, None, "r", 1, {"CPU": 2})
    layout = Layout.of(plan.signature.variables, plan.signature.variable_shapes, (), structured=False)
    results = {"influence": {"preconditioner": Preconditioner.identity(layout, 0.1)}}
    request = rows_pass.request_of(plan, results)
    assert (request.projection, request.projection_dtype, request.structured, request.dense_scores) == (
        8, "float16", False, True)
    assert request.write and request.self_influence and request.top_k == 100
    assert [name for _, name in request.files] == ["part-000.parquet", "part-001.parquet"]
    entry = rows_pass.manifest_entry(plan, {"request": request, "parts": ["a", "b"], "resumed": 1})["per_example"]
    assert entry["columns"] == ["row", "file", "file_row", "weight", "loss", "gradient_norm", "self_influence",
                                "projection"]
    assert (entry["rows"], entry["parts"], entry["resumed_parts"]) == (40, 2, 1)
