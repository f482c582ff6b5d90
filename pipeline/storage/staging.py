"""Durable staging of finished shards, so that a run killed mid-way resumes where it stopped.

Each finished shard's ``Partial`` of the main pass is saved, atomically (a temporary file,
then one rename), to ``OUTPUT/NAME/.partials/run=RUN_ID/shard-00003.npz``, beside a
``state.json`` written when the run starts::

    {"run_id": ..., "date": "2026-11-26", "started_at": "2026-11-26T23:59:01+00:00",
     "fingerprint": {"job": {...}, "model_sha256": ..., "data_fingerprint": ..., "shards": [[0, 58], ...],
                     "inputs_sha256": {"hvp": ...}, "version": ...}}

Running the same command with the same ``--run-id`` reads ``state.json``: the run keeps its
original start date (a run resumed after midnight UTC still publishes under the day it
started), the fingerprint must equal the new plan's (same job apart from ``output``,
``workers`` and ``shards``, same model bytes, same data files, same shard layout, same HVP
vectors), and only the shards without a staged partial are computed. A mismatch is an
input error that names what changed, never a silent mix.

The fingerprint sees the data files' footers (TFRecord: record lengths), not their data pages:
a file rewritten in place with the same size and footer would pass it. So each staged shard
also carries the sha256 of the bytes each of its pieces was read from (computed by the worker
as it read them) and each file's size and modification time when it was planned; a staged
shard whose file was rewritten, or whose bytes no longer match (the workers read them again,
``cluster.pool``), is computed again rather than resumed. The folder is removed after a
successful publish, and after an input error found while computing (the data must change,
so the partials could never be used).

Storage only: NumPy and PyArrow file systems (local paths and URIs alike), no Ray.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from dataclasses import dataclass
import io
import json
import os
import posixpath
import secrets

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from pipeline import __version__
from pipeline.errors import ComputeError, InputError
from pipeline.influence.topk import Top
from pipeline.partial import Partial
from pipeline.storage.layout import output_root_of, partials_dir, plain_name
from pipeline.storage.uri import first_line, resolve_filesystem

STATE = "state.json"
# Job keys that do not change a shard's partial sums: where results go, how many actors
# compute them and what the plan may cost (the shard layout is compared on its own).
_IRRELEVANT_KEYS = ("output", "workers", "shards", "limits")


def fingerprint(plan) -> dict:
    """Everything a staged partial depends on, as JSON-able data."""
    job = {k: v for k, v in plan.job.to_dict().items() if k not in _IRRELEVANT_KEYS}
    # Arrays read at plan time (an HVP vectors file): their bytes, not just their path.
    inputs = {name: hashlib.sha256(np.ascontiguousarray(array, dtype=np.float64).tobytes()).hexdigest()
              for name, array in sorted(plan.inputs.items())}
    return {
        "job": json.loads(json.dumps(job, default=str)),
        "model_sha256": plan.model_sha256,
        "data_fingerprint": plan.data.fingerprint,
        "shards": [[int(s.first_row), int(s.rows)] for s in plan.data.shards],
        "inputs_sha256": inputs,
        "version": __version__,
    }


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    said = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict) and name != "inputs_sha256":
            said += _differences(a, b, name + ".")
        else:
            said.append(name)
    return said


_WHAT = {"model_sha256": "the model file", "data_fingerprint": "the data files", "shards": "the shard layout",
         "inputs_sha256": "the quantities' input files (HVP vectors)", "version": "the hessian-pipeline version"}


def _tops(data) -> dict:
    """The rows pass's top-k selections of a staged shard (``Partial.tops``)."""
    kinds = {key[4:-5] for key in data.files if key.startswith("top_") and key.endswith("_rows")}
    return {kind: Top(kind, np.array(data[f"top_{kind}_rows"]), np.array(data[f"top_{kind}_scores"]),
                      np.array(data[f"top_{kind}_ids"]) if f"top_{kind}_ids" in data.files else None)
            for kind in kinds}


@dataclass
class StagedShard:
    """A finished shard found in staging. ``digests``: sha256 of the bytes each of its pieces
    was read from; ``stale``: why it must be computed again although its partial reads (a file
    rewritten since, no record of its input), else None."""

    partial: Partial
    digests: tuple[str, ...]
    stale: str | None = None


