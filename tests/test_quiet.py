"""TensorFlow imported without its start-up lines: file descriptor 2 points at /dev/null while
Keras and TensorFlow import, and is the caller's again afterwards; a failing import stays quiet
there and fails visibly where the command imports it again."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest

import paths
from pipeline.quiet import silence_tensorflow_logger


def python(code: str, *path: str, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    environment.update(env, PYTHONPATH=os.pathsep.join([*path, paths.REPO]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=environment, timeout=300)


def test_lines_written_to_fd_2_during_the_import_are_dropped_and_fd_2_comes_back(tmp_path):
    # A stand-in Keras that writes below Python, as TensorFlow's C++ start-up does, then fails.
    (tmp_path / "keras").mkdir()
    (tmp_path / "keras" / "__init__.py").write_text(
        "import os\nos.write(2, b'C++ start-up line\\n')\nraise ImportError('keras stand-in')\n", encoding="utf-8")
    done = python("""
        import sys
        from pipeline.quiet import import_tensorflow
        import_tensorflow()
        sys.stderr.write("restored\\n")
        sys.stderr.flush()
        print("tensorflow" in sys.modules, "keras" in sys.modules)
        import keras
    """, str(tmp_path))
    assert done.stdout == "False False\n"  # the failure left nothing half-imported
    err = done.stderr.splitlines()
    assert err[0] == "restored", done.stderr
    # The second import, with stderr back, shows both the line and the error.
    assert err[1] == "C++ start-up line" and err[-1] == "ImportError: keras stand-in", done.stderr
    assert done.returncode == 1


@pytest.mark.slow
def test_the_real_import_is_silent_and_leaves_both_imported():
    done = python("""
        import sys
        from pipeline.quiet import import_tensorflow
        import_tensorflow()
        print("tensorflow" in sys.modules, "keras" in sys.modules)
        sys.stderr.write("after\\n")
    """)
    assert done.returncode == 0 and done.stdout == "True True\n"
    assert done.stderr == "after\n"


def test_silence_tensorflow_logger_sets_it_to_error():
    logger = logging.getLogger("tensorflow")
    saved = logger.level
    try:
        logger.setLevel(logging.DEBUG)
        silence_tensorflow_logger()
        assert logger.level == logging.ERROR and not logger.isEnabledFor(logging.WARNING)
    finally:
        logger.setLevel(saved)
