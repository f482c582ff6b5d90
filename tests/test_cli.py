"""The command line, invoked for real: exit status, stdout, stderr, files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import yaml

import jobs
import shell

pytestmark = pytest.mark.slow
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=600)


def error_line(process):
    """The single ``error:`` line of a failed command (and no traceback)."""
    lines = [line for line in process.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, process.stderr
    assert "Traceback" not in process.stderr
    return lines[0]


@pytest.fixture(scope="module")
def job_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    jobs.write_data(root / "data", rows=120, files=2)
    jobs.write_model(str(root / "model.keras"))
    spec = jobs.job(root, {"hessian_diagonal": {"method": "exact"}, "gradient": {}})
    # Relative paths are relative to the job file.
    spec["model"] = "model.keras"
    spec["data"]["path"] = "data/"
    spec["output"] = "results"
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_run_prints_run_dir_last_then_show_and_refuses_rerun(job_file, tmp_path):
    done = cli("run", str(job_file), "--run-id", "r1", "--workers", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run_dir = done.stdout.strip().splitlines()[-1]
    assert run_dir.startswith(str(job_file.parent / "results" / "test-job" / "date="))
    assert run_dir.endswith("run=r1")
    manifest = json.load(open(os.path.join(run_dir, "manifest.json")))
    assert manifest["workers"] == 2 and manifest["run_id"] == "r1"

    shown = cli("show", run_dir)
    assert shown.returncode == 0, shown.stderr
    assert "hessian_diagonal" in shown.stdout and "__all__" in shown.stdout and "r1" in shown.stdout

    again = cli("run", str(job_file), "--run-id", "r1")
    assert again.returncode == 2
    assert "already published" in error_line(again)


def test_dry_run_prints_plan_and_writes_nothing(job_file, tmp_path):
    done = cli("run", str(job_file), "--dry-run", "--output", str(tmp_path / "out"), "--set", "shards=3")
    assert done.returncode == 0, done.stderr
    for word in ("shards       3", "rows", "workers", "parameters   53", "passes"):
        assert word in done.stdout
    assert not (tmp_path / "out").exists()


def _ray_processes_of(pid: int) -> list[str]:
    """Command lines of live processes in a Ray session that process ``pid`` started (Ray names
    the session directory ``session_<date>_<pid>``)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    line = handle.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if re.search(rf"session_[0-9_-]+_{pid}(/|\s|$)", line):
                found.append(line[:200])
    return found


