"""``eigenvalues``: the ``top`` extreme eigenvalues of H (``which``: largest, smallest or
largest in magnitude) by block Lanczos with full reorthogonalisation, each with its true
residual ``||H v - lambda v||`` from one extra pass; with ``vectors: true`` also the unit Ritz
vectors Lanczos already holds (``eigenvectors.parquet``, signed so that each one's
largest-magnitude entry is positive). One pass over the data per iteration
(a block of ``b`` HVPs per batch); the driver holds the Krylov basis, P x b x iterations floats.

Source: Golub and Underwood (1977), block Lanczos; residuals as in ARPACK/scipy ``eigsh``.
"""

from __future__ import annotations

import numpy as np

from pipeline import cost, spectrum
from pipeline.options import Option, boolean, choice, positive_float, positive_int
from pipeline.quantities._base import Quantity
from pipeline.storage import tables


class Eigenvalues(Quantity):
    name = "eigenvalues"
    help = "extreme eigenvalues of H (Lanczos)"
    options = {
        "top": Option(positive_int(5), 5, "how many eigenvalues"),
        "which": Option(choice("largest", "smallest", "magnitude"), "largest",
                        "largest, smallest or magnitude (largest absolute value)"),
        "iterations": Option(positive_int(100), 100, "Lanczos iterations at most"),
        "tol": Option(positive_float(1e-6), 1e-6, "convergence tolerance on the residual"),
        "vectors": Option(boolean, False, "also publish the unit eigenvectors (eigenvectors.parquet)"),
    }
    files = ("eigenvalues.parquet", "eigenvectors.parquet")

    def cost(self, options, w, m, asked, prepared=None):
        block = spectrum.default_block(int(options["top"]))
        steps = int(options["iterations"]) + 1
        basis = 8 * w.parameters * block * steps
        return cost.QuantityCost(self.name, passes=steps, vectors=block, worker_bytes=cost.vector_bytes(w, block),
                                 driver_bytes=basis + 6 * 8 * block * w.parameters)

    def compute(self, options, context, operator, sums):
        size = context.parameters
        result = spectrum.top_eigenvalues(operator, size, top=min(options["top"], size), which=options["which"],
                                          iterations=options["iterations"], tol=options["tol"], seed=context.seed)
        context.say(f"eigenvalues ({options['which']}): {np.array2string(result.eigenvalues, precision=6)}")
        return result

    def tables(self, options, result, context):
        out = {"eigenvalues.parquet": tables.eigenvalues_table(result.eigenvalues, result.residuals)}
        if options.get("vectors"):
            out["eigenvectors.parquet"] = tables.eigenvectors_table(
                context.signature.variables, context.signature.variable_shapes, unit_vectors(result.eigenvectors))
        return out


def unit_vectors(vectors: np.ndarray) -> np.ndarray:
    """Ritz vectors [k, P] scaled to unit norm, each signed so that its largest-magnitude entry
    is positive (an eigenvector's sign is arbitrary; this makes runs comparable)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    signs = np.sign(vectors[np.arange(len(vectors)), np.argmax(np.abs(vectors), axis=1)])
    return vectors * np.where(signs == 0, 1.0, signs)[:, None]


UNIT = Eigenvalues()
