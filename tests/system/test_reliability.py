"""Failures on purpose: killed workers, failing shards, a killed driver, a crash mid-publish,
a lost node, two runs at once. Faults are injected with ``HESSIAN_PIPELINE_FAULT``
(``pipeline/faults.py``); every result is checked against the in-process engine."""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import jobs
import paths
from pipeline.curvature.engine import CurvatureEngine
from pipeline.curvature.losses import resolve_loss
from pipeline.curvature.model import load_model
from pipeline.curvature.requests import BatchWork
from pipeline.errors import ComputeError, InputError
from pipeline.job import load_job
from pipeline.storage.publish import RunPublisher
from pipeline.quantities.registry import finalize
from pipeline.driver import run

pytestmark = pytest.mark.slow
QUANTITIES = {"gradient": {}, "fisher_diagonal": {}, "hessian_diagonal": {"method": "exact"}}
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
ENV.pop("HESSIAN_PIPELINE_FAULT", None)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    x, labels, weights = jobs.write_data(root / "data")
    jobs.write_model(str(root / "model.keras"))
    engine = CurvatureEngine(load_model(load_job(jobs.job(root, {"gradient": {}})).model),
                             resolve_loss(load_job(jobs.job(root, {"gradient": {}})).loss), precision="float64")
    part = engine.partial([x], [labels], None, np.arange(len(labels)),
                          BatchWork(hessian_diagonal="exact", sum_grad_squared=True))
    return root, finalize(part)


@pytest.fixture
def fault(monkeypatch, tmp_path):
    """Sets HESSIAN_PIPELINE_FAULT for this test; returns a reader of the workers' log."""
    folder = tmp_path / "faults"
    folder.mkdir()
    monkeypatch.setenv("HESSIAN_PIPELINE_FAULT_DIR", str(folder))

    def set_fault(value):
        if value:
            monkeypatch.setenv("HESSIAN_PIPELINE_FAULT", value)
        else:
            monkeypatch.delenv("HESSIAN_PIPELINE_FAULT", raising=False)

    def computed():
        """[(shard, pid, node)] in the order the workers started them."""
        path = folder / "computed.log"
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            fields = dict(part.split("=", 1) for part in line.split())
            rows.append((int(fields["shard"]), fields["pid"], fields["node"]))
        return rows

    set_fault.computed = computed
    set_fault.folder = folder
    return set_fault


def _diagonals(run_dir):
    return pq.read_table(os.path.join(run_dir, "diagonals.parquet")).to_pydict()


def _assert_matches(run_dir, expected, examples=230):
    manifest = json.load(open(os.path.join(run_dir, "manifest.json")))
    assert manifest["examples"] == examples and manifest["status"] == "complete"
    assert manifest["loss"] == pytest.approx(float(expected["loss"]), rel=1e-12)
    diagonals = _diagonals(run_dir)
    for column in ("gradient", "fisher_diagonal", "hessian_diagonal"):
        np.testing.assert_allclose(diagonals[column], expected[column], rtol=1e-9, atol=1e-13, err_msg=column)
    return manifest


def _partials(output, run_id):
    return sorted(glob.glob(os.path.join(output, "test-job", ".partials", f"run={run_id}", "shard-*.npz")))


# ------------------------------------------------------------------------- workers
def test_killed_worker_shard_is_computed_again_once(ray_local, files, fault, tmp_path):
    root, expected = files
    fault("kill-worker:shard=3:once")
    spec = load_job(jobs.job(root, QUANTITIES, shards=6, workers=2, output=str(tmp_path)))
    result = run(spec, run_id="killed")
    _assert_matches(result.run_dir, expected)
    started = collections.Counter(shard for shard, _, _ in fault.computed())
    # Shard 3 started twice (the first process died in it), every other shard once.
    assert started == {0: 1, 1: 1, 2: 1, 3: 2, 4: 1, 5: 1}
    pids = [pid for shard, pid, _ in fault.computed() if shard == 3]
    assert pids[0] != pids[1]
    assert result.manifest["resumed_shards"] == 0
    assert not os.path.exists(os.path.join(str(tmp_path), "test-job", ".partials", "run=killed"))


