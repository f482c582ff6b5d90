"""The ``Quantity`` unit: everything about one quantity in one place.

A unit owns its job options and their checks, its plan-time cost, what it asks the engine to
sum over each batch of the main pass, how its sums become results, any driver-side algorithm
(the spectral ones, each product with ``H`` a pass over the data), and the columns and files it
publishes. The driver only walks the registry (``pipeline/quantities/registry.py``).

The idea is optax's ``GradientTransformation``: one small protocol that everything implements
and that composes. NumPy only here; tables are built by ``pipeline.storage.tables``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

import numpy as np

from pipeline import blocks, spectrum
from pipeline.cost import BlockCost, Measurement, QuantityCost, Workload, vector_bytes
from pipeline.errors import InputError
from pipeline.options import Option, check_keys, show
from pipeline.reduce import Sums
from pipeline.signature import ModelSignature


@dataclass(frozen=True)
class PlanFacts:
    """What the plan found on the first rows that a unit's notes may mention."""

    parameters: int
    batches: int
    route: str | None  # exact diagonal: "vectorised" | "loop"
    per_example_route: str | None  # Fisher/GGN products: "vectorised" | "loop"
    # Fisher/GGN products per variable: "layer rule" | "per-example" ({} when not decided).
    layer_routes: dict = field(default_factory=dict)
    variable_sizes: dict = field(default_factory=dict)  # entries per variable name
    # Per route ("route", "per_example_route"): its check against the loop on the first rows.
    route_checks: dict = field(default_factory=dict)
    # Layers with Kronecker factors: (path, d_in, d_out, positions per example, bias).
    factor_layers: tuple = ()
    # Whether the loss has a predictive distribution to draw labels from (Monte Carlo methods).
    predictive: bool = True
    rows: int = 0  # rows of the dataset (the per-example outputs' size)
    variable_shapes: tuple = ()  # the selected variables' shapes, in variable_sizes' order


@dataclass
class Context:
    """What a unit sees while a run computes and publishes."""

    signature: ModelSignature
    seed: int
    # Arrays prepared at plan time, by quantity name (``Quantity.prepare``): the HVP vectors.
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    log: TextIO | None = None
    # A series of checkpoints: the previous checkpoint's Ritz vectors by block of H ([k, block
    # size]), Lanczos' start block (``eigenvalues``); empty otherwise.
    warm_start: dict[str, np.ndarray] = field(default_factory=dict)
    # The plan's factored layers, ``(path, d_in, d_out, positions, bias)`` (``Workload.factor_layers``).
    factor_layers: tuple = ()

    @property
    def parameters(self) -> int:
        return self.signature.parameters

    def say(self, line: str) -> None:
        if self.log is not None:
            self.log.write(line + "\n")

    def blocks(self, kind: str) -> list[blocks.Block]:
        """The diagonal blocks of ``blocks: kind`` over the selected variables."""
        return blocks.of(kind, self.signature.variables, self.signature.variable_shapes)


