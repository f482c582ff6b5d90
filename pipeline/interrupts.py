"""Ctrl-C and SIGTERM held while a run starts TensorFlow and Ray (standard library only).

A signal sent to the process goes to any thread that does not block it. While Ray starts, its
core worker installs C-level handlers for SIGINT and SIGTERM that took Ctrl-C away from Python
or ended the process after the product's own error line. So ``run`` blocks both signals in its
main thread *before* TensorFlow and Ray create their threads (a thread inherits its creator's
mask: those threads then never take them), keeps them blocked until Python's handlers are back
after ``ray.init`` (``pipeline.cluster.connect``), and ``release`` then delivers what arrived
meanwhile, as ``KeyboardInterrupt`` or the SIGTERM handler's exit. docs/failures.md has the case.

A process forked while they are held inherits the mask: Ray's raylet, GCS and agents, started
by ``ray.init`` in that window, ignored the SIGTERM of ``ray.shutdown``, which waited one second
for each of its five processes before killing them (5.3 s of the bundled example's 32 s). So
a child forked while they are held unblocks them first (``os.register_at_fork``; Python runs
those hooks in a ``subprocess`` child when the caller passes a ``preexec_fn``, as Ray does, and
Ray's own then blocks SIGINT again for its processes).
"""

from __future__ import annotations

import os
import signal
import threading

HELD = {signal.SIGINT, signal.SIGTERM}
_holding = threading.Event()


def _unblock_in_child() -> None:
    if _holding.is_set():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)


os.register_at_fork(after_in_child=_unblock_in_child)


def hold() -> None:
    """Blocks SIGINT and SIGTERM in the calling thread (the main thread only: another thread's
    mask says nothing about where the process's signals go)."""
    if threading.current_thread() is threading.main_thread():
        _holding.set()
        signal.pthread_sigmask(signal.SIG_BLOCK, HELD)


def holding() -> bool:
    """Whether ``hold`` holds them now."""
    return _holding.is_set()


def release_dropping() -> None:
    """``release``, where one that arrived meanwhile is dropped: the caller is already ending
    with an error that says more."""
    try:
        release()
    except KeyboardInterrupt:
        pass


def release() -> None:
    """Unblocks them; one that arrived while they were held is delivered now."""
    if threading.current_thread() is threading.main_thread():
        _holding.clear()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)