def test_failing_shard_stops_with_exit_1_then_resumes(ray_local, files, fault, tmp_path):
    root, expected = files
    output = str(tmp_path / "out")
    job = jobs.job(root, QUANTITIES, shards=5, workers=1, output=output)
    fault("fail-shard:shard=2")
    with pytest.raises(ComputeError) as failed:
        run(load_job(job), run_id="flaky")
    message = str(failed.value)
    print(f"\nerror: {message}")
    assert failed.value.exit_status == 1
    assert "shard 2 (rows 92-137) failed after its retries" in message
    assert "fault injected: fail-shard 2" in message
    assert "--run-id flaky to resume" in message
    # First try and two retries; nothing published; the finished shards are staged.
    assert collections.Counter(s for s, _, _ in fault.computed())[2] == 3
    assert not glob.glob(os.path.join(output, "test-job", "date=*", "run=*"))
    staged = _partials(output, "flaky")
    assert len(staged) >= 2 and not any("shard-00002" in p for p in staged)

    # A different job under the same run id is refused and the staged state is left alone.
    with pytest.raises(InputError) as mismatch:
        run(load_job(job, ["data.batch_size=16"]), run_id="flaky")
    print(f"\nerror: {mismatch.value}")
    assert "data.batch_size changed" in str(mismatch.value)
    assert _partials(output, "flaky") == staged

    fault(None)
    before = len(fault.computed())
    result = run(load_job(job), run_id="flaky")
    recomputed = {s for s, _, _ in fault.computed()[before:]}
    assert len(recomputed) == 5 - len(staged) and 2 in recomputed
    assert result.manifest["resumed_shards"] == len(staged)
    _assert_matches(result.run_dir, expected)
    assert not os.path.exists(os.path.join(output, "test-job", ".partials"))


def _bad_data(folder, nan_row=None, huge_row=None):
    x, labels, _ = jobs.write_data(folder, files=1)
    os.remove(os.path.join(folder, "part-000.parquet"))
    x = x.copy()
    if nan_row is not None:
        x[nan_row, 2] = np.nan
    if huge_row is not None:
        x[huge_row] = 1e308
    table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 6), "label": pa.array(labels)})
    pq.write_table(table, os.path.join(folder, "part-000.parquet"), row_group_size=50)


def _overflow_model(path):
    """Logits = sum of the inputs in every class: 6e308 overflows to inf, the loss to NaN."""
    import keras

    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, name="out")])
    model.get_layer("out").set_weights([np.ones((6, 3), np.float32), np.zeros(3, np.float32)])
    model.save(path)


@pytest.mark.parametrize("case", ["nan", "overflow"])
def test_non_finite_values_name_the_shard_and_row(ray_local, files, tmp_path, case):
    root, _ = files
    _bad_data(tmp_path / "data", nan_row=57 if case == "nan" else None, huge_row=101 if case == "overflow" else None)
    model = root / "model.keras"
    if case == "overflow":
        model = tmp_path / "overflow.keras"
        _overflow_model(str(model))
    job = jobs.job(tmp_path, {"gradient": {}}, shards=3, workers=1, output=str(tmp_path / "out"))
    job["model"] = str(model)
    with pytest.raises(InputError) as failed:
        run(load_job(job), run_id="nonfinite")
    message = str(failed.value)
    print(f"\nerror: {message}")
    assert failed.value.exit_status == 2
    if case == "nan":
        assert "column 'x' has a NaN or infinite value at row 57 (shard 0)" in message
    else:
        assert "in shard 1 (rows 77-108), first at row 101 (its inputs are finite)" in message
    assert not glob.glob(str(tmp_path / "out" / "test-job" / "date=*" / "run=*"))
    assert not (tmp_path / "out" / "test-job" / ".partials").exists()


# ------------------------------------------------------------------------- the driver
def _cli(job_file, *args, fault=None, fault_dir=None):
    env = dict(ENV)
    if fault:
        env["HESSIAN_PIPELINE_FAULT"] = fault
    if fault_dir:
        env["HESSIAN_PIPELINE_FAULT_DIR"] = str(fault_dir)
    return subprocess.run([sys.executable, "-m", "pipeline", "run", str(job_file), *args], capture_output=True,
                          text=True, env=env, timeout=600)


