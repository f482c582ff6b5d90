"""``HESSIAN_PIPELINE_FAULT``, the reliability tests' hook: off when unset; each
``kind[:key=value]...[:once]`` fires where its keys match, ``once`` only the first time."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import paths
from pipeline import faults
from pipeline.faults import FAULT, FAULT_DIR, active, environment, record, worker_faults


@pytest.fixture
def fault(monkeypatch, tmp_path):
    """Sets the fault variable; ``once`` markers and ``computed.log`` go to ``tmp_path``."""
    monkeypatch.delenv(FAULT, raising=False)
    monkeypatch.setenv(FAULT_DIR, str(tmp_path))
    return lambda text: monkeypatch.setenv(FAULT, text)


def test_off_when_unset(monkeypatch, tmp_path):
    monkeypatch.delenv(FAULT, raising=False)
    monkeypatch.delenv(FAULT_DIR, raising=False)
    for kind in ("kill-worker", "fail-shard", "delay", "disk-full", "publish-before-rename"):
        assert active(kind, shard=0) is None
    assert environment() == {}
    worker_faults(3, node="n")  # nothing fires, nothing is recorded
    record("shard=3")
    assert os.listdir(tmp_path) == []


def test_a_fault_fires_on_its_shard_only(fault):
    fault("fail-shard:shard=3")
    assert active("fail-shard", shard=3) == {"_text": "fail-shard:shard=3", "shard": "3"}
    assert active("fail-shard", shard=4) is None
    assert active("kill-worker", shard=3) is None  # another kind
    worker_faults(4)
    with pytest.raises(RuntimeError, match="^fault injected: fail-shard 3$"):
        worker_faults(3)


def test_without_shard_it_fires_on_every_shard(fault):
    fault("fail-shard")
    assert all(active("fail-shard", shard=k) is not None for k in range(5))


def test_several_faults_separated_by_commas_with_values_and_spaces(fault):
    fault(" delay:seconds=0.01 , kill-driver:shards=2,publish-before-rename,pause-after-publish:seconds=60")
    assert active("delay")["seconds"] == "0.01"
    assert active("kill-driver")["shards"] == "2"
    assert active("publish-before-rename") == {"_text": "publish-before-rename"}
    assert active("pause-after-publish")["seconds"] == "60"
    assert active("disk-full") is None


def test_once_fires_only_the_first_time_and_leaves_its_marker(fault, tmp_path):
    fault("fail-shard:shard=1:once")
    first = active("fail-shard", shard=1)
    assert first is not None and first["once"] is True
    markers = [f for f in os.listdir(tmp_path) if f.startswith("fault-")]
    assert len(markers) == 1
    assert active("fail-shard", shard=1) is None
    worker_faults(1)  # does not raise again
    # Across processes: another process sees the marker too.
    code = "from pipeline.faults import active; print(active('fail-shard', shard=1))"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONPATH": paths.REPO}).stdout
    assert shown.strip() == "None"


def test_workers_record_each_shard_they_start(fault, tmp_path):
    fault("delay:seconds=0")
    worker_faults(2, node="abc")
    worker_faults(5)
    lines = (tmp_path / "computed.log").read_text(encoding="utf-8").splitlines()
    assert lines == [f"shard=2 node=abc pid={os.getpid()}", f"shard=5 node=None pid={os.getpid()}"]


def test_environment_hands_on_both_variables(fault, tmp_path):
    fault("disk-full")
    assert environment() == {FAULT: "disk-full", FAULT_DIR: str(tmp_path)}


def test_kill_worker_ends_the_process_at_once_with_status_1(tmp_path):
    code = ("import atexit; atexit.register(print, 'atexit ran'); from pipeline.faults import worker_faults; "
            "worker_faults(0); worker_faults(3); print('survived')")
    env = {**os.environ, "PYTHONPATH": paths.REPO, FAULT: "kill-worker:shard=3", FAULT_DIR: str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1
    assert done.stdout == "" and done.stderr == "fault injected: kill-worker shard 3: exiting\n"
    assert len((tmp_path / "computed.log").read_text(encoding="utf-8").splitlines()) == 2
    assert faults.FAULT_VARIABLES == (FAULT, FAULT_DIR)
