"""``per_example``: one row per example of the dataset (contract 7.1), written by the workers as
they go into the run's ``per_example/`` folder (``part-SSSSS.parquet``, one per shard):

    row, file, file_row, id, weight (s_i), loss (l_i), gradient_norm (|g_i|), projection (Phi g_i)

``l_i`` is contract 1's (a masked sequence's masked sum), unweighted; ``g_i`` its gradient over
the selected variables. ``projection: k`` adds ``Phi g_i`` (``pipeline.influence.projection``:
Kronecker-structured per factored layer, dense Gaussian for the other variables, ``E[Phi^T Phi]
= I``, drawn from ``seed`` alone), stored as float32 or float16 (``projection_dtype``).

Cost: one more pass over the data after the others (``pipeline.rows_pass``), about a gradient
per batch plus per-example gradients of the variables in no factored layer (``B x P_rest``) and
the projection's products; disk ``rows x (48 + k x bytes)`` bytes before compression. A resumed
run keeps the parts of the shards it finished. Sources: Park et al. (2023), TRAK; Choe et al.
(2024), LoGra.
"""

from __future__ import annotations

from pipeline import cost
from pipeline.influence import projection as projections
from pipeline.influence.layout import Layout
from pipeline.memory import gib
from pipeline.options import Option, choice, non_negative_int
from pipeline.quantities._base import Quantity

#: The folder of parts in a run, and a part's name.
FOLDER = "per_example"
#: Bytes of a row's fixed columns (row, file_row, weight, loss, gradient_norm, self_influence).
ROW_BYTES = 48


def part_name(shard: int) -> str:
    return f"{FOLDER}/part-{shard:05d}.parquet"


class PerExample(Quantity):
    name = "per_example"
    help = "one row per example: loss, gradient norm, optional projected gradient (per_example/)"
    options = {
        "projection": Option(non_negative_int(0), 0, "k: store Phi g_i, k numbers per example (0: none)"),
        "projection_dtype": Option(choice("float32", "float16"), "float32", "storage type of the projection"),
        "seed": Option(non_negative_int(0), 0, "seed of the projection Phi"),
    }
    # Its outputs are a folder of parts the workers write (``rows_pass``), not tables built here.
    files = (FOLDER + "/",)

    def per_layer(self, options):
        return "optional" if options["projection"] > 0 else False

    def notes(self, options, facts):
        k = options["projection"]
        disk = f"{gib(self.disk_bytes(options, facts.rows))} on disk for {facts.rows:,} rows (before compression)"
        if not k:
            return [f"{self.name}: loss and gradient norm of each example, one part per shard; {disk}"]
        layout = Layout.of(tuple(facts.variable_sizes), _shapes(facts), facts.factor_layers)
        shares = projections.shares(layout, k)
        shown = ", ".join(f"{s.name} {s.k_in}x{s.k_out}" if s.k_out > 1 else f"{s.name} {s.k}" for s in shares)
        return [f"{self.name}: projection of {k:,} ({options['projection_dtype']}) per example: {shown} "
                f"(Phi: +{gib(projections.bytes_held(layout, k))} per worker); {disk}"]

    def cost(self, options, w, m, asked, prepared=None):
        k = options["projection"]
        layout = Layout.of(w.variables, w.variable_shapes, w.factor_layers) if w.variables else None
        held = projections.bytes_held(layout, k) if (k and layout is not None) else 0.0
        rest = layout.rest_size if layout is not None else w.parameters
        # The rows pass is the influence unit's when both are asked (one pass writes both).
        passes = 0 if "influence" in asked else 1
        return cost.QuantityCost(self.name, passes=passes,
                                 main=0.0 if passes == 0 else min(3.0, rest / max(1.0, w.parameters) * 3.0),
                                 worker_bytes=held + 8.0 * w.batch_size * (rest + k),
                                 driver_bytes=0.0)

    def disk_bytes(self, options, rows: int) -> float:
        """Bytes of ``per_example/`` before compression."""
        width = 4 if options["projection_dtype"] == "float32" else 2
        return rows * (ROW_BYTES + options["projection"] * width)


def _shapes(facts) -> list[tuple[int, ...]]:
    """The variables' shapes (flat ones where the facts give only sizes: they suffice)."""
    return list(facts.variable_shapes) or [(size,) for size in facts.variable_sizes.values()]


UNIT = PerExample()
