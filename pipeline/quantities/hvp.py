"""``hvp``: Hessian-vector products ``H v_k`` over the whole dataset.

The vectors are a Parquet file in the layout of ``hvp.parquet`` (``vectors``: every parameter of
every vector present, checked when the plan reads it) or ``random`` Rademacher vectors drawn
from ``(seed, k)`` (published as ``hvp_vectors.parquet``). Reverse-over-reverse in the engine:
one persistent tape per block of 16 vectors, then one backward pass per vector, about
1.5 gradients per vector and batch; K x P float64 sums per worker and in the driver.
"""

from __future__ import annotations

from pipeline import cost
from pipeline.errors import InputError
from pipeline.options import MISSING, Option, check_keys, column_name, positive_int, resolved_path
from pipeline.probes import HVP_STREAM, rademacher
from pipeline.quantities._base import Quantity
from pipeline.storage import tables


class Hvp(Quantity):
    name = "hvp"
    help = "Hessian-vector products; exactly one of vectors or random"
    # Checked by ``parse`` (the two options exclude each other and vectors is a path): the
    # entries here document them.
    options = {
        "vectors": Option(column_name, MISSING, "Parquet file of vectors (layout of hvp.parquet)"),
        "random": Option(positive_int(4), MISSING, "number of random Rademacher vectors"),
    }
    files = ("hvp.parquet", "hvp_vectors.parquet")
    vector_tables = ("hvp", "hvp_vectors")

    def parse(self, options, where, base_dir):
        options = self._mapping(options, where)
        check_keys(options, tuple(self.options), where)
        # A null counts as absent, so --set quantities.hvp.vectors=null --set ...random=4 switches.
        given = [k for k in ("vectors", "random") if options.get(k) is not None]
        if len(given) != 1:
            problem = "takes either vectors or random, not both" if given else "needs vectors or random"
            raise InputError(f"{where} {problem}: write e.g. hvp: {{vectors: vectors.parquet}} or hvp: {{random: 4}}")
        if given == ["vectors"]:
            return {"vectors": resolved_path(base_dir, "a Parquet file of vectors")(options["vectors"],
                                                                                    f"{where}.vectors")}
        return {"random": self.options["random"].check(options["random"], f"{where}.random")}

    def prepare(self, options, signature, seed):
        """The vectors of a file, read (and checked) before the cost is estimated; random
        vectors are drawn only once the plan has passed its limits (``vectors``)."""
        if options.get("vectors"):
            return tables.read_vectors(options["vectors"], signature.variables, signature.variable_shapes)
        return None

    def vectors(self, options, context):
        """[K, P] float64: the file's vectors, or the Rademacher vectors of ``(seed, k)``."""
        if options.get("vectors"):
            return context.inputs[self.name]
        return rademacher(context.seed, range(options["random"]), context.parameters, stream=HVP_STREAM)

    def cost(self, options, w, m, asked, prepared=None):
        k = int(options.get("random") or (len(prepared) if prepared is not None else 0))
        written = (2 if options.get("random") else 1) * cost.TABLE_ENTRY_BYTES * k * w.parameters
        return cost.QuantityCost(self.name, main=k * cost.HVP_GRADIENTS,
                                 worker_bytes=cost.vector_bytes(w, m, k),
                                 driver_bytes=cost.driver_vector_bytes(w, k) + written)

    def request(self, options, context):
        return {"hvp_vectors": self.vectors(options, context)}

    def finalize(self, options, sums):
        return {"hvp": sums.mean("hvp")} if "hvp" in sums else {}

    def tables(self, options, result, context):
        names, shapes = context.signature.variables, context.signature.variable_shapes
        out = {"hvp.parquet": tables.vectors_table(names, shapes, result)}
        if options.get("random"):
            out["hvp_vectors.parquet"] = tables.vectors_table(names, shapes, self.vectors(options, context))
        return out


UNIT = Hvp()