def test_driver_killed_then_publish_crash_then_resume(files, tmp_path):
    root, expected = files
    output = tmp_path / "out"
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(jobs.job(root, QUANTITIES, shards=5, workers=1, output=str(output))))
    log = tmp_path / "log"
    log.mkdir()

    def started_since(mark):
        lines = (log / "computed.log").read_text().splitlines() if (log / "computed.log").exists() else []
        return sorted(int(line.split()[0].split("=")[1]) for line in lines[mark:]), len(lines)

    # 1. The driver dies after staging two shards: nothing is published.
    killed = _cli(job_file, "--run-id", "nightly", fault="kill-driver:shards=2", fault_dir=log)
    # The fault ends the process at once (os._exit(1), as a crash would): no error line, and its
    # own note goes to the descriptor the command line points at /dev/null outside --debug.
    assert killed.returncode == 1 and "error:" not in killed.stderr and killed.stdout == ""
    assert len(_partials(str(output), "nightly")) == 2
    assert not glob.glob(str(output / "test-job" / "date=*" / "run=*"))
    first, mark = started_since(0)
    assert first[:2] == [0, 1]
    state_path = output / "test-job" / ".partials" / "run=nightly" / "state.json"
    state = json.loads(state_path.read_text())
    # Pretend the run started just before midnight UTC: the resumed run keeps that date.
    state["started_at"] = "1999-12-31T23:59:30+00:00"
    state["date"] = "1999-12-31"
    state_path.write_text(json.dumps(state))

    # 2. The same command resumes (3 shards computed), then dies just before the publishing rename.
    crashed = _cli(job_file, "--run-id", "nightly", fault="publish-before-rename", fault_dir=log)
    assert crashed.returncode == 1 and "error:" not in crashed.stderr, crashed.stderr  # died, as a crash does
    assert "resumed 2 of 5 shards" in crashed.stderr
    second, mark = started_since(mark)
    assert second == [2, 3, 4]
    # Either nothing or the complete run: here nothing visible, the staged files hidden.
    assert not glob.glob(str(output / "test-job" / "date=*" / "run=*"))
    assert len(glob.glob(str(output / "test-job" / "date=1999-12-31" / ".staging-run=nightly-*"))) == 1

    # 3. Once more: nothing left to compute; published under the original date.
    done = _cli(job_file, "--run-id", "nightly", fault_dir=log)
    assert done.returncode == 0, done.stderr
    assert "resumed 5 of 5 shards" in done.stderr
    assert started_since(mark)[0] == []
    run_dir = done.stdout.strip().splitlines()[-1]
    assert run_dir == str(output / "test-job" / "date=1999-12-31" / "run=nightly")
    manifest = _assert_matches(run_dir, expected)
    assert manifest["resumed_shards"] == 5 and manifest["started_at"] == "1999-12-31T23:59:30+00:00"
    assert not (output / "test-job" / ".partials").exists()
    assert os.listdir(output / "test-job" / "date=1999-12-31") == ["run=nightly"]


