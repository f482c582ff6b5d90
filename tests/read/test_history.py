"""``history`` and ``show --latest`` (contract 6.2): the series of a job's runs over time, on
runs published by the real publisher; then a nightly series of five checkpoints of the bundled
model, run as one job (``model:`` a glob) end to end."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import struct

import numpy as np
import pytest
import yaml

import paths
import pipeline
from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.read.history import history
from pipeline.storage import tables
from pipeline.storage.publish import RunPublisher

VARIABLES = ("hidden/kernel", "hidden/bias")
SHAPES = ((3, 2), (2,))
REPO = paths.REPO


def publish(root, run_id, date, started, *, loss=0.5, trace=6.0, eigenvalues=(4.0, 2.0), scale=1.0,
            learning_rate=None, blocks=None, with_trace=True):
    rng = np.random.default_rng(0)
    values = {"hessian_diagonal": scale * rng.uniform(0.1, 1.0, 8), "gradient": scale * rng.normal(size=8)}
    publisher = RunPublisher(str(root), "nightly", run_id, date)
    provenance = {"run_id": run_id}
    publisher.write_table("diagonals.parquet", tables.diagonals_table(VARIABLES, SHAPES, values), provenance)
    publisher.write_table("summary.parquet", tables.summary_table(VARIABLES, SHAPES, values), provenance)
    per_block = blocks or [("__all__", np.array(eigenvalues), [1e-8] * len(eigenvalues))]
    publisher.write_table("eigenvalues.parquet", tables.eigenvalues_table(per_block), provenance)
    if with_trace:
        publisher.write_table("trace.parquet", tables.trace_table([("__all__", "hutch++", trace, 0.1, 30)]),
                              provenance)
    options = {"which": "largest", **({"learning_rate": learning_rate} if learning_rate else {})}
    manifest = {"run_id": run_id, "date": date, "status": "complete", "examples": 100, "loss": loss,
                "started_at": started, "job": {"name": "nightly", "quantities": {"eigenvalues": options}},
                "model": {"path": "m.keras", "sha256": hashlib.sha256(run_id.encode()).hexdigest()},
                "data": {"fingerprint": "f" * 64, "rows": 100}}
    return publisher.publish(manifest)


def cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), out=out, err=err)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def nights(tmp_path):
    """Four nights, published out of order; the third's loss jumps by 50%."""
    publish(tmp_path, "n3", "2026-12-03", "2026-12-03T02:00:00+00:00", loss=0.75, trace=6.3)
    publish(tmp_path, "n1", "2026-12-01", "2026-12-01T02:00:00+00:00", loss=0.5, trace=6.0)
    publish(tmp_path, "n4", "2026-12-04", "2026-12-04T02:00:00+00:00", loss=0.76, trace=6.2)
    # two runs on one date: ordered by start time, not by run id
    publish(tmp_path, "z2", "2026-12-02", "2026-12-02T01:00:00+00:00", loss=0.51, trace=6.1)
    publish(tmp_path, "a2", "2026-12-02", "2026-12-02T03:00:00+00:00", loss=0.52, trace=6.1)
    return tmp_path / "nightly"


def test_history_orders_runs_by_date_then_start_time_with_every_series(nights):
    result = history(str(nights))
    assert [r["run"] for r in result.rows] == ["n1", "z2", "a2", "n3", "n4"]
    assert result.series[:4] == ["loss", "trace", "eigenvalue_1", "eigenvalue_2"]
    assert {"hessian_diagonal.l2_norm", "gradient.l2_norm"} <= set(result.series)
    assert [r["loss"] for r in result.rows] == [0.5, 0.51, 0.52, 0.75, 0.76]
    assert result.rows[0]["model_sha256"] == hashlib.sha256(b"n1").hexdigest()
    rng = np.random.default_rng(0)
    expected = np.linalg.norm(rng.uniform(0.1, 1.0, 8))
    assert result.rows[0]["hessian_diagonal.l2_norm"] == pytest.approx(expected, rel=1e-12)
    frame = result.frame()
    assert list(frame["run"]) == ["n1", "z2", "a2", "n3", "n4"] and frame.shape == (5, 4 + len(result.series))


def test_fail_above_flags_the_night_to_night_jump_and_exits_1(nights):
    above = history(str(nights)).above(0.2)
    assert [(run, change.quantity) for _, run, change in above] == [("n3", "loss")]
    assert above[0][2].relative_change == pytest.approx(0.75 / 0.52 - 1)
    status, out, err = cli("history", str(nights), "--fail-above", "0.2")
    assert status == 1 and "n3" in out
    assert err.startswith("drift: 1 run-to-run relative changes above 0.2") and "loss at 2026-12-03 run n3" in err
    assert cli("history", str(nights), "--fail-above", "0.5")[0] == 0
    assert cli("history", str(nights))[0] == 0


