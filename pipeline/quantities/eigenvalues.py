"""``eigenvalues``: the ``top`` extreme eigenvalues of H (``which``: largest, smallest or
largest in magnitude) by block Lanczos with full reorthogonalisation, each with its true
residual ``||H v - lambda v||`` from one extra pass; with ``vectors: true`` also the unit Ritz
vectors Lanczos already holds (``eigenvectors.parquet``, signed so that each one's
largest-magnitude entry is positive). One pass over the data per iteration
(a block of ``b`` HVPs per batch); the driver holds the Krylov basis, P x b x iterations floats.

``blocks: variable | layer`` (contract 5.3): the same on every diagonal block ``H_bb`` (one per
variable or per Keras layer), all blocks' Lanczos runs side by side in the same passes
(``pipeline.spectrum.side_by_side``): as many passes as the slowest block, each with every
block's vectors. Each block's result is that of a run with ``variables:`` set to the block.

In a series of checkpoints (``model:`` a list or glob) Lanczos of each checkpoint starts from
the previous checkpoint's Ritz vectors (``Context.warm_start``): fewer passes when they changed
little, the same eigenvalues within the residuals.

With ``learning_rate: eta`` (the optimiser's step size), ``show`` and ``history`` give the
edge-of-stability ratio ``lambda_max * eta / 2`` beside the top eigenvalue: gradient descent on
the local quadratic is stable while it is below 1 (Cohen et al. 2021, "Gradient descent on
neural networks typically occurs at the edge of stability").

Source: Golub and Underwood (1977), block Lanczos; residuals as in ARPACK/scipy ``eigsh``.
"""

from __future__ import annotations

import numpy as np

from pipeline import blocks, spectrum
from pipeline.options import Option, boolean, choice, optional, positive_float, positive_int
from pipeline.quantities._base import Quantity, per_block, per_block_cost
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
        "blocks": blocks.OPTION,
        "learning_rate": Option(optional(positive_float(0.01)), None,
                                "the training learning rate eta: show and history then give the sharpness "
                                "lambda_max * eta / 2 (>= 1: at the edge of stability)"),
    }
    files = ("eigenvalues.parquet", "eigenvectors.parquet")

    def parse(self, options, where, base_dir):
        parsed = super().parse(options, where, base_dir)
        if parsed["learning_rate"] is None:
            del parsed["learning_rate"]  # unset is absent: a job without it resolves, and publishes, as before
        return parsed

    def notes(self, options, facts):
        return [f"eigenvalues: passes and time are counted at the iteration limit ({options['iterations']}); "
                "Lanczos stops sooner once the residuals are within tol"]

    def cost(self, options, w, m, asked, prepared=None):
        width, steps = spectrum.default_block(int(options["top"])), int(options["iterations"]) + 1

        def one(size: int) -> tuple[int, int, float]:
            block = min(width, size)
            return steps, block, 8.0 * size * block * steps + 6 * 8 * block * size  # the basis, a block's work

        return per_block_cost(self.name, options, w, m, one)

    def compute(self, options, context, operator, sums):
        def start(block):
            vectors = context.warm_start.get(block.name)
            return vectors if vectors is not None and vectors.shape[-1] == block.size else None

        results = per_block(options, context, operator, lambda block: spectrum.top_eigenvalues_steps(
            block.size, top=min(options["top"], block.size), which=options["which"],
            iterations=options["iterations"], tol=options["tol"], seed=context.seed, start=start(block)))
        for block, result in results:
            where = "" if block.name == blocks.ALL else f" of block {block.name}"
            context.say(f"eigenvalues{where} ({options['which']}): {np.array2string(result.eigenvalues, precision=6)}")
        return results

    def tables(self, options, result, context):
        out = {"eigenvalues.parquet": tables.eigenvalues_table(
            [(block.name, r.eigenvalues, r.residuals) for block, r in result])}
        if options.get("vectors"):
            out["eigenvectors.parquet"] = tables.eigenvectors_table(
                [(block.name, block.variables, block.shapes, unit_vectors(r.eigenvectors)) for block, r in result])
        return out


def unit_vectors(vectors: np.ndarray) -> np.ndarray:
    """Ritz vectors [k, P] scaled to unit norm, each signed so that its largest-magnitude entry
    is positive (an eigenvector's sign is arbitrary; this makes runs comparable)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    signs = np.sign(vectors[np.arange(len(vectors)), np.argmax(np.abs(vectors), axis=1)])
    return vectors * np.where(signs == 0, 1.0, signs)[:, None]


UNIT = Eigenvalues()
