"""``fisher_diagonal``: the empirical Fisher diagonal ``(1/N) sum_i s_i g_i**2``.

``g_i`` is the gradient of example i's own loss (CONTRACT.md section 1); the sum is the engine's
``sum_grad_squared`` building block (BackPACK's ``SumGradSquared``): by per-layer rules
(``pipeline.curvature.layer_rules``: the layer's inputs times its output gradients, from the
same backward pass as the gradient) where a layer has one, by per-example vector-Jacobian
products ``J_i^T dl_i/df`` vectorised over the batch elsewhere. About 2 gradients per batch on
CPU with rules for every variable (engine_bench: 2.3x an MLP's plain gradient), about 1 + 4
without. Defined over the data loss only: no regularization term.
"""

from __future__ import annotations

from pipeline import cost
from pipeline.quantities._base import Quantity
from pipeline.quantities.ggn_diagonal import per_example_notes


class FisherDiagonal(Quantity):
    name = "fisher_diagonal"
    help = "empirical Fisher diagonal (1/N) sum g_i**2; no options"
    columns = ("fisher_diagonal",)
    label, color, line_width = "Fisher", "#2ca02c", 1.4

    def routes(self, options):
        return ("per_example_route",)

    def notes(self, options, facts):
        return per_example_notes(facts)

    def cost(self, options, w, m, asked, prepared=None):
        main, held = cost.per_example(w, m, 1)
        return cost.QuantityCost(self.name, main=main, worker_bytes=held, driver_bytes=cost.diagonal_driver_bytes(w))

    def request(self, options, context):
        return {"sum_grad_squared": True}

    def finalize(self, options, sums):
        return {"fisher_diagonal": sums.mean("sum_grad_squared")} if "sum_grad_squared" in sums else {}


UNIT = FisherDiagonal()
