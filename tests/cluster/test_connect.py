"""Joining a Ray cluster (``run --address``): a deadline, a line that names the address, Ctrl-C
that works while it waits, and a version mismatch named with both versions. Real processes:
the command line in a subprocess, sockets on loopback, a real Ray head started here (stopped by
its process group, never ``ray stop``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import paths
import shell
from pipeline.cluster import connect
from pipeline.errors import InputError

pytestmark = pytest.mark.slow
ROOT = paths.REPO
EXAMPLE = os.path.join(ROOT, "jobs", "example.yaml")
BIN = os.path.dirname(sys.executable)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "3", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_where_nothing_listens_is_one_line_within_the_deadline(tmp_path):
    """Before: no output for about 150 s (Ray's own retries), and Ctrl-C ignored."""
    port = _free_port()
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", EXAMPLE, "--address", f"127.0.0.1:{port}",
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=100,
                          env=_env(HESSIAN_PIPELINE_CONNECT_SECONDS="3"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"error: no Ray cluster answers at 127.0.0.1:{port} within 3 s (Connection refused): start one with "
        "`ray start --head` or drop --address (HESSIAN_PIPELINE_CONNECT_SECONDS sets the wait)"]
    assert done.stdout == "" and not (tmp_path / "out").exists()
    assert time.monotonic() - began < 90


def test_ctrl_c_while_joining_a_cluster_is_one_line_at_once(tmp_path):
    """An address that accepts connections and never answers (a stalled head): the driver waits
    for its deadline, but a Ctrl-C ends the wait at once. Before: held until Ray gave up."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        silent.settimeout(120)
        port = silent.getsockname()[1]
        driver = subprocess.Popen(preexec_fn=shell.like_a_terminal, args=[sys.executable, "-m", "pipeline", "run", EXAMPLE, "--address",
                                   f"127.0.0.1:{port}", "--run-id", "joining", "--output", str(tmp_path / "out")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=_env(HESSIAN_PIPELINE_CONNECT_SECONDS="300"))
        try:
            peer, _ = silent.accept()  # the driver is now waiting for an answer
            time.sleep(1.0)
            driver.send_signal(signal.SIGINT)
            interrupted = time.monotonic()
            stdout, stderr = driver.communicate(timeout=60)
        finally:
            if driver.poll() is None:
                driver.kill()
        peer.close()
    assert time.monotonic() - interrupted < 15, stderr
    assert driver.returncode == 1 and stdout == "", stderr
    assert stderr.splitlines() == [
        "error: interrupted; run the same command with --run-id joining to resume (finished shards are kept)"]


def test_a_listener_that_is_not_ray_is_named_as_such(monkeypatch):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        monkeypatch.setattr(connect, "CONNECT_SECONDS", 3.0)
        began = time.monotonic()
        with pytest.raises(InputError, match=rf"^no Ray cluster answers at 127.0.0.1:{port} within 3 s \(something "
                                             r"listens there, but no Ray GCS answered\): start one with"):
            connect.connect(f"127.0.0.1:{port}", quiet=True)
        assert time.monotonic() - began < 10


TOKEN = "hessian-pipeline-connect-token-5e0b"


@pytest.fixture(scope="module")
def head():
    """A real Ray head of this module's own (its own ports, temp dir and auth token)."""
    gcs = _free_port()
    temp = tempfile.mkdtemp(prefix="hp-connect-", dir="/tmp")
    log = open(os.path.join(temp, "head.log"), "w")
    process = subprocess.Popen(
        [os.path.join(BIN, "ray"), "start", "--head", "--block", "--port", str(gcs), "--include-dashboard=false",
         "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
         "--num-cpus", "1", "--disable-usage-stats", "--temp-dir", temp],
        env=_env(PATH=BIN + os.pathsep + os.environ["PATH"], RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", gcs), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the Ray head did not start: " + open(log.name).read()[-2000:])
                time.sleep(0.5)
        yield f"127.0.0.1:{gcs}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)
        log.close()
        subprocess.run(["rm", "-rf", temp], check=False)


# Ray reads its auth settings once per process, at import: the clients run in their own.
REWRITE = """
import json, sys, time
from ray._common.usage import usage_constants
from ray._raylet import InnerGcsClient
gcs = InnerGcsClient.standalone(sys.argv[1], None, 30000)
key, space = usage_constants.CLUSTER_METADATA_KEY, b"cluster"
deadline = time.monotonic() + 60
while not gcs.internal_kv_get(key, space, timeout=10) and time.monotonic() < deadline:
    time.sleep(0.5)  # the head writes it as it starts
metadata = json.loads(gcs.internal_kv_get(key, space, timeout=10))
metadata.update(json.loads(sys.argv[2]))
gcs.internal_kv_put(key, json.dumps(metadata).encode(), True, space, timeout=10)
"""
JOIN = """
import sys, ray
from pipeline.cluster import connect
from pipeline.errors import InputError
try:
    connect.connect(sys.argv[1], quiet=True)
    print("joined", ray.cluster_resources().get("CPU"))
except InputError as err:
    print("error:", err, "initialized" if ray.is_initialized() else "")
"""


def _python(code, *args):
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env=_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN))
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_a_version_mismatch_names_both_versions(head):
    """The cluster's metadata rewritten to say it runs another Ray and Python (what a head of
    another version records): refused at once with both named. Before: Ray's multi-line
    ``RuntimeError: Version mismatch`` as a traceback."""
    import platform

    import ray

    _python(REWRITE, head, json.dumps({"ray_version": "2.59.1", "python_version": "3.10.14"}))
    try:
        assert _python(JOIN, head) == (
            f"error: the Ray cluster at {head} runs Ray 2.59.1 with Python 3.10.14, but this machine has Ray "
            f"{ray.__version__} with Python {platform.python_version()}: a driver must use the cluster's versions "
            "(install ray==2.59.1 under Python 3.10.14 here), or send the run with `hessian-pipeline submit`, which "
            "runs it on the cluster")
    finally:
        _python(REWRITE, head, json.dumps({"ray_version": ray.__version__, "python_version": platform.python_version()}))
    # With its true versions, the same head is joined through the same checks.
    assert _python(JOIN, head) == "joined 1.0"