def test_resume_after_a_data_page_changed_computes_that_shard_again(files, tmp_path):
    """Issue 24.8: a data page rewritten in place (same size, same footer, so the same data
    fingerprint, and the old modification time put back) between a killed run and its resume.
    The staged shard that read it is computed again (its bytes differ from those it was
    computed from); the result equals a fresh run on the new data, never a mix of the two."""
    root, _ = files
    data = tmp_path / "data"
    x, labels = jobs.write_bare_data(data, rows=230, cut=100, row_group=17, seed=3)
    output = tmp_path / "out"
    spec = jobs.job(root, QUANTITIES, shards=6, workers=1, output=str(output))
    spec["data"]["path"] = str(data)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(spec))
    log = tmp_path / "log"
    log.mkdir()
    killed = _cli(job_file, "--run-id", "mixed", fault="kill-driver:shards=2", fault_dir=log)
    assert killed.returncode == 1 and len(_partials(str(output), "mixed")) == 2  # shards 0 and 1

    from pipeline.storage.dataset import plan_data

    fingerprint = plan_data(load_job(spec).data, 6).fingerprint
    path = data / "part-000.parquet"
    raw, before = path.read_bytes(), path.stat()
    value = x[5, 2].tobytes()
    assert raw.count(value) == 1  # row 5: shard 0 (rows 0-38)
    x[5, 2] += 1.0
    path.write_bytes(raw.replace(value, x[5, 2].tobytes()))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and plan_data(load_job(spec).data, 6).fingerprint == fingerprint

    marks = len((log / "computed.log").read_text().splitlines())
    done = _cli(job_file, "--run-id", "mixed", fault_dir=log)
    print("\n" + done.stderr)
    assert done.returncode == 0, done.stderr
    assert re.search(r"shard 0 \(rows 0-38\): staged, but the bytes of \S*part-000.parquet rows 0-38 differ from "
                     r"those it was computed from; computing it again", done.stderr), done.stderr
    assert "resumed 1 of 6 shards" in done.stderr
    again = sorted(int(line.split()[0].split("=")[1]) for line in
                   (log / "computed.log").read_text().splitlines()[marks:])
    assert again == [0, 2, 3, 4, 5]
    engine = CurvatureEngine(load_model(load_job(spec).model), resolve_loss(load_job(spec).loss), precision="float64")
    fresh = finalize(engine.partial([x], [labels], None, np.arange(230),
                                    BatchWork(hessian_diagonal="exact", sum_grad_squared=True)))
    manifest = _assert_matches(done.stdout.strip().splitlines()[-1], fresh)
    assert manifest["resumed_shards"] == 1 and manifest["resumed_shard_indices"] == [1]
    assert not (output / "test-job" / ".partials").exists()


# ------------------------------------------------------------------------- storage
def test_crash_during_publish_leaves_previous_state_or_complete_run(tmp_path):
    """The publisher alone, killed at its last step, in a subprocess (no Ray, no TensorFlow)."""
    script = f"""
import pyarrow as pa
from pipeline.storage.publish import RunPublisher
p = RunPublisher({str(tmp_path)!r}, "job", "r1", "2026-01-02")
p.write_table("trace.parquet", pa.table({{"estimate": [1.0]}}), {{"run_id": "r1"}})
print(p.publish({{"run_id": "r1", "status": "complete"}}))
"""
    env = {**ENV, "HESSIAN_PIPELINE_FAULT": "publish-before-rename"}
    crashed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert crashed.returncode == 1 and "fault injected" in crashed.stderr
    date_dir = tmp_path / "job" / "date=2026-01-02"
    assert not (date_dir / "run=r1").exists()
    assert [p.name.startswith(".staging-run=r1-") for p in date_dir.iterdir()] == [True]
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(date_dir / "run=r1")) == ["manifest.json", "trace.parquet"]
    assert os.listdir(date_dir) == ["run=r1"]  # the crashed staging folder is cleaned up


def test_staged_partials_round_trip_and_refuse_damage(tmp_path):
    from types import SimpleNamespace

    from pipeline.storage.dataset import Shard
    from pipeline.partial import Partial
    from pipeline.storage.staging import PartialStore

    shards = (Shard(0, 0, 5, ()), Shard(1, 5, 4, ()))
    plan = SimpleNamespace(job=load_job({"name": "n", "model": "/m.keras", "loss": "mse", "quantities": {"gradient": {}},
                                         "data": {"path": "/d", "features": "x", "labels": "y"}}),
                           inputs={}, model_sha256="abc", data=SimpleNamespace(fingerprint="f", shards=shards),
                           date="2026-01-02")
    import datetime as dt

    start = dt.datetime(2026, 1, 2, 23, 59, tzinfo=dt.timezone.utc)
    store = PartialStore(str(tmp_path), "n", "r")
    assert store.started() is None
    store.open(plan, start)
    part = Partial(examples=5, weight_sum=5.0, batches=1, sums={"loss": np.float64(2.5), "gradient": np.arange(3.0)})
    store.save(shards[0], part)
    again = PartialStore(str(tmp_path), "n", "r")
    assert again.started() == start and again.staged_shards == 2
    again.open(plan, start)
    loaded = again.load(shards)
    assert list(loaded) == [0] and loaded[0].partial.examples == 5
    np.testing.assert_array_equal(loaded[0].partial.sums["gradient"], np.arange(3.0))
    # A damaged partial is computed again; a damaged state is an input error.
    (tmp_path / "n" / ".partials" / "run=r" / "shard-00000.npz").write_bytes(b"garbage")
    assert again.load(shards) == {}
    (tmp_path / "n" / ".partials" / "run=r" / "state.json").write_text("{not json")
    with pytest.raises(InputError, match="is damaged"):
        PartialStore(str(tmp_path), "n", "r").started()
    again.remove()
    assert not (tmp_path / "n" / ".partials").exists()


