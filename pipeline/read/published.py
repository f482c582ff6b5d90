"""A published run opened for reading: its manifest, its tables, its blocks and its arrays.

The one way the read side opens a run (``Run`` is this class with every view's accessors), so
that a run's completeness is checked in one place. It knows no quantity: a table is a file
name, a block a value of its ``block`` column, an array what the quantity unit that published
it reads back (``Quantity.read_array``). Loading reads only PyArrow, pandas and numpy: no
TensorFlow, no Ray. Tables are read on first use and kept; a run directory may be local or a
URI (``s3://``, ``gs://``, ``file://``).
"""

from __future__ import annotations

import os
from functools import cached_property
from typing import Any

import numpy as np

from pipeline import blocks
from pipeline.blocks import ALL
from pipeline.errors import InputError
from pipeline.quantities.registry import ARRAY_QUANTITIES, UNITS
from pipeline.storage.publish import read_manifest, read_run_table
from pipeline.storage.uri import absolute

# Every run this program publishes has these (contract section 4).
REQUIRED = ("run_id", "date", "job", "examples", "loss", "files")


class RunTables:
    """A published run, read from its directory: facts of the manifest, tables by file name,
    blocks, and per-variable arrays of every per-parameter quantity.

    ``InputError`` when the directory holds no complete run, a damaged manifest, or when a
    table, block or quantity asked for is not in the run (the message names what it has).
    """

    def __init__(self, run_dir: str):
        self.run_dir = absolute(os.fspath(run_dir))
        self.manifest: dict[str, Any] = read_manifest(self.run_dir)
        if self.manifest.get("status") != "complete":
            raise InputError(f"{run_dir} is not a complete run (status {self.manifest.get('status')!r}): "
                             "run the job again")
        # A manifest without these is a damaged or hand-made one, and reading on would show an
        # empty run as a result.
        missing = [name for name in REQUIRED if name not in self.manifest]
        if missing:
            raise InputError(f"{self.run_dir.rstrip('/')}/manifest.json lacks {', '.join(missing)}: the run is damaged (or was not "
                             "published by hessian-pipeline); run the job again")
        self._tables: dict[Any, Any] = {}

    # ------------------------------------------------------------------ facts
    @property
    def run_id(self) -> str:
        return self.manifest.get("run_id", "")

    @property
    def name(self) -> str:
        return self.manifest.get("job", {}).get("name", "")

    @property
    def loss(self) -> float:
        return float(self.manifest.get("loss", float("nan")))

    @property
    def parameters(self) -> int:
        return int(self.manifest.get("parameters", 0))

    @property
    def files(self) -> list[str]:
        return list(self.manifest.get("files", []))

    def options(self, quantity: str) -> dict:
        """The job's options of one quantity (``{}`` when the job did not ask for it)."""
        return ((self.manifest.get("job") or {}).get("quantities") or {}).get(quantity) or {}

    def has(self, table: str) -> bool:
        """Whether the run published ``table`` (``"spectrum"`` or ``"spectrum.parquet"``)."""
        return f"{table.removesuffix('.parquet')}.parquet" in self.files

    def tables(self) -> list[str]:
        """The names of the tables the run published, in the manifest's order. The parts of a
        folder (``per_example/part-00000.parquet``) are one output, read by the view that claims
        the folder, not tables of their own."""
        return [f.removesuffix(".parquet") for f in self.files if f.endswith(".parquet") and "/" not in f]

    @cached_property
    def variables(self) -> list[tuple[str, tuple[int, ...]]]:
        """``(name, shape)`` of every trainable variable, in parameter order."""
        listed = self.manifest.get("variables")
        if listed:
            return [(v["name"], tuple(int(d) for d in v["shape"])) for v in listed]
        found = self._variables_from_tables()
        if found is None:
            raise InputError(f"{self.run_dir}: the manifest has no variables and there is no table to learn them "
                             "from")
        return found

    def _variables_from_tables(self) -> list[tuple[str, tuple[int, ...]]] | None:
        """The variables of a manifest that does not list them (not written by every version):
        a view's accessor that can learn them from its table overrides this."""
        return None

    # ------------------------------------------------------------------ tables
    def _check_has(self, name: str) -> None:
        name = name.removesuffix(".parquet")
        if not self.has(name):
            raise InputError(f"run {self.run_id} has no {name}.parquet (it has: {', '.join(self.tables()) or 'nothing'}"
                             "): add the quantity to the job and run it again")

    def table(self, name: str, columns: list[str] | None = None):
        """One table of the run as a pandas DataFrame (``"spectrum"``, or any file a quantity
        publishes), read on first use and kept; ``InputError`` when the run has no such table."""
        name = name.removesuffix(".parquet")
        self._check_has(name)
        key = (name, tuple(columns) if columns else None)
        if key not in self._tables:
            self._tables[key] = read_run_table(self.run_dir, f"{name}.parquet", columns).to_pandas()
        return self._tables[key]

    def rows(self, name: str, columns: list[str] | None = None) -> list[dict]:
        """One table of the run as a list of row dicts (plain Python values), for the text of
        ``show`` and ``compare``; ``InputError`` when the run has no such table."""
        self._check_has(name)
        return read_run_table(self.run_dir, f"{name.removesuffix('.parquet')}.parquet", columns).to_pylist()

    def columns(self, name: str) -> list[str]:
        """The columns of a table, read from its schema only."""
        name = name.removesuffix(".parquet")
        self._check_has(name)
        key = (name, "schema")
        if key not in self._tables:
            self._tables[key] = list(read_run_table(self.run_dir, f"{name}.parquet", schema_only=True).names)
        return self._tables[key]

    # ------------------------------------------------------------------ blocks
    def blocked(self, name: str):
        """A per-block table; runs published before per-block results (no ``block`` column)
        read as the single block ``"__all__"``."""
        frame = self.table(name)
        if "block" not in frame.columns:
            frame.insert(0, "block", ALL)
        return frame

    def blocks(self, name: str) -> list[str]:
        """The blocks of H a table of the run holds (``"eigenvalues"``, ``"trace"``,
        ``"spectrum"``, ``"hessian"``, ``"eigenvectors"``, ``"kfac"``, ...), in the order published
        (model order)."""
        if "block" not in self.columns(name):
            return [ALL]
        return list(dict.fromkeys(self.table(name, columns=["block"])["block"]))

    def block_size(self, block: str) -> int:
        """Parameters of a block: all of them (``"__all__"``), a variable's, or a layer's."""
        if block == ALL:
            return self.parameters
        names, shapes = [name for name, _ in self.variables], [shape for _, shape in self.variables]
        for kind in ("variable", "layer"):
            for candidate in blocks.of(kind, names, shapes):
                if candidate.name == block:
                    return candidate.size
        raise InputError(f"run {self.run_id} has no variable or layer {block!r}")

    def block(self, name: str, block: str = ALL):
        """The rows of the per-block table ``name`` for one block; ``InputError`` naming the
        blocks it has when there is no such block."""
        frame = self.blocked(name)
        part = frame[frame["block"] == block]
        if part.empty:
            raise InputError(f"run {self.run_id} has no block {block!r} in {name}.parquet (blocks: "
                             f"{', '.join(dict.fromkeys(frame['block']))})")
        return part

    def matrix(self, name: str, block: str, factor: str | None = None) -> np.ndarray:
        """A square matrix stored one row per ``index`` in a ``row`` list column (a Hessian block,
        a Kronecker factor), float64; ``factor`` picks one of several per block."""
        part = self.block(name, block)
        if factor is not None:
            part = part[part["factor"] == factor]
        part = part.sort_values("index")
        return np.stack([np.asarray(row, dtype=np.float64) for row in part["row"]])

    # ------------------------------------------------------------------ arrays
    def quantities(self) -> list[str]:
        """The per-parameter quantities of this run that ``arrays`` and ``variable`` give."""
        return [name for unit in UNITS.values() for name in unit.arrays_in(self)]

    def _flat(self, quantity: str) -> np.ndarray:
        """``[P]`` (diagonal quantities) or ``[K, P]`` (hvp) in parameter order: read by the
        quantity unit that published it."""
        for unit in UNITS.values():
            if quantity in unit.arrays_in(self):
                return unit.read_array(self, quantity)
        if quantity in ARRAY_QUANTITIES:
            raise InputError(f"run {self.run_id} has no {quantity} (per-parameter quantities: "
                             f"{', '.join(self.quantities()) or 'none'})")
        raise InputError(f"unknown quantity {quantity!r}: one of {', '.join(ARRAY_QUANTITIES)}")

    def arrays(self, quantity: str) -> dict[str, np.ndarray]:
        """``{variable name: array of its shape}`` for one quantity (``hvp``: ``[K, *shape]``)."""
        flat = self._flat(quantity)
        sizes = [int(np.prod(shape, dtype=np.int64)) for _, shape in self.variables]
        if flat.shape[-1] != sum(sizes):
            raise InputError(f"run {self.run_id}: {quantity} has {flat.shape[-1]} values but the variables hold "
                             f"{sum(sizes)}: the run is damaged")
        out, start = {}, 0
        for (name, shape), size in zip(self.variables, sizes):
            part = flat[..., start:start + size]
            out[name] = part.reshape(flat.shape[:-1] + tuple(shape))
            start += size
        return out
