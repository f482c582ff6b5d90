"""TensorFlow imported without its start-up lines (standard library only until called)."""

from __future__ import annotations

import logging
import os
import sys


def import_tensorflow() -> None:
    """Imports TensorFlow and Keras with file descriptor 2 pointed at /dev/null.

    Their C++ start-up lines (``oneDNN custom operations are on``, ``Could not find cuda
    drivers``, ``cuInit`` errors) are written before absl's logging is set up, so
    ``TF_CPP_MIN_LOG_LEVEL`` cannot silence them; default mode shows only the product's own
    lines (``--debug`` shows everything); ``pipeline.run(quiet=True)`` does the same. Deliberately
    lazy: the other commands never need TensorFlow. An import that fails here fails again,
    visibly, where the command imports it.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        try:
            import keras  # noqa: F401 - lazy: see the docstring
            import tensorflow  # noqa: F401 - lazy: see the docstring
        except Exception:  # noqa: BLE001 - shown below, with stderr restored
            pass
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def silence_tensorflow_logger() -> None:
    """TensorFlow's Python logger at ERROR: its retracing warnings (a model planned once per
    checkpoint traces its functions again) are advice to the product, not to its user."""
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
