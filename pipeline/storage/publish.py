"""Atomic publication of a run: nobody ever sees half a result.

Tables are written to a staging directory; ``manifest.json`` is written last and only then
does the run appear at ``OUTPUT/NAME/date=YYYY-MM-DD/run=RUN_ID/``. On a local filesystem
that is one ``os.rename`` of the staging directory (a hidden ``.staging-run=ID-<random>``
sibling, so Hive-style readers skip it). Object stores have no atomic rename: the tables
are copied into the final directory and ``manifest.json`` is written after them, which is
the contract's definition of a complete run.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import re
import secrets
import shutil
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import faults
from pipeline.errors import InputError
from pipeline.storage.layout import MANIFEST, PLAIN_NAME, date_of, output_root_of, plain_name, run_dir
from pipeline.storage.uri import first_line, resolve_filesystem

PROVENANCE_KEY = b"hessian_pipeline"
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _json_default(value: Any) -> Any:
    # Counts and statistics often arrive as numpy scalars; JSON has no such types.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _dumps(value: dict, **kwargs) -> str:
    return json.dumps(value, default=_json_default, allow_nan=True, **kwargs)


def _fault(point: str) -> None:
    """Test hook: ``HESSIAN_PIPELINE_FAULT=publish-before-rename`` ends the process here
    (see ``pipeline/faults.py``), to show that a crash mid-publish leaves no half result."""
    if point in os.environ.get("HESSIAN_PIPELINE_FAULT", "") and faults.active(point) is not None:
        faults.die(point)


def published(output_root: str, name: str, date: str, run_id: str) -> bool:
    """Whether run ``run_id`` of job ``name`` is published under ``output_root`` (False when
    that cannot be read)."""
    try:
        filesystem, fs_root = resolve_filesystem(output_root_of(output_root))
        path = f"{run_dir(fs_root, name, date, run_id)}/{MANIFEST}"
        return filesystem.get_file_info(path).type == pafs.FileType.File
    except (pa.ArrowException, OSError, InputError):
        return False


def published_any_date(output_root: str, name: str, run_id: str) -> str | None:
    """The directory of run ``run_id`` of job ``name`` published on any date, or ``None``."""
    try:
        filesystem, fs_root = resolve_filesystem(output_root_of(output_root))
        job_dir = f"{fs_root.rstrip('/')}/{name}"
        dates = filesystem.get_file_info(pafs.FileSelector(job_dir, allow_not_found=True))
        for info in sorted(dates, key=lambda i: i.path):
            date = date_of(info.path)
            if date is not None and published(output_root, name, date, run_id):
                return run_dir(output_root_of(output_root), name, date, run_id)
    except (pa.ArrowException, OSError, InputError):
        return None
    return None


def _location(path: str) -> tuple[str, str]:
    """``(filesystem kind, path)`` to compare locations: local paths with their links resolved."""
    fs, inner = resolve_filesystem(path)
    if isinstance(fs, pafs.LocalFileSystem):
        return "local", os.path.realpath(inner)
    return fs.type_name, inner.rstrip("/")


def _within(inner: tuple[str, str], outer: tuple[str, str]) -> bool:
    return inner[0] == outer[0] and (inner[1] == outer[1] or inner[1].startswith(outer[1].rstrip("/") + "/"))


def published_run_around(path: str) -> str | None:
    """The published run (a folder holding ``manifest.json``) that ``path`` is, or is inside."""
    try:
        fs, inner = resolve_filesystem(path)
        kind, current = _location(path)
        while True:
            if fs.get_file_info(posixpath.join(current, MANIFEST)).type == pafs.FileType.File:
                return current if kind == "local" else path.split("://", 1)[0] + "://" + current
            parent = posixpath.dirname(current)
            if parent == current or not parent:
                return None
            current = parent
    except (pa.ArrowException, OSError, InputError):
        return None  # unreadable: writing there reports it


def check_output_location(output_root: str, name: str, data_path: str) -> None:
    """Refuses an output root that overlaps the run's inputs or a published run, before
    anything is written: results inside ``data.path`` would be read as data by the next run
    (a directory or glob takes every Parquet file under it), and a published run is never
    written to."""
    root = output_root_of(output_root)
    inside = published_run_around(root)
    if inside is not None:
        raise InputError(f"output {root} is inside the published run {inside}, which is never written to: choose "
                         "an --output outside it (e.g. the folder that holds the job's runs)")
    parts = data_path.rstrip("/").split("/")
    static = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
    data_root = "/".join(parts[:static]) or "/"
    try:
        fs, inner = resolve_filesystem(data_root)
        if fs.get_file_info(inner).type == pafs.FileType.File:
            return  # a single file: nothing can be written inside it
        # Runs are written under OUTPUT/NAME: that folder must not be among the data.
        overlap = _within(_location(f"{root.rstrip('/')}/{name}"), _location(data_root))
    except (pa.ArrowException, OSError, InputError):
        return  # the plan reports an unreadable data path
    if overlap:
        raise InputError(f"output {root} puts the runs ({root.rstrip('/')}/{name}/...) inside data.path {data_path}: "
                         "the results would be written among the data and read as data by the next run; choose an "
                         "--output outside the data")


class RunPublisher:
    """Stage a run's tables, then publish them all at once with their manifest.

    >>> publisher = RunPublisher("results", "digits-mlp", "r1", "2025-01-31")  # doctest: +SKIP
    >>> publisher.write_table("trace.parquet", table, provenance)              # doctest: +SKIP
    >>> publisher.publish(manifest)  # -> ".../digits-mlp/date=2025-01-31/run=r1"   # doctest: +SKIP
    """

    def __init__(self, output_root: str, name: str, run_id: str, date: str):
        plain_name(run_id, "run id", "--run-id")
        plain_name(name, "job name", "name in the job file")
        if not isinstance(date, str) or not _DATE.fullmatch(date):
            raise InputError(f"date {date!r} is not YYYY-MM-DD: pass the run's UTC start date")
        root = output_root_of(output_root)
        self.run_id = run_id
        self.final_dir = run_dir(root, name, date, run_id)
        self._fs, fs_root = resolve_filesystem(root)
        self._local = isinstance(self._fs, pafs.LocalFileSystem)
        self._date_path = run_dir(fs_root, name, date, run_id).rsplit("/", 1)[0]
        self._final_path = run_dir(fs_root, name, date, run_id)
        if self._exists(f"{self._final_path}/{MANIFEST}"):
            raise InputError(f"run {run_id} already published at {self.final_dir}: choose another --run-id "
                             f"or delete it")
        self._refuse_link()
        self._probe_writable(root)
        self._staging_path = f"{self._date_path}/.staging-run={run_id}-{secrets.token_hex(6)}"
        self._written: set[str] = set()
        self._moved: list[tuple[str, str]] = []  # parts moved into staging: (from, to), to move back on abort
        self._copies: list[tuple[str, str]] = []  # parts copied at publish (object storage): (from, name)
        self._published = False
        self._created_staging = False

    # ------------------------------------------------------------------------ helpers

    def _exists(self, path: str) -> bool:
        try:
            return self._fs.get_file_info(path).type != pafs.FileType.NotFound
        except (pa.ArrowException, OSError) as err:
            raise InputError(f"cannot read output {self.final_dir}: {first_line(err)}: check --output and "
                             f"credentials") from err

    def _probe_writable(self, root: str) -> None:
        """Fail now, as an input error, rather than after hours of compute."""
        probe = f"{self._date_path}/.probe-{secrets.token_hex(6)}"
        # Folders this run makes (the date folder, the job's, and any missing part of the output
        # root), removed again, deepest first and only if still empty, when it ends without a result.
        self._created_dirs = []
        path = self._date_path
        while path and path not in ("/", ".") and not self._exists(path):
            self._created_dirs.append(path)
            path = path.rsplit("/", 1)[0] if "/" in path else ""
        try:
            self._fs.create_dir(self._date_path, recursive=True)
            with self._fs.open_output_stream(probe) as stream:
                stream.write(b"probe")
            self._fs.delete_file(probe)
        except (pa.ArrowException, OSError) as err:
            raise InputError(f"cannot write to output {root}: {first_line(err)}: choose a writable --output") from err

    def _ensure_staging(self) -> None:
        if not self._created_staging:
            self._fs.create_dir(self._staging_path, recursive=True)
            self._created_staging = True

    def _check_open(self, filename: str) -> None:
        if self._published:
            raise RuntimeError(f"run {self.run_id} is already published; cannot write {filename}")
        if "/" in filename or "\\" in filename or not PLAIN_NAME.fullmatch(filename) or filename in (".", ".."):
            raise ValueError(f"file name {filename!r} must be a plain name")

    # ------------------------------------------------------------------------- public

    def write_table(self, filename: str, table: pa.Table, provenance: dict) -> None:
        """Write one Parquet table into staging, carrying the provenance in its schema metadata."""
        self._check_open(filename)
        if filename == MANIFEST:
            raise ValueError(f"{MANIFEST} is written by publish()")
        metadata = dict(table.schema.metadata or {})
        metadata[PROVENANCE_KEY] = _dumps(provenance, sort_keys=True).encode()
        self._ensure_staging()
        if faults.active("disk-full") is not None:  # a test hook (docs/failures.md), off unless asked for
            raise OSError(errno.ENOSPC, "No space left on device (fault injected)", filename)
        pq.write_table(table.replace_schema_metadata(metadata), f"{self._staging_path}/{filename}",
                       filesystem=self._fs)
        self._written.add(filename)

    def add_parts(self, folder: str, sources: list[str]) -> None:
        """Publishes ``sources`` (the parts workers staged, file system paths on this output's
        file system: ``parts.list_parts``) as ``folder/<name>`` in the run, listed in the manifest's
        ``files``. Local: moved into the staging folder now (one rename each, no copy) and moved
        back if the run is aborted, so that a resumed run still has them; object storage: copied
        at publish. Cost: one rename (or copy) per part."""
        self._check_open(folder)
        self._ensure_staging()
        if self._local:
            os.makedirs(f"{self._staging_path}/{folder}", exist_ok=True)
        for source in sources:
            name = f"{folder}/{posixpath.basename(source)}"
            if self._local:
                os.rename(source, f"{self._staging_path}/{name}")
                self._moved.append((source, f"{self._staging_path}/{name}"))
            else:
                self._copies.append((source, name))
            self._written.add(name)

    def write_parts_table(self, filename: str, sources: list[str], provenance: dict) -> None:
        """One Parquet table ``filename`` made of the tables ``sources`` (parts on this output's
        file system, same schema), in order, streamed part by part: memory of one part."""
        self._check_open(filename)
        self._ensure_staging()
        writer = None
        try:
            for source in sources:
                table = pq.read_table(source, filesystem=self._fs)
                if writer is None:
                    metadata = dict(table.schema.metadata or {})
                    metadata[PROVENANCE_KEY] = _dumps(provenance, sort_keys=True).encode()
                    schema = table.schema.with_metadata(metadata)
                    writer = pq.ParquetWriter(f"{self._staging_path}/{filename}", schema, filesystem=self._fs)
                writer.write_table(table.replace_schema_metadata(writer.schema.metadata))
        finally:
            if writer is not None:
                writer.close()
        if writer is not None:
            self._written.add(filename)

    def publish(self, manifest: dict) -> str:
        """Write ``manifest.json`` last and make the run visible; returns ``final_dir``."""
        self._check_open(MANIFEST)
        manifest = dict(manifest)
        manifest["files"] = sorted(self._written)
        text = _dumps(manifest, indent=2) + "\n"
        self._ensure_staging()
        if self._local:
            self._publish_local(text)
        else:
            self._publish_copy(text)
        self._published = True
        self._created_staging = False
        return self.final_dir

    def _publish_local(self, text: str) -> None:
        staging_manifest = f"{self._staging_path}/{MANIFEST}"
        with open(staging_manifest, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        self._remove_stale()
        _fault("publish-before-rename")
        try:
            os.rename(self._staging_path, self._final_path)
        except OSError as err:
            # Another process published the same run id between our check and now.
            if os.path.exists(f"{self._final_path}/{MANIFEST}"):
                raise InputError(f"run {self.run_id} already published at {self.final_dir}: choose another "
                                 f"--run-id or delete it") from err
            raise

    def _publish_copy(self, text: str) -> None:
        self._remove_stale()
        self._fs.create_dir(self._final_path, recursive=True)
        copied = dict((name, source) for source, name in self._copies)
        for filename in sorted(self._written):
            source = copied.get(filename, f"{self._staging_path}/{filename}")
            self._fs.copy_file(source, f"{self._final_path}/{filename}")
        _fault("publish-before-manifest")
        with self._fs.open_output_stream(f"{self._final_path}/{MANIFEST}") as stream:
            stream.write(text.encode())
        self.abort()

    def _refuse_link(self) -> None:
        """A symbolic link where the run folder goes was not made here: never delete through it."""
        if self._local and os.path.islink(self._final_path):
            raise InputError(f"{self.final_dir} is a symbolic link, not a run folder this program made: remove the "
                             "link or choose another --run-id")

    def _remove_stale(self) -> None:
        """A final directory without manifest.json is the leftover of a crash, never a result."""
        self._refuse_link()
        if self._exists(f"{self._final_path}/{MANIFEST}"):
            raise InputError(f"run {self.run_id} already published at {self.final_dir}: choose another --run-id "
                             f"or delete it")
        if self._exists(self._final_path):
            if self._local:
                shutil.rmtree(self._final_path)
            else:
                self._fs.delete_dir(self._final_path)
        if self._local:
            # Staging folders of this run id left by a crash during an earlier publish.
            own = os.path.basename(self._staging_path)
            prefix = f".staging-run={self.run_id}-"
            for entry in os.listdir(self._date_path):
                if entry.startswith(prefix) and entry != own and len(entry) == len(own):
                    shutil.rmtree(f"{self._date_path}/{entry}", ignore_errors=True)

    @property
    def published(self) -> bool:
        """Whether this publisher has published its run (``publish`` returned)."""
        return self._published

    def published_elsewhere(self) -> bool:
        """Whether this run id is published by another process (its manifest exists)."""
        if self._published:
            return False
        try:
            return self._exists(f"{self._final_path}/{MANIFEST}")
        except InputError:
            return False

    def abort(self) -> None:
        """Remove the staging directory, and the output folders this run made if they are still
        empty (best effort: called while something else failed). Nothing else is touched."""
        if self._published:
            return
        for source, moved in reversed(self._moved):  # the staged parts go back for a resumed run
            try:
                os.rename(moved, source)
            except OSError:
                pass
        self._moved = []
        if self._created_staging:
            try:
                self._fs.delete_dir(self._staging_path)
            except (pa.ArrowException, OSError):
                pass
            self._created_staging = False
        if self._local:
            for path in getattr(self, "_created_dirs", []):
                try:  # os.rmdir removes only an empty folder: another run's files stay
                    os.rmdir(path)
                except OSError:
                    break

    def __enter__(self) -> "RunPublisher":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if not self._published:
            self.abort()


def read_run_table(run_dir: str, filename: str, columns: list[str] | None = None, schema_only: bool = False):
    """One Parquet file of a published run (a ``pyarrow.Table``, or its schema): the one way
    ``show``, ``report``, ``compare`` and ``pipeline.load`` read results. A file that is
    missing or damaged is an ``InputError`` naming it, never a traceback."""
    fs, root = resolve_filesystem(run_dir)
    try:
        with fs.open_input_file(f"{root.rstrip('/')}/{filename}") as handle:
            return pq.read_schema(handle) if schema_only else pq.read_table(handle, columns=columns)
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"cannot read {run_dir.rstrip('/')}/{filename} ({first_line(err)}): the run is damaged, "
                         "run it again") from None


def read_manifest(run_dir: str) -> dict:
    """The manifest of a complete run; a directory without one is not a result."""
    fs, path = resolve_filesystem(run_dir)
    target = posixpath.join(path.rstrip("/") or path, MANIFEST)
    try:
        with fs.open_input_stream(target) as stream:
            raw = stream.read()
    except (pa.ArrowException, OSError) as err:
        if fs.get_file_info(path).type == pafs.FileType.File:
            raise InputError(f"{run_dir} is a file, not a run directory: give the run's folder "
                             f"({posixpath.dirname(run_dir.rstrip('/')) or '.'})") from None
        if isinstance(err, FileNotFoundError) or not fs.get_file_info(target).type == pafs.FileType.File:
            raise InputError(f"{run_dir} is not a complete run (no {MANIFEST})") from err
        raise InputError(f"cannot read {target}: {first_line(err)}: check the path and credentials") from err
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except ValueError as err:  # UnicodeDecodeError too: bytes that are not text
        raise InputError(f"{run_dir}/{MANIFEST} is not valid JSON ({err}): the run is damaged, run it again") from err
    if not isinstance(manifest, dict):
        raise InputError(f"{run_dir}/{MANIFEST} is not a JSON object: the run is damaged, run it again")
    for field, kinds, what in _MANIFEST_TYPES:
        value = manifest.get(field)
        if value is not None and not (isinstance(value, kinds) and _well_formed(field, value)):
            raise InputError(f"{run_dir}/{MANIFEST}: field '{field}' is not {what} (got {json.dumps(value)[:60]}): "
                             "the run is damaged or was edited, run it again")
    return manifest


# What the read side (show, report, compare, pipeline.load) relies on in a manifest. A missing
# field is each reader's concern (an older run); a field of the wrong kind is a damaged run.
_MANIFEST_TYPES = (
    ("job", dict, "a mapping"),
    ("variables", list, "a list of {name, shape}"),
    ("files", list, "a list of file names"),
    ("worker_names", list, "a list"),
    ("model", dict, "a mapping"),
    ("data", dict, "a mapping"),
    ("versions", dict, "a mapping"),
    ("run_id", str, "a string"),
    ("date", str, "a string"),
    ("examples", int, "an integer"),
    ("parameters", int, "an integer"),
    ("loss", (int, float), "a number"),
)


def _well_formed(field: str, value) -> bool:
    if field == "variables":
        return all(isinstance(v, dict) and isinstance(v.get("name"), str) and isinstance(v.get("shape"), list)
                   and all(isinstance(d, int) for d in v["shape"]) for v in value)
    if field == "files":
        return all(isinstance(f, str) for f in value)
    return not isinstance(value, bool)
