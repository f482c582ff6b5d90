"""``hessian_diagonal``: ``diag(H)`` of the objective.

- ``method: exact``: P Hessian-vector products with basis vectors per batch, vectorised by
  ``pfor`` per block of a variable's gradient entries (a ``while_loop`` Jacobian for recurrent
  models). Refused above ``EXACT_DIAGONAL_LIMIT`` products in all unless ``force: true``.
- ``method: hutchinson``: ``diag(H) ~ mean_k z_k * (H z_k)`` over ``probes`` Rademacher probes
  drawn from ``(seed, k)`` (Bekas, Kokiopoulou and Saad, 2007), with the standard error
  ``std_k / sqrt(K)`` over the K per-probe estimates of the whole dataset: ``probes`` HVPs per
  batch in all. The standard error needs each probe's estimate over the whole dataset, so a
  pass holds B x P float64 per-probe sums in every worker and in the driver: the probes go in
  passes of ``B = probes_per_pass`` (auto: the fewest passes within ``PROBE_PASS_BYTES``, shared
  out evenly), the first in the main pass, and each finished pass is folded into running
  moments (mean and sum of squared deviations, merged as Chan, Golub and LeVeque 1979), the
  workers forming ``z * (H z)`` themselves (``operator.probe_products``). Memory stays that of B probes
  whatever K; the price is ``ceil(K / B) - 1`` extra passes (a forward pass and a gradient per
  batch each).
"""

from __future__ import annotations

import numpy as np

from pipeline import cost
from pipeline.errors import InputError
from pipeline.options import Option, auto_or_positive_int, boolean, choice, positive_int
from pipeline.probes import PROBE_STREAM, rademacher
from pipeline.quantities._base import Quantity

# An exact Hessian diagonal costs one HVP per parameter and batch: refused above this many in
# total unless ``hessian_diagonal.force`` (about a day on one CPU core for a small model).
EXACT_DIAGONAL_LIMIT = 5e7
# The per-probe sums of one pass of Hutchinson probes (B x P float64) stay under this many bytes
# with ``probes_per_pass: auto``.
PROBE_PASS_BYTES = 64 << 20


