"""``compare``: runs published with the real publisher and tables, compared in every format."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.storage import tables
from pipeline.cli import main
from pipeline.read.compare import Change, compare_runs
from pipeline.errors import InputError
from pipeline.storage.publish import RunPublisher

VARIABLES = ("hidden/kernel", "hidden/bias")
SHAPES = ((3, 2), (2,))


def publish(root, run_id, *, scale=1.0, sha="a" * 64, fingerprint="f" * 64, eigenvalues=(4.0, 2.0),
            which="largest", trace=6.0, loss=0.5, with_trace=True, blocks=None, variables=None):
    rng = np.random.default_rng(0)
    values = {"hessian_diagonal": scale * rng.uniform(0.1, 1.0, 8), "gradient": scale * rng.normal(size=8)}
    publisher = RunPublisher(str(root), "drift", run_id, "2026-11-26")
    provenance = {"run_id": run_id}
    publisher.write_table("diagonals.parquet", tables.diagonals_table(VARIABLES, SHAPES, values), provenance)
    publisher.write_table("summary.parquet", tables.summary_table(VARIABLES, SHAPES, values), provenance)
    per_block = blocks or [("__all__", np.array(eigenvalues) * scale, [1e-8] * len(eigenvalues))]
    publisher.write_table("eigenvalues.parquet", tables.eigenvalues_table(per_block), provenance)
    if with_trace:
        publisher.write_table("trace.parquet", tables.trace_table([("__all__", "hutch++", trace * scale, 0.1, 30)]), provenance)
    manifest = {"run_id": run_id, "date": "2026-11-26", "status": "complete", "examples": 100, "loss": loss * scale,
                "job": {"name": "drift", "quantities": {"eigenvalues": {"which": which}}},
                "model": {"path": "m.keras", "sha256": sha}, "data": {"fingerprint": fingerprint, "rows": 100}}
    if variables is not None:
        manifest["variables"] = [{"name": name, "shape": list(shape)} for name, shape in variables]
    return publisher.publish(manifest)


def test_same_runs_have_zero_change_in_every_shared_quantity(tmp_path):
    a = publish(tmp_path, "a")
    b = publish(tmp_path, "b")
    result = compare_runs(a, b)
    assert result.warnings == []
    keys = {(c.variable, c.quantity, c.statistic) for c in result.changes}
    for variable in (*VARIABLES, "__all__"):
        for quantity in ("hessian_diagonal", "gradient"):
            for statistic in ("mean", "l2_norm", "sum"):
                assert (variable, quantity, statistic) in keys
    assert {("__all__", "trace", "estimate"), ("__all__", "eigenvalues", "rank_1"), ("__all__", "eigenvalues", "rank_2"),
            ("__all__", "loss", "value")} <= keys
    assert all(c.change == 0 and c.relative_change == 0 for c in result.changes)


def test_relative_and_absolute_changes(tmp_path):
    result = compare_runs(publish(tmp_path, "a"), publish(tmp_path, "b", scale=1.1))
    trace = next(c for c in result.changes if c.quantity == "trace")
    assert trace.a == 6.0 and trace.change == pytest.approx(0.6) and trace.relative_change == pytest.approx(0.1)
    for c in result.changes:  # everything scaled by 1.1: (b - a) / |a| is +-10%, by the sign of a
        assert c.relative_change == pytest.approx(math.copysign(0.1, c.a)), c
    assert len(result.above(0.05)) == len(result.changes) and result.above(0.2) == []
    assert Change("v", "q", "s", 0.0, 1.0).relative_change == math.inf
    assert Change("v", "q", "s", 0.0, 0.0).relative_change == 0.0
    assert Change("v", "q", "s", -2.0, -1.0).relative_change == pytest.approx(0.5)
    assert math.isnan(Change("v", "q", "s", math.nan, math.nan).relative_change)


def test_different_model_or_data_is_compared_with_a_warning(tmp_path):
    result = compare_runs(publish(tmp_path, "a"), publish(tmp_path, "b", sha="b" * 64, fingerprint="e" * 64,
                                                          which="smallest", with_trace=False))
    text = " ".join(result.warnings)
    assert "different models" in text and "different data" in text
    assert "eigenvalues are the largest in A and the smallest in B" in text
    assert "trace.parquet" in text  # only in A
    assert not any(c.quantity in ("eigenvalues", "trace") for c in result.changes)
    assert any(c.quantity == "gradient" for c in result.changes)


def test_not_a_run_is_an_input_error(tmp_path):
    a = publish(tmp_path, "a")
    with pytest.raises(InputError, match="not a complete run"):
        compare_runs(a, str(tmp_path / "missing"))


def test_command_formats_and_fail_above(tmp_path):
    a, b = publish(tmp_path, "a"), publish(tmp_path, "b", scale=1.1, sha="b" * 64)
    out, err = io.StringIO(), io.StringIO()
    assert main(["compare", a, b], out=out, err=err) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("A: ") and lines[1].startswith("B: ")
    header = next(line for line in lines if line.startswith("variable"))
    assert header.split() == ["variable", "quantity", "statistic", "a", "b", "change", "relative"]
    rows = [line for line in lines if line.startswith("hidden/kernel")]
    assert len(rows) == 6 and all(row.endswith(("+10%", "-10%")) for row in rows)
    assert len({len(line) for line in lines[lines.index(header):lines.index(header) + 10]}) == 1  # aligned
    assert "warning: different models" in err.getvalue()

    out = io.StringIO()
    assert main(["compare", a, b, "--format", "json"], out=out, err=io.StringIO()) == 0
    document = json.loads(out.getvalue())
    assert document["a"]["run_id"] == "a" and document["b"]["model_sha256"] == "b" * 64
    assert any("different models" in w for w in document["warnings"])
    assert all(abs(c["relative_change"]) == pytest.approx(0.1) for c in document["changes"])

    out = io.StringIO()
    assert main(["compare", a, b, "--format", "csv"], out=out, err=io.StringIO()) == 0
    records = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert list(records[0]) == ["variable", "quantity", "statistic", "a", "b", "change", "relative_change"]
    assert len(records) == len(document["changes"])
    assert abs(float(records[0]["relative_change"])) == pytest.approx(0.1)

    err = io.StringIO()
    assert main(["compare", a, b, "--fail-above", "0.05"], out=io.StringIO(), err=err) == 1
    assert "drift:" in err.getvalue()
    assert main(["compare", a, b, "--fail-above", "0.2"], out=io.StringIO(), err=io.StringIO()) == 0


def test_command_input_errors_exit_2(tmp_path):
    a = publish(tmp_path, "a")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-m", "pipeline", "compare", a, str(tmp_path / "nope")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error:") and "Traceback" not in done.stderr
    err = io.StringIO()
    assert main(["compare", a, a, "--fail-above", "-1"], out=io.StringIO(), err=err) == 2
    assert "--fail-above" in err.getvalue()


def test_per_block_eigenvalues_at_rounding_level_are_no_drift_and_blocks_must_hold_the_same_parameters(tmp_path):
    """Per-block spectra hold exact zeros whose computed values are rounding noise of either
    sign: within the residuals they are no relative change. A block is paired by name only when
    it covers as many parameters in both runs."""
    a = publish(tmp_path, "a", blocks=[("hidden", [4.0, 3.47e-18], [1e-9, 1e-17]), ("out", [2.0, -1.39e-17], [1e-9, 0.0])])
    b = publish(tmp_path, "b", blocks=[("hidden", [4.0, -1.73e-18], [1e-9, 1e-17]), ("out", [2.2, 0.0], [1e-9, 0.0])])
    result = compare_runs(a, b)
    changes = {(c.variable, c.statistic): c for c in result.changes if c.quantity == "eigenvalues"}
    assert changes[("hidden", "rank_2")].relative_change == 0.0 and changes[("out", "rank_2")].relative_change == 0.0
    assert changes[("out", "rank_1")].relative_change == pytest.approx(0.1)
    assert [c.variable for c in result.above(0.05)] == ["out"]
    # Block "hidden" is hidden/kernel + hidden/bias (8 parameters) in A, the kernel alone in B.
    c = publish(tmp_path, "c", blocks=[("hidden", [4.0, 1.0], [1e-9, 1e-9])], variables=[("hidden/kernel", (3, 2))])
    d = publish(tmp_path, "d", blocks=[("hidden", [1.0, 0.5], [1e-9, 1e-9])],
                variables=[("hidden/kernel", (3, 2)), ("hidden/bias", (2,))])
    mixed = compare_runs(c, d)
    assert not [x for x in mixed.changes if x.quantity == "eigenvalues"]
    assert "eigenvalues of block hidden covers 6 parameters in A and 8 in B: not compared" in mixed.warnings