class Quantity:
    """One curvature quantity. Subclasses set the class attributes and override what applies.

    ``columns``: its columns of ``diagonals.parquet`` (a value, then its standard error), the
    first one also summarised in ``summary.parquet``; ``files``: its own result files, of which
    ``vector_tables`` hold per-parameter vectors that ``pipeline.load`` reads back as arrays.
    """

    name: str = ""
    help: str = ""
    options: dict[str, Option] = {}
    columns: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    vector_tables: tuple[str, ...] = ()  # its files of [K, P] vectors in the long layout (hvp)
    label: str = ""  # its short name in plots (a curvature diagonal's)
    color: str = ""  # its colour in plots
    line_width: float = 1.4  # its line width in plots

    # -------------------------------------------------------------------- the job file
    def parse(self, options: Any, where: str, base_dir: str) -> dict:
        """The options as written (``None`` for ``{}``) -> every option checked, defaults filled."""
        options = self._mapping(options, where)
        check_keys(options, tuple(self.options), where)
        return {option: spec.check(options.get(option, spec.default), f"{where}.{option}")
                for option, spec in self.options.items()}

    def _mapping(self, options: Any, where: str) -> dict:
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise InputError(f"{where} must be a mapping of options (or {{}}), got {show(options)}: "
                             f"write e.g. {self.name}: {{}}")
        if not self.options and options:
            raise InputError(f"{where} takes no options, got {show(options)}: write {self.name}: {{}}")
        return options

    # -------------------------------------------------------------------- the plan
    def per_layer(self, options: dict) -> bool | str:
        """Whether it needs the layers with Kronecker factors (the plan finds them, with their
        widths and positions, on the first rows: ``Workload.factor_layers``); "optional" when it
        uses them where the model has them and works without."""
        return False

    def manifest(self, options: dict, result: Any) -> dict:
        """Entries it adds to the run's manifest (``result``: what ``finalize`` gave under its name)."""
        return {}

    def routes(self, options: dict) -> tuple[str, ...]:
        """The vectorised routes its products take (``curvature.routes.ROUTES``): "route" for
        the exact family's rows of H, "per_example_route" for per-example products. The plan
        checks each against its loop on the first rows and decides the layer rules."""
        return ()

    def notes(self, options: dict, facts: PlanFacts) -> list[str]:
        """Lines the plan prints about this quantity."""
        return []

    def prepare(self, options: dict, signature: ModelSignature, seed: int) -> np.ndarray | None:
        """An array it reads at plan time, before the cost is estimated (the HVP vectors of a
        file); it reaches ``request`` and ``tables`` as ``context.inputs[name]``."""
        return None

    def cost(self, options: dict, w: Workload, m: Measurement, asked: dict,
             prepared: np.ndarray | None = None) -> QuantityCost:
        """Its share of the run's passes, time and memory (``pipeline.cost``); ``asked`` is every
        quantity of the job (a unit that shares another's products counts them once);
        ``prepared`` what its ``prepare`` returned."""
        return QuantityCost(self.name)

    # -------------------------------------------------------------------- the main pass
    def request(self, options: dict, context: Context) -> dict:
        """``BatchWork`` fields it asks the engine for on every batch of the main pass."""
        return {}

    def finalize(self, options: dict | None, sums: Sums) -> dict[str, np.ndarray]:
        """Its results from the reduced sums (``options`` None: whatever the sums hold, for tests
        of the engine): its ``columns``, and/or its own result under its ``name``, which
        ``tables`` then publishes."""
        return {}

    # -------------------------------------------------------------------- after the main pass
    def compute(self, options: dict, context: Context, operator, sums: Sums) -> Any:
        """A driver-side algorithm over ``operator`` (``V [K, P] -> (H V^T)^T``, one pass over
        the data per call); its result (kept under its ``name``) is published by ``tables``. A
        unit with ``columns`` may instead return ``{column: [P] array}`` (its diagonal, finished
        over passes of its own), which joins ``diagonals.parquet`` like ``finalize``'s."""
        return None

    # -------------------------------------------------------------------- publishing
    def tables(self, options: dict, result: Any, context: Context) -> dict:
        """``{file name: pyarrow.Table}`` of its own ``files``, from ``result`` (what ``finalize``
        or ``compute`` returned under its ``name``); built by ``pipeline.storage.tables``."""
        return {}

    # -------------------------------------------------------------------- reading back
    def arrays_in(self, run) -> list[str]:
        """Names of the per-parameter results it published in ``run`` (a ``pipeline.read.run.Run``)."""
        return [c for c in self.columns if c in run.diagonal_columns] + \
            [f for f in self.vector_tables if run.has(f)]

    def read_array(self, run, name: str) -> np.ndarray:
        """One of them, flat in parameter order: ``[P]`` (a column of ``diagonals.parquet``) or
        ``[K, P]`` (a file of vectors in the long layout, rows ordered by vector, variable, index)."""
        if name in self.columns:
            return run.diagonals[name].to_numpy(np.float64)
        frame = run.table(name)
        order = {variable: k for k, (variable, _) in enumerate(run.variables)}
        frame = frame.assign(_owner=frame["variable"].map(order)).sort_values(["vector", "_owner", "index"],
                                                                               kind="stable")
        return frame["value"].to_numpy(np.float64).reshape(frame["vector"].nunique(), -1)


# ---------------------------------------------------------------------- per block of H
# ``eigenvalues``, ``trace`` and ``spectrum`` take ``blocks: full | variable | layer`` (contract
# 5.3): the same algorithm on every diagonal block H_bb, side by side in the same passes.

def per_block(options: dict, context: Context, operator,
              steps_of: Callable[[blocks.Block], spectrum.Steps]) -> list[tuple[blocks.Block, Any]]:
    """``(block, result)`` of the algorithm ``steps_of(block)`` (step by step, sized to the
    block) on each block of ``options["blocks"]``, all in the same passes over the data
    (``pipeline.spectrum.side_by_side``); one block, ``"__all__"``, for ``blocks: full``."""
    named = context.blocks(options.get("blocks", "full"))
    shapes = context.signature.variable_shapes
    results = spectrum.side_by_side([steps_of(block) for block in named],
                                    [blocks.positions(block, shapes) for block in named],
                                    operator, context.parameters)
    return list(zip(named, results))


def per_block_cost(name: str, options: dict, w: Workload, m: Measurement,
                   one: Callable[[int], tuple[int, int, float]]) -> QuantityCost:
    """A quantity run per block: ``one(size) -> (passes, vectors per pass, driver bytes)`` of its
    algorithm on one block of ``size`` parameters. The blocks share passes (the most any of them
    takes) and each pass carries all their vectors, embedded in the P parameters."""
    if w.variables:
        named = blocks.of(options.get("blocks", "full"), w.variables, w.variable_shapes)
        sizes = [(block.name, block.size) for block in named]
    else:  # a workload without its variables (cost arithmetic alone): all of H
        sizes = [(blocks.ALL, w.parameters)]
    parts = [(block, size, *one(size)) for block, size in sizes]
    vectors = sum(count for _, _, _, count, _ in parts)
    driver = sum(held for *_, held in parts)
    if len(parts) > 1:  # the embedded vectors and their products, [vectors, P], twice over
        driver += 3 * 8.0 * vectors * w.parameters
    return QuantityCost(name, passes=max(passes for _, _, passes, _, _ in parts), vectors=vectors,
                        worker_bytes=vector_bytes(w, m, vectors), driver_bytes=driver,
                        blocks=tuple(BlockCost(block, size, count, held) for block, size, _, count, held in parts)
                        if len(parts) > 1 else ())