def test_two_publishers_under_one_root_do_not_interfere(tmp_path):
    table = pa.table({"estimate": [1.0]})
    a = RunPublisher(str(tmp_path), "job", "a", "2026-01-02")
    b = RunPublisher(str(tmp_path), "job", "b", "2026-01-02")
    a.write_table("trace.parquet", table, {})
    b.write_table("trace.parquet", table, {})
    b.write_table("spectrum.parquet", table, {})
    a_dir = a.publish({"run_id": "a"})
    b_dir = b.publish({"run_id": "b"})
    assert sorted(os.listdir(a_dir)) == ["manifest.json", "trace.parquet"]
    assert sorted(os.listdir(b_dir)) == ["manifest.json", "spectrum.parquet", "trace.parquet"]


def _beside_a_slow_driver(root, tmp_path, shards: int, theirs: str, mine: str):
    """Starts a slow CLI run (``--run-id theirs``), runs ``mine`` in this process once the slow
    one has staged its state, and returns (my RunResult, their exit status, stdout, stderr).
    The slow one's workers start while it plans, so by then they are computing: 3 s a shard
    keeps it behind this one's plan and worker start."""
    output = tmp_path / "out"
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(jobs.job(root, QUANTITIES, shards=shards, workers=1,
                                                output=str(output))))
    other = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(job_file), "--run-id", theirs],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**ENV, "HESSIAN_PIPELINE_FAULT": "delay:seconds=3"})
    try:
        deadline = time.time() + 120
        while not (output / "test-job" / ".partials" / f"run={theirs}" / "state.json").exists():
            assert other.poll() is None and time.time() < deadline, other.communicate()
            time.sleep(0.2)
        result = run(load_job(str(job_file)), run_id=mine)
        stdout, stderr = other.communicate(timeout=300)
    finally:
        other.kill()
    return result, other.returncode, stdout, stderr


def test_two_drivers_with_one_run_id_at_once(ray_local, files, tmp_path):
    """Two drivers with one --run-id, computing at the same time under one output root: the one
    that finishes first publishes; the slow one finds the run published when it is done, ends
    with exit 2 and removes its staged shards (no orphan .partials/run=ID/). (Separate run ids
    under one root: test_two_publishers_under_one_root_do_not_interfere.)"""
    root, expected = files
    mine, status, stdout, stderr = _beside_a_slow_driver(root, tmp_path, 3, "same", "same")
    _assert_matches(mine.run_dir, expected)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert status == 2 and len(errors) == 1 and "already published" in errors[0], stderr
    assert not stdout.strip()
    assert not (tmp_path / "out" / "test-job" / ".partials").exists()
    assert sorted(os.listdir(os.path.dirname(mine.run_dir))) == ["run=same"]


def test_run_stays_within_the_memory_its_plan_printed(tmp_path):
    """The plan's per-process estimate against the peaks the run measured (manifest), under a
    memory cap: Hutchinson probes make the K x P arrays the largest part of every process."""
    example = os.path.join(paths.REPO, "jobs", "example.yaml")
    probes = ["--set", "quantities={hessian_diagonal: {method: hutchinson, probes: 3000}}",
              "--set", "data.limit=512", "--set", "shards=2", "--output", str(tmp_path / "out")]
    # (A plan over the cap is refused: tests/test_cost.py and tests/system/test_bad_input.py.)
    done = _cli(example, *probes, "--set", "limits.memory_gib=3")
    assert done.returncode == 0, done.stderr
    assert "whole run" in done.stderr  # the plan printed its cost table
    manifest = json.load(open(os.path.join(done.stdout.strip().splitlines()[-1], "manifest.json")))
    estimate, measured = manifest["estimate"], manifest["memory"]
    peaks = measured["worker_peak_bytes"] + [measured["driver_peak_bytes"]]
    planned = [estimate["worker_bytes"]] * len(measured["worker_peak_bytes"]) + [estimate["driver_bytes"]]
    print("\npeak / planned (workers, driver): " + ", ".join(f"{p / q:.2f}" for p, q in zip(peaks, planned)))
    assert len(measured["worker_peak_bytes"]) == manifest["workers"] >= 1
    for peak, plan in zip(peaks, planned):
        assert peak <= 1.5 * plan and peak <= 3 * 2**30
        assert peak >= plan / 3  # an estimate that tracks the run, not a number too big to matter


