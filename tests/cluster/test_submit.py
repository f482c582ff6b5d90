"""``submit``: the job's runtime environment, and end to end against a real local Ray head.

The head is started here with its own ports, temp dir and auth token, and stopped by its
process group (never ``ray stop``, which would end every Ray on the machine).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

import jobs
from pipeline.errors import InputError
from pipeline.cluster.submit import dashboard_address, prepare_submission, run_dir_in_logs

TOKEN = "hessian-pipeline-test-token-7d1f2c9a"
BIN = os.path.dirname(sys.executable)
# An interpreter without Ray (the system's, where it has none; else a shell that is no Python).
SYSTEM_PYTHON = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.exists(p) and
                      subprocess.run([p, "-c", "import ray"], capture_output=True).returncode != 0), "/bin/false")


def cli(*args, env=None, cwd=None, timeout=300):
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env = {**base, "TF_CPP_MIN_LOG_LEVEL": "3", "PATH": BIN + os.pathsep + os.environ["PATH"], **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def error_lines(process):
    return [line for line in process.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder as a user has it: job file, model and data inside, relative paths."""
    root = tmp_path_factory.mktemp("project")
    jobs.write_data(root / "data", rows=90, files=2)
    jobs.write_model(str(root / "model.keras"))
    spec = jobs.job(root, {"hessian_diagonal": {"method": "exact"}, "gradient": {}, "fisher_diagonal": {}},
                    shards=2, workers=1)
    spec.update(name="submit-test", model="model.keras", output="results")
    spec["data"]["path"] = "data/"
    (root / "job.yaml").write_text(yaml.safe_dump(spec))
    return root


# ------------------------------------------------------------------------ without a cluster
def test_entrypoint_runtime_env_and_submission_id(project, tmp_path):
    now = dt.datetime(2026, 11, 26, 23, 59, tzinfo=dt.timezone.utc)
    sub = prepare_submission(str(project / "job.yaml"), output=str(tmp_path / "out"), workers=1,
                             overrides=["data.batch_size=16"], now=now)
    assert sub.submission_id == "hessian-submit-test-2026-11-26"
    argv = shlex.split(sub.command)
    assert argv[:5] == ["$PY", "-m", "pipeline", "run", "job.yaml"]
    # The interpreter is chosen on the head (the first that imports ray), not a bare `python`.
    assert sub.entrypoint.startswith("PY=; for p in") and sub.entrypoint.endswith(
        '"$PY" ' + sub.command[len("$PY "):])
    assert argv[argv.index("--run-id") + 1] == sub.submission_id
    assert argv[argv.index("--output") + 1] == str(tmp_path / "out")
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert sets == ["data.batch_size=16", "model=model.keras", "data.path=data"]
    assert sub.runtime_env["working_dir"] == str(project)
    assert os.path.basename(sub.runtime_env["py_modules"][0]) == "pipeline"
    gpus = prepare_submission(str(project / "job.yaml"), output="s3://b/r", gpus=2, gpu_timeout=60,
                              submission_id="x1", run_id="r1")
    assert gpus.command.startswith("$PY -m pipeline.cluster.submit --await-gpus 2 --timeout 60 && $PY -m pipeline run")
    assert "--run-id r1" in gpus.entrypoint and "--output s3://b/r" in gpus.entrypoint
    named = prepare_submission(str(project / "job.yaml"), output="s3://b/r", python="/opt/ray env/bin/python")
    assert named.entrypoint.startswith("'/opt/ray env/bin/python' -m pipeline run job.yaml")


def test_local_inputs_must_travel(project, tmp_path):
    with pytest.raises(InputError, match="is inside"):  # the default output, results/, is inside the project
        prepare_submission(str(project / "job.yaml"))
    elsewhere = tmp_path / "job.yaml"
    spec = yaml.safe_load((project / "job.yaml").read_text())
    spec["model"] = str(project / "model.keras")
    elsewhere.write_text(yaml.safe_dump(spec))
    with pytest.raises(InputError, match="model .* is outside"):
        prepare_submission(str(elsewhere), output="s3://b/r")
    # ... unless the working dir holds them; then absolute paths become relative ones.
    (tmp_path / "data").symlink_to(project / "data")
    sub = prepare_submission(str(elsewhere), output="s3://b/r", working_dir=str(project.parent))
    assert "model=../" in sub.entrypoint
    # A data folder that .gitignore keeps from travelling is refused here, not on the cluster.
    (project / ".gitignore").write_text("data/\n")
    try:
        with pytest.raises(InputError, match=r"\.gitignore"):
            prepare_submission(str(project / "job.yaml"), output="s3://b/r")
    finally:
        (project / ".gitignore").unlink()
    with pytest.raises(InputError, match="dashboard"):
        dashboard_address("ray://head:10001")
    assert dashboard_address("head:8265") == "http://head:8265"


