"""The local Ray's own processes, read from ``/proc`` (Linux; elsewhere nothing is found).

When the raylet or the GCS server of a Ray this driver started dies, Ray ends the driver ten to
sixty seconds later without a message, and its agents live on (PITFALLS.md): the worker pool
watches them every second and ends what is left (``end``). Standard library only.
"""

from __future__ import annotations

import os
import signal


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
