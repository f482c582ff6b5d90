"""``trace``: ``tr(H)``.

- ``method: exact``: the sum of the exact diagonal (its P basis-vector HVPs per batch, shared
  with ``hessian_diagonal: {method: exact}`` when both are asked);
- ``method: hutchinson``: ``mean_k z_k^T H z_k`` over ``probes`` Rademacher probes (Hutchinson,
  1989), in passes of up to 64 probes;
- ``method: hutch++``: Hutch++ (Meyer, Musco, Musco and Woodruff, 2021): a third of the
  products sketch the top of the spectrum exactly, the rest estimate the remainder.

Every estimate comes with its standard error (0 when exact) and its count of products.
"""

from __future__ import annotations

from pipeline import cost, spectrum
from pipeline.options import Option, choice, positive_int
from pipeline.quantities._base import Quantity
from pipeline.quantities.hessian_diagonal import exact_diagonal_notes, loop_notes
from pipeline.spectrum.trace import MAX_BLOCK
from pipeline.storage import tables


class Trace(Quantity):
    name = "trace"
    help = "trace of H"
    options = {
        "method": Option(choice("exact", "hutchinson", "hutch++", example="hutch++"), "hutch++",
                         "exact, hutchinson or hutch++"),
        "probes": Option(positive_int(100), 100, "matrix-vector products to spend"),
    }
    files = ("trace.parquet",)

    def per_parameter(self, options):
        return options["method"] == "exact"

    def notes(self, options, facts):
        return loop_notes(facts) + (exact_diagonal_notes(facts) if options["method"] == "exact" else [])

    def cost(self, options, w, m, asked, prepared=None):
        method, probes = options["method"], int(options["probes"])
        if method == "exact":
            if (asked.get("hessian_diagonal") or {}).get("method") == "exact":
                return cost.QuantityCost(self.name)  # the diagonal's products, counted there
            main, held = cost.exact_diagonal(w, m)
            return cost.QuantityCost(self.name, main=main, worker_bytes=held)
        block = min(probes, MAX_BLOCK)
        return cost.QuantityCost(self.name, passes=spectrum.trace_passes(method, probes), vectors=block,
                                 worker_bytes=cost.vector_bytes(w, block),
                                 driver_bytes=3 * 8 * probes * w.parameters + 4 * 8 * block * w.parameters)

    def request(self, options, context):
        return {"hessian_diagonal": "exact"} if options["method"] == "exact" else {}

    def compute(self, options, context, operator, sums):
        method = options["method"]
        if method == "exact":
            result = spectrum.exact_trace(sums.mean("hessian_diagonal"))
        elif method == "hutchinson":
            result = spectrum.hutchinson_trace(operator, context.parameters, options["probes"], context.seed)
        else:
            result = spectrum.hutchpp_trace(operator, context.parameters, options["probes"], context.seed)
        context.say(f"trace ({method}): {result.estimate:.6g} +- {result.stderr:.2g}")
        return result

    def tables(self, options, result, context):
        return {"trace.parquet": tables.trace_table(result.method, result.estimate, result.stderr, result.matvecs)}


UNIT = Trace()