# ------------------------------------------------------------------------- a lost node (last: own Ray)
def test_node_lost_mid_run_completes_and_no_node_left_ends_the_run(files, fault, tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.cluster import pool

    root, expected = files
    if ray.is_initialized():
        ray.shutdown()
    fault("delay:seconds=0.7")
    monkeypatch.setattr(pool, "LIVENESS_SECONDS", 2.0)
    # Notice a lost node within about two seconds (Ray's default is tens of seconds). The head
    # has no CPU: workers run only on the two nodes that are removed.
    fast = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000, "health_check_failure_threshold": 2}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "_system_config": fast})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    output = tmp_path / "out"
    removed = []

    def remove_busy_nodes(run_id, count):
        deadline = time.time() + 120
        while time.time() < deadline and len(removed) < count:
            if _partials(str(output), run_id):
                busy = {node for _, _, node in fault.computed()}
                for node in nodes:
                    if node.node_id in busy and node.node_id not in removed:
                        cluster.remove_node(node, allow_graceful=False)
                        removed.append(node.node_id)
                        break
            time.sleep(0.1)

    try:
        ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3"}})
        watcher = threading.Thread(target=remove_busy_nodes, args=("lost", 1), daemon=True)
        watcher.start()
        spec = load_job(jobs.job(root, QUANTITIES, shards=6, workers=2, output=str(output)))
        result = run(spec, run_id="lost")
        watcher.join(timeout=5)
        assert removed, "no node was removed during the run"
        _assert_matches(result.run_dir, expected)
        started = fault.computed()
        again = [s for i, (s, _, node) in enumerate(started) if node == removed[0]
                 and any(s == t for t, _, other in started[i + 1:] if other != removed[0])]
        print(f"\nnode {removed[0][:8]} removed mid-run; 6 shards started {len(started)} times; "
              f"shards moved off the lost node: {again}")
        # Now the last node that can run a worker dies mid-pass: the run stops with a message
        # (it waited forever for a replacement worker that no node could host).
        watcher = threading.Thread(target=remove_busy_nodes, args=("orphaned", 2), daemon=True)
        watcher.start()
        began = time.time()
        with pytest.raises(ComputeError, match=r"no live Ray node can run a worker .* --run-id orphaned to resume"):
            run(spec, run_id="orphaned", stream=open(os.devnull, "w"))
        assert len(removed) == 2 and time.time() - began < 120
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.parametrize("how", ["SIGTERM", "SIGTERM to a new run", "raylet killed"])
def test_a_run_stopped_mid_pass_ends_with_one_line(files, fault, tmp_path, how):
    """SIGTERM to the driver (a scheduler stopping the job), or the only node's raylet killed
    (as the OOM killer would): exit 1 within seconds, one error line that says how to resume,
    nothing on stdout, no report from Ray or absl; the finished shards are kept. A new run (no
    --run-id: its Ray started before TensorFlow's import) names the run id it chose."""
    import signal

    root, _ = files
    output = tmp_path / "out"
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(jobs.job(root, {"gradient": {}}, shards=6, workers=1, output=str(output))))
    named = [] if how == "SIGTERM to a new run" else ["--run-id", "stopped"]

    def staged():
        found = glob.glob(os.path.join(str(output), "test-job", ".partials", "run=*", "shard-*.npz"))
        return found if not named else _partials(str(output), "stopped")

    driver = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(job_file), *named],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**ENV, "HESSIAN_PIPELINE_FAULT": "delay:seconds=1",
                                   "HESSIAN_PIPELINE_FAULT_DIR": str(fault.folder)})
    try:
        deadline = time.time() + 120
        while not staged():
            assert driver.poll() is None and time.time() < deadline, driver.communicate()
            time.sleep(0.2)
        if how.startswith("SIGTERM"):
            driver.send_signal(signal.SIGTERM)
        else:
            raylets = subprocess.run(["pgrep", "-x", "raylet", "-P", str(driver.pid)], capture_output=True,
                                     text=True).stdout.split()
            assert len(raylets) == 1
            os.kill(int(raylets[0]), signal.SIGKILL)
        stdout, stderr = driver.communicate(timeout=90)
    finally:
        driver.kill()
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert driver.returncode == 1 and len(errors) == 1 and stderr.splitlines()[-1] == errors[0], stderr
    expected = "terminated (SIGTERM)" if how.startswith("SIGTERM") else "the local Ray node died mid-pass"
    run_id = re.search(r"--run-id (\S+) to resume", errors[0])
    assert expected in errors[0] and run_id, errors[0]
    assert stdout == "" and "Traceback" not in stderr and "SIGTERM received" not in stderr
    assert not [line for line in stderr.splitlines() if line.startswith("[")], stderr  # no Ray C++ log lines
    assert _partials(str(output), "stopped" if named else run_id.group(1))


