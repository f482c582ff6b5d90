"""The registry of the quantities: ``REGISTRY`` lists them, in the order their columns appear in ``diagonals.parquet`` and
``summary.parquet`` and their driver-side algorithms run. Adding a quantity is one new module
here (defining ``UNIT``) and its name in ``REGISTRY``. The functions below are what the job
file, the plan, the driver and the read side ask of all the quantities of a job at once:

    >>> from pipeline.quantities.registry import UNITS
    >>> UNITS["trace"].parse({"method": "hutchinson"}, "quantities.trace", ".")
    {'method': 'hutchinson', 'probes': 100}
"""

from __future__ import annotations

import importlib

import numpy as np

from pipeline import cost
from pipeline.curvature.requests import BatchWork
from pipeline.options import check_keys, fail
from pipeline.partial import Partial
from pipeline.quantities._base import Context, PlanFacts, Quantity
from pipeline.reduce import Sums
from pipeline.storage import tables as storage_tables

REGISTRY = ("hessian_diagonal", "ggn_diagonal", "fisher_diagonal", "gradient", "hvp", "trace", "eigenvalues",
            "spectrum", "hessian", "layer_inputs", "kfac", "per_example", "influence")

UNITS: dict[str, Quantity] = {name: importlib.import_module(f"pipeline.quantities.{name}").UNIT for name in REGISTRY}

# Columns of diagonals.parquet any run may have, in their order (the read side's list).
DIAGONAL_COLUMNS = tuple(column for unit in UNITS.values() for column in unit.columns)
# The curvature diagonals a Laplace approximation can use, in laplace-torch's order of preference
# (the GGN first), and the Fisher diagonal, which EWC and Fisher merging weigh by (pipeline/exports).
LAPLACE_CURVATURE = ("ggn_diagonal", "fisher_diagonal", "hessian_diagonal")
FISHER = LAPLACE_CURVATURE[1]
# Per-parameter results ``pipeline.load(...).arrays`` gives in each variable's shape.
ARRAY_QUANTITIES = tuple(name for unit in UNITS.values() for name in unit.columns + unit.vector_tables)
# Files a run may publish: the two shared by the diagonal quantities, then each unit's own.
FILES = ("diagonals.parquet", "summary.parquet") + tuple(f for unit in UNITS.values() for f in unit.files)

__all__ = ["ARRAY_QUANTITIES", "DIAGONAL_COLUMNS", "FISHER", "LAPLACE_CURVATURE", "FILES", "REGISTRY", "UNITS", "Context", "PlanFacts", "Quantity", "estimate",
           "finalize", "main_request", "parse", "tables"]


def _asked(quantities: dict):
    """(unit, options) of each quantity the job asks for, in registry order."""
    return [(unit, quantities[name]) for name, unit in UNITS.items() if name in quantities]


# ------------------------------------------------------------------------------ the job file
def parse(quantities, base_dir: str) -> dict[str, dict]:
    """The job's ``quantities`` mapping, every unit's options checked and filled (file order)."""
    if not isinstance(quantities, dict) or not quantities:
        fail("quantities", "a non-empty mapping", quantities, "write e.g. quantities: {hessian_diagonal: {}, trace: {}}")
    check_keys(quantities, REGISTRY, "quantities")
    return {name: UNITS[name].parse(options, f"quantities.{name}", base_dir) for name, options in quantities.items()}


# ------------------------------------------------------------------------------ the plan
def routes(quantities: dict) -> tuple[str, ...]:
    """The vectorised routes the quantities take (``Quantity.routes``), in ``routes.ROUTES`` order:
    the plan checks these against their loops on the first rows."""
    taken = {name for unit, options in _asked(quantities) for name in unit.routes(options)}
    return tuple(name for name in ("route", "per_example_route") if name in taken)


def per_layer(quantities: dict) -> bool | str:
    """Whether any quantity needs the layers with Kronecker factors (``Quantity.per_layer``):
    True when one cannot do without them, "optional" when they are only used where found."""
    wanted = [unit.per_layer(options) for unit, options in _asked(quantities)]
    return True if True in wanted else ("optional" if "optional" in wanted else False)


