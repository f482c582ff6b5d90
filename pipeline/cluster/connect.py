"""Starting or joining Ray, what the cluster offers, and stopping cleanly on SIGTERM. Ray only."""

from __future__ import annotations

import _thread
import json
import os
import platform
import re
import shutil
import signal
import socket
import sys
import threading
import time

import ray

from pipeline import interrupts
from pipeline.cluster import processes
from pipeline.errors import InputError
from pipeline.faults import environment

STOPPED: list[int] = []  # signals received by a run (SIGTERM)


# How long joining a cluster (--address, RAY_ADDRESS) may take before the run stops with a
# line that names the address: Ray's own connection retries last about 150 s, silently.
CONNECT_SECONDS = float(os.environ.get("HESSIAN_PIPELINE_CONNECT_SECONDS", "15"))

# A local Ray writes its session (sockets, ports, logs) under its temp directory and starts no
# server when it cannot: it waited 30 s and ended in a traceback. Checked before it starts.
RAY_TEMP_MIN_BYTES = 64 << 20


def ray_temp_dir() -> str:
    """Where a local Ray puts its sessions: ``$RAY_TMPDIR/ray``, else ``$TMPDIR/ray``, else
    ``/tmp/ray`` (``ray._common.utils.get_default_ray_temp_dir``, which Ray reads itself)."""
    return os.path.join(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp", "ray")


def check_ray_temp_space(need: int = RAY_TEMP_MIN_BYTES) -> None:
    """``InputError`` naming Ray's temp directory and its free space when it has under ``need``."""
    folder = ray_temp_dir()
    existing = folder
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return  # nothing to measure: Ray reports what it finds
    if free < need:
        raise InputError(f"Ray's temp directory {folder} has {free / 2**20:.1f} MiB free, and a local Ray needs "
                         f"{need >> 20} MiB for its session: free space there, or set RAY_TMPDIR to a folder with room")


def connect(address: str | None, quiet: bool = False) -> bool:
    """Uses a Ray already initialised in this process, a cluster at ``address``, or a new local
    one; returns whether the caller owns it (and must shut it down): this call started it, or
    ``start_early`` did and this is the first call since.

    Ctrl-C and SIGTERM are held while Ray starts and stay held when this returns
    (``pipeline.interrupts``): Ray's core worker installs C-level handlers for them during
    ``ray.init``, which swallowed a Ctrl-C (the run went on) or ended the process with no status
    after the product's own line. The Python handlers are put back, and ``interrupts.release``
    (called once the caller knows whether it owns Ray) delivers what arrived meanwhile as
    ``KeyboardInterrupt`` or ``SystemExit``. Joining a cluster is the exception: it has a
    deadline (``CONNECT_SECONDS``) and a Ctrl-C or SIGTERM is delivered at once (``_Watch``).
    ``quiet`` (the command line without ``--debug``): Ray logs errors only, so its start-up
    warnings (token authentication, ...) do not precede the product's own lines.
    """
    global _PRESTARTED
    if ray.is_initialized():
        # A local Ray started early by this process (``pool.prestart``) passes to its first caller,
        # with Python's signal handlers in charge again (TensorFlow's import, since, set its own).
        owned, _PRESTARTED = _PRESTARTED, False
        if owned:
            python_handles_signals()
        return owned
    address = address or os.environ.get("RAY_ADDRESS") or None
    env = {"env_vars": worker_env()}
    level = "ERROR" if quiet else "WARNING"
    if not address or address == "local":
        check_ray_temp_space()  # before the signals are held: an error here leaves them as they were
    held_by_caller = interrupts.holding()
    interrupts.hold()
    try:
        return _start_or_join(address, level, env)
    except BaseException:
        if not held_by_caller:
            # A library caller (no command line holding them): its signals as they were, else every
            # process it starts afterwards inherits them blocked. The error says what happened.
            interrupts.release_dropping()
        raise


def _start_or_join(address: str | None, level: str, env: dict) -> bool:
    """``ray.init`` with the signals held: a cluster at ``address`` joined under a deadline, or a
    local instance started (and its processes watched); True (this process owns a Ray)."""
    if address and address != "local":
        with _Watch(address, CONNECT_SECONDS) as watch:
            target = reachable(address, watch)
            try:
                ray.init(address=address, logging_level=level, log_to_driver=False, runtime_env=env)
            except KeyboardInterrupt:
                _forget_ray()
                raise
            except Exception as err:  # noqa: BLE001 - ConnectionError, RuntimeError: each is the address's
                _forget_ray()
                raise _connect_error(address, target, err) from None
    else:
        before = set(processes.children([os.getpid()]))
        # address="local": always a new instance, never a cluster some other `ray start`
        # left on this machine. Worker logs stay in Ray's session logs: TensorFlow prints
        # start-up noise that no setting silences; errors still reach the driver.
        ray.init(address="local", include_dashboard=False, logging_level=level, log_to_driver=False,
                 runtime_env=env)
        started = [pid for pid in processes.children([os.getpid()]) if pid not in before]
        processes.start_watchdog(started, _session_dir())
    python_handles_signals()
    return True


# Whether this process started a local Ray early (``start_early``) that no ``connect`` took yet.
_PRESTARTED = False


def start_early(quiet: bool) -> None:
    """Starts a local Ray now (``connect(None, quiet)``), for the next ``connect`` to take (it then
    returns True and owns it); ``release_early`` shuts it down if none did."""
    global _PRESTARTED
    _PRESTARTED = connect(None, quiet)


def release_early(close_workers) -> None:
    """Calls ``close_workers`` and shuts down a Ray that ``start_early`` started and no
    ``connect`` took (the run stopped before it joined Ray: an input error); nothing otherwise
    (the caller that took them ends them)."""
    global _PRESTARTED
    if _PRESTARTED:
        _PRESTARTED = False
        close_workers()
        shutdown()


class _Watch:
    """While a cluster is joined: delivers a held Ctrl-C or SIGTERM to the main thread at once,
    and interrupts it at the deadline. Ray's connection code blocks with the signals held (see
    ``connect``), so a helper thread (which holds them too) takes them with ``sigtimedwait`` and
    hands them on with ``_thread.interrupt_main``: Python raises them in the main thread as soon
    as it runs Python code again (Ray's retry loops do, every second)."""

    def __init__(self, address: str, seconds: float):
        self.address, self.seconds = address, seconds
        self.deadline = time.monotonic() + seconds
        self.expired = False
        self._done = threading.Event()
        self._thread = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._thread = threading.Thread(target=self._run, name="hessian-pipeline-connect", daemon=True)
            self._thread.start()
        return self

    def _run(self):
        grace = 1.0  # the main thread's own checks of the deadline speak first, in their words
        while not self._done.is_set():
            got = signal.sigtimedwait(interrupts.HELD, 0.2)
            if got is not None and (self._done.is_set() or not callable(signal.getsignal(got.si_signo))):
                os.kill(os.getpid(), got.si_signo)  # held again, for ``interrupts.release``
                return
            if got is not None:
                _thread.interrupt_main(got.si_signo)
                return
            if time.monotonic() > self.deadline + grace and not self._done.is_set():
                self.expired = True
                _thread.interrupt_main(signal.SIGINT)
                return

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def timed_out(self, what: str = "") -> InputError:
        return InputError(f"no Ray cluster answers at {self.address} within {self.seconds:.0f} s{what}: start one "
                          "with `ray start --head` or drop --address (HESSIAN_PIPELINE_CONNECT_SECONDS sets the "
                          "wait)")

    def __exit__(self, kind, error, trace):
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        if self.expired:
            try:  # the deadline's interrupt may not have been raised yet: take it here, not later
                for _ in range(100_000):
                    pass
            except KeyboardInterrupt:
                pass
            if kind is KeyboardInterrupt:
                raise self.timed_out() from None
        return False


def reachable(address: str, watch: _Watch) -> str:
    """Checks, within ``watch``'s deadline, that a Ray cluster answers at ``address`` with this
    machine's Ray and Python versions; returns its ``host:port``. ``InputError`` otherwise."""
    if address.startswith(("http://", "https://")):
        raise InputError(f"--address {address} is a dashboard (Jobs API) address: give it to `hessian-pipeline "
                         "submit`, or give run the cluster's GCS address (HEAD:6379) or ray://HEAD:10001")
    client = address.startswith("ray://")
    target = address[len("ray://"):] if client else address
    if target == "auto":
        try:
            target = ray._private.services.canonicalize_bootstrap_address(target)
        except Exception:  # noqa: BLE001 - ConnectionError: no `ray start` recorded on this machine
            target = None
        if not target:
            raise InputError("--address auto finds no Ray cluster started on this machine: start one with "
                             "`ray start --head`, or drop --address for a Ray of the run's own")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--address {address} is not HOST:PORT (e.g. 127.0.0.1:6379, ray://HEAD:10001, auto): "
                         "fix --address")
    host = host.strip("[]")
    refused = ""
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=max(0.1, min(1.0, watch.remaining()))).close()
            break
        except OSError as err:
            refused = f" ({err.strerror or type(err).__name__})"
        if watch.remaining() <= 0:
            raise watch.timed_out(refused)
        time.sleep(min(0.5, max(0.0, watch.remaining())))  # a head that is starting answers soon
    if not client:
        _check_versions(address, target, watch)
    return target