def test_history_formats_are_parseable_and_agree(nights):
    _, table, _ = cli("history", str(nights))
    lines = table.splitlines()
    assert lines[0].split()[:6] == ["date", "run", "model_sha256", "examples", "loss", "trace"] and len(lines) == 7
    _, text, _ = cli("history", str(nights), "--format", "json")
    rows = json.loads(text)
    _, text, _ = cli("history", str(nights), "--format", "csv")
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert [r["run"] for r in rows] == [r["run"] for r in parsed] == ["n1", "z2", "a2", "n3", "n4"]
    assert [float(r["trace"]) for r in parsed] == [r["trace"] for r in rows] == [6.0, 6.1, 6.1, 6.3, 6.2]


def test_a_series_a_run_lacks_is_nan_and_null(tmp_path):
    publish(tmp_path, "a", "2026-12-01", "2026-12-01T02:00:00+00:00")
    publish(tmp_path, "b", "2026-12-02", "2026-12-02T02:00:00+00:00", with_trace=False)
    result = history(str(tmp_path / "nightly"))
    assert result.rows[0]["trace"] == 6.0 and math.isnan(result.rows[1]["trace"])
    assert json.loads(cli("history", str(tmp_path / "nightly"), "--format", "json")[1])[1]["trace"] is None
    assert not any(change.quantity == "trace" for *_, change in result.above(0.0))


def test_per_block_series_and_sharpness_from_the_learning_rate(tmp_path):
    blocks = [("__all__", np.array([4.0]), [1e-8]), ("dense/kernel", np.array([3.0]), [1e-8])]
    publish(tmp_path, "a", "2026-12-01", "2026-12-01T02:00:00+00:00", learning_rate=0.5, blocks=blocks)
    result = history(str(tmp_path / "nightly"))
    row = result.rows[0]
    assert row["eigenvalue_1"] == 4.0 and row["eigenvalue_1[dense/kernel]"] == 3.0
    assert row["sharpness"] == pytest.approx(4.0 * 0.5 / 2) and row["sharpness[dense/kernel]"] == pytest.approx(0.75)
    status, out, _ = cli("show", str(tmp_path / "nightly"), "--latest")
    assert status == 0 and "sharpness lambda_max * lr / 2 (lr 0.5" in out


def test_show_latest_shows_the_newest_complete_run(nights):
    half = nights / "date=2026-12-09" / "run=crashed"
    half.mkdir(parents=True)  # a run being published, or one that crashed: no manifest
    warning = (f"warning: 1 folder holds no complete run (no manifest.json, or a damaged or incomplete one), "
               f"skipped: {half}\n")
    status, out, err = cli("show", "--latest", str(nights))
    assert status == 0 and err == warning
    assert out.splitlines()[0].split() == ["run", "n4"]
    status, _, err = cli("history", str(nights))
    assert status == 0 and err == warning
    (nights / "date=2026-12-04" / "run=n4" / "manifest.json").write_text("{not json")  # damaged: skipped, named
    status, out, err = cli("show", "--latest", str(nights))
    assert status == 0 and out.splitlines()[0].split() == ["run", "n3"] and "run=n4" in err and "2 folders" in err


@pytest.mark.parametrize("where, message", [
    ("nothing", "is not a folder"),
    ("empty", "no published runs under"),
    ("output", "it holds the jobs nightly: give one"),
    ("run", "is one run, not a job's folder"),
])
def test_history_of_a_wrong_folder_is_one_error_line(tmp_path, where, message):
    publish(tmp_path / "out", "a", "2026-12-01", "2026-12-01T02:00:00+00:00")
    (tmp_path / "empty").mkdir()
    folder = {"nothing": tmp_path / "nothing", "empty": tmp_path / "empty", "output": tmp_path / "out",
              "run": tmp_path / "out" / "nightly" / "date=2026-12-01" / "run=a"}[where]
    for argv in (("history", str(folder)), ("show", "--latest", str(folder))):
        status, out, err = cli(*argv)
        assert status == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ") and message in err


def _png_size(path) -> tuple[int, int]:
    with open(path, "rb") as handle:
        head = handle.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_a_bad_plots_folder_is_an_error_before_any_output(nights, tmp_path):
    (tmp_path / "file").write_text("x")
    status, out, err = cli("history", str(nights), "--plots", str(tmp_path / "file"))
    assert status == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: cannot create plots folder")


def test_history_plots_one_png_per_series_and_a_page(nights, tmp_path):
    status, _, err = cli("history", str(nights), "--plots", str(tmp_path / "plots"), "--fail-above", "0.2")
    assert status == 1
    names = sorted(os.listdir(tmp_path / "plots"))
    assert "index.html" in names and "01-loss.png" in names and "02-trace.png" in names
    for name in names:
        if name.endswith(".png"):
            assert _png_size(tmp_path / "plots" / name) == (800, 450)
            assert name in (tmp_path / "plots" / "index.html").read_text()