def test_a_head_where_no_python_imports_ray_is_one_line(tmp_path):
    """The entrypoint's choice of interpreter, run by a real shell with a PATH whose Pythons lack Ray."""
    from pipeline.cluster.submit import FIND_PYTHON

    shadow = tmp_path / "bin"
    shadow.mkdir()
    for name in ("python", "python3"):
        (shadow / name).symlink_to(SYSTEM_PYTHON)
    env = {"PATH": f"{shadow}:/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(["/bin/sh", "-c", FIND_PYTHON + 'echo "$PY"'], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "error: no python on this node imports ray (tried $HESSIAN_PIPELINE_PYTHON, the ray command's interpreter, "
        "python3, python): set HESSIAN_PIPELINE_PYTHON in the cluster's environment, or submit with --python PATH"]
    chosen = subprocess.run(["/bin/sh", "-c", FIND_PYTHON + 'echo "$PY"'], capture_output=True, text=True,
                            env={**env, "PATH": f"{shadow}:{BIN}:/usr/bin:/bin"})
    assert chosen.returncode == 0, chosen.stderr
    assert subprocess.run([chosen.stdout.strip(), "-c", "import ray"], capture_output=True).returncode == 0


def test_run_dir_is_found_in_the_logs():
    logs = "output       /r\nloss 1.1 over 90 examples, 3.0s\n/r/x/date=2026-11-26/run=hessian-x\n(raylet) bye\n"
    assert run_dir_in_logs(logs) == "/r/x/date=2026-11-26/run=hessian-x"


# --------------------------------------------------------------------------- a real head
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process) -> None:
    """Ends the head we started: SIGTERM to `ray start --block` (it stops its children), then
    SIGKILL to what is left of its process group."""
    try:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def head():
    # Every fixed default port gets a free one: a colleague's Ray (any local ray.init) holds
    # 52365, the agent's, and the job API needs that agent.
    dashboard, gcs, client_port, agent = _free_port(), _free_port(), _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="hp-ray-", dir="/tmp")
    # The head's PATH finds a `python` without Ray first, as on a machine whose Ray runs from a
    # virtual environment that was never activated: the job must still run with Ray's Python.
    shadow = os.path.join(temp, "system-python")
    os.makedirs(shadow)
    for name in ("python", "python3"):
        os.symlink(SYSTEM_PYTHON, os.path.join(shadow, name))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PATH": os.pathsep.join([shadow, BIN, os.environ["PATH"]])}
    env.pop("RAY_ADDRESS", None)
    log = open(os.path.join(temp, "head.log"), "w")
    process = subprocess.Popen(
        [os.path.join(BIN, "ray"), "start", "--head", "--block", "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dashboard), "--port", str(gcs), "--ray-client-server-port", str(client_port),
         "--dashboard-agent-listen-port", str(agent),
         "--num-cpus", "2", "--disable-usage-stats", "--temp-dir", temp],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        import requests

        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{address}/api/version", timeout=2,
                                headers={"Authorization": f"Bearer {TOKEN}"}).ok:
                    break
            except requests.RequestException:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the Ray head did not start: " + open(log.name).read()[-2000:])
            time.sleep(0.5)
        yield {"dashboard": address, "gcs": f"127.0.0.1:{gcs}", "process": process}
    finally:
        _stop(process)
        log.close()
        subprocess.run(["rm", "-rf", temp], check=False)


