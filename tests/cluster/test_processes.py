"""Processes read from /proc: a real ``sleep`` child (its stat, its parent, its descendants,
its end), and the watchdog's loop on stand-in processes (a ``sleep`` as the driver, others as
Ray's). Every process here is started by the test and ended by its id."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import paths
from pipeline.cluster.processes import (children, descendants, end, local_ray_processes, process_stat, processes,
                                        running, start_time, start_watchdog, watch)

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc (Linux)")


@pytest.fixture
def started():
    """Starts processes with ``start(argv, **popen)``; kills and reaps those left at the end."""
    procs: list[subprocess.Popen] = []

    def start(argv, **options):
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **options)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _until(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _gone(pid):
    return _until(lambda: not running(pid))


def test_a_child_is_seen_with_its_name_state_and_parent(started):
    child = started(["sleep", "30"])
    name, state, parent = process_stat(child.pid)
    assert name == "sleep" and parent == os.getpid() and state in "RSD"
    assert running(child.pid)
    assert child.pid in children([os.getpid()])
    assert (child.pid, "sleep", os.getpid()) in processes()
    assert children([]) == []


def test_a_name_with_spaces_and_parentheses_is_read_whole(started, tmp_path):
    program = tmp_path / "odd (name) x"
    program.symlink_to("/bin/sleep")
    child = started([str(program), "30"])
    # /proc/PID/stat reads "PID (odd (name) x) S PPID ...": the name ends at the last ')'.
    assert _until(lambda: process_stat(child.pid)[0] == "odd (name) x")
    name, state, parent = process_stat(child.pid)
    assert state in "RSD" and parent == os.getpid()


def test_descendants_go_below_the_children(started):
    shell = started(["sh", "-c", "sleep 30 & sleep 30 & wait"])
    assert _until(lambda: len(children([shell.pid])) == 2)
    grandchildren = children([shell.pid])
    below = descendants([os.getpid()])
    assert shell.pid in below and set(grandchildren) <= set(below)
    assert set(descendants([shell.pid])) == set(grandchildren)
    assert descendants([]) == []
    end(grandchildren)  # the fixture ends the shell only
    assert all(_gone(pid) for pid in grandchildren)


def test_end_kills_and_a_zombie_is_not_running(started):
    child = started(["sleep", "30"])
    end([child.pid])
    # Killed but not yet reaped: a zombie, which does not count as running.
    assert _until(lambda: process_stat(child.pid) is not None and process_stat(child.pid)[1] == "Z")
    assert not running(child.pid)
    assert child.wait(timeout=5) == -signal.SIGKILL
    assert process_stat(child.pid) is None and not running(child.pid) and start_time(child.pid) is None
    end([child.pid])  # gone: nothing to do, no error


def test_start_time_names_one_process():
    mine = start_time(os.getpid())
    assert isinstance(mine, int) and mine == start_time(os.getpid())
    assert start_time(os.getppid()) <= mine


def test_no_ray_started_here_and_no_watchdog_for_nothing(started):
    before = set(children([os.getpid()]))
    assert local_ray_processes() == []
    start_watchdog([], "/tmp/nowhere")  # no Ray processes: nothing to watch, no process started
    assert set(children([os.getpid()])) == before


def _watch_in_thread(*args, **kwargs):
    thread = threading.Thread(target=watch, args=args, kwargs=kwargs, daemon=True)
    thread.start()
    return thread


def test_the_watchdog_ends_the_ray_processes_and_the_sessions_once_the_driver_is_gone(started, tmp_path):
    session = tmp_path / "session_1"
    session.mkdir()
    driver = started(["sleep", "30"])
    raylet = started(["sh", "-c", "sleep 30 & wait"])  # a stand-in raylet, with a worker below it
    assert _until(lambda: len(children([raylet.pid])) == 1)
    worker = children([raylet.pid])[0]
    with open(session / "agent.log", "w") as log:  # an agent that renamed itself keeps its log open
        agent = started(["sleep", "30"], stdout=log)
    named = started([sys.executable, "-c", "import time; time.sleep(30)", str(session)])
    bystander = started(["sleep", "30"])
    thread = _watch_in_thread(driver.pid, [raylet.pid], str(session), poll_s=0.05)
    time.sleep(0.3)
    assert thread.is_alive() and running(raylet.pid) and running(agent.pid)  # the driver lives: nothing ended
    driver.kill()
    driver.wait()
    thread.join(timeout=10)
    assert not thread.is_alive()
    for pid in (raylet.pid, worker, agent.pid, named.pid):
        assert _gone(pid), pid
    assert running(bystander.pid)


def test_the_watchdog_returns_once_ray_was_shut_down(started, tmp_path):
    driver = started(["sleep", "30"])
    raylet = started(["sleep", "30"])
    thread = _watch_in_thread(driver.pid, [raylet.pid], str(tmp_path), poll_s=0.05)
    raylet.kill()
    raylet.wait()
    thread.join(timeout=10)
    assert not thread.is_alive() and running(driver.pid)


def test_the_watchdog_as_its_own_process(started, tmp_path):
    """``python -m pipeline.cluster.processes`` (what ``start_watchdog`` starts): its exit once
    the driver has gone, and the Ray processes it was given ended."""
    driver = started(["sleep", "30"])
    raylet = started(["sleep", "30"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([paths.REPO, os.environ.get("PYTHONPATH", "")])}
    dog = started([sys.executable, "-m", "pipeline.cluster.processes", "--driver", str(driver.pid),
                   "--session-dir", str(tmp_path) + "/", str(raylet.pid)], env=env)
    time.sleep(0.5)
    assert dog.poll() is None and running(raylet.pid)
    driver.kill()
    driver.wait()
    assert dog.wait(timeout=20) == 0
    assert _gone(raylet.pid)


def test_start_watchdog_ends_the_ray_processes_once_its_driver_exits(started, tmp_path):
    """A driver (a Python child here) starts the watchdog and exits without shutting its Ray
    down: the watchdog, in a session of its own, ends the processes it was given."""
    raylet = started(["sleep", "30"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([paths.REPO, os.environ.get("PYTHONPATH", "")])}
    code = ("import sys, time; from pipeline.cluster.processes import start_watchdog; "
            "start_watchdog([int(sys.argv[1])], sys.argv[2]); time.sleep(1.0)")
    driver = started([sys.executable, "-c", code, str(raylet.pid), str(tmp_path)], env=env)
    assert _until(lambda: len(children([driver.pid])) == 1)  # the watchdog, while the driver lives
    assert running(raylet.pid)
    assert driver.wait(timeout=30) == 0
    assert _gone(raylet.pid)
