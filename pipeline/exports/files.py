"""A local file written whole or not at all (standard library only)."""

from __future__ import annotations

import contextlib
import os
import tempfile


@contextlib.contextmanager
def written_whole(out: str, suffix: str):
    """Yields a temporary path beside ``out`` (same folder, so the rename is atomic) to write;
    renamed to ``out`` when the block ends, removed if it raises: ``out`` is whole or absent.
    The suffix is kept because Keras chooses the format by the file's extension."""
    handle, temporary = tempfile.mkstemp(prefix=".hessian-pipeline-", suffix=suffix, dir=os.path.dirname(out))
    os.close(handle)
    try:
        yield temporary
        # mkstemp makes the file private (0600); the result gets the mode any new file would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, out)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