class PartialStore:
    """The staged partials of one run id.

    >>> store = PartialStore("results", "digits-mlp", "nightly-1")   # doctest: +SKIP
    >>> store.started()            # None, or the original start of an interrupted run
    >>> store.open(plan, now)      # writes state.json, or checks it against the plan
    >>> store.load()               # {shard index: Partial} already finished
    >>> store.save(shard, partial) # atomically, as each shard arrives
    >>> store.remove()             # after the run is published
    """

    def __init__(self, output_root: str, name: str, run_id: str, prefix: str = ""):
        plain_name(run_id, "run id", "--run-id")
        plain_name(name, "job name", "name in the job file")
        root = output_root_of(output_root)
        self.location = partials_dir(root, name, run_id)
        self.run_id = run_id
        self._fs, fs_root = resolve_filesystem(root)
        self._path = partials_dir(fs_root, name, run_id)
        self._state: dict | None = None
        self._stamps: dict[str, tuple[int, int]] = {}
        self.prefix = prefix  # a pass after the main pass stages its shards beside it (``for_pass``)

    def for_pass(self, name: str) -> "PartialStore":
        """The same run's staging for a later pass (``rows``: per-example outputs and influence):
        its shards are ``NAME-shard-00003.npz`` beside the main pass's, under the same state."""
        other = PartialStore.__new__(PartialStore)
        other.__dict__.update(self.__dict__)
        other.prefix = f"{name}-"
        return other

    @property
    def pass_name(self) -> str:
        """``main``, or the later pass's name (``for_pass``)."""
        return self.prefix.rstrip("-") or "main"

    @property
    def folder(self) -> str:
        """Where workers may stage files of this run (the per-example parts): a path or URI."""
        return self.location

    # ------------------------------------------------------------------------ files
    def _read(self, path: str) -> bytes | None:
        try:
            if self._fs.get_file_info(path).type != pafs.FileType.File:
                return None
            with self._fs.open_input_stream(path) as stream:
                return stream.read()
        except (pa.ArrowException, OSError) as err:
            raise InputError(f"cannot read staged state {self.location}: {first_line(err)}: check --output "
                             "and its permissions") from err

    def _write_atomic(self, path: str, payload: bytes) -> None:
        """A reader sees the old file or the whole new one, never a part (temp + rename)."""
        self._fs.create_dir(posixpath.dirname(path), recursive=True)
        temporary = f"{posixpath.dirname(path)}/.tmp-{secrets.token_hex(6)}-{posixpath.basename(path)}"
        with self._fs.open_output_stream(temporary) as stream:
            stream.write(payload)
        if isinstance(self._fs, pafs.LocalFileSystem):
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
        self._fs.move(temporary, path)

    # ------------------------------------------------------------------------ state
    def started(self) -> _dt.datetime | None:
        """The UTC start of the interrupted run staged under this run id, if any."""
        payload = self._read(f"{self._path}/{STATE}")
        if payload is None:
            return None
        try:
            self._state = json.loads(payload.decode("utf-8"))
            return _dt.datetime.fromisoformat(self._state["started_at"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise InputError(f"staged state {self.location}/{STATE} is damaged ({first_line(err)}): delete "
                             f"{self.location} to start run {self.run_id} over") from err

    @property
    def staged_shards(self) -> int | None:
        """How many shards the interrupted run was cut into (None without one)."""
        if self._state is None:
            return None
        return len(self._state.get("fingerprint", {}).get("shards", [])) or None

    def open(self, plan, started: _dt.datetime) -> None:
        """Writes ``state.json`` for a new run, or checks a staged one against ``plan``."""
        self._stamps = dict(zip(getattr(plan.data, "files", ()), getattr(plan.data, "file_stamps", ())))
        current = fingerprint(plan)
        if self._state is not None:
            changed = _differences(self._state.get("fingerprint", {}), current)
            if changed:
                shown = ", ".join(_WHAT.get(c, c if not c.startswith("job.") else c[4:]) for c in changed[:6])
                raise InputError(
                    f"run {self.run_id} has staged partials of a different job ({shown} changed since it "
                    f"started): run the same job again, choose another --run-id, or delete {self.location}")
            return
        self._state = {"run_id": self.run_id, "date": plan.date, "started_at": started.isoformat(timespec="seconds"),
                       "fingerprint": current}
        try:
            self._write_atomic(f"{self._path}/{STATE}", (json.dumps(self._state, indent=2) + "\n").encode())
        except (pa.ArrowException, OSError) as err:
            raise InputError(f"cannot write staged state under {self.location}: {first_line(err)}: choose a "
                             "writable --output") from err

    # ------------------------------------------------------------------------ partials
    def _shard_path(self, index: int) -> str:
        return f"{self._path}/{self.prefix}shard-{index:05d}.npz"

    def _piece_stamps(self, shard) -> np.ndarray:
        return np.array([self._stamps.get(piece.file, (-1, -1)) for piece in shard.pieces],
                        dtype=np.int64).reshape(-1, 2)

    def save(self, shard, partial: Partial, digests=()) -> None:
        """Stages ``shard``'s partial with ``digests`` (the bytes it was read from, one per piece)
        and the planned size and modification time of each piece's file."""
        arrays = {f"sum_{key}": np.asarray(value, dtype=np.float64) for key, value in partial.sums.items()}
        for kind, top in partial.tops.items():
            arrays.update({f"top_{kind}_rows": top.rows, f"top_{kind}_scores": top.scores})
            if top.ids is not None:
                arrays[f"top_{kind}_ids"] = top.ids
        buffer = io.BytesIO()
        np.savez(buffer, examples=np.int64(partial.examples), weight_sum=np.float64(partial.weight_sum),
                 batches=np.int64(partial.batches), first_row=np.int64(shard.first_row),
                 rows=np.int64(shard.rows), digests=np.array(list(digests), dtype="U64"),
                 stamps=self._piece_stamps(shard), **arrays)
        try:
            self._write_atomic(self._shard_path(shard.index), buffer.getvalue())
        except (pa.ArrowException, OSError) as err:
            raise ComputeError(f"cannot stage shard {shard.index} under {self.location}: {first_line(err)}; free "
                               f"space or fix permissions, then run the same command with --run-id {self.run_id} "
                               "to resume") from err

    def load(self, shards) -> dict[int, StagedShard]:
        """The staged shards among ``shards`` (a file that does not match its shard is ignored;
        one whose input looks changed is returned ``stale``)."""
        found = {}
        try:
            listed = self._fs.get_file_info(pafs.FileSelector(self._path, allow_not_found=True))
        except (pa.ArrowException, OSError) as err:
            raise InputError(f"cannot list staged partials {self.location}: {first_line(err)}") from err
        names = {posixpath.basename(i.path) for i in listed if i.type == pafs.FileType.File}
        for shard in shards:
            name = posixpath.basename(self._shard_path(shard.index))
            if name not in names:
                continue
            try:
                with np.load(io.BytesIO(self._read(self._shard_path(shard.index)))) as data:
                    if int(data["first_row"]) != shard.first_row or int(data["rows"]) != shard.rows:
                        continue
                    partial = Partial(
                        examples=int(data["examples"]), weight_sum=float(data["weight_sum"]),
                        batches=int(data["batches"]),
                        sums={key[4:]: np.array(data[key]) for key in data.files if key.startswith("sum_")},
                        tops=_tops(data))
                    digests = tuple(str(d) for d in data["digests"]) if "digests" in data.files else ()
                    stamps = np.array(data["stamps"]) if "stamps" in data.files else None
                    found[shard.index] = StagedShard(partial, digests, self._stale(shard, digests, stamps))
            except (ValueError, KeyError, OSError, TypeError):
                continue  # unreadable: compute the shard again
        return found

    def _stale(self, shard, digests, stamps) -> str | None:
        if len(digests) != len(shard.pieces) or stamps is None or stamps.shape != (len(shard.pieces), 2):
            return "it was staged without a record of the bytes it read"
        for piece, (size, mtime), (size_now, mtime_now) in zip(shard.pieces, stamps, self._piece_stamps(shard)):
            # A filesystem without modification times (-1) is judged by the size and the digests.
            if size != size_now or (mtime != mtime_now and -1 not in (mtime, mtime_now)):
                return f"{piece.file} was rewritten since (its size or modification time changed)"
        return None

    def remove(self) -> None:
        """Deletes the staged partials (best effort: the run is already published)."""
        try:
            self._fs.delete_dir(self._path)
        except (pa.ArrowException, OSError):
            return
        if isinstance(self._fs, pafs.LocalFileSystem):
            try:  # only if empty: another run may be staging beside this one
                os.rmdir(posixpath.dirname(self._path))
            except OSError:
                pass
