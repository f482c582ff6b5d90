"""``hessian``: dense blocks of the Hessian ``H = d2L/dw2`` (contract 5.2), the seed article's
third recipe.

- ``blocks: full``: one block, ``H`` over all selected parameters (``"__all__"``);
- ``blocks: variable``: one block per variable, ``H_vv`` (named by the variable's path);
- ``blocks: layer``: one block per Keras layer, its selected variables together (named by the
  layer's path, the variable path without its last part); see ``pipeline.blocks``.

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

from pipeline import blocks, cost
from pipeline.errors import InputError
from pipeline.memory import gib
from pipeline.options import Option, positive_int
from pipeline.quantities._base import Quantity
from pipeline.quantities.hessian_diagonal import loop_notes
from pipeline.storage import tables


class Hessian(Quantity):
    name = "hessian"
    help = "dense Hessian blocks: full, per variable or per layer"
    options = {
        "blocks": blocks.OPTION,
        "max_parameters": Option(positive_int(10000), 10000, "largest block allowed, in parameters"),
    }
    files = ("hessian.parquet",)

    def routes(self, options):
        return ("route",)

    def notes(self, options, facts):
        return loop_notes(facts)

    def prepare(self, options, signature, seed):
        """Refuses a block over ``max_parameters`` at plan time (nothing to read: returns None)."""
        for block in blocks.of(options["blocks"], signature.variables, signature.variable_shapes):
            name, size = block.name, block.size
            if size > options["max_parameters"]:
                raise InputError(
                    f"quantities.hessian: block {name!r} has {size:,} parameters, more than max_parameters="
                    f"{options['max_parameters']:,} (its float64 sums alone take {gib(8.0 * size * size)} per "
                    f"worker and in the driver): use hessian: {{blocks: variable}} or layer, select fewer "
                    "parameters with variables:, or raise quantities.hessian.max_parameters")
        return None

    def cost(self, options, w, m, asked, prepared=None):
        named = blocks.of(options["blocks"], w.variables, w.variable_shapes) if w.variables else []
        # A workload without its variables (cost arithmetic alone): one block of all of H.
        sizes = np.array([block.size for block in named] or [w.parameters], dtype=np.float64)
        largest = float(sizes.max())
        # One basis-vector HVP per parameter of a block, vectorised like the exact diagonal.
        main = float(sizes.sum()) * cost.HVP_GRADIENTS / cost.DIAGONAL_VECTORISATION + \
            float(np.ceil(sizes / max(1, w.diagonal_block)).sum())
        squares = 8.0 * float((sizes * sizes).sum())
        held = squares * cost.WORKER_VECTOR_COPIES + \
            min(w.diagonal_block, largest) * (m.activation_bytes + 2 * largest * w.itemsize)
        # The running sum, an arriving partial, staging's copy, the symmetrised matrix, the table.
        return cost.QuantityCost(self.name, main=main, worker_bytes=held, driver_bytes=6 * squares,
                                 blocks=tuple(cost.BlockCost(block.name, block.size, block.size,
                                                             6 * 8.0 * block.size ** 2) for block in named)
                                 if len(named) > 1 else (),
                                 remedy=("set quantities.hessian.blocks=layer (one block per layer) or narrow "
                                         "variables: to the layers you need") if options.get("blocks", "full") == "full"
                                 else "narrow variables: to the layers you need")

    def request(self, options, context):
        return {"hessian_blocks": tuple(block.members for block in context.blocks(options["blocks"]))}

    def compute(self, options, context, operator, sums):
        """Each block's mean, symmetrised; the raw asymmetry (float rounding) said per block."""
        out = []
        for number, block in enumerate(context.blocks(options["blocks"])):
            name = block.name
            raw = sums.mean(f"hessian_block_{number}")
            asymmetry = float(np.abs(raw - raw.T).max()) / max(float(np.abs(raw).max()), 1e-300)
            context.say(f"hessian block {name}: {raw.shape[0]:,} parameters, raw asymmetry {asymmetry:.1e} "
                        "(relative; published symmetrised)")
            out.append((number, (raw + raw.T) / 2, asymmetry))
        return out

    def tables(self, options, result, context):
        named = context.blocks(options["blocks"])
        parts = [(named[number].name, named[number].variables, named[number].shapes, matrix)
                 for number, matrix, _ in result]
        return {"hessian.parquet": tables.hessian_table(parts)}


UNIT = Hessian()