def _ended(process) -> list[str]:
    """Ray processes of ``process``'s session still alive 20 s after it exited."""
    deadline = time.monotonic() + 20
    while (left := _ray_processes_of(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def test_a_new_run_records_its_phases_and_workers_and_plans_as_its_dry_run(job_file, tmp_path):
    """A new run from the command line starts its Ray and workers before it imports TensorFlow
    (no --run-id): it publishes the same kind of manifest, with where the time went (``timings``)
    and each worker's rows; its plan's passes equal the dry run's and its time is within 1.5x."""
    dry = cli("run", str(job_file), "--dry-run", "--output", str(tmp_path / "out"))
    assert dry.returncode == 0, dry.stderr
    process = subprocess.Popen(preexec_fn=shell.like_a_terminal, args=[sys.executable, "-m", "pipeline", "run", str(job_file), "--output",
                                str(tmp_path / "out"), "--workers", "2"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=ENV)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    assert _ended(process) == []
    manifest = json.load(open(os.path.join(out.strip().splitlines()[-1], "manifest.json")))
    assert list(manifest["timings"]) == ["ray_start_seconds", "plan_seconds", "workers_start_seconds",
                                         "main_pass_seconds", "hvp_passes_seconds"]
    assert sum(manifest["timings"].values()) <= manifest["seconds"] + 0.5
    assert sum(w["rows"] for w in manifest["per_worker"]) == manifest["examples"]
    assert {w["worker"] for w in manifest["per_worker"]} <= set(manifest["worker_names"])
    passes = int(re.search(r"passes\s+(\d+) over the data", dry.stdout).group(1))
    seconds = re.search(r"whole run\s+\d+\s+(\d+) s", dry.stdout)
    assert passes == manifest["passes"] == manifest["estimate"]["passes"]
    assert seconds and 1 / 1.5 <= int(seconds.group(1)) / manifest["estimate"]["seconds"] <= 1.5, dry.stdout


def test_an_input_error_after_the_early_start_leaves_no_ray(job_file, tmp_path):
    """A new run starts Ray before its plan: a bad input found by the plan (a column the data
    lacks) is still one error line and exit 2, and the Ray it started is gone."""
    process = subprocess.Popen(preexec_fn=shell.like_a_terminal, args=[sys.executable, "-m", "pipeline", "run", str(job_file), "--output",
                                str(tmp_path / "out"), "--set", "data.labels=no_such_column"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 2, err
    assert "no_such_column" in error_line(subprocess.CompletedProcess([], 2, out, err))
    assert _ended(process) == []
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("manifest.json"))


def test_validate(job_file):
    done = cli("validate", str(job_file))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok: test-job")
    # The plan's cost: one line per quantity, then the whole run (README "Cost and limits").
    cost = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("cost: ")]
    assert cost[:4] == ["quantity", "gradient", "hessian_diagonal", "whole"], done.stdout


@pytest.mark.parametrize("args,needle", [
    (["--set", "data.batch_size=0"], "data.batch_size"),
    (["--set", "data.features=nope"], "nope"),
    (["--set", "bogus=1"], "bogus"),
    (["--set", "loss=not_a_loss"], "unknown loss"),
])
def test_bad_input_is_one_error_line_and_exit_2(job_file, args, needle):
    done = cli("validate", str(job_file), *args)
    assert done.returncode == 2
    assert needle in error_line(done)


def test_run_bad_input_publishes_nothing(job_file, tmp_path):
    done = cli("run", str(job_file), "--run-id", "../x", "--output", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "run id" in error_line(done)
    missing = cli("run", str(tmp_path / "missing.yaml"))
    assert missing.returncode == 2 and "not found" in error_line(missing)


def test_help_for_every_command():
    for command in ("run", "validate", "show"):
        done = cli(command, "--help")
        assert done.returncode == 0 and "examples:" in done.stdout


def test_a_bad_argument_is_one_error_line(job_file):
    done = cli("run", str(job_file), "--workers", "abc")
    assert done.returncode == 2 and done.stderr.splitlines() == [
        "error: hessian-pipeline run: argument --workers: invalid int value: 'abc': see hessian-pipeline run --help"]


@pytest.mark.parametrize("seconds", [1.5, 2.2])
def test_ctrl_c_during_start_up_is_one_error_line(job_file, tmp_path, seconds):
    """SIGINT while TensorFlow loads or Ray starts. A hostile trial found a traceback from
    TensorFlow's import; during ``ray.init`` Ray's own C-level handler swallowed Ctrl-C (the run
    went on) or ended the process by the signal after the error line."""
    import signal
    import time

    driver = subprocess.Popen(preexec_fn=shell.like_a_terminal, args=[sys.executable, "-m", "pipeline", "run", str(job_file), "--output",
                               str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=ENV)
    time.sleep(seconds)
    driver.send_signal(signal.SIGINT)
    stdout, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 1 and stdout == "", stderr
    assert re.fullmatch(r"error: interrupted; run the same command with --run-id \d{8}T\d{6}Z-[0-9a-f]{4} to "
                        r"resume \(finished shards are kept\)", stderr.splitlines()[-1]), stderr
    assert "Traceback" not in stderr and not (tmp_path / "out").exists()


def test_only_the_products_own_warnings_reach_stderr_and_an_error_stands_alone(monkeypatch):
    """Default mode: a library's UserWarning is left out; the product's InputWarning is one
    `warning:` line, shown when the command succeeds, dropped when it ends in an error."""
    import io
    import warnings

    from pipeline import cli as cli_module
    from pipeline.errors import InputError, InputWarning

    def handler(fail):
        def show(args, out, err):
            warnings.warn("a library's warning", UserWarning)
            warnings.warn("loss 'mae' is piecewise linear", InputWarning)
            if fail:
                raise InputError("bad run: fix it")
            out.write("shown\n")
            return 0
        return show

    for fail, expected in ((False, "warning: loss 'mae' is piecewise linear\n"), (True, "error: bad run: fix it\n")):
        monkeypatch.setitem(cli_module.HANDLERS, "show", handler(fail))
        out, err = io.StringIO(), io.StringIO()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            status = cli_module.main(["show", "somewhere"], out=out, err=err)
        assert (status, err.getvalue()) == (2 if fail else 0, expected)


def test_a_run_that_ends_before_its_driver_leaves_ctrl_c_unblocked(tmp_path):
    """``main(["run", ...])`` holds Ctrl-C and SIGTERM until its driver has started Ray; a bad
    job file ended it before, and they stayed blocked in the calling process (a notebook, a
    test worker) and in every process it started afterwards: their Ctrl-C was never taken."""
    import io
    import signal

    from pipeline.cli import main

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    err = io.StringIO()
    assert main(["run", str(tmp_path / "missing.yaml")], io.StringIO(), err) == 2
    assert err.getvalue().startswith("error: ")
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
