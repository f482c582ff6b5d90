"""Object storage: data, model and output on ``s3://``, through ``pyarrow.fs``, end to end.

The S3 server is moto's, on loopback, started here. The endpoint and credentials reach
pyarrow through the standard AWS variables (``AWS_ENDPOINT_URL_S3`` and friends), in this
process and, by the runtime env, in every Ray worker: as they would from a cluster's setup.
"""

from __future__ import annotations

import io
import json
import os
import socket

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import jobs
from pipeline.cli import main
from pipeline.curvature.engine import CurvatureEngine
from pipeline.curvature.losses import resolve_loss
from pipeline.curvature.model import load_model
from pipeline.curvature.requests import BatchWork
from pipeline.job import load_job
from pipeline.storage.publish import read_manifest
from pipeline.quantities.registry import finalize
from pipeline.driver import run

pytestmark = pytest.mark.slow
BUCKET = "hessian-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
        # Never ask the EC2 metadata service (an address off this machine) for credentials or region.
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture(scope="module")
def ray_with_s3(s3_env):
    import ray

    # address="local": never join a cluster that `ray start` left recorded in /tmp/ray.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3", **s3_env}})
    yield ray
    ray.shutdown()


def _upload(local_root, fs, prefix):
    for folder, _, names in os.walk(local_root):
        for name in names:
            path = os.path.join(folder, name)
            key = f"{prefix}/{os.path.relpath(path, local_root)}"
            with open(path, "rb") as source, fs.open_output_stream(key) as target:
                target.write(source.read())


def test_data_model_and_output_on_s3(ray_with_s3, tmp_path):
    x, labels, _ = jobs.write_data(tmp_path / "data", rows=100, files=2)
    jobs.write_model(str(tmp_path / "model.keras"))
    # From a URI, as the pipeline opens it: only then does pyarrow read AWS_ENDPOINT_URL_S3
    # (S3FileSystem() alone would ignore it and go to AWS).
    fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}")
    _upload(tmp_path / "data", fs, f"{BUCKET}/inputs/data")
    with open(tmp_path / "model.keras", "rb") as source, fs.open_output_stream(f"{BUCKET}/inputs/model.keras") as out:
        out.write(source.read())

    spec = load_job(jobs.job(tmp_path, {"hessian_diagonal": {"method": "exact"}, "gradient": {},
                                        "trace": {"method": "exact"}},
                             model=f"s3://{BUCKET}/inputs/model.keras", data={"path": f"s3://{BUCKET}/inputs/data/"},
                             output=f"s3://{BUCKET}/results", shards=3, workers=2))
    result = run(spec, run_id="on-s3")
    assert result.run_dir.startswith(f"s3://{BUCKET}/results/test-job/date=") and result.run_dir.endswith("/run=on-s3")

    manifest = read_manifest(result.run_dir)
    assert manifest["status"] == "complete" and manifest["examples"] == 100
    assert manifest["model"]["path"] == f"s3://{BUCKET}/inputs/model.keras"
    assert all(f.startswith(f"{BUCKET}/inputs/data/") for f in manifest["data"]["files"])
    # Every listed file is there, and manifest.json was written last.
    run_path = result.run_dir[len("s3://"):]
    infos = {os.path.basename(i.path): i for i in fs.get_file_info(pafs.FileSelector(run_path))}
    assert set(infos) == set(manifest["files"]) | {"manifest.json"}
    assert all(infos["manifest.json"].mtime >= i.mtime for i in infos.values())
    # Nothing is left in staging.
    date_path = run_path.rsplit("/", 1)[0]
    assert [os.path.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(date_path))] == ["run=on-s3"]

    # The numbers: the same as the engine on the same arrays, in this process.
    engine = CurvatureEngine(load_model(load_job(jobs.job(tmp_path, {"gradient": {}})).model),
                             resolve_loss(spec.loss), precision="float64")
    expected = finalize(engine.partial([x], [labels], None, np.arange(len(labels)),
                                       BatchWork(hessian_diagonal="exact")))
    with fs.open_input_file(f"{run_path}/diagonals.parquet") as handle:
        diagonals = pq.read_table(handle).to_pydict()
    np.testing.assert_allclose(diagonals["hessian_diagonal"], expected["hessian_diagonal"], rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(diagonals["gradient"], expected["gradient"], rtol=1e-9, atol=1e-13)

    # show and compare read runs on S3 too.
    out = io.StringIO()
    assert main(["show", result.run_dir], out=out, err=io.StringIO()) == 0 and "on-s3" in out.getvalue()
    out = io.StringIO()
    assert main(["compare", result.run_dir, result.run_dir, "--format", "json", "--fail-above", "0"], out=out,
                err=io.StringIO()) == 0
    assert json.loads(out.getvalue())["changes"]


def test_a_stalled_object_store_fails_the_run_with_a_line_not_a_freeze(tmp_path):
    """The S3 server stops answering mid-run (SIGSTOP: it still accepts connections, as a hung
    endpoint does). Before: progress froze with no message, forever (pyarrow's requests have no
    deadline). Now each request gives up after HESSIAN_PIPELINE_STORAGE_TIMEOUT_SECONDS, the
    driver says what it waits for, and the shard fails after its retries: exit 1, resumable."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    port = _free_port()
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
           "AWS_EC2_METADATA_DISABLED": "true", "TF_CPP_MIN_LOG_LEVEL": "3",
           "HESSIAN_PIPELINE_STORAGE_TIMEOUT_SECONDS": "2", "HESSIAN_PIPELINE_WAIT_REPORT_SECONDS": "3",
           "HESSIAN_PIPELINE_FAULT": "delay:seconds=1"}
    env.pop("RAY_ADDRESS", None)
    driver = None
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.3)
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            import boto3

            boto3.client("s3").create_bucket(Bucket=BUCKET)
            fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}")
            jobs.write_data(tmp_path / "data", rows=120, files=6)
            _upload(tmp_path / "data", fs, f"{BUCKET}/stall/data")
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        jobs.write_model(str(tmp_path / "model.keras"))
        spec = jobs.job(tmp_path, {"gradient": {}}, data={"path": f"s3://{BUCKET}/stall/data/"}, shards=6, workers=1)
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
        output = tmp_path / "out"
        driver = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(tmp_path / "job.yaml"), "--run-id",
                                   "stalled", "--output", str(output)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
        partials = output / "test-job" / ".partials" / "run=stalled"
        deadline = time.monotonic() + 240
        while not list(partials.glob("shard-*.npz")):
            assert driver.poll() is None and time.monotonic() < deadline, "the run did not stage a shard"
            time.sleep(0.2)
        server.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        stdout, stderr = driver.communicate(timeout=300)
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        server.send_signal(signal.SIGCONT)
        server.kill()
        server.wait()
    assert driver.returncode == 1, stderr
    assert time.monotonic() - stopped < 240
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors == [stderr.splitlines()[-1]], stderr
    assert errors[0].startswith("error: shard ") and "failed after its retries: OSError: reading " \
        f"{BUCKET}/stall/data/part-" in errors[0] and "Timeout was reached" in errors[0], errors[0]
    assert errors[0].endswith("run the same command with --run-id stalled to resume (finished shards are kept)")
    assert any(line.startswith("waiting for shard ") for line in stderr.splitlines()), stderr
    assert stdout == "", stdout
