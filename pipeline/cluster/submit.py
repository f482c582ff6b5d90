"""``submit JOB.yaml --address http://HEAD:8265``: a run as a Ray Job on a cluster.

What travels with the job (its runtime environment):

- ``working_dir``: the job file's folder (``--working-dir`` to choose another). Every *local*
  input of the job (model, weights, data, HVP vectors) must lie inside it and is uploaded with
  it (Ray's limit: 512 MiB zipped; files matched by its ``.gitignore`` or ``.rayignore`` do not
  travel, and a local input they match is refused here). Bigger data belongs in object
  storage: URIs (``s3://``, ``gs://``) are kept as written and must be readable from the
  cluster's nodes, with the nodes' own credentials.
- ``py_modules``: this ``pipeline`` package, so the cluster runs the code you submit (its
  dependencies, TensorFlow and Ray, come from the cluster's image or setup commands).

The entrypoint is ``python -m pipeline run <job file> ...`` with the ``run`` options given
here passed through. A local output path is written on the node that runs the driver (the
head): right for a shared filesystem mounted at the same path, or a one-machine cluster; use a
URI otherwise. The submission id is ``hessian-<name>-<UTC date>`` and is also the run id
unless ``--run-id`` is given, so a nightly job lands at a known place and cannot run twice a
day by accident (a second submit with the same id is an input error; a ``--dry-run`` gets a
suffixed id, so looking at the plan does not use up the day's).

Authentication: Ray 2.60 clusters may require a token. It is read as Ray reads it:
``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``,
and sent as ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import logging
import os
import re
import secrets
import shlex
import sys
import time
from dataclasses import dataclass

import ray
import yaml
from ray.autoscaler.sdk import request_resources
from ray.job_submission import JobSubmissionClient

import pipeline
from pipeline import faults
from pipeline.errors import ComputeError, InputError
from pipeline.job import load_job
from pipeline.storage import layout
from pipeline.storage.uri import SUBMITTED_FROM

try:  # what Ray's own packaging of a working directory uses to read .gitignore/.rayignore
    from ray._private.thirdparty.pathspec import PathSpec
except ImportError:  # pragma: no cover - moved in another Ray version
    PathSpec = None

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
GPU_WAIT_DEFAULT_S = 1800
_LOG_TAIL_CHARS = 1 << 20


@dataclass
class Submission:
    """What ``submit`` sends: build it with ``prepare_submission``, send it with ``send``."""

    submission_id: str
    entrypoint: str
    runtime_env: dict
    metadata: dict
    working_dir: str
    command: str = ""  # the entrypoint without the lines that choose the interpreter (shown to users)
    output: str = ""  # where the run is published (the root), its job name and run id
    name: str = ""
    run_id: str = ""
    dry_run: bool = False


# The interpreter of a submitted run, chosen on the head, where the entrypoint runs: a bare
# `python` is whatever the PATH of the process that started Ray finds (often the system's, without
# Ray, when Ray runs from a virtual environment that was never activated). The first that imports
# ray of: $HESSIAN_PIPELINE_PYTHON (set on the cluster), the interpreter of the `ray` command
# (its #! line: the Python Ray was installed in), python3, python. `--python` names it instead.
FIND_PYTHON = (
    'PY=; for p in "$HESSIAN_PIPELINE_PYTHON" "$(sed -n \'1s/^#!//p\' "$(command -v ray)" 2>/dev/null)" python3 python; '
    'do if [ -n "$p" ] && "$p" -c \'import ray\' 2>/dev/null; then PY=$p; break; fi; done; '
    '[ -n "$PY" ] || { echo "error: no python on this node imports ray (tried \\$HESSIAN_PIPELINE_PYTHON, the ray '
    'command\'s interpreter, python3, python): set HESSIAN_PIPELINE_PYTHON in the cluster\'s environment, or submit '
    'with --python PATH" >&2; exit 2; }; ')


# ------------------------------------------------------------------------------ authentication
def auth_token() -> str | None:
    """The Ray auth token, looked up in Ray's order; None if there is none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as handle:
            return handle.read().strip() or None
    except OSError:
        if os.environ.get("RAY_AUTH_TOKEN_PATH"):
            raise InputError(f"RAY_AUTH_TOKEN_PATH names {path}, which cannot be read: fix or unset it") from None
        return None


