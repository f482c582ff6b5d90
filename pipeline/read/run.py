"""A published run, read back: pandas tables and numpy arrays (``pipeline.load``).

    >>> import pipeline                                                   # doctest: +SKIP
    >>> result = pipeline.load("results/digits-mlp/date=2026-11-26/run=r1")  # doctest: +SKIP
    >>> result.summary.query("variable == '__all__'")                      # doctest: +SKIP
    >>> result.variable("hidden/kernel").hessian_diagonal.shape           # doctest: +SKIP
    (64, 32)

``Run`` is ``pipeline.read.published.RunTables`` (the manifest, tables by name, blocks, arrays)
with the accessors of every registered view (``pipeline.read.views``): ``run.eigenvalues``,
``run.kfac(layer)``, ... live with the family they read. Loading reads only PyArrow, pandas and
numpy: no TensorFlow, no Ray.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass

import numpy as np

from pipeline.errors import InputError
from pipeline.quantities.registry import ARRAY_QUANTITIES
from pipeline.read.published import RunTables
from pipeline.read.views import ACCESSORS, VIEWS


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


class Run(*ACCESSORS, RunTables):
    """A published run, read from its directory.

    Tables (pandas DataFrames, read on first use): ``diagonals``, ``summary``, ``hvp``,
    ``hvp_vectors``, ``eigenvalues``, ``trace``, ``spectrum``, ``eigenvectors``, in the layouts of
    the contract's output section, and ``table(name)`` for any of them; a table the run did not
    compute raises ``InputError`` naming the ones it has (``has("spectrum")`` asks first).
    ``manifest`` is the manifest as a dict. Per variable, ``variable(name)`` and
    ``arrays(quantity)`` give numpy arrays in each variable's own shape (C order, as the
    contract flattens them), read back by the quantity unit that published them
    (``Quantity.read_array``). Matrices: ``hessian(block)``, ``layer_inputs(layer)``,
    ``kfac(layer)``, ``kfac_curvature(layer)``, ``kfac_eigen(layer)``. Per training example:
    ``per_example(columns)`` (a ``pyarrow.Table``) and ``influence(query)`` (contract 7).
    """

    def variable(self, name: str) -> Variable:
        """Every per-parameter quantity of one variable, each in the variable's shape."""
        shapes = dict(self.variables)
        if name not in shapes:
            raise InputError(f"run {self.run_id} has no variable {name!r} (variables: {', '.join(shapes)})")
        return Variable(name, shapes[name], {q: self.arrays(q)[name] for q in self.quantities()})

    def _repr_html_(self) -> str:
        """A notebook's view: the run's facts, then what each view adds (the summary's ``__all__`` rows)."""
        facts = [("run", self.run_id), ("directory", self.run_dir), ("job", self.name),
                 ("examples", self.manifest.get("examples")), ("loss", f"{self.loss:.6g}"),
                 ("parameters", self.parameters), ("tables", ", ".join(self.tables()))]
        rows = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>"
                       f"{html.escape(str(v))}</td></tr>" for k, v in facts)
        return f"<table>{rows}</table>" + "".join(view.notebook(self) for view in VIEWS)

    def __repr__(self) -> str:
        return (f"Run({self.name!r}, run_id={self.run_id!r}, examples={self.manifest.get('examples')}, "
                f"parameters={self.parameters}, tables={self.tables()})")


def load(run_dir: str | os.PathLike) -> Run:
    """The published run at ``run_dir`` (a directory with ``manifest.json``; local or a URI)."""
    return Run(os.fspath(run_dir))
