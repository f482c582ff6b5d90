"""Fault injection for the reliability tests: a documented test hook, off unless asked for.

``HESSIAN_PIPELINE_FAULT`` holds comma-separated faults, each ``kind[:key=value]...[:once]``:

=====================================  ======================================================
``kill-worker:shard=3[:once]``         the worker process dies (``os._exit``) when it starts
                                       computing shard 3 (every shard without ``shard=``)
``fail-shard:shard=3[:once]``          the worker raises ``RuntimeError`` on shard 3 (an
                                       ordinary exception, as from a flaky file system)
``delay:seconds=0.5``                  every shard takes this much longer (to widen the window
                                       for a test that removes a node mid-run)
``kill-driver:shards=2[:pass=rows]``   the driver dies after it has staged 2 shards of this
                                       invocation's main pass (of its rows pass: per-example
                                       outputs and influence)
``publish-before-rename``              the driver dies after the run's files and manifest are
                                       staged, just before the rename that publishes them
``disk-full``                          writing a result table raises ``OSError(ENOSPC)``, as a
                                       full disk does
``pause-after-publish:seconds=60``     the driver waits this long once its run is published (a
                                       window for ``ray job stop`` in the submit tests)
=====================================  ======================================================

``once`` fires only the first time, across processes: a marker file in
``HESSIAN_PIPELINE_FAULT_DIR`` (default: the system's temporary folder) remembers it. With
``HESSIAN_PIPELINE_FAULT_DIR`` set, workers also append one line per shard they start to
``computed.log`` there (``shard=3 node=<Ray node id> pid=1234``), so a test can count how often
each shard ran, and where.

Both variables reach Ray workers through the actor's runtime environment
(``actor.remote_worker_class``), and a job's driver through the runtime env of ``submit``. Standard library only.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time

FAULT = "HESSIAN_PIPELINE_FAULT"
FAULT_DIR = "HESSIAN_PIPELINE_FAULT_DIR"
FAULT_VARIABLES = (FAULT, FAULT_DIR)


def _faults(kind: str) -> list[dict]:
    found = []
    for text in os.environ.get(FAULT, "").split(","):
        parts = [p.strip() for p in text.strip().split(":") if p.strip()]
        if not parts or parts[0] != kind:
            continue
        options = {"_text": text.strip()}
        for part in parts[1:]:
            key, _, value = part.partition("=")
            options[key] = value if value else True
        found.append(options)
    return found


def _first_time(options: dict) -> bool:
    """False when a ``once`` fault has already fired (in any process)."""
    if "once" not in options:
        return True
    folder = os.environ.get(FAULT_DIR) or tempfile.gettempdir()
    marker = os.path.join(folder, "fault-" + hashlib.sha256(options["_text"].encode()).hexdigest()[:16])
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def active(kind: str, **context) -> dict | None:
    """The fault of ``kind`` matching ``context`` (``shard=3``), if one is set and due."""
    for options in _faults(kind):
        if all(str(context.get(k)) == str(v) for k, v in options.items()
               if k not in ("_text", "once") and k in context):
            if _first_time(options):
                return options
    return None


def record(event: str) -> None:
    """Appends ``event`` to ``computed.log`` in ``HESSIAN_PIPELINE_FAULT_DIR`` (tests only)."""
    folder = os.environ.get(FAULT_DIR)
    if not folder:
        return
    with open(os.path.join(folder, "computed.log"), "a", encoding="utf-8") as log:
        log.write(f"{event} pid={os.getpid()}\n")


def die(point: str) -> None:
    """Ends this process at once, as a crash would (no cleanup, no atexit)."""
    sys.stderr.write(f"fault injected: {point}: exiting\n")
    sys.stderr.flush()
    os._exit(1)


def worker_faults(shard_index: int, node: str | None = None) -> None:
    """The faults a worker honours when it starts a shard."""
    record(f"shard={shard_index} node={node}")
    if not os.environ.get(FAULT):
        return
    delay = active("delay")
    if delay is not None:
        time.sleep(float(delay.get("seconds", 1)))
    if active("kill-worker", shard=shard_index) is not None:
        die(f"kill-worker shard {shard_index}")
    if active("fail-shard", shard=shard_index) is not None:
        raise RuntimeError(f"fault injected: fail-shard {shard_index}")


def environment() -> dict:
    """The fault variables set in this process, to hand on to Ray workers."""
    return {name: os.environ[name] for name in FAULT_VARIABLES if os.environ.get(name)}