def dashboard_address(address: str | None) -> str:
    """``http://HEAD:8265`` from ``--address``, ``RAY_API_SERVER_ADDRESS`` or an http ``RAY_ADDRESS``."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address and os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        address = os.environ["RAY_ADDRESS"]
    if not address:
        raise InputError("submit needs the cluster's dashboard address: pass --address http://HEAD:8265")
    if address.startswith("ray://") or re.match(r"^[^/]*:(6379|10001)$", address):
        raise InputError(f"--address {address} is not the dashboard: submit talks to the Jobs API, "
                         "e.g. --address http://HEAD:8265")
    if "://" not in address:
        address = "http://" + address
    return address.rstrip("/")


# ----------------------------------------------------------------------------------- preparing
def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([os.path.abspath(path), folder]) == folder


def _literal_prefix(path: str) -> str:
    """The part of a (glob) path before its first glob character."""
    cut = min((i for i in (path.find(c) for c in "*?[") if i >= 0), default=len(path))
    return path[:cut]


def _ignored_by(working_dir: str, relative: str, is_dir: bool) -> str | None:
    """The ignore file at the top of ``working_dir`` that keeps ``relative`` from travelling."""
    if PathSpec is None:  # pragma: no cover - moved in another Ray version
        return None
    names = [".rayignore"]
    if os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1":
        names.insert(0, ".gitignore")
    candidates = [relative + "/" if is_dir else relative]
    parts = relative.split("/")
    candidates += ["/".join(parts[:i]) + "/" for i in range(1, len(parts))]
    for name in names:
        ignore_file = os.path.join(working_dir, name)
        if not os.path.isfile(ignore_file):
            continue
        with open(ignore_file, encoding="utf-8") as handle:
            spec = PathSpec.from_lines("gitwildmatch", handle.readlines())
        if any(spec.match_file(c) for c in candidates):
            return name
    return None


def _yaml_value(text: str) -> str:
    """A string as ``--set`` reads it back (YAML): quoted only where YAML would change it."""
    try:
        if yaml.safe_load(text) == text:
            return text
    except yaml.YAMLError:
        pass
    return json.dumps(text)


def _local_inputs(job) -> list[tuple[str, str]]:
    """(``--set`` key, absolute local path) of every local input of the job."""
    inputs = []
    if job.checkpoints:  # a series: every checkpoint travels (``model[k]``, set back as one list)
        inputs += [(f"model[{k}]", path) for k, path in enumerate(job.checkpoints)]
    elif job.model.path:
        inputs.append(("model", job.model.path))
    if job.model.weights:
        inputs.append(("model.weights", job.model.weights))
    inputs.append(("data.path", job.data.path))
    vectors = (job.quantities.get("hvp") or {}).get("vectors")
    if vectors:
        inputs.append(("quantities.hvp.vectors", vectors))
    return [(key, path) for key, path in inputs if "://" not in path or path.startswith("file://")]


def default_submission_id(name: str, now: _dt.datetime | None = None) -> str:
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return f"hessian-{name}-{now.strftime('%Y-%m-%d')}"


def _input_overrides(job, job_dir: str, working_dir: str) -> list[str]:
    """``--set KEY=VALUE`` texts that give each local input of ``job`` (the model, or each
    checkpoint of a series, the data, ...) relative to the job file, as it lies in the uploaded
    ``working_dir`` on the cluster; an ``InputError`` for one outside it, missing, or that a
    ``.gitignore``/``.rayignore`` keeps Ray from uploading."""
    sets: list[str] = []
    series: list[str] = []
    for key, path in _local_inputs(job):
        local = path[len("file://"):] if path.startswith("file://") else path
        prefix = _literal_prefix(local)
        if not _inside(prefix, working_dir):
            raise InputError(f"{key} {local} is outside {working_dir}, the folder submit uploads: move it under "
                             "that folder, pass --working-dir, or put it in object storage (s3://...)")
        relative = os.path.relpath(prefix, working_dir).replace(os.sep, "/")
        if not os.path.exists(prefix.rstrip("/") or prefix) and prefix == local:
            raise InputError(f"{key} {local} not found: fix the path in the job file")
        ignored = _ignored_by(working_dir, relative, os.path.isdir(prefix))
        if ignored:
            raise InputError(f"{key} {local} is matched by {os.path.join(working_dir, ignored)}, so Ray would not "
                             f"upload it: add '!{relative}' there, or use object storage (s3://...)")
        # Relative to the job file, as the job file's own relative paths are, on the cluster too.
        if key.startswith("model["):
            series.append(os.path.relpath(local, job_dir).replace(os.sep, "/"))
            continue
        sets.append(f"{key}={_yaml_value(os.path.relpath(local, job_dir).replace(os.sep, '/'))}")
    if series:
        sets.append(f"model={json.dumps(series)}")
    return sets


def prepare_submission(job_file: str, *, overrides=(), output: str | None = None, run_id: str | None = None,
                       workers: int | None = None, dry_run: bool = False, debug: bool = False,
                       submission_id: str | None = None, working_dir: str | None = None, gpus: int | None = None,
                       gpu_timeout: float = GPU_WAIT_DEFAULT_S, now: _dt.datetime | None = None,
                       python: str | None = None) -> Submission:
    """Checks the job here (an input error costs a second, not a cluster round trip) and builds
    the Ray Job: entrypoint, runtime environment, submission id."""
    job = load_job(job_file, overrides)
    job_path = os.path.abspath(job_file)
    working_dir = os.path.abspath(os.path.expanduser(working_dir or os.path.dirname(job_path)))
    if not os.path.isdir(working_dir):
        raise InputError(f"--working-dir {working_dir} is not a directory: name the folder to upload")
    if not _inside(job_path, working_dir):
        raise InputError(f"the job file {job_file} is outside --working-dir {working_dir}: it must travel with it")
    job_dir = os.path.dirname(job_path)
    sets = list(overrides) + _input_overrides(job, job_dir, working_dir)

    target = output or job.output
    if "://" not in target:
        target = os.path.abspath(os.path.expanduser(target))
        if _inside(target, working_dir):
            raise InputError(f"output {target} is inside {working_dir}: on the cluster it would be written into "
                             "the job's temporary copy and lost; use --output s3://BUCKET/PREFIX or an absolute "
                             "path of a filesystem the head node shares")
    if not submission_id:
        submission_id = default_submission_id(job.name, now)
        if dry_run:  # a look at the plan must not use up the day's id
            submission_id += "-dry-run-" + secrets.token_hex(2)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", submission_id):
        raise InputError(f"submission id {submission_id!r} is not a plain name (letters, digits, . _ -): "
                         "fix --submission-id")

    command = ["-m", "pipeline", "run", os.path.relpath(job_path, working_dir).replace(os.sep, "/"),
               "--output", target, "--run-id", run_id or submission_id]
    if workers is not None:
        command += ["--workers", str(workers)]
    for text in sets:
        command += ["--set", text]
    if dry_run:
        command.append("--dry-run")
    if debug:
        command.append("--debug")
    steps = [command]
    if gpus:
        steps.insert(0, ["-m", "pipeline.cluster.submit", "--await-gpus", str(gpus), "--timeout", str(int(gpu_timeout))])
    interpreter = shlex.quote(python) if python else '"$PY"'
    shown = " && ".join(f"{python or '$PY'} {shlex.join(step)}" for step in steps)
    entrypoint = ("" if python else FIND_PYTHON) + " && ".join(f"{interpreter} {shlex.join(step)}" for step in steps)
    runtime_env = {
        "working_dir": working_dir,
        "py_modules": [os.path.dirname(os.path.abspath(pipeline.__file__))],
        "excludes": ["**/__pycache__", "**/.pytest_cache"],
        # Not TF_CPP_MIN_LOG_LEVEL: the driver's ray.init sets it, and Ray refuses a job whose
        # runtime env sets the same variable as its driver's.
        # Fault injection (tests only, off unless set) reaches the driver on the cluster.
        # The manifest then records the user's paths, not Ray's copy of the folder (uri.as_submitted).
        "env_vars": {"PYTHONUNBUFFERED": "1", SUBMITTED_FROM: working_dir, **faults.environment()},
    }
    metadata = {"hessian_pipeline_job": job.name, "job_file": os.path.relpath(job_path, working_dir)}
    return Submission(submission_id, entrypoint, runtime_env, metadata, working_dir, command=shown, output=target,
                      name=job.name, run_id=run_id or submission_id, dry_run=dry_run)


# ----------------------------------------------------------------------------------- sending
def _client(address: str):
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as err:  # noqa: BLE001 - ray.exceptions.AuthenticationError, ConnectionError, ...
        if _auth_problem(f"{type(err).__name__} {err}"):
            raise InputError(f"{address} refused the token ({_first_line(err)}): {AUTH_HELP}") from None
        raise InputError(f"cannot reach the Ray dashboard at {address} ({_first_line(err)}): check --address "
                         "(the head's dashboard, port 8265; `ray dashboard cluster.yaml` forwards it)") from None


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else type(err).__name__


def _auth_problem(text: str) -> bool:
    return any(sign in text for sign in ("Authentication", "status code 401", "status code 403"))


AUTH_HELP = ("the cluster wants Ray's auth token: export RAY_AUTH_TOKEN=<token> (on the head: ray get-auth-token) "
             "or copy the head's ~/.ray/auth_token here")


def send(submission: Submission, address: str, agent_wait_s: float = 120):
    """Submits; returns the client. A used submission id or a refused token is an input error."""
    client = _client(address)
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            client.submit_job(entrypoint=submission.entrypoint, submission_id=submission.submission_id,
                              runtime_env=submission.runtime_env, metadata=submission.metadata)
            return client
        except (RuntimeError, ValueError, ConnectionError) as err:
            text = str(err)
            # A head that has just started answers before its job agent is up.
            if "No available agent" in text and time.monotonic() < deadline:
                time.sleep(2)
                continue
            if "already exists" in text:
                status = _status_text(client, submission.submission_id)
                raise InputError(f"job {submission.submission_id} was already submitted to {address}{status}: a "
                                 "job runs once per submission id; pass --submission-id to submit it again") from None
            if _auth_problem(text):
                raise InputError(f"{address} refused the submission ({_first_line(err)}): {AUTH_HELP}") from None
            if "No available agent" in text:
                raise InputError(f"{address} has no job agent up after {agent_wait_s:.0f}s: see "
                                 "dashboard_agent.log in the head's Ray logs (its port, 52365 by default, may be "
                                 "taken: ray start --dashboard-agent-listen-port)") from None
            raise InputError(f"{address} refused the submission: {_first_line(err)}") from None


def _status_text(client, submission_id: str) -> str:
    try:
        return f" (status {client.get_job_info(submission_id).status})"
    except Exception:  # noqa: BLE001 - only decorates a message
        return ""


# How long ``follow`` keeps trying a head it cannot reach before it gives up (exit 1).
HEAD_LOST_SECONDS = 120.0


def follow(client, submission_id: str, stream, poll_s: float = 1.0) -> tuple[object, str]:
    """Streams the job's logs to ``stream`` until it ends; returns its info and the end of its logs."""
    tail = []
    size = 0

    async def stream_logs():
        nonlocal size
        async for chunk in client.tail_job_logs(submission_id):
            stream.write(chunk)
            stream.flush()
            tail.append(chunk)
            size += len(chunk)
            while size > _LOG_TAIL_CHARS and len(tail) > 1:
                size -= len(tail.pop(0))

    try:
        asyncio.run(stream_logs())
    except Exception as err:  # noqa: BLE001 - the logs are a courtesy; the status decides
        stream.write(f"(log stream ended: {_first_line(err)}; waiting for the job's status)\n")
    reached = time.monotonic()
    while True:
        try:
            info = client.get_job_info(submission_id)
            reached = time.monotonic()
        except Exception as err:  # noqa: BLE001 - the head may be restarting: give it a while
            if time.monotonic() - reached > HEAD_LOST_SECONDS:
                raise ComputeError(
                    f"lost contact with the cluster for {HEAD_LOST_SECONDS:.0f} s while job {submission_id} was "
                    f"running ({_first_line(err)}): check `ray job status {submission_id}` once the head is back; "
                    "the run resumes with the same command") from None
            info = None
        if info is not None and str(info.status) in TERMINAL:
            break
        time.sleep(poll_s)
    text = "".join(tail)
    if not text:
        try:
            text = client.get_job_logs(submission_id)[-_LOG_TAIL_CHARS:]
        except Exception:  # noqa: BLE001
            text = ""
    return info, text