# ---------------------------------------------------------------------------- end to end
def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.slow
def test_a_nightly_series_of_five_checkpoints_gives_a_history(tmp_path):
    """The bundled series job (``model:`` a glob of 5 checkpoints) runs one run per checkpoint
    on one Ray; history lists them in order with each checkpoint's sha256 and the sharpness;
    run again with its run id, nothing is computed again."""
    folder = tmp_path / "jobs"
    shutil.copytree(os.path.join(REPO, "jobs", "example"), folder / "example")
    spec = yaml.safe_load(open(os.path.join(REPO, "jobs", "series.yaml")))
    spec["data"]["limit"] = 600
    spec["output"] = str(tmp_path / "results")
    (folder / "series.yaml").write_text(yaml.safe_dump(spec))
    status, out, err = cli("run", str(folder / "series.yaml"), "--run-id", "s", "--workers", "1")
    assert status == 0, err
    dirs = [line for line in out.splitlines() if "run=" in line]
    assert [d.rsplit("=", 1)[1] for d in dirs] == [f"s-{k:02d}" for k in range(1, 6)] and out.splitlines()[-1] == dirs[-1]
    result = history(str(tmp_path / "results" / "digits-mlp-series"))
    checkpoints = sorted((folder / "example" / "checkpoints").glob("night-*.keras"))
    assert [r["model_sha256"] for r in result.rows] == [_sha256(p) for p in checkpoints]
    losses = [r["loss"] for r in result.rows]
    assert len(set(losses)) == 5 and all(r["examples"] == 600 for r in result.rows)
    assert all(r["sharpness"] == pytest.approx(r["eigenvalue_1"] * 0.05 / 2) for r in result.rows)
    status, text, _ = cli("history", str(tmp_path / "results" / "digits-mlp-series"), "--plots", str(tmp_path / "p"))
    assert status == 0 and len(text.splitlines()) == 7 and os.path.exists(tmp_path / "p" / "05-sharpness.png")
    # Lanczos of each checkpoint started from the previous one's Ritz vectors: the same
    # eigenvalues as a random start, within the residuals, in no more passes
    assert [r.manifest.get("warm_start") for r in result.runs] == [None, "s-01", "s-02", "s-03", "s-04"]
    spec.update(name="cold", model="example/checkpoints/night-05.keras")
    (folder / "cold.yaml").write_text(yaml.safe_dump(spec))
    status, out, err = cli("run", str(folder / "cold.yaml"), "--run-id", "cold", "--workers", "1")
    assert status == 0, err
    cold, warm = pipeline.load(out.splitlines()[-1]), result.runs[-1]
    bound = cold.eigenvalues.residual.to_numpy() + warm.eigenvalues.residual.to_numpy()
    assert np.all(np.abs(cold.eigenvalues.eigenvalue.to_numpy() - warm.eigenvalues.eigenvalue.to_numpy()) <= bound)
    assert warm.manifest["passes"] <= cold.manifest["passes"]
    # run again: every checkpoint's run is published already, none is computed again
    status, again, err = cli("run", str(folder / "series.yaml"), "--run-id", "s", "--workers", "1")
    assert status == 0 and err.count("published already") == 5
    assert [line for line in again.splitlines() if "run=" in line] == dirs
    # a checkpoint changed since its run was published: refused, never shown as the old numbers
    checkpoints[-1].write_bytes(checkpoints[-2].read_bytes())
    status, again, err = cli("run", str(folder / "series.yaml"), "--run-id", "s", "--workers", "1")
    assert status == 2 and again == "" and err.splitlines()[-1].startswith("error: checkpoint ")
    assert "changed since run" in err and err.count("error:") == 1


def test_a_model_list_or_glob_is_checked_at_load(tmp_path):
    from pipeline.job import load_job

    (tmp_path / "a.keras").write_bytes(b"")
    (tmp_path / "b.keras").write_bytes(b"")
    base = {"name": "s", "loss": "mse", "data": {"path": "d", "features": "x", "labels": "y"},
            "quantities": {"gradient": {}}}
    spec = load_job({**base, "model": [str(tmp_path / "b.keras"), str(tmp_path / "a.keras")]})
    assert spec.checkpoints == (str(tmp_path / "b.keras"), str(tmp_path / "a.keras"))
    assert spec.model.path == str(tmp_path / "b.keras") and spec.checkpoint(1).model.path == str(tmp_path / "a.keras")
    assert spec.checkpoint(1).checkpoints == () and spec.to_dict()["model"] == list(spec.checkpoints)
    assert load_job(spec.to_dict()) == spec
    assert load_job({**base, "model": str(tmp_path / "*.keras")}).checkpoints == (
        str(tmp_path / "a.keras"), str(tmp_path / "b.keras"))
    for bad, message in ((str(tmp_path / "none-*.keras"), "no file matches"), ([], "a non-empty list"),
                         ([str(tmp_path / "a.keras"), 3], "a non-empty list"),
                         ([str(tmp_path / "a.keras")] * 2, "distinct")):
        with pytest.raises(InputError, match=message):
            load_job({**base, "model": bad})