def manifest(quantities: dict, results: dict) -> dict:
    """The manifest entries of every quantity with a result (``Quantity.manifest``)."""
    out: dict = {}
    for unit, options in _asked(quantities):
        if unit.name in results:
            out.update(unit.manifest(options, results[unit.name]))
    return out


def notes(quantities: dict, facts: PlanFacts) -> list[str]:
    """The plan's notes of every quantity, each said once."""
    said: list[str] = []
    for unit, options in _asked(quantities):
        said += [note for note in unit.notes(options, facts) if note not in said]
    return said


def prepare(quantities: dict, signature, seed: int) -> dict[str, np.ndarray]:
    """Arrays the quantities read at plan time (``Quantity.prepare``), by quantity name."""
    prepared = {}
    for unit, options in _asked(quantities):
        array = unit.prepare(options, signature, seed)
        if array is not None:
            prepared[unit.name] = array
    return prepared


def estimate(quantities: dict, w: cost.Workload, m: cost.Measurement,
             prepared: dict[str, np.ndarray] | None = None) -> cost.Cost:
    """The run's cost: each quantity's share (job order), combined (``pipeline.cost.combine``)."""
    prepared = prepared or {}
    parts = [UNITS[name].cost(options or {}, w, m, quantities, prepared.get(name))
             for name, options in quantities.items()]
    return cost.combine(parts, w, m)


# ------------------------------------------------------------------------------ the main pass
def main_request(quantities: dict, context: Context) -> BatchWork:
    """One request for every batch of the main pass: all quantities' building blocks, fused
    (the engine shares one forward pass and one gradient among them)."""
    work = BatchWork(gradient=True, seed=context.seed)
    for unit, options in _asked(quantities):
        work = work.merged(**unit.request(options, context))
    return work


def finalize(sums: Sums | Partial, quantities: dict | None = None) -> dict[str, np.ndarray]:
    """``loss`` and the per-parameter results of ``quantities`` from the reduced sums; without
    ``quantities``, of every quantity whose sums are present (for tests of the engine)."""
    if isinstance(sums, Partial):
        sums = Sums(sums)
    results = {"loss": np.asarray(sums.mean("loss"), dtype=np.float64)}
    asked = _asked(quantities) if quantities is not None else [(unit, None) for unit in UNITS.values()]
    for unit, options in asked:
        results.update(unit.finalize(options, sums))
    return results


def compute(quantities: dict, context: Context, operator, sums: Sums) -> dict:
    """Results of the driver-side algorithms (trace, eigenvalues, spectrum; the Hutchinson
    diagonal's probes beyond the main pass), in registry order."""
    out = {}
    for unit, options in _asked(quantities):
        result = unit.compute(options, context, operator, sums)
        if isinstance(result, dict) and unit.columns and set(result) <= set(unit.columns):
            out.update(result)  # per-parameter columns finished over passes of their own
        elif result is not None:
            out[unit.name] = result
    return out


# ------------------------------------------------------------------------------ publishing
def tables(quantities: dict, results: dict, context: Context) -> dict:
    """``{file name: pyarrow.Table}``: ``diagonals.parquet`` and ``summary.parquet`` with one
    column (and standard error) per diagonal quantity, then each quantity's own files."""
    names, shapes = context.signature.variables, context.signature.variable_shapes
    out = {}
    columns = {column: results[column] for unit, _ in _asked(quantities) for column in unit.columns
               if column in results}
    if columns:
        out["diagonals.parquet"] = storage_tables.diagonals_table(names, shapes, columns)
        summary = {unit.columns[0]: results[unit.columns[0]] for unit, _ in _asked(quantities)
                   if unit.columns and unit.columns[0] in results}
        out["summary.parquet"] = storage_tables.summary_table(names, shapes, summary)
    for unit, options in _asked(quantities):
        if unit.name in results and unit.files:
            out.update(unit.tables(options, results[unit.name], context))
    return out