def _check_versions(address: str, target: str, watch: _Watch) -> None:
    """Reads the cluster's Ray and Python versions from its GCS (in a thread: Ray's client
    blocks for 12 s or more on an address that is not a GCS) and refuses a mismatch with both
    versions named, as Ray itself would refuse it, only later and in a multi-line report."""
    found: dict = {}

    def read():
        try:
            # lazy: Ray's private modules, needed only to join a cluster; one that a Ray version
            # lacks is an error of this read, reported with the address by the caller (lazy)
            from ray._common.usage import usage_constants
            from ray._raylet import InnerGcsClient  # lazy, as above

            gcs = InnerGcsClient.standalone(target, None, int(max(1.0, watch.remaining()) * 1000))
            raw = gcs.internal_kv_get(usage_constants.CLUSTER_METADATA_KEY, b"cluster",
                                      timeout=max(1.0, watch.remaining()))
            found["metadata"] = json.loads(raw) if raw else {}
        except Exception as err:  # noqa: BLE001 - reported by the caller
            found["error"] = err

    thread = threading.Thread(target=read, name="hessian-pipeline-gcs", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)  # short: a Ctrl-C (interrupt_main) lands between the joins
        if watch.remaining() <= 0 and thread.is_alive():
            raise watch.timed_out(" (something listens there, but no Ray GCS answered)")
    if "error" in found:
        if "uthenticat" in f"{type(found['error']).__name__} {found['error']}":
            raise InputError(f"the Ray cluster at {address} refused this machine's auth token (or it has none): "
                             "export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<token> (on the head: ray get-auth-token) "
                             "or copy the head's ~/.ray/auth_token here")
        raise watch.timed_out(f" (something listens there, but it is not a Ray GCS: {_first_line(found['error'])})")
    theirs = found.get("metadata") or {}
    mismatch = _version_mismatch(theirs.get("ray_version"), theirs.get("python_version"))
    if mismatch:
        raise InputError(f"the Ray cluster at {address} {mismatch}")


