"""The run layout: where a run is published and where its finished shards are staged.

```
OUTPUT/NAME/date=YYYY-MM-DD/run=RUN_ID/      a published run (manifest.json written last)
OUTPUT/NAME/.partials/run=RUN_ID/            its staged shards until it is published
```

Paths only (strings): ``publish`` and ``staging`` open them through ``pipeline.storage.uri``.
"""

from __future__ import annotations

import re

from pipeline.errors import InputError
from pipeline.storage.uri import absolute, is_uri

MANIFEST = "manifest.json"
DATE_PART, RUN_PART = "date=", "run="  # the Hive-style partition keys of a run's path
# A run directory as a line of text (what the driver prints last; ``submit`` reads it back).
RUN_DIR_LINE = re.compile(r"^\s*(\S.*/date=\d{4}-\d{2}-\d{2}/run=[A-Za-z0-9._-]+)\s*$")
PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]+")  # use with fullmatch: `$` also matches before a final newline
# A name becomes one path component ("run=ID", ".staging-run=ID-<12 hex>"), and file systems
# allow 255 bytes: checked first, so that a long name is not reported as an unreadable output.
MAX_NAME_LENGTH = 200


def output_root_of(output_root: str) -> str:
    """The output root as shown to users: URIs as given, local paths absolute; no trailing slash."""
    if is_uri(output_root):
        stripped = output_root.rstrip("/")
        return output_root if stripped.endswith(":") else stripped
    return absolute(output_root)


def _under(output_root: str, path: str) -> str:
    """``path`` below the output root; a scheme alone (``file:///``, ``s3://``) keeps its slashes,
    which are part of it, so that the result is still a URI."""
    stripped = output_root.rstrip("/")
    if stripped.endswith(":"):
        return output_root + path if output_root.endswith("/") else f"{output_root}/{path}"
    return f"{stripped}/{path}"


def run_dir(output_root: str, name: str, date: str, run_id: str) -> str:
    """Where a run is published (the contract's Hive-style layout)."""
    return _under(output_root, f"{name}/{DATE_PART}{date}/{RUN_PART}{run_id}")


def partials_dir(output_root: str, name: str, run_id: str) -> str:
    """Where a run's finished shards are staged until it is published."""
    return _under(output_root, f"{name}/.partials/{RUN_PART}{run_id}")


def date_of(folder: str) -> str | None:
    """The date of a ``date=YYYY-MM-DD`` folder (its path or its name), ``None`` for another folder."""
    name = folder.rstrip("/").rsplit("/", 1)[-1]
    return name[len(DATE_PART):] if name.startswith(DATE_PART) else None


def run_id_of(folder: str) -> str | None:
    """The run id of a ``run=ID`` folder (its path or its name), ``None`` for another folder."""
    name = folder.rstrip("/").rsplit("/", 1)[-1]
    return name[len(RUN_PART):] if name.startswith(RUN_PART) else None


def plain_name(value: str, what: str, flag: str) -> None:
    """A run id or job name becomes a folder: letters, digits, ``. _ -`` only (no ``..``), at
    most ``MAX_NAME_LENGTH`` characters."""
    if isinstance(value, str) and len(value) > MAX_NAME_LENGTH:
        raise InputError(f"{what} is {len(value)} characters long, more than the {MAX_NAME_LENGTH} allowed (it "
                         f"becomes a folder name): shorten {flag}")
    if not isinstance(value, str) or not PLAIN_NAME.fullmatch(value) or value in (".", ".."):
        raise InputError(f"{what} {value!r} is not a plain name (letters, digits, . _ -): fix {flag}")
