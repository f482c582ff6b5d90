"""``spectrum``: the spectral density of H by stochastic Lanczos quadrature (Ghorbani, Krishnan
and Xiao, 2019): ``runs`` Lanczos runs of ``steps`` steps from Rademacher starts, all runs side
by side, one pass over the data per step (``runs`` HVPs per batch). Published as quadrature
nodes and weights per run (a run's weights sum to 1); ``report`` draws the smoothed density.
"""

from __future__ import annotations

from pipeline import cost, spectrum
from pipeline.options import Option, positive_int
from pipeline.quantities._base import Quantity
from pipeline.storage import tables


class Spectrum(Quantity):
    name = "spectrum"
    help = "spectral density of H (stochastic Lanczos quadrature)"
    options = {
        "runs": Option(positive_int(4), 4, "stochastic Lanczos quadrature runs"),
        "steps": Option(positive_int(64), 64, "Lanczos steps per run"),
    }
    files = ("spectrum.parquet",)

    def cost(self, options, w, m, asked, prepared=None):
        runs, steps = int(options["runs"]), int(options["steps"])
        return cost.QuantityCost(self.name, passes=steps, vectors=runs, worker_bytes=cost.vector_bytes(w, runs),
                                 driver_bytes=8 * runs * steps * w.parameters + 6 * 8 * runs * w.parameters)

    def compute(self, options, context, operator, sums):
        size = context.parameters
        return spectrum.spectral_density(operator, size, runs=options["runs"], steps=min(options["steps"], size),
                                         seed=context.seed)

    def tables(self, options, result, context):
        return {"spectrum.parquet": tables.spectrum_table(result.nodes, result.weights)}


UNIT = Spectrum()
