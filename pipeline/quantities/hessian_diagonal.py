"""``hessian_diagonal``: ``diag(H)`` of the objective.

- ``method: exact``: P Hessian-vector products with basis vectors per batch, vectorised by
  ``pfor`` per block of a variable's gradient entries (a ``while_loop`` Jacobian for recurrent
  models). Refused above ``EXACT_DIAGONAL_LIMIT`` products in all unless ``force: true``.
- ``method: hutchinson``: ``diag(H) ~ mean_k z_k * (H z_k)`` over ``probes`` Rademacher probes
  drawn from ``(seed, k)`` (Bekas, Kokiopoulou and Saad, 2007), with the standard error
  ``std_k / sqrt(K)`` over the K per-probe estimates of the whole dataset: ``probes`` HVPs per
  batch, and K x P float64 sums per worker and in the driver.
"""

from __future__ import annotations

import numpy as np

from pipeline import cost
from pipeline.errors import InputError
from pipeline.options import Option, boolean, choice, positive_int
from pipeline.probes import PROBE_STREAM, rademacher
from pipeline.quantities._base import Quantity

# An exact Hessian diagonal costs one HVP per parameter and batch: refused above this many in
# total unless ``hessian_diagonal.force`` (about a day on one CPU core for a small model).
EXACT_DIAGONAL_LIMIT = 5e7


def exact_diagonal_notes(facts) -> list[str]:
    """The plan's note on the exact diagonal's products (also said for an exact trace)."""
    return [f"exact Hessian diagonal: {facts.parameters:,} Hessian-vector products per batch, "
            f"{float(facts.parameters) * facts.batches:,.0f} in all"]


def loop_notes(facts) -> list[str]:
    """The plan's note when the model's loops keep the exact diagonal from being vectorised."""
    if facts.route != "loop":
        return []
    return ["the model's recurrent (while) loops cannot be vectorised: the exact diagonal is formed by a "
            "while-loop Jacobian, one backward pass per parameter (slower)"]


class HessianDiagonal(Quantity):
    name = "hessian_diagonal"
    help = "diag(H) of the objective"
    options = {
        "method": Option(choice("exact", "hutchinson"), "exact", "exact (one HVP per parameter) or hutchinson (probes HVPs)"),
        "probes": Option(positive_int(100), 100, "Hutchinson probes (used with hutchinson)"),
        "force": Option(boolean, False, "extension: allow the exact diagonal of a very large model"),
    }
    columns = ("hessian_diagonal", "hessian_diagonal_stderr")
    label, color, line_width = "Hessian", "#1f77b4", 2.6

    def per_parameter(self, options):
        return options["method"] == "exact"

    def notes(self, options, facts):
        return loop_notes(facts) + (exact_diagonal_notes(facts) if options["method"] == "exact" else [])

    def cost(self, options, w, m, asked, prepared=None):
        if options.get("method") == "hutchinson":
            k = int(options["probes"])
            return cost.QuantityCost(self.name, main=k * cost.HVP_GRADIENTS,
                                     worker_bytes=cost.vector_bytes(w, k) + m.activation_bytes,
                                     driver_bytes=cost.driver_vector_bytes(w, k) + 2 * cost.diagonal_driver_bytes(w))
        main, held = cost.exact_diagonal(w, m)
        total = float(w.parameters) * w.batches
        if total > EXACT_DIAGONAL_LIMIT and not options.get("force"):
            raise InputError(
                f"an exact Hessian diagonal of {w.parameters:,} parameters over {w.batches:,} batches needs "
                f"{total:,.0f} Hessian-vector products (days of compute): use hessian_diagonal: "
                "{method: hutchinson}, or set quantities.hessian_diagonal.force=true")
        return cost.QuantityCost(self.name, main=main, worker_bytes=held, driver_bytes=cost.diagonal_driver_bytes(w))

    def request(self, options, context):
        if options["method"] == "exact":
            return {"hessian_diagonal": "exact"}
        return {"probes": rademacher(context.seed, range(options["probes"]), context.parameters, stream=PROBE_STREAM)}

    def finalize(self, options, sums):
        hutchinson = "hessian_probes" in sums if options is None else options["method"] == "hutchinson"
        if hutchinson and "hessian_probes" in sums:
            estimates = sums.mean("hessian_probes")  # [K, P], one unbiased estimate per probe
            k = estimates.shape[0]
            stderr = (estimates.std(axis=0, ddof=1) / np.sqrt(k) if k > 1
                      else np.full(estimates.shape[1], np.nan))
            return {"hessian_diagonal": estimates.mean(axis=0), "hessian_diagonal_stderr": stderr}
        if "hessian_diagonal" in sums:
            return {"hessian_diagonal": sums.mean("hessian_diagonal")}
        return {}


UNIT = HessianDiagonal()
