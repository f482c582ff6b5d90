"""A published run, read back: pandas tables and numpy arrays (``pipeline.load``).

The one way the read side opens a run: ``show``, ``compare`` and ``report`` all go through
``Run``, so a run's completeness is checked in one place.

    >>> import pipeline                                                   # doctest: +SKIP
    >>> result = pipeline.load("results/digits-mlp/date=2026-11-26/run=r1")  # doctest: +SKIP
    >>> result.summary.query("variable == '__all__'")                      # doctest: +SKIP
    >>> result.variable("hidden/kernel").hessian_diagonal.shape           # doctest: +SKIP
    (64, 32)

Loading reads only PyArrow, pandas and numpy: no TensorFlow, no Ray. Tables are read on first
use and kept; a run directory may be local or a URI (``s3://``, ``gs://``, ``file://``).
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from pipeline import blocks
from pipeline.blocks import ALL
from pipeline.errors import InputError
from pipeline.quantities.registry import ARRAY_QUANTITIES, UNITS
from pipeline.storage.publish import read_manifest, read_run_table
from pipeline.storage.uri import absolute



@dataclass(frozen=True)
class Variable:
    """One trainable variable of a run: its name, shape and every per-parameter quantity.

    ``arrays`` maps a quantity (``hessian_diagonal``, ``gradient``, ``hvp``, ...) to a float64
    array of the variable's shape (``hvp`` and ``hvp_vectors``: ``[K, *shape]``, one row per
    vector). Each quantity is also an attribute: ``variable.hessian_diagonal``.
    """

    name: str
    shape: tuple[int, ...]
    arrays: dict[str, np.ndarray]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def __getattr__(self, quantity: str) -> np.ndarray:
        if quantity.startswith("_") or quantity in ("name", "shape", "arrays"):
            raise AttributeError(quantity)
        arrays = self.__dict__.get("arrays", {})
        if quantity in arrays:
            return arrays[quantity]
        if quantity in ARRAY_QUANTITIES:
            raise AttributeError(f"{quantity} was not computed in this run (present: {', '.join(arrays) or 'none'})")
        raise AttributeError(f"{type(self).__name__!r} has no attribute {quantity!r}")

    def __repr__(self) -> str:
        return f"Variable({self.name!r}, shape={self.shape}, quantities={list(self.arrays)})"


class Run:
    """A published run, read from its directory.

    Tables (pandas DataFrames, read on first use): ``diagonals``, ``summary``, ``hvp``,
    ``hvp_vectors``, ``eigenvalues``, ``trace``, ``spectrum``, in the layouts of the output
    section of README.md, and ``table(name)`` for any of them; a table the run did not compute
    raises ``InputError`` naming the ones it has (``has("spectrum")`` asks first). ``manifest``
    is the manifest as a dict. Per variable, ``variable(name)`` and ``arrays(quantity)`` give
    numpy arrays in each variable's own shape (C order, as the contract flattens them), read
    back by the quantity unit that published them (``Quantity.read_array``).
    """

    def __init__(self, run_dir: str):
        self.run_dir = absolute(os.fspath(run_dir))
        self.manifest: dict[str, Any] = read_manifest(self.run_dir)
        if self.manifest.get("status") != "complete":
            raise InputError(f"{run_dir} is not a complete run (status {self.manifest.get('status')!r}): "
                             "run the job again")
        # Every run this program publishes has these (contract section 4); a manifest without
        # them is a damaged or hand-made one, and reading on would show an empty run as a result.
        missing = [field for field in _REQUIRED if field not in self.manifest]
        if missing:
            raise InputError(f"{self.run_dir.rstrip('/')}/manifest.json lacks {', '.join(missing)}: the run is damaged (or was not "
                             "published by hessian-pipeline); run the job again")
        self._tables: dict[str, Any] = {}

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

    @property
    def learning_rate(self) -> float | None:
        """The job's ``quantities.eigenvalues.learning_rate`` (``None`` when not given)."""
        options = ((self.manifest.get("job") or {}).get("quantities") or {}).get("eigenvalues") or {}
        rate = options.get("learning_rate")
        return float(rate) if isinstance(rate, (int, float)) and not isinstance(rate, bool) else None

    def sharpness(self) -> dict[str, float]:
        """``{block: lambda_max * eta / 2}``, the edge-of-stability ratio of gradient descent with
        step ``eta`` (Cohen et al. 2021; >= 1: the step is at or past the edge), for a run whose job
        gave ``quantities.eigenvalues.learning_rate: eta`` and asked for the ``largest`` or
        ``magnitude`` eigenvalues; ``{}`` otherwise."""
        rate = self.learning_rate
        options = ((self.manifest.get("job") or {}).get("quantities") or {}).get("eigenvalues") or {}
        if rate is None or not self.has("eigenvalues") or options.get("which", "largest") == "smallest":
            return {}
        frame = self.eigenvalues
        return {block: float(part["eigenvalue"].max()) * rate / 2.0
                for block, part in frame.groupby("block", sort=False)}

    def has(self, table: str) -> bool:
        """Whether the run published ``table`` (``"spectrum"`` or ``"spectrum.parquet"``)."""
        return f"{table.removesuffix('.parquet')}.parquet" in self.files

    @cached_property
    def variables(self) -> list[tuple[str, tuple[int, ...]]]:
        """``(name, shape)`` of every trainable variable, in parameter order."""
        listed = self.manifest.get("variables")
        if listed:
            return [(v["name"], tuple(int(d) for d in v["shape"])) for v in listed]
        # Without the manifest's shapes (not written by every version) each variable is flat.
        if self.has("diagonals"):
            frame = self.table("diagonals", columns=["variable"])
            counts = frame["variable"].value_counts(sort=False)
            return [(str(name), (int(count),)) for name, count in counts.items()]
        raise InputError(f"{self.run_dir}: the manifest has no variables and there is no diagonals.parquet to "
                         "learn them from")

    # ------------------------------------------------------------------ tables
    def _check_has(self, name: str) -> None:
        name = name.removesuffix(".parquet")
        if not self.has(name):
            computed = ", ".join(f.removesuffix(".parquet") for f in self.files if f.endswith(".parquet"))
            raise InputError(f"run {self.run_id} has no {name}.parquet (it has: {computed or 'nothing'}): add the "
                             f"quantity to the job and run it again")

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

    @property
    def diagonals(self):
        """One row per parameter: ``variable``, ``index``, then each diagonal quantity computed."""
        return self.table("diagonals")

    @property
    def summary(self):
        """Per (variable, quantity) and ``__all__``: size, mean, std, min, max, abs_mean, sum, l2_norm."""
        return self.table("summary")

    @property
    def hvp(self):
        """Hessian-vector products, long layout: ``vector``, ``variable``, ``index``, ``value``."""
        return self.table("hvp")

    @property
    def hvp_vectors(self):
        """The random vectors the HVPs used (``hvp: {random: K}``), same layout as ``hvp``."""
        return self.table("hvp_vectors")

    @property
    def eigenvalues(self):
        """``block``, ``rank`` (1 first in each block), ``eigenvalue``, ``residual`` = ``|Hv - lambda v|``."""
        return self._blocked("eigenvalues")

    @property
    def trace(self):
        """One row per block: ``block``, ``method``, ``estimate``, ``stderr``, ``matvecs``."""
        return self._blocked("trace")

    @property
    def spectrum(self):
        """Stochastic Lanczos quadrature: ``block``, ``run``, ``node``, ``weight`` (a run's weights
        sum to 1)."""
        return self._blocked("spectrum")

    @property
    def eigenvectors(self):
        """``block``, ``rank``, ``variable``, ``index``, ``value``: unit norm per (block, rank)."""
        return self.table("eigenvectors")

    def _blocked(self, name: str):
        """A per-block table; runs published before per-block results (no ``block`` column)
        read as the single block ``"__all__"``."""
        frame = self.table(name)
        if "block" not in frame.columns:
            frame.insert(0, "block", ALL)
        return frame

    def blocks(self, name: str) -> list[str]:
        """The blocks of H a table of the run holds (``"eigenvalues"``, ``"trace"``,
        ``"spectrum"``, ``"hessian"``, ``"eigenvectors"``), in the order published (model order)."""
        frame = self.table(name, columns=["block"]) if name in ("hessian", "eigenvectors", "layer_inputs", "kfac",
                                                                 "kfac_eigen") else self._blocked(name)
        return list(dict.fromkeys(frame["block"]))

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
        frame = self._blocked(name) if name in ("eigenvalues", "trace", "spectrum") else self.table(name)
        part = frame[frame["block"] == block]
        if part.empty:
            raise InputError(f"run {self.run_id} has no block {block!r} in {name}.parquet (blocks: "
                             f"{', '.join(dict.fromkeys(frame['block']))})")
        return part

    def hessian(self, block: str = "__all__") -> np.ndarray:
        """One dense block of ``hessian.parquet`` as a float64 ``[b, b]`` matrix, rows and columns
        in the block's flat order (``"__all__"`` for ``blocks: full``; a variable path or a
        layer name otherwise)."""
        part = self.block("hessian", block)
        return np.stack([np.asarray(row, dtype=np.float64) for row in part["row"]])

    def layer_inputs(self, layer: str) -> np.ndarray:
        """A layer's input second moment ``A`` (``layer_inputs.parquet``) as a float64 ``[d, d]``
        matrix; ``layer`` is its path as the plan names it (``run.blocks("layer_inputs")``)."""
        return self._matrix("layer_inputs", layer)

    def kfac(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """A layer's K-FAC factors ``(A, S)`` (``kfac.parquet``) as published (contract 6.1). They
        approximate its curvature block at a scale: ``kron(A, S) / R`` with ``reduction: expand``
        (R positions per example), ``kron(A, S)`` with ``reduce``; ``kfac_curvature`` applies it."""
        return self._matrix("kfac", layer, "A"), self._matrix("kfac", layer, "S")

    def kfac_stderr(self, layer: str) -> np.ndarray:
        """The standard error of a layer's ``S`` (``fisher_type: mc`` only; ``factor`` "S_stderr"
        of ``kfac.parquet``), entry by entry, ``[d_out, d_out]``. ``KeyError`` for another
        fisher_type (its S is exact for its labels)."""
        part = self.block("kfac", layer)
        if not (part["factor"] == "S_stderr").any():
            raise KeyError(f"layer {layer!r} has no S_stderr: only kfac with fisher_type: mc has one")
        return self._matrix("kfac", layer, "S_stderr")

    def kfac_curvature(self, layer: str, max_dimension: int = 4096) -> np.ndarray:
        """The dense K-FAC approximation of a layer's GGN/Fisher block (contract 6.1), ``[D, D]``
        with ``D = d_A * d_S`` in the engine's flat order (kernel ``[d_in, d_out]`` in C order,
        then the bias):

            C_l = kron(A, S) / R   (reduction: expand; R = manifest layer_positions[layer])
            C_l = kron(A, S)       (reduction: reduce)

        the approximation of kfac-jax, curvlinops and Grosse & Martens (2016): for a linear
        layer under mse, where K-FAC expand is exact, ``C_l`` is the layer's GGN block (a test
        shows it to 1e-8). ``kron(A, S)`` alone is R times too large for a layer with R > 1
        positions (a Conv, a Dense on a sequence). Memory: ``8 D^2`` bytes; ``ValueError`` above
        ``max_dimension``, ``KeyError`` for a layer without factors."""
        a, s = self.kfac(layer)
        size = len(a) * len(s)
        if size > max_dimension:
            raise ValueError(f"layer {layer!r}: its K-FAC block is {size:,} x {size:,} ({8 * size * size / 2**30:.1f} "
                             f"GiB); use its factors (run.kfac), or raise max_dimension")
        options = self.manifest.get("job", {}).get("quantities", {}).get("kfac", {}) or {}
        positions = 1.0
        if options.get("reduction", "expand") == "expand":
            positions = float(self.manifest["layer_positions"][layer])
        return np.kron(a, s) / positions

    def kfac_eigen(self, layer: str) -> np.ndarray:
        """A layer's EK-FAC eigenvalues ``[d_A, d_S]`` (``kfac_eigen.parquet``): entry ``(a, c)``
        belongs to ``Q_A[:, a] (x) Q_S[:, c]``, the eigenvectors ``numpy.linalg.eigh`` gives for
        the published ``A`` and ``S``."""
        a, s = self.kfac(layer)
        part = self.block("kfac_eigen", layer)
        return part.sort_values("index")["value"].to_numpy(np.float64).reshape(len(a), len(s))

    def _matrix(self, name: str, layer: str, factor: str | None = None) -> np.ndarray:
        part = self.block(name, layer)
        if factor is not None:
            part = part[part["factor"] == factor]
        part = part.sort_values("index")
        return np.stack([np.asarray(row, dtype=np.float64) for row in part["row"]])

    def spectrum_runs(self, block: str = ALL) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Nodes and weights per SLQ run of one block, as ``pipeline.spectrum.slq.density`` takes them."""
        frame = self.block("spectrum", block)
        nodes, weights = [], []
        for _, part in frame.groupby("run", sort=True):
            nodes.append(part["node"].to_numpy(np.float64))
            weights.append(part["weight"].to_numpy(np.float64))
        return nodes, weights

    # ------------------------------------------------------------------ arrays
    def quantities(self) -> list[str]:
        """The per-parameter quantities of this run that ``arrays`` and ``variable`` give."""
        return [name for unit in UNITS.values() for name in unit.arrays_in(self)]

    @cached_property
    def diagonal_columns(self) -> list[str]:
        """The columns of ``diagonals.parquet`` ([] without one), read from its schema only."""
        if not self.has("diagonals"):
            return []
        return list(read_run_table(self.run_dir, "diagonals.parquet", schema_only=True).names)

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

    def variable(self, name: str) -> Variable:
        """Every per-parameter quantity of one variable, each in the variable's shape."""
        shapes = dict(self.variables)
        if name not in shapes:
            raise InputError(f"run {self.run_id} has no variable {name!r} (variables: "
                             f"{', '.join(shapes)})")
        return Variable(name, shapes[name], {q: self.arrays(q)[name] for q in self.quantities()})

    def _repr_html_(self) -> str:
        """A notebook's view: the run's facts, then its summary (``__all__`` rows) when it has one."""
        facts = [("run", self.run_id), ("directory", self.run_dir), ("job", self.name),
                 ("examples", self.manifest.get("examples")), ("loss", f"{self.loss:.6g}"),
                 ("parameters", self.parameters),
                 ("tables", ", ".join(f.removesuffix(".parquet") for f in self.files if f.endswith(".parquet")))]
        rows = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>"
                       f"{html.escape(str(v))}</td></tr>" for k, v in facts)
        text = f"<table>{rows}</table>"
        if self.has("summary"):
            summary = self.summary
            text += summary[summary["variable"] == ALL].to_html(index=False)
        return text

    def __repr__(self) -> str:
        tables = [f.removesuffix(".parquet") for f in self.files if f.endswith(".parquet")]
        return (f"Run({self.name!r}, run_id={self.run_id!r}, examples={self.manifest.get('examples')}, "
                f"parameters={self.parameters}, tables={tables})")


_REQUIRED = ("run_id", "date", "job", "examples", "loss", "files")


def load(run_dir: str | os.PathLike) -> Run:
    """The published run at ``run_dir`` (a directory with ``manifest.json``; local or a URI)."""
    return Run(os.fspath(run_dir))

