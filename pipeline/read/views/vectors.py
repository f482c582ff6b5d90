"""Hessian-vector products: ``hvp.parquet`` and, for ``hvp: {random: K}``, the vectors used,
``hvp_vectors.parquet`` (long layout: ``vector``, ``variable``, ``index``, ``value``); per
variable they read as ``[K, *shape]`` arrays (``run.arrays("hvp")``).

``show`` and ``report`` say how many products there are and where the vectors came from.
"""

from __future__ import annotations

from pipeline.read import pages
from pipeline.read.views._base import Section, Shown, View

HVP, HVP_VECTORS = "hvp", "hvp_vectors"


class VectorsAccess:
    """``Run``'s Hessian-vector products."""

    @property
    def hvp(self):
        """Hessian-vector products, long layout: ``vector``, ``variable``, ``index``, ``value``."""
        return self.table(HVP)

    @property
    def hvp_vectors(self):
        """The random vectors the HVPs used (``hvp: {random: K}``), same layout as ``hvp``."""
        return self.table(HVP_VECTORS)


class VectorsView(View):
    files = (f"{HVP}.parquet", f"{HVP_VECTORS}.parquet")
    access = VectorsAccess
    page = 80

    def show(self, run) -> Shown:
        if not run.has(HVP):
            return Shown()
        vectors = len({r["vector"] for r in run.rows(HVP, ["vector"])})  # K x P rows: one column read
        source = "random, saved in hvp_vectors.parquet" if run.has(HVP_VECTORS) else "given vectors"
        return Shown(lines=[(HVP, f"{vectors} Hessian-vector products ({source}) in hvp.parquet")])

    def sections(self, run, baseline, drawn, context):
        if not run.has(HVP):
            return [Section(80, "<h2>Hessian-vector products</h2>\n<p>Not computed.</p>\n")]
        count = run.hvp["vector"].nunique()
        given = "random Rademacher vectors (hvp_vectors.parquet)" if run.has(HVP_VECTORS) else "the given vectors"
        return [Section(80, f"<h2>Hessian-vector products</h2>\n<p>{count} products with {pages.escape(given)}, "
                            "in hvp.parquet.</p>\n")]