# ------------------------------------------------------------------ a local Ray dies with its driver
def _start_time(pid):
    """(name, start time) of a live process; None once it is gone or a zombie."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
        fields = stat[stat.rindex(")") + 2:].split()
        return None if fields[0] in "ZX" else (stat[stat.index("(") + 1:stat.rindex(")")], int(fields[19]))
    except (OSError, ValueError):
        return None


def _below(root):
    """Every process under ``root`` with its start time (so a reused id is not mistaken for it)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
                parents.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry))
            except (OSError, ValueError):
                pass
    found, frontier = {}, [root]
    while frontier:
        for child in parents.get(frontier.pop(), []):
            if child not in found:
                found[child] = _start_time(child)
                frontier.append(child)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_a_killed_driver_takes_its_local_ray_with_it(tmp_path):
    """SIGKILL to a `run` that started its own Ray. Before: Ray's raylet and GCS followed it, but
    `ray::DashboardAgent` and `ray::RuntimeEnvAgent` lived on. Only this run's processes are
    looked at (those under the driver, by id and start time), never anyone else's Ray."""
    import yaml

    import jobs

    jobs.write_data(tmp_path / "data", rows=120, files=2)
    jobs.write_model(str(tmp_path / "model.keras"))
    spec = jobs.job(tmp_path, {"gradient": {}}, shards=6, workers=1)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    output = tmp_path / "out"
    driver = subprocess.Popen(preexec_fn=shell.like_a_terminal, args=[sys.executable, "-m", "pipeline", "run", str(tmp_path / "job.yaml"), "--run-id",
                               "killed", "--output", str(output)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=_env(HESSIAN_PIPELINE_FAULT="delay:seconds=2"))
    try:
        partials = output / "test-job" / ".partials" / "run=killed"
        deadline = time.monotonic() + 240
        while not list(partials.glob("shard-*.npz")):
            assert driver.poll() is None and time.monotonic() < deadline, "the run did not stage a shard"
            time.sleep(0.3)
        tree = _below(driver.pid)
        names = {t[0] for t in tree.values() if t}
        assert {"raylet", "ray::DashboardA", "ray::RuntimeEnv"} <= names, names
    finally:
        driver.kill()
        driver.wait()
    deadline = time.monotonic() + 20
    while True:
        alive = {pid: t for pid, t in tree.items() if t is not None and _start_time(pid) == t}
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not alive, {pid: t[0] for pid, t in alive.items()}
