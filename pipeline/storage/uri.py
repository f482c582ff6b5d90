"""The one rule for "URI or local path", and the PyArrow file system behind each.

A URI is ``scheme://...`` with an identifier as its scheme (``s3://``, ``gs://``, ``file://``,
``hdfs://``); anything else is a local path, made absolute (``~`` expanded). Every module that
touches a file goes through ``resolve_filesystem``, so local paths and object stores behave
alike. PyArrow only.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.errors import InputError

GLOB_CHARS = "*?["
# Every request to an object store has a deadline: an S3 server that stops answering mid-run
# (a stalled endpoint, a network partition) left reads waiting forever with no message. A
# request that makes no progress for this long fails (AWS SDK: 3 attempts), naming the file,
# and the shard is retried like any other I/O failure.
STORAGE_TIMEOUT_SECONDS = float(os.environ.get("HESSIAN_PIPELINE_STORAGE_TIMEOUT_SECONDS", "60"))


def is_uri(path: str) -> bool:
    """Whether ``path`` names an object in a file system other than the local one by URI."""
    scheme, sep, _ = str(path).partition("://")
    return bool(sep) and scheme.isidentifier()


def absolute(path: str, base_dir: str | None = None) -> str:
    """A URI as written; a local path absolute (relative to ``base_dir`` when given)."""
    if is_uri(path):
        return path
    path = os.path.expanduser(path)
    return os.path.abspath(os.path.join(base_dir, path) if base_dir else path)


def first_line(err: BaseException) -> str:
    """The first line of an error's message (PyArrow's run over several)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def resolve_filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """Filesystem and the path inside it, for a local path or a URI (s3://, gs://, file://).

    Glob characters are kept out of URI parsing (a ``[`` is not valid in a URI) and put back
    on the returned path. Raises ``InputError`` for a URI PyArrow cannot open.
    """
    if not isinstance(path, str) or not path:
        raise InputError(f"data path {path!r} is not a path: set a file, directory, glob or URI")
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    scheme_end = path.index("://") + 3
    cut = min((i for i in (path.find(c, scheme_end) for c in GLOB_CHARS) if i >= 0),
              default=len(path))
    literal, pattern = path[:cut], path[cut:]
    try:
        fs, inner = from_uri(literal)
    except (pa.ArrowException, ValueError, OSError) as err:
        raise InputError(f"cannot open {path}: {' '.join(str(err).split())}: check the URI and credentials") from err
    if pattern and literal.endswith("/") and not inner.endswith("/"):
        inner += "/"
    return fs, inner + pattern


def from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """``pyarrow.fs.FileSystem.from_uri`` with deadlines on an S3 file system's requests
    (``STORAGE_TIMEOUT_SECONDS``; pyarrow's own default is none). Its other options, the endpoint
    from ``AWS_ENDPOINT_URL_S3`` included, stay as pyarrow resolved them."""
    fs, inner = pafs.FileSystem.from_uri(uri)
    if isinstance(fs, pafs.S3FileSystem) and STORAGE_TIMEOUT_SECONDS > 0:
        rebuild, (options,) = fs.__reduce__()
        options = {**options, "request_timeout": STORAGE_TIMEOUT_SECONDS,
                   "connect_timeout": min(10.0, STORAGE_TIMEOUT_SECONDS)}
        fs = rebuild(options)
    return fs, inner


def sha256(path: str) -> str:
    """sha256 of a file's bytes (local or URI), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    filesystem, inner = resolve_filesystem(path)
    with filesystem.open_input_stream(inner) as stream:
        while True:
            chunk = stream.read(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


def local_copy(path: str, what: str = "model file") -> str:
    """A local file with the bytes of ``path``: the path itself when local (``file://`` too),
    else a temporary copy (Keras loads from local files only). ``InputError`` when missing
    or unreadable."""
    if not is_uri(path) or path.startswith("file://"):
        local = path[len("file://"):] if path.startswith("file://") else path
        if not os.path.exists(local):
            raise InputError(f"{what} {path} not found: check the job's 'model' path")
        return local
    try:
        filesystem, inner = from_uri(path)
        handle, local = tempfile.mkstemp(suffix="-" + os.path.basename(inner))
        with os.fdopen(handle, "wb") as out, filesystem.open_input_stream(inner) as src:
            out.write(src.read())
    except Exception as exc:  # noqa: BLE001 - any failure to read a user's URI is their input
        raise InputError(f"{what} {path} cannot be read ({exc}): check the URI and credentials") from None
    return local


# Set by `submit` to the folder it uploads, as the user's machine names it: on the cluster the
# run's working directory is Ray's copy of that folder (a temporary runtime-env path).
SUBMITTED_FROM = "HESSIAN_PIPELINE_SUBMITTED_FROM"


def as_submitted(path):
    """``path`` as the user who submitted the run knows it: a local path inside the run's working
    directory (Ray's temporary copy of the uploaded folder) is mapped back into the folder the
    user uploaded; every other path, URIs and local runs' paths, is returned as it is."""
    origin = os.environ.get(SUBMITTED_FROM)
    if not origin or not isinstance(path, str) or is_uri(path):
        return path
    here = os.getcwd().rstrip(os.sep)
    if path == here or path.startswith(here + os.sep):
        return origin.rstrip(os.sep) + path[len(here):]
    return path
