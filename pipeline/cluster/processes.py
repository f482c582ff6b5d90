"""The local Ray's own processes, read from ``/proc`` (Linux; elsewhere nothing is found).

When the raylet or the GCS server of a Ray this driver started dies, Ray ends the driver ten to
sixty seconds later without a message, and its agents live on (PITFALLS.md): the worker pool
watches them every second and ends what is left (``end``). When the driver itself dies, a
watchdog process (``start_watchdog``) ends them. Standard library only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def process_stat(pid) -> tuple[str, str, int] | None:
    """(name, state, parent id) of process ``pid`` from /proc (Linux); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            stat = handle.read()
        rest = stat[stat.rindex(")") + 2:].split()
        return stat[stat.index("(") + 1:stat.rindex(")")], rest[0], int(rest[1])
    except (OSError, ValueError, IndexError):
        return None


def processes() -> list[tuple[int, str, int]]:
    """(pid, name, parent id) of every process on this machine ([] off Linux)."""
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    found = ((int(e), process_stat(e)) for e in entries)
    return [(pid, stat[0], stat[2]) for pid, stat in found if stat is not None]


def running(pid: int) -> bool:
    """Whether process ``pid`` is alive (a zombie, ended but not yet reaped, is not)."""
    stat = process_stat(pid)
    return stat is not None and stat[1] not in ("Z", "X")


def children(parents: list[int]) -> list[int]:
    """Process ids whose parent is one of ``parents``."""
    wanted = set(parents)
    return [pid for pid, _, parent in processes() if parent in wanted] if wanted else []


def end(pids: list[int]) -> None:
    """SIGKILL to the processes of a local Ray that died (best effort: some are gone)."""
    for pid in pids:
        if running(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def local_ray_processes() -> list[int]:
    """Process ids of the raylet and the GCS server this process started (a local Ray); [] off
    Linux. When either dies, the local Ray instance is gone."""
    return [pid for pid, name, parent in processes()
            if name in ("raylet", "gcs_server") and parent == os.getpid()]


# ----------------------------------------------------------------------------- the watchdog
def start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot): with the id, names one process
    even after the id is reused."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            stat = handle.read()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def descendants(roots: list[int]) -> list[int]:
    """Every process below ``roots`` (children, their children, ...)."""
    below: dict[int, list[int]] = {}
    for pid, _, parent in processes():
        below.setdefault(parent, []).append(pid)
    found, frontier = [], list(roots)
    while frontier:
        for child in below.get(frontier.pop(), []):
            if child not in found:
                found.append(child)
                frontier.append(child)
    return found


def _in_session(pid: int, session_dir: str) -> bool:
    """Whether process ``pid`` belongs to the Ray session at ``session_dir``: its command line
    names it, or it holds a file there open (Ray's agents rename themselves, ``ray::...``, but
    keep their session's log files open)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            if session_dir.encode() in handle.read():
                return True
        for fd in os.listdir(f"/proc/{pid}/fd"):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(session_dir + "/"):
                return True
    except OSError:
        pass
    return False


def start_watchdog(ray_processes: list[int], session_dir: str | None) -> None:
    """Starts a process that ends the local Ray this process started when this process ends
    without shutting it down (SIGKILL, the OOM killer): Ray's raylet and GCS follow their parent
    (Linux's parent-death signal), but its agents (``ray::DashboardAgent``,
    ``ray::RuntimeEnvAgent``) lived on. Its own session, so a Ctrl-C at the terminal does not
    end it; it exits once this process has gone and the session's processes with it."""
    if not ray_processes or not os.path.isdir("/proc"):
        return
    command = [sys.executable, "-m", "pipeline.cluster.processes", "--driver", str(os.getpid()),
               "--session-dir", session_dir or "", *map(str, ray_processes)]
    # It starts while the run holds SIGINT and SIGTERM (``pipeline.interrupts``) and a mask
    # survives exec: unblocked in the child, or a SIGTERM to the watchdog would wait forever.
    # (A preexec_fn is what Ray's own process starts use in this same window.)
    subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, close_fds=True, preexec_fn=_unblock_signals)


def _unblock_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def watch(driver: int, ray_processes: list[int], session_dir: str, poll_s: float = 0.5) -> None:
    """The watchdog's loop: notes the local Ray's processes (those given and every process below
    them, with their start times) while ``driver`` lives; once it is gone, ends those still
    running and any other process of ``session_dir``, then returns."""
    born = start_time(driver)
    known: dict[int, int | None] = {pid: start_time(pid) for pid in ray_processes}
    while born is not None and start_time(driver) == born and running(driver):
        for pid in descendants(list(known)):
            known.setdefault(pid, start_time(pid))
        known = {pid: t for pid, t in known.items() if t is not None and start_time(pid) == t}
        if not known:
            return  # Ray was shut down: nothing left to watch
        time.sleep(poll_s)
    me = os.getpid()
    for _ in range(3):  # a worker forked as the driver died shows up a moment later
        doomed = [pid for pid, t in known.items() if t is not None and start_time(pid) == t]
        if session_dir:
            doomed += [pid for pid, _, _ in processes() if pid != me and pid not in known and
                       _in_session(pid, session_dir)]
        end([pid for pid in doomed if pid != me])
        time.sleep(poll_s)


def _main(argv=None) -> int:
    import argparse  # lazy: only the watchdog's own process parses arguments

    parser = argparse.ArgumentParser(prog="python -m pipeline.cluster.processes",
                                     description="(started by a run) end its local Ray when the run's process ends")
    parser.add_argument("--driver", type=int, required=True)
    parser.add_argument("--session-dir", default="")
    parser.add_argument("pids", type=int, nargs="*")
    args = parser.parse_args(argv)
    # Started while the run held them (pipeline.interrupts): a process inherits the mask.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    watch(args.driver, args.pids, args.session_dir.rstrip("/"))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