def probes_per_pass(options: dict, parameters: int) -> int:
    """B: the Hutchinson probes sent in one pass over the data (at most ``probes``)."""
    probes, asked = int(options["probes"]), options.get("probes_per_pass", "auto")
    if asked != "auto":
        return min(probes, int(asked))
    most = max(1, min(probes, PROBE_PASS_BYTES // (8 * max(1, int(parameters)))))
    # As few passes as the bound allows, shared out evenly (100 probes at most 14 a pass: 8
    # passes of 13, not 7 of 14 and one of 2), so that every pass holds about as much memory.
    return -(-probes // -(-probes // most))


class Moments:
    """Running count, mean and sum of squared deviations (``m2``) of per-probe estimates, per
    parameter; two sets merge exactly (Chan, Golub and LeVeque 1979), so probes can be folded in
    pass by pass without keeping them."""

    def __init__(self, estimates: np.ndarray):
        estimates = np.asarray(estimates, dtype=np.float64)
        self.count = estimates.shape[0]
        self.mean = estimates.mean(axis=0)
        self.m2 = ((estimates - self.mean) ** 2).sum(axis=0)

    def add(self, estimates: np.ndarray) -> None:
        other = Moments(estimates)
        count = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / count)
        self.m2 = self.m2 + other.m2 + delta ** 2 * (self.count * other.count / count)
        self.count = count

    @property
    def stderr(self) -> np.ndarray:
        """``std (ddof=1) / sqrt(count)``; NaN for a single estimate."""
        if self.count < 2:
            return np.full(self.mean.shape, np.nan)
        return np.sqrt(self.m2 / (self.count - 1) / self.count)


def exact_diagonal_notes(facts) -> list[str]:
    """The plan's note on the exact diagonal's products (also said for an exact trace)."""
    return [f"exact Hessian diagonal: {facts.parameters:,} Hessian-vector products per batch, "
            f"{float(facts.parameters) * facts.batches:,.0f} in all"]


def loop_notes(facts) -> list[str]:
    """The plan's note on how the exact diagonal (and dense Hessian blocks) are formed: the
    vectorised Jacobian's check against the loop, or why the loop is taken."""
    checked = facts.route_checks.get("route")
    if facts.route != "loop":
        return [f"exact diagonal and Hessian blocks: {checked}"] if checked else []
    if checked:
        return [f"exact diagonal and Hessian blocks: {checked} (a while-loop Jacobian, one backward pass per "
                "parameter: slower)"]
    return ["the model's recurrent (while) loops cannot be vectorised: the exact diagonal is formed by a "
            "while-loop Jacobian, one backward pass per parameter (slower)"]


class HessianDiagonal(Quantity):
    name = "hessian_diagonal"
    help = "diag(H) of the objective"
    options = {
        "method": Option(choice("exact", "hutchinson"), "exact", "exact (one HVP per parameter) or hutchinson (probes HVPs)"),
        "probes": Option(positive_int(100), 100, "Hutchinson probes (used with hutchinson)"),
        "probes_per_pass": Option(auto_or_positive_int(16), "auto",
                                  "extension: Hutchinson probes per pass over the data; auto keeps each pass's "
                                  "per-probe sums under 64 MiB, the rest go in extra passes"),
        "force": Option(boolean, False, "extension: allow the exact diagonal of a very large model"),
    }
    columns = ("hessian_diagonal", "hessian_diagonal_stderr")
    label, color, line_width = "Hessian", "#1f77b4", 2.6

    def routes(self, options):
        return ("route",) if options["method"] == "exact" else ()

    def notes(self, options, facts):
        if options["method"] == "hutchinson":
            k, b = int(options["probes"]), probes_per_pass(options, facts.parameters)
            if b >= k:
                return loop_notes(facts)
            return loop_notes(facts) + [
                f"hessian_diagonal: {k:,} Hutchinson probes in {-(-k // b):,} passes of at most {b:,} "
                f"(probes_per_pass), so that no process holds more than {b:,} x {facts.parameters:,} per-probe sums"]
        return loop_notes(facts) + exact_diagonal_notes(facts)

    def cost(self, options, w, m, asked, prepared=None):
        if options.get("method") == "hutchinson":
            k = int(options["probes"])
            b = probes_per_pass(options, w.parameters)
            return cost.QuantityCost(self.name, main=b * cost.HVP_GRADIENTS, passes=-(-k // b) - 1, vectors=b,
                                     worker_bytes=cost.vector_bytes(w, m, b),
                                     driver_bytes=cost.driver_vector_bytes(w, b) + 2 * cost.diagonal_driver_bytes(w))
        main, held = cost.exact_diagonal(w, m)
        total = float(w.parameters) * w.batches
        if total > EXACT_DIAGONAL_LIMIT and not options.get("force"):
            raise InputError(
                f"an exact Hessian diagonal of {w.parameters:,} parameters over {w.batches:,} batches needs "
                f"{total:,.0f} Hessian-vector products (days of compute): use hessian_diagonal: "
                "{method: hutchinson}, or set quantities.hessian_diagonal.force=true")
        return cost.QuantityCost(self.name, main=main, worker_bytes=held, driver_bytes=cost.diagonal_driver_bytes(w),
                                 remedy="set quantities.hessian_diagonal.method=hutchinson (an unbiased estimate with "
                                        "its standard error: probes=20 costs about 20 Hessian-vector products per "
                                        "row, a vector's memory per probe)")

    def request(self, options, context):
        if options["method"] == "exact":
            return {"hessian_diagonal": "exact"}
        first = range(probes_per_pass(options, context.parameters))
        # int8: the probes are +-1, and travel to every worker (an eighth of float64's bytes).
        return {"probes": rademacher(context.seed, first, context.parameters, stream=PROBE_STREAM, dtype=np.int8)}

    def finalize(self, options, sums):
        hutchinson = "hessian_probes" in sums if options is None else options["method"] == "hutchinson"
        if hutchinson and "hessian_probes" in sums:
            estimates = sums.mean("hessian_probes")  # [B, P], one unbiased estimate per probe
            if options is not None and estimates.shape[0] < options["probes"]:
                return {}  # the other probes go in passes of their own (compute)
            k = estimates.shape[0]
            stderr = (estimates.std(axis=0, ddof=1) / np.sqrt(k) if k > 1
                      else np.full(estimates.shape[1], np.nan))
            return {"hessian_diagonal": estimates.mean(axis=0), "hessian_diagonal_stderr": stderr}
        if "hessian_diagonal" in sums:
            return {"hessian_diagonal": sums.mean("hessian_diagonal")}
        return {}

    def compute(self, options, context, operator, sums):
        """Hutchinson probes beyond the main pass's: ``z * (H z)`` for B more probes a pass (formed
        in the workers, ``operator.probe_products``), each pass folded into the running moments of
        the main pass's estimates."""
        if options["method"] != "hutchinson":
            return None
        k, b = int(options["probes"]), probes_per_pass(options, context.parameters)
        if b >= k:
            return None
        moments = Moments(sums.mean("hessian_probes"))
        for start in range(b, k, b):
            z = rademacher(context.seed, range(start, min(k, start + b)), context.parameters, stream=PROBE_STREAM,
                           dtype=np.int8)
            moments.add(operator.probe_products(z))
        return {"hessian_diagonal": moments.mean, "hessian_diagonal_stderr": moments.stderr}


UNIT = HessianDiagonal()
