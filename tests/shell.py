"""Starting the command line as a terminal's shell does, for the tests that send it Ctrl-C.

A test worker's own signal state is not a terminal's: after some tests (Ray started in the
worker, in-process runs) it was passed on to the commands those tests started, whose Ctrl-C
then never arrived (the cause was not found; CI paired the files differently after the tests
were reorganised). A shell starts a command with SIGINT and SIGTERM unblocked and at their
default actions: ``preexec_fn=like_a_terminal`` does the same.
"""

from __future__ import annotations

import signal


def like_a_terminal() -> None:
    """In the child, before ``exec``: SIGINT and SIGTERM unblocked and at their defaults."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
