"""``gradient``: ``dL/dw = (1/N) sum_i s_i g_i`` (plus the regularization's gradient), one column
of ``diagonals.parquet``. Costs nothing beyond the main pass's own gradient."""

from __future__ import annotations

from pipeline import cost
from pipeline.quantities._base import Quantity


class Gradient(Quantity):
    name = "gradient"
    help = "dL/dw; no options"
    columns = ("gradient",)

    def cost(self, options, w, m, asked, prepared=None):
        return cost.QuantityCost(self.name, worker_bytes=3 * 8 * w.parameters,
                                 driver_bytes=cost.diagonal_driver_bytes(w))

    def request(self, options, context):
        return {"gradient": True}

    def finalize(self, options, sums):
        return {"gradient": sums.mean("gradient")} if "gradient" in sums else {}


UNIT = Gradient()
