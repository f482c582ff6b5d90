"""Ctrl-C and SIGTERM held while a run starts TensorFlow and Ray (standard library only).

A signal sent to the process goes to any thread that does not block it. While Ray starts, its
core worker installs C-level handlers for SIGINT and SIGTERM that took Ctrl-C away from Python
or ended the process after the product's own error line. So ``run`` blocks both signals in its
main thread *before* TensorFlow and Ray create their threads (a thread inherits its creator's
mask: those threads then never take them), keeps them blocked until Python's handlers are back
after ``ray.init`` (``pipeline.cluster.connect``), and ``release`` then delivers what arrived
meanwhile, as ``KeyboardInterrupt`` or the SIGTERM handler's exit. docs/failures.md has the case.
"""

from __future__ import annotations

import signal
import threading

HELD = {signal.SIGINT, signal.SIGTERM}


def hold() -> None:
    """Blocks SIGINT and SIGTERM in the calling thread (the main thread only: another thread's
    mask says nothing about where the process's signals go)."""
    if threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, HELD)


def release() -> None:
    """Unblocks them; one that arrived while they were held is delivered now."""
    if threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)
