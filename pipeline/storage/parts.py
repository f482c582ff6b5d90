"""Parts: Parquet files that workers write as they go (the per-example rows of contract 7.1,
the dense influence scores), staged under the run's ``.partials/run=ID/`` folder and moved into
the published run by ``publish.RunPublisher.add_parts``.

A part is written atomically (a temporary name, then one move), so that a reader, a resumed
run or a second copy of the same shard sees the whole part or none; the name is the shard's,
so a shard computed twice writes the same part twice. Storage only: PyArrow file systems.
"""

from __future__ import annotations

import json
import posixpath
import secrets

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import ComputeError
from pipeline.storage.publish import PROVENANCE_KEY
from pipeline.storage.uri import first_line, resolve_filesystem


def part_name(shard: int) -> str:
    """A shard's part in its folder."""
    return f"part-{shard:05d}.parquet"


def write_part(folder: str, shard: int, table: pa.Table, provenance: dict) -> str:
    """Writes ``table`` as ``folder/part-SSSSS.parquet`` (``folder`` a path or URI), atomically,
    with ``provenance`` in its schema metadata; returns its path. ``ComputeError`` when the
    storage refuses (the shard is retried, then the run stops and can be resumed)."""
    fs, path = resolve_filesystem(folder)
    target = f"{path.rstrip('/')}/{part_name(shard)}"
    temporary = f"{path.rstrip('/')}/.tmp-{secrets.token_hex(6)}-{part_name(shard)}"
    metadata = dict(table.schema.metadata or {})
    metadata[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True, default=str).encode()
    try:
        fs.create_dir(path, recursive=True)
        pq.write_table(table.replace_schema_metadata(metadata), temporary, filesystem=fs)
        fs.move(temporary, target)
    except (pa.ArrowException, OSError) as err:
        raise ComputeError(f"cannot write {part_name(shard)} under {folder}: {first_line(err)}") from err
    return target


def list_parts(folder: str) -> list[str]:
    """The parts under ``folder`` (file system paths, by name), none when it does not exist."""
    fs, path = resolve_filesystem(folder)
    listed = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.path for i in listed if i.type == pafs.FileType.File
                  and posixpath.basename(i.path).startswith("part-"))