def run_dir_in_logs(text: str) -> str | None:
    """The run directory the driver printed last (``.../date=YYYY-MM-DD/run=ID``)."""
    found = None
    for line in text.splitlines():
        match = layout.RUN_DIR_LINE.match(line)
        if match:
            found = match.group(1)
    return found


# Ray's client logs at INFO to stderr (``Uploading package gcs://...``) and sets the level itself
# when imported: the product's lines only, unless --debug.
RAY_CLIENT_LOGGERS = ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                      "ray._private.runtime_env.packaging")


def submit(job_file: str, address: str | None, *, wait: bool = True, out=None, err=None, **options) -> int:
    """The ``submit`` command: returns the exit status (0 succeeded, or stopped after its run was
    published; 1 failed; 2 input problem)."""
    out = out or sys.stdout
    err = err or sys.stderr
    if not options.get("debug"):
        for name in RAY_CLIENT_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    address = dashboard_address(address)
    submission = prepare_submission(job_file, **options)
    started = _dt.datetime.now(_dt.timezone.utc)
    client = send(submission, address)
    err.write(f"submitted {submission.submission_id} to {address}\n  entrypoint: {submission.command}\n")
    err.flush()
    if not wait:
        err.write(f"follow it: ray job logs --follow {submission.submission_id} --address {address}\n"
                  f"stop it:   ray job stop {submission.submission_id} --address {address}\n")
        out.write(submission.submission_id + "\n")
        return 0
    try:
        info, logs = follow(client, submission.submission_id, err)
    except KeyboardInterrupt:
        err.write(f"error: stopped following; job {submission.submission_id} goes on running on the cluster: "
                  f"ray job stop {submission.submission_id} --address {address} stops it\n")
        return 1
    status = str(info.status)
    if status == "SUCCEEDED":
        run_dir = run_dir_in_logs(logs)
        out.write(f"job {submission.submission_id} succeeded\n")
        if run_dir:
            out.write(run_dir + "\n")
        return 0
    code = getattr(info, "driver_exit_code", None)
    sid = submission.submission_id
    run_dir = None if submission.dry_run else published_run(submission, logs, started)
    if run_dir:
        # Stopped (`ray job stop`, a scheduler) or failed after its manifest was written: the
        # run is complete, and resubmitting would be refused as already published.
        out.write(f"job {sid} {status.lower()} after its run was published: the results are complete\n")
        out.write(run_dir + "\n")
        return 0
    if code == 2:
        err.write(f"error: job {sid} failed on an input problem (its error: line is above): fix it and submit "
                  f"again with --submission-id {sid}-2\n")
    else:
        reason = (str(info.message or "").strip().splitlines() or [status.lower()])[0].split(", last available")[0]
        err.write(f"error: job {sid} {status.lower()}: {reason}; submit again with --submission-id {sid}-2 "
                  f"--run-id {options.get('run_id') or sid} to resume it (finished shards are kept)\n")
    return 2 if code == 2 else 1


