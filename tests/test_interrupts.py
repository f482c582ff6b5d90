"""Ctrl-C and SIGTERM held while a run starts: blocked in the main thread, delivered on
``release``, unblocked in a child forked meanwhile. Every signal here goes to a handler of the
test's own (restored after), so a slip cannot end the test session."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import pytest

from pipeline import interrupts
from pipeline.interrupts import HELD, hold, release


def blocked() -> set:
    return set(signal.pthread_sigmask(signal.SIG_BLOCK, []))


@pytest.fixture
def received():
    """Signals that reached Python's handlers, in order; handlers and mask restored after."""
    got: list[int] = []
    saved = {number: signal.signal(number, lambda number, frame: got.append(number)) for number in HELD}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    try:
        yield got
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        interrupts._holding.clear()
        for number, handler in saved.items():
            signal.signal(number, handler)


def test_held_signals_wait_and_are_delivered_on_release(received):
    assert not HELD & blocked()
    hold()
    assert HELD <= blocked()
    # Sent to this thread: a signal sent to the process may go to any thread that does not block
    # it, and a test process (pytest-xdist's worker) has other threads.
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
    signal.pthread_kill(threading.get_ident(), signal.SIGINT)
    for _ in range(1000):  # plenty of bytecodes in which an unblocked handler would have run
        pass
    assert received == []
    assert HELD <= signal.sigpending()
    release()
    for _ in range(1000):
        pass
    assert sorted(received) == sorted(HELD)
    assert not HELD & blocked() and not signal.sigpending() & HELD


def test_hold_in_another_thread_changes_nothing(received):
    seen = {}

    def other():
        hold()
        seen["mask"] = blocked()
        seen["holding"] = interrupts._holding.is_set()

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert not HELD & seen["mask"] and not seen["holding"]
    assert not HELD & blocked()


def test_a_child_forked_while_they_are_held_unblocks_them(received):
    code = "import signal; print(sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))"
    hold()
    try:
        # A preexec_fn makes subprocess fork in Python, running the at-fork hooks (Ray passes one).
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                               preexec_fn=lambda: None, timeout=60).stdout
        assert HELD <= blocked()  # still held here
    finally:
        release()
    assert not {int(s) for s in HELD} & set(eval(child)), child
