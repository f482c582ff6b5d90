"""Fixtures shared by the test files that run the pipeline on a real local Ray."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray of this test file's own (2 CPUs), shut down after its last test.

    ``address="local"``: always a new instance, never a cluster that ``ray start`` (another
    test file, a colleague) left recorded in /tmp/ray; a plain ``ray.init()`` would join it and
    refuse ``num_cpus``.
    """
    import ray  # lazy: only the files that use this fixture pay for Ray's import

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3"}})
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def signals_left_as_found():
    """Every test leaves Ctrl-C and SIGTERM unblocked if it found them so. A call that held them
    and returned (``pipeline.cli.main(["run", ...])`` with a bad job file, ``connect`` failing)
    left them blocked in this worker process, and every process a later test started inherited
    the mask: their Ctrl-C tests failed far from the cause. This names the cause."""
    import signal

    held = {signal.SIGINT, signal.SIGTERM}
    before = held & signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    after = held & signal.pthread_sigmask(signal.SIG_BLOCK, [])
    if after != before:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, after - before)  # the next tests start clean
        pytest.fail(f"the test left {sorted(s.name for s in after - before)} blocked in the test process")