def published_run(submission: Submission, logs: str, started: _dt.datetime) -> str | None:
    """The run directory if the submitted run was published: the line its driver prints once it
    has published, or the run's manifest under the output (dated any day from the submission to
    now, UTC), if this machine can read that output (a URI, or a path it shares with the head)."""
    from pipeline.storage.publish import published  # lazy: PyArrow

    printed = run_dir_in_logs(logs)
    if printed and printed.endswith(f"/run={submission.run_id}"):
        return printed
    day, today = started.date(), _dt.datetime.now(_dt.timezone.utc).date()
    while day <= today:
        date = day.strftime("%Y-%m-%d")
        if published(submission.output, submission.name, date, submission.run_id):
            return layout.run_dir(layout.output_root_of(submission.output), submission.name, date, submission.run_id)
        day += _dt.timedelta(days=1)
    return None


# ---------------------------------------------------------------- waiting for autoscaled GPUs
def await_gpus(count: int, timeout_s: float, stream=None, poll_s: float = 5.0) -> int:
    """Asks the autoscaler for ``count`` GPUs and waits until the cluster has them.

    Runs in the job's driver before ``run``: a cluster whose GPU nodes scale from zero has no
    GPU when the job starts, and ``run`` plans one worker per GPU it sees. The request is
    withdrawn once the GPUs are there (the nodes then stay while the run uses them).
    """
    stream = stream or sys.stderr
    ray.init(logging_level="WARNING", log_to_driver=False)
    try:
        request_resources(bundles=[{"GPU": 1}] * count)
        deadline = time.monotonic() + timeout_s
        have = 0
        while True:
            have = int(ray.cluster_resources().get("GPU", 0))
            if have >= count:
                stream.write(f"{have} GPUs in the cluster\n")
                return 0
            if time.monotonic() >= deadline:
                stream.write(f"error: {count} GPUs asked for, {have} joined within {timeout_s:.0f}s: check the GPU "
                             "node type's max_workers in cluster.yaml and the cloud's GPU quota\n")
                return 1
            time.sleep(max(0.1, min(poll_s, deadline - time.monotonic())))
    finally:
        request_resources(num_cpus=0)
        ray.shutdown()


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.cluster.submit",
                                     description="(used inside submitted jobs) wait for autoscaled GPUs")
    parser.add_argument("--await-gpus", type=int, required=True, metavar="N")
    parser.add_argument("--timeout", type=float, default=GPU_WAIT_DEFAULT_S, metavar="SECONDS")
    args = parser.parse_args(argv)
    return await_gpus(args.await_gpus, args.timeout)


if __name__ == "__main__":
    raise SystemExit(_main())
