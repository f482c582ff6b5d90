"""Starting or joining Ray, what the cluster offers, and stopping cleanly on SIGTERM. Ray only."""

from __future__ import annotations

import os
import signal
import sys
import threading

import ray

from pipeline import interrupts
from pipeline.errors import InputError
from pipeline.faults import environment

STOPPED: list[int] = []  # signals received by a run (SIGTERM)


def connect(address: str | None, quiet: bool = False) -> bool:
    """Uses a Ray already initialised in this process, a cluster at ``address``, or a new local
    one; returns whether this call started it (and must shut it down).

    Ctrl-C and SIGTERM are held while Ray starts and stay held when this returns
    (``pipeline.interrupts``): Ray's core worker installs C-level handlers for them during
    ``ray.init``, which swallowed a Ctrl-C (the run went on) or ended the process with no status
    after the product's own line. The Python handlers are put back, and ``interrupts.release``
    (called once the caller knows whether it owns Ray) delivers what arrived meanwhile as
    ``KeyboardInterrupt`` or ``SystemExit``.
    ``quiet`` (the command line without ``--debug``): Ray logs errors only, so its start-up
    warnings (token authentication, ...) do not precede the product's own lines.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    env = {"env_vars": worker_env()}
    level = "ERROR" if quiet else "WARNING"
    interrupts.hold()
    try:
        if address:
            ray.init(address=address, logging_level=level, log_to_driver=False, runtime_env=env)
        else:
            # address="local": always a new instance, never a cluster some other `ray start`
            # left on this machine. Worker logs stay in Ray's session logs: TensorFlow prints
            # start-up noise that no setting silences; errors still reach the driver.
            ray.init(address="local", include_dashboard=False, logging_level=level, log_to_driver=False,
                     runtime_env=env)
    except ConnectionError as err:
        raise InputError(f"cannot reach the Ray cluster at {address}: {err}; check --address") from None
    python_handles_signals()
    return True


def worker_env() -> dict:
    """The environment variables of the workers: TensorFlow quiet, and the fault-injection
    variables of this process (``pipeline.faults``). A Ray this driver starts or joins gets
    them as its job's runtime environment, so that workers asking for the same one (the
    ``ShardWorker`` actors) can take the Python processes Ray starts in advance, instead of
    new ones set up for a different environment."""
    return {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore::DeprecationWarning", **environment()}


def shutdown() -> None:
    ray.shutdown()


def python_handles_signals() -> None:
    """Ray's core worker installs C-level handlers: for SIGTERM, a failure handler that prints a
    report and aborts the process; for SIGINT, one that took Ctrl-C away from Python. Python's
    handlers installed after them are in charge again: Ctrl-C raises ``KeyboardInterrupt``;
    SIGTERM is noted and exits (as Ray's own does), and the driver turns that into a
    ComputeError that says how to resume."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
        if signal.getsignal(signal.SIGINT) in (signal.default_int_handler, None):
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _on_sigterm(signum, frame):
    STOPPED.append(signum)
    sys.exit(signum)  # may surface as Ray's own SystemExit(1) when it arrives inside ray.wait


def local_resources() -> dict:
    """What a plan made without starting Ray may use: this process's Ray if it has one, else
    this machine's CPUs (``--dry-run`` of a local run starts no Ray)."""
    return dict(ray.cluster_resources()) if ray.is_initialized() else {"CPU": os.cpu_count() or 1}


def cluster_resources(local: bool) -> dict:
    """Ray's ``cluster_resources()``; for a cluster this driver did not start, also the smallest
    worker node's memory (``node_memory``, bytes) and the number of such nodes (``nodes``), which
    the plan's memory budget shares out among the workers."""
    resources = dict(ray.cluster_resources())
    if local:
        return resources
    nodes = [n["Resources"] for n in ray.nodes()
             if n.get("Alive") and (n["Resources"].get("CPU", 0) >= 1 or n["Resources"].get("GPU", 0) >= 1)]
    if nodes:
        resources["node_memory"] = min(r.get("memory", 0) + r.get("object_store_memory", 0) for r in nodes)
        resources["nodes"] = len(nodes)
    return resources
