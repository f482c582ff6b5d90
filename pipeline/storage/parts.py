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
    with PartWriter(folder, shard, provenance) as writer:
        writer.write(table)
        return writer.close()


#: Rows are written in row groups of about this many bytes: a worker holds at most one group,
#: and groups of one batch each (256 rows) made the writes twice as slow.
ROW_GROUP_BYTES = 32 << 20


class PartWriter:
    """A part written as the batches come, in row groups of about ``ROW_GROUP_BYTES``, so that
    a worker holds one group of rows, never its whole shard: ``write(table)`` per batch, then
    ``close()`` moves it to ``folder/part-SSSSS.parquet`` at once; ``discard()`` (or a failure
    inside ``with``) leaves nothing. Nothing is created before the first group is written."""

    def __init__(self, folder: str, shard: int, provenance: dict):
        self.folder, self.shard = folder, shard
        self._fs, path = resolve_filesystem(folder)
        self._path = path.rstrip("/")
        self._temporary = f"{self._path}/.tmp-{secrets.token_hex(6)}-{part_name(shard)}"
        self._metadata = {PROVENANCE_KEY: json.dumps(provenance, sort_keys=True, default=str).encode()}
        self._writer = None
        self._pending: list[pa.Table] = []
        self._pending_bytes = 0

    def write(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._pending_bytes += table.nbytes
        if self._pending_bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        self._pending, self._pending_bytes = [], 0
        try:
            if self._writer is None:
                self._fs.create_dir(self._path, recursive=True)
                schema = table.schema.with_metadata({**(table.schema.metadata or {}), **self._metadata})
                self._writer = pq.ParquetWriter(self._temporary, schema, filesystem=self._fs)
            self._writer.write_table(table.replace_schema_metadata(self._writer.schema.metadata),
                                     row_group_size=table.num_rows)
        except (pa.ArrowException, OSError) as err:
            self.discard()
            raise ComputeError(f"cannot write {part_name(self.shard)} under {self.folder}: {first_line(err)}") from err

    def close(self) -> str | None:
        """Publishes the part in its folder; returns its path (None when nothing was written)."""
        self._flush()
        if self._writer is None:
            return None
        try:
            self._writer.close()
            self._writer = None
            target = f"{self._path}/{part_name(self.shard)}"
            self._fs.move(self._temporary, target)
            return target
        except (pa.ArrowException, OSError) as err:
            self.discard()
            raise ComputeError(f"cannot write {part_name(self.shard)} under {self.folder}: {first_line(err)}") from err

    def discard(self) -> None:
        """Removes the unfinished part (best effort)."""
        self._pending, self._pending_bytes = [], 0
        if self._writer is not None:
            try:
                self._writer.close()
            except (pa.ArrowException, OSError):
                pass
            self._writer = None
        try:
            self._fs.delete_file(self._temporary)
        except (pa.ArrowException, OSError):
            pass

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.discard()


def list_parts(folder: str) -> list[str]:
    """The parts under ``folder`` (file system paths, by name), none when it does not exist."""
    fs, path = resolve_filesystem(folder)
    listed = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.path for i in listed if i.type == pafs.FileType.File
                  and posixpath.basename(i.path).startswith("part-"))