def _version_mismatch(ray_version: str | None, python_version: str | None) -> str:
    """'' when a driver with this process's Ray and Python may join a cluster running these
    (Ray's own rule: the same Ray, the same Python to the patch unless
    RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL=minor), else the sentence that says why not."""
    if not ray_version or not python_version:
        return ""
    mine = platform.python_version()
    level = os.environ.get("RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL", "patch")
    same_python = (mine.split(".")[:2] == python_version.split(".")[:2]) if level == "minor" else mine == python_version
    if ray_version == ray.__version__ and same_python:
        return ""
    return (f"runs Ray {ray_version} with Python {python_version}, but this machine has Ray {ray.__version__} with "
            f"Python {mine}: a driver must use the cluster's versions (install ray=={ray_version} under Python "
            f"{python_version} here), or send the run with `hessian-pipeline submit`, which runs it on the cluster")


def _connect_error(address: str, target: str | None, err: Exception) -> InputError:
    text = " ".join(str(err).split())
    versions = re.search(r"started with: Ray: (\S+) Python: (\S+) This process", text)
    if versions:
        return InputError(f"the Ray cluster at {address} {_version_mismatch(*versions.groups())}")
    return InputError(f"cannot join the Ray cluster at {address}: {_first_line(err)}: check --address")


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _forget_ray() -> None:
    """Leaves no half-made connection behind an interrupted or failed ``ray.init``."""
    try:
        ray.shutdown()
    except Exception:  # noqa: BLE001 - nothing to shut down
        pass


def _session_dir() -> str | None:
    try:
        return ray._private.worker._global_node.get_session_dir_path()
    except Exception:  # noqa: BLE001 - private API moved: the watchdog then goes by process ids only
        return None


def worker_env() -> dict:
    """The environment variables of the workers: TensorFlow quiet, and the fault-injection
    variables of this process (``pipeline.faults``). A Ray this driver starts or joins gets
    them as its job's runtime environment, so that workers asking for the same one (the
    ``ShardWorker`` actors) can take the Python processes Ray starts in advance, instead of
    new ones set up for a different environment. Also the storage deadline (``FORWARDED``)."""
    deadlines = {name: os.environ[name] for name in FORWARDED if os.environ.get(name)}
    env = {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore::DeprecationWarning", **deadlines, **environment()}
    # Ray refuses a driver whose runtime env sets a variable that its Ray Job's (``submit``) sets
    # too: those reach the workers through the job's runtime env already.
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        taken = set((job.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        taken = set()
    return {name: value for name, value in env.items() if name not in taken}


# Settings the workers read themselves: a cluster's workers do not inherit the driver's environment.
FORWARDED = ("HESSIAN_PIPELINE_STORAGE_TIMEOUT_SECONDS",)


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