@pytest.mark.slow
def test_submit_end_to_end(head, project, tmp_path):
    env = {"RAY_AUTH_TOKEN": TOKEN}
    head = head["dashboard"]
    output = tmp_path / "cluster-results"
    done = cli("submit", str(project / "job.yaml"), "--address", head, "--output", str(output),
               "--submission-id", "e2e-1", env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    run_dir = done.stdout.strip().splitlines()[-1]
    assert run_dir.startswith(str(output / "submit-test" / "date=")) and run_dir.endswith("run=e2e-1")
    manifest = json.load(open(os.path.join(run_dir, "manifest.json")))
    assert manifest["status"] == "complete" and manifest["examples"] == 90
    # the user's paths, not Ray's temporary copy of the uploaded folder
    assert manifest["model"]["path"] == str(project / "model.keras"), manifest["model"]
    assert manifest["job"]["data"]["path"].startswith(str(project))
    copies = [f"{k}.{j}: {w}" for k, v in manifest.items() if isinstance(v, dict) for j, w in v.items() if "runtime_resources" in json.dumps(w)]
    assert not copies, copies
    assert "submitted e2e-1" in done.stderr  # the logs were streamed
    # Ray's own client lines (`INFO dashboard_sdk.py:... -- Uploading package gcs://...`) only with --debug.
    assert "Uploading" not in done.stderr and " INFO " not in done.stderr, done.stderr[:3000]

    # The same numbers as a run on this machine.
    # RAY_ADDRESS=local: a plain ray.init() joins the cluster that `ray start` last recorded in
    # /tmp/ray (a colleague's, on a shared machine) instead of starting its own.
    local = cli("run", str(project / "job.yaml"), "--output", str(tmp_path / "local"), "--run-id", "local",
                env={"RAY_ADDRESS": "local"})
    assert local.returncode == 0, local.stderr[-4000:]
    local_dir = local.stdout.strip().splitlines()[-1]
    a = pq.read_table(os.path.join(local_dir, "diagonals.parquet")).to_pydict()
    b = pq.read_table(os.path.join(run_dir, "diagonals.parquet")).to_pydict()
    for column in ("hessian_diagonal", "gradient", "fisher_diagonal"):
        np.testing.assert_allclose(b[column], a[column], rtol=1e-9, atol=1e-13, err_msg=column)
    same = cli("compare", local_dir, run_dir, "--fail-above", "1e-9")
    assert same.returncode == 0, same.stdout + same.stderr

    # A second submit of the same id is refused: a nightly job cannot run twice by accident.
    again = cli("submit", str(project / "job.yaml"), "--address", head, "--output", str(output),
                "--submission-id", "e2e-1", env=env)
    assert again.returncode == 2
    assert len(error_lines(again)) == 1 and "already submitted" in error_lines(again)[0]
    assert "Traceback" not in again.stderr

    # A wrong token is an input error that says where the token comes from.
    wrong = cli("submit", str(project / "job.yaml"), "--address", head, "--output", str(output),
                "--submission-id", "e2e-2", env={"RAY_AUTH_TOKEN": "wrong", "RAY_AUTH_MODE": "token"})
    assert wrong.returncode == 2 and "RAY_AUTH_TOKEN" in error_lines(wrong)[0], wrong.stderr

    # --no-wait prints the id and returns.
    quick = cli("submit", str(project / "job.yaml"), "--address", head, "--output", str(output),
                "--submission-id", "e2e-3", "--dry-run", "--no-wait", env=env)
    assert quick.returncode == 0 and quick.stdout.strip() == "e2e-3", quick.stderr

    # A job that fails on the cluster exits with its driver's status: 2 for an input problem
    # found there (a column the data does not have), 1 for a compute failure.
    failing = cli("submit", str(project / "job.yaml"), "--address", head, "--output", str(output),
                  "--submission-id", "e2e-4", "--set", "data.features=nope", env=env)
    assert failing.returncode == 2, failing.stderr[-3000:]
    assert "job e2e-4 failed on an input problem" in error_lines(failing)[-1]
    assert "column 'nope'" in failing.stderr and "--submission-id e2e-4-2" in failing.stderr


@pytest.mark.slow
def test_a_job_stopped_after_it_published_reports_its_run(head, project, tmp_path):
    """`ray job stop` in the moment after the driver published (its manifest is written) and
    before it exited. Before: exit 1, `error: job ... stopped ...; submit again ... to resume`,
    though the run was complete (and a resubmission would be refused as already published)."""
    import threading

    from ray.job_submission import JobSubmissionClient

    output = tmp_path / "results"
    stopped = []

    def stop_once_published():
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            if list(output.glob("submit-test/date=*/run=late/manifest.json")):
                client = JobSubmissionClient(head["dashboard"], headers={"Authorization": f"Bearer {TOKEN}"})
                stopped.append(client.stop_job("late"))
                return
            time.sleep(0.3)

    watcher = threading.Thread(target=stop_once_published, daemon=True)
    watcher.start()
    done = cli("submit", str(project / "job.yaml"), "--address", head["dashboard"], "--output", str(output),
               "--submission-id", "late", env={"RAY_AUTH_TOKEN": TOKEN,
                                               "HESSIAN_PIPELINE_FAULT": "pause-after-publish:seconds=300"})
    watcher.join(timeout=10)
    assert stopped == [True], done.stderr[-3000:]
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-2] == "job late stopped after its run was published: the results are complete"
    assert lines[-1].startswith(str(output / "submit-test" / "date=")) and lines[-1].endswith("/run=late")
    assert os.path.exists(os.path.join(lines[-1], "manifest.json"))
    assert not error_lines(done) or all("terminated" in line for line in error_lines(done)), done.stderr[-3000:]
    assert not (output / "submit-test" / ".partials").exists()  # the stopped driver removed its staged shards