# ------------------------------------------------------------------ never wait forever
def test_more_workers_than_the_cluster_can_place_are_not_started(tmp_path):
    """--workers 3 on 2 CPUs: the plan starts 2 and says so (an actor asking for a CPU the
    cluster lacks would never be scheduled)."""
    from pipeline.plan import make_plan

    jobs.write_data(tmp_path / "data", rows=60, files=1)
    jobs.write_model(str(tmp_path / "model.keras"))
    plan = make_plan(load_job(jobs.job(tmp_path, {"gradient": {}}, shards=4)), workers=3, cluster={"CPU": 2})
    assert plan.workers == 2
    assert any("3 asked, 2 can be placed" in note for note in plan.notes), plan.notes


def test_a_worker_never_asks_for_more_cpus_than_the_cluster_has():
    """Workers started before the plan count as held by the pool; while they still wait for a
    previous run's CPUs, free + held exceeded the cluster (2 CPUs): the pool asked for 4 and
    its worker was never scheduled (the run stopped after 600 s)."""
    import ray

    from pipeline.cluster.pool import worker_cpus

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        deadline = time.monotonic() + 60
        while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert worker_cpus(1, False) == 2.0
        assert worker_cpus(1, False, held=2.0) == 2.0
        assert worker_cpus(2, False, held=2.0) == 1.0
        assert worker_cpus(1, True) == 1.0
    finally:
        ray.shutdown()


def test_workers_that_cannot_start_end_the_run_with_a_message(tmp_path, monkeypatch):
    """Every CPU held by someone else: the worker is never scheduled; the run stops at the
    deadline with exit status 1 and one message, instead of waiting forever."""
    import ray

    from pipeline import driver
    from pipeline.cluster import pool

    jobs.write_data(tmp_path / "data", rows=60, files=1)
    jobs.write_model(str(tmp_path / "model.keras"))
    monkeypatch.setattr(pool, "WORKER_START_SECONDS", 5.0)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        @ray.remote(num_cpus=2)
        class Hog:
            def ready(self):
                return True

        hog = Hog.remote()
        ray.get(hog.ready.remote())
        with pytest.raises(ComputeError, match=r"did not all start within 5 s .* check `ray status`"):
            driver.run(load_job(jobs.job(tmp_path, {"gradient": {}}, workers=1)), run_id="starved",
                       stream=open(os.devnull, "w"))
    finally:
        ray.shutdown()


