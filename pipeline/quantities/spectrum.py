"""``spectrum``: the spectral density of H by stochastic Lanczos quadrature (Ghorbani, Krishnan
and Xiao, 2019): ``runs`` Lanczos runs of ``steps`` steps from Rademacher starts, all runs side
by side, one pass over the data per step (``runs`` HVPs per batch). Published as quadrature
nodes and weights per run (a run's weights sum to 1); ``report`` draws the smoothed density.

``blocks: variable | layer`` (contract 5.3): the density of every diagonal block ``H_bb`` (one per
variable or per Keras layer), the blocks' runs side by side in the same passes
(``pipeline.spectrum.side_by_side``).
"""

from __future__ import annotations

from pipeline import blocks, spectrum
from pipeline.options import Option, positive_int
from pipeline.quantities._base import Quantity, per_block, per_block_cost
from pipeline.storage import tables


class Spectrum(Quantity):
    name = "spectrum"
    help = "spectral density of H (stochastic Lanczos quadrature)"
    options = {
        "runs": Option(positive_int(4), 4, "stochastic Lanczos quadrature runs"),
        "steps": Option(positive_int(64), 64, "Lanczos steps per run"),
        "blocks": blocks.OPTION,
    }
    files = ("spectrum.parquet",)

    def cost(self, options, w, m, asked, prepared=None):
        runs, steps = int(options["runs"]), int(options["steps"])
        return per_block_cost(self.name, options, w, m, lambda size: (
            min(steps, size), runs, 8 * runs * min(steps, size) * size + 6 * 8 * runs * size))

    def compute(self, options, context, operator, sums):
        return per_block(options, context, operator, lambda block: spectrum.spectral_density_steps(
            block.size, runs=options["runs"], steps=min(options["steps"], block.size), seed=context.seed))

    def tables(self, options, result, context):
        return {"spectrum.parquet": tables.spectrum_table([(block.name, r.nodes, r.weights) for block, r in result])}


UNIT = Spectrum()
