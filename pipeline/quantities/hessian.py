"""``hessian``: dense blocks of the Hessian ``H = d2L/dw2`` (contract 5.2), the seed article's
third recipe.

- ``blocks: full``: one block, ``H`` over all selected parameters (``"__all__"``);
- ``blocks: variable``: one block per variable, ``H_vv`` (named by the variable's path);
- ``blocks: layer``: one block per Keras layer, its selected variables together (named by the
  layer's path, the variable path without its last part).

A block of ``b`` parameters costs ``b`` Hessian-vector products with basis vectors per batch
(vectorised like the exact diagonal) and ``b x b`` float64 sums per worker and in the driver,
added across shards like every other sum. The float64 total is symmetrised once,
``(H + H^T) / 2``; the raw asymmetry (float rounding) is reported on the plan's log. A block
larger than ``max_parameters`` is refused at plan time with its size and memory.
Published as ``hessian.parquet``: one row per (block, parameter), ``row`` = that parameter's
row of the block, columns in the block's flat order.
"""

from __future__ import annotations

import numpy as np

from pipeline import cost
from pipeline.errors import InputError
from pipeline.memory import gib
from pipeline.options import Option, choice, positive_int
from pipeline.quantities._base import Quantity
from pipeline.storage import tables

ALL = "__all__"


def blocks(kind: str, names) -> list[tuple[str, tuple[int, ...]]]:
    """``(block name, positions of its variables)`` in model order, for ``blocks: kind``."""
    if kind == "full":
        return [(ALL, tuple(range(len(names))))]
    if kind == "variable":
        return [(name, (i,)) for i, name in enumerate(names)]
    grouped: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        grouped.setdefault(name.rsplit("/", 1)[0] if "/" in name else name, []).append(i)
    return [(layer, tuple(members)) for layer, members in grouped.items()]


class Hessian(Quantity):
    name = "hessian"
    help = "dense Hessian blocks: full, per variable or per layer"
    options = {
        "blocks": Option(choice("full", "variable", "layer"), "full",
                         "full (one block), variable (one per variable) or layer (one per Keras layer)"),
        "max_parameters": Option(positive_int(10000), 10000, "largest block allowed, in parameters"),
    }
    files = ("hessian.parquet",)

    def per_parameter(self, options):
        return True

    def _sizes(self, options, signature) -> list[tuple[str, tuple[int, ...], int]]:
        sizes = [int(np.prod(shape, dtype=np.int64)) for shape in signature.variable_shapes]
        return [(name, members, sum(sizes[i] for i in members))
                for name, members in blocks(options["blocks"], signature.variables)]

    def prepare(self, options, signature, seed):
        """The blocks' sizes (for the cost), after refusing a block over ``max_parameters``."""
        sizes = self._sizes(options, signature)
        for name, _, size in sizes:
            if size > options["max_parameters"]:
                raise InputError(
                    f"quantities.hessian: block {name!r} has {size:,} parameters, more than max_parameters="
                    f"{options['max_parameters']:,} (its float64 sums alone take {gib(8.0 * size * size)} per "
                    f"worker and in the driver): use hessian: {{blocks: variable}} or layer, select fewer "
                    "parameters with variables:, or raise quantities.hessian.max_parameters")
        return np.array([size for _, _, size in sizes], dtype=np.int64)

    def cost(self, options, w, m, asked, prepared=None):
        sizes = np.asarray(prepared if prepared is not None else [w.parameters], dtype=np.float64)
        largest = float(sizes.max())
        # One basis-vector HVP per parameter of a block, vectorised like the exact diagonal.
        main = float(sizes.sum()) * cost.HVP_GRADIENTS / cost.DIAGONAL_VECTORISATION + \
            float(np.ceil(sizes / max(1, w.diagonal_block)).sum())
        squares = 8.0 * float((sizes * sizes).sum())
        held = squares * cost.WORKER_VECTOR_COPIES + \
            min(w.diagonal_block, largest) * (m.activation_bytes + 2 * largest * w.itemsize)
        # The running sum, an arriving partial, staging's copy, the symmetrised matrix, the table.
        return cost.QuantityCost(self.name, main=main, worker_bytes=held, driver_bytes=6 * squares)

    def request(self, options, context):
        return {"hessian_blocks": tuple(members for _, members in blocks(options["blocks"],
                                                                         context.signature.variables))}

    def compute(self, options, context, operator, sums):
        """Each block's mean, symmetrised; the raw asymmetry (float rounding) said per block."""
        named = blocks(options["blocks"], context.signature.variables)
        out = []
        for number, (name, _) in enumerate(named):
            raw = sums.mean(f"hessian_block_{number}")
            asymmetry = float(np.abs(raw - raw.T).max()) / max(float(np.abs(raw).max()), 1e-300)
            context.say(f"hessian block {name}: {raw.shape[0]:,} parameters, raw asymmetry {asymmetry:.1e} "
                        "(relative; published symmetrised)")
            out.append((number, (raw + raw.T) / 2, asymmetry))
        return out

    def tables(self, options, result, context):
        signature = context.signature
        named = blocks(options["blocks"], signature.variables)
        parts = []
        for number, matrix, asymmetry in result:
            name, members = named[number]
            parts.append((name, [signature.variables[i] for i in members],
                          [signature.variable_shapes[i] for i in members], matrix))
        return {"hessian.parquet": tables.hessian_table(parts)}


UNIT = Hessian()