@pytest.mark.slow
def test_waiting_for_gpus_that_never_come_fails_in_time(head):
    # What `submit --gpus N` runs before `run` in the job: here no autoscaler can add a GPU.
    env = {**os.environ, "RAY_ADDRESS": head["gcs"], "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN,
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-m", "pipeline.cluster.submit", "--await-gpus", "1", "--timeout", "2"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "1 GPUs asked for, 0 joined within 2s" in done.stderr and "max_workers" in done.stderr


@pytest.mark.slow
def test_a_head_lost_while_following_a_job_ends_with_one_message(head, monkeypatch):
    """The head stops while ``submit`` follows a job: no traceback, no endless wait, exit 1
    (ComputeError) once the head has been unreachable for HEAD_LOST_SECONDS. Last in this
    module: it ends the module's head."""
    import threading

    from pipeline.cluster import submit as submitting
    from pipeline.errors import ComputeError

    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    monkeypatch.setattr(submitting, "HEAD_LOST_SECONDS", 3.0)
    client = submitting._client(head["dashboard"])
    job = client.submit_job(entrypoint="sleep 300", submission_id="outlived")
    threading.Timer(3.0, _stop, args=(head["process"],)).start()
    began = time.monotonic()
    with pytest.raises(ComputeError, match=r"lost contact with the cluster for 3 s while job outlived was running"):
        submitting.follow(client, job, open(os.devnull, "w"), poll_s=0.5)
    assert time.monotonic() - began < 120


def test_paths_inside_the_uploaded_folder_are_recorded_as_the_user_names_them(tmp_path, monkeypatch):
    """On the cluster the run's working directory is Ray's copy of the uploaded folder: the
    manifest maps paths inside it back to the user's folder (submit sets the variable)."""
    from pipeline.storage.uri import SUBMITTED_FROM, as_submitted

    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_1234"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    assert as_submitted(str(copy / "model.keras")) == str(copy / "model.keras")  # not submitted: as it is
    monkeypatch.setenv(SUBMITTED_FROM, "/home/me/project")
    assert as_submitted(str(copy / "model.keras")) == "/home/me/project/model.keras"
    assert as_submitted(str(copy / "data")) == "/home/me/project/data"
    assert as_submitted(str(tmp_path / "elsewhere.keras")) == str(tmp_path / "elsewhere.keras")
    assert as_submitted("s3://bucket/model.keras") == "s3://bucket/model.keras"
    assert as_submitted(None) is None


def test_a_series_of_checkpoints_travels_whole(project, tmp_path):
    """``model:`` a glob: every checkpoint is checked to be inside the uploaded folder and the
    cluster's run gets them all, as a list relative to the job file (not the first alone)."""
    from pipeline.job import load_job

    nights = project / "nights"
    nights.mkdir(exist_ok=True)
    for k in (1, 2):
        (nights / f"night-{k}.keras").write_bytes((project / "model.keras").read_bytes())
    spec = yaml.safe_load((project / "job.yaml").read_text())
    spec["model"] = "nights/night-*.keras"
    (project / "series.yaml").write_text(yaml.safe_dump(spec))
    sub = prepare_submission(str(project / "series.yaml"), output=str(tmp_path / "out"))
    argv = shlex.split(sub.command)
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert 'model=["nights/night-1.keras", "nights/night-2.keras"]' in sets
    again = load_job(str(project / "series.yaml"), sets)
    assert again.checkpoints == (str(nights / "night-1.keras"), str(nights / "night-2.keras"))