def test_disk_full_while_publishing_is_one_line_and_resumes(files, tmp_path):
    """Writing the results fails (ENOSPC): exit 1, one error line that says how to resume, no
    traceback; the same command afterwards publishes without computing again."""
    root, expected = files
    output = tmp_path / "out"
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(jobs.job(root, QUANTITIES, shards=3, workers=1, output=str(output))))
    full = _cli(job_file, "--run-id", "full", fault="disk-full", fault_dir=tmp_path)
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr
    assert len(errors) == 1 and "No space left on device" in errors[0] and "--run-id full to resume" in errors[0]
    assert not glob.glob(str(output / "test-job" / "date=*" / "run=*"))
    done = _cli(job_file, "--run-id", "full", fault_dir=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "resumed 3 of 3 shards" in done.stderr
    _assert_matches(done.stdout.strip().splitlines()[-1], expected)



RAY_CHILDREN_MASKS = r"""
import glob, json, os, sys
sys.path.insert(0, sys.argv[1])
from pipeline import interrupts
from pipeline.cluster import connect

def status(pid):
    with open(f"/proc/{pid}/status") as handle:
        return dict(line.split(":", 1) for line in handle.read().splitlines() if ":" in line)

connect.connect(None, quiet=True)   # holds SIGINT and SIGTERM while Ray starts, as a run does
interrupts.release()
table = {}
for path in glob.glob("/proc/[0-9]*/status"):
    try:
        fields = status(path.split("/")[2])
        table[int(fields["Pid"])] = (int(fields["PPid"]), fields["Name"].strip(), int(fields["SigBlk"], 16))
    except (OSError, KeyError, ValueError):
        pass
ours, grew = {os.getpid()}, True
while grew:
    more = {pid for pid, (parent, _, _) in table.items() if parent in ours} - ours
    ours |= more
    grew = bool(more)
masks = {f"{pid} {table[pid][1]}": table[pid][2] for pid in ours - {os.getpid()}}
connect.shutdown()
print(json.dumps(masks))
"""


def test_rays_processes_do_not_inherit_the_held_sigterm():
    """Signals held while Ray starts must not stay blocked in the processes it forks: a raylet
    that blocks SIGTERM made ``ray.shutdown`` wait a second for each of Ray's processes and then
    kill them (5 s of the bundled example's 32 s)."""
    root = paths.REPO
    done = subprocess.run([sys.executable, "-c", RAY_CHILDREN_MASKS, root], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-2000:]
    masks = json.loads(done.stdout.strip().splitlines()[-1])
    assert any("raylet" in name for name in masks), masks
    sigterm = 1 << (15 - 1)
    assert {name: mask for name, mask in masks.items() if mask & sigterm} == {}


def test_a_staged_shard_whose_file_was_rewritten_is_stale(tmp_path):
    """Each staged shard keeps the digests of the bytes it read and its files' planned size and
    modification time: a file rewritten since makes the shard stale (computed again)."""
    import datetime as dt
    from types import SimpleNamespace

    from pipeline.partial import Partial
    from pipeline.storage.dataset import Piece, Shard
    from pipeline.storage.staging import PartialStore

    shards = (Shard(0, 0, 5, (Piece("/d/a.parquet", 0, 5),)), Shard(1, 5, 4, (Piece("/d/b.parquet", 0, 4),)))
    job = load_job({"name": "n", "model": "/m.keras", "loss": "mse", "quantities": {"gradient": {}},
                    "data": {"path": "/d", "features": "x", "labels": "y"}})

    def plan(stamps):
        data = SimpleNamespace(fingerprint="f", shards=shards, files=("/d/a.parquet", "/d/b.parquet"),
                               file_stamps=stamps)
        return SimpleNamespace(job=job, inputs={}, model_sha256="abc", data=data, date="2026-01-02")

    start = dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)
    store = PartialStore(str(tmp_path), "n", "r")
    store.open(plan(((10, 111), (20, 222))), start)
    for shard in shards:
        store.save(shard, Partial(examples=shard.rows, weight_sum=float(shard.rows)), digests=(f"d{shard.index}",))
    again = PartialStore(str(tmp_path), "n", "r")
    again.started()
    again.open(plan(((10, 111), (20, 999))), start)  # b.parquet touched since
    loaded = again.load(shards)
    assert loaded[0].stale is None and loaded[0].digests == ("d0",)
    assert loaded[1].stale == "/d/b.parquet was rewritten since (its size or modification time changed)"
    again.save(shards[0], Partial(examples=5, weight_sum=5.0))  # served from a worker's memory: no digests
    assert again.load(shards)[0].stale == "it was staged without a record of the bytes it read"
