"""``trace``: ``tr(H)``.

- ``method: exact``: the sum of the exact diagonal (its P basis-vector HVPs per batch, shared
  with ``hessian_diagonal: {method: exact}`` when both are asked);
- ``method: hutchinson``: ``mean_k z_k^T H z_k`` over ``probes`` Rademacher probes (Hutchinson,
  1989), in passes of up to 64 probes;
- ``method: hutch++``: Hutch++ (Meyer, Musco, Musco and Woodruff, 2021): a third of the
  products sketch the top of the spectrum exactly, the rest estimate the remainder.

Every estimate comes with its standard error (0 when exact) and its count of products.

``blocks: variable | layer`` (contract 5.3): ``tr(H_bb)`` of every diagonal block (one per
variable or per Keras layer), the blocks' estimators side by side in the same passes
(``pipeline.spectrum.side_by_side``); the exact one sums the block's part of the diagonal.
"""

from __future__ import annotations

from pipeline import blocks, cost, spectrum
from pipeline.errors import InputError
from pipeline.options import Option, choice, positive_int
from pipeline.quantities._base import Quantity, per_block, per_block_cost
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
        "blocks": blocks.OPTION,
    }
    files = ("trace.parquet",)

    def parse(self, options, where, base_dir):
        parsed = super().parse(options, where, base_dir)
        if parsed["method"] == "hutch++" and parsed["probes"] < 3:
            raise InputError(f"{where}.probes: hutch++ needs at least 3 products (a third sketch the top of the "
                             f"spectrum), got {parsed['probes']}: use probes: 3 or more, or method: hutchinson")
        return parsed

    def routes(self, options):
        return ("route",) if options["method"] == "exact" else ()

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
        return per_block_cost(self.name, options, w, m, lambda size: (
            spectrum.trace_passes(method, probes), block, 3 * 8 * probes * size + 4 * 8 * block * size))

    def request(self, options, context):
        return {"hessian_diagonal": "exact"} if options["method"] == "exact" else {}

    def compute(self, options, context, operator, sums):
        method = options["method"]
        if method == "exact":
            diagonal = sums.mean("hessian_diagonal")
            shapes = context.signature.variable_shapes
            results = [(block, spectrum.exact_trace(diagonal[blocks.positions(block, shapes)]))
                       for block in context.blocks(options.get("blocks", "full"))]
        else:
            steps = spectrum.hutchinson_steps if method == "hutchinson" else spectrum.hutchpp_steps
            results = per_block(options, context, operator,
                                lambda block: steps(block.size, options["probes"], context.seed))
        for block, result in results:
            where = "" if block.name == blocks.ALL else f" of block {block.name}"
            context.say(f"trace{where} ({method}): {result.estimate:.6g} +- {result.stderr:.2g}")
        return results

    def tables(self, options, result, context):
        return {"trace.parquet": tables.trace_table([(block.name, r.method, r.estimate, r.stderr, r.matvecs)
                                                     for block, r in result])}


UNIT = Trace()
