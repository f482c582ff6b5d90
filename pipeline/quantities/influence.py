"""``influence``: which training rows move each query's loss (contract 7.2).

    I(q, i) = g_q^T (C + lambda I)^-1 g_i

``g_i`` the gradient of training example i's loss ``l_i`` (unweighted), ``g_q`` that of query q's
loss, ``C`` the curvature (``pipeline.influence.preconditioner``): ``ekfac`` or ``kfac`` (the
factors of 6.1 as ``kron(A, S) / R``; a variable of no factored layer takes its GGN diagonal),
``ggn`` (dense, up to ``max_dimension`` parameters) or ``identity`` (``C = 0``, ``lambda = 1``: the
gradient dot product). ``lambda = damping * mean eigenvalue of C`` per block (the manifest's
``influence.lambda``). Positive: up-weighting i lowers the query's loss to first order (helpful).

Passes: the main pass sums the curvature (K-FAC's factors and the GGN diagonal, or the dense GGN);
EK-FAC adds a pass for its eigenvalues; one worker reads the query set and returns ``g_q``
``[Q, P]`` (``rows_pass``); the driver forms ``v_q = (C + lambda I)^-1 g_q`` and ships ``V`` once
to every worker; one scoring pass over the training data forms ``g_i . v_q`` per layer without
forming ``g_i`` (``x_i^T V_q s_i`` for a one-position layer) and keeps per shard the ``top_k``
largest (``helpful``) and smallest (``harmful``) per query, merged exactly (ties by the smaller
row). ``self: true`` adds ``self_influence = g_i^T (C + lambda I)^-1 g_i`` to ``per_example/``.
Memory per worker: ``V`` (Q x P float64, twice) and the preconditioner's factors.

Published: ``influence_topk.parquet`` (``query``, ``query_id``, ``kind``, ``rank``, ``row``,
``file``, ``file_row``, ``id``, ``score``) and, with ``scores: dense``, ``influence.parquet``
(``query``, ``row``, ``score``; refused at the plan above ``DENSE_LIMIT`` scores). Sources: Koh
and Liang (2017), "Understanding black-box predictions via influence functions"; Grosse et al.
(2023), EK-FAC influence (kronfluence); Pruthi et al. (2020), TracIn (``identity``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re

import numpy as np

from pipeline import cost
from pipeline.curvature.requests import KroneckerRequest
from pipeline.errors import InputError
from pipeline.influence.layout import Layout
from pipeline.influence.preconditioner import Preconditioner
from pipeline.memory import gib
from pipeline.options import Option, boolean, choice, positive_float, positive_int
from pipeline.quantities import kfac as kfac_unit
from pipeline.quantities._base import Quantity
from pipeline.storage import tables

#: Dense scores (queries x training rows) refused above this many (contract 7.2).
DENSE_LIMIT = 10 ** 8
CURVATURES = ("ekfac", "kfac", "ggn", "identity")
QUERIES_KEY = "quantities.influence.queries"
TOPK_FILE, DENSE_FILE = "influence_topk.parquet", "influence.parquet"


def _queries(value, key: str):
    """The query set's mapping, as ``data`` takes it; checked by ``Influence.parse``."""
    if value is None:
        return None  # required: ``Influence.parse`` says so
    if not isinstance(value, dict):
        raise InputError(f"{key} must be a mapping like data (path, features, labels, ...), got {value!r}: write "
                         f"e.g. queries: {{path: data/test/, features: pixels, labels: label}}")
    return value


class Influence(Quantity):
    name = "influence"
    help = "per query, the training rows whose up-weighting helps or harms it most (influence_topk.parquet)"
    options = {
        "queries": Option(_queries, None, "the query set: a mapping with the keys of data (path, features, "
                                          "labels, id, ...)"),
        "curvature": Option(choice(*CURVATURES), "ekfac", "C: ekfac, kfac, ggn (dense, small models) or identity"),
        "fisher_type": Option(choice("empirical", "mc", "exact"), "mc", "labels of K-FAC's S (as kfac's)"),
        "samples": Option(positive_int(1), 1, "label draws per example (fisher_type: mc)"),
        "damping": Option(positive_float(0.1), 0.1, "lambda as a fraction of C's mean eigenvalue (per block)"),
        "top_k": Option(positive_int(100), 100, "rows kept per query and kind (helpful, harmful)"),
        "self": Option(boolean, True, "add self_influence to per_example/"),
        "scores": Option(choice("topk", "dense"), "topk", "topk, or dense: every score in influence.parquet"),
        "max_dimension": Option(positive_int(8192), 8192, "most parameters for curvature: ggn; widest K-FAC factor"),
    }
    files = (TOPK_FILE, DENSE_FILE)

    # -------------------------------------------------------------------- the job file
    def parse(self, options, where, base_dir):
        parsed = super().parse(options, where, base_dir)
        if parsed["queries"] is None:
            raise InputError(f"{where}.queries is required: the query set, e.g. queries: {{path: data/test/, "
                             "features: pixels, labels: label}")
        # lazy: pipeline.job imports the registry of quantities, this module among them
        from pipeline.job import parse_data_spec

        spec = parse_data_spec(parsed["queries"], f"{where}.queries", base_dir)
        parsed["queries"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(spec).items()}
        return parsed

    # -------------------------------------------------------------------- the plan
    def per_layer(self, options):
        return "optional" if options["curvature"] != "ggn" else False

    def routes(self, options):
        return ("per_example_route",)

    def prepare(self, options, signature, seed):
        """The query set, planned and checked against the model: ``[rows, fingerprint digits]``
        (its fingerprint joins the staged run's, so that a changed query set is not resumed)."""
        from pipeline.storage.dataset import check_schema, plan_data  # lazy: see parse

        spec = query_spec(options)
        with about_queries():
            planned = plan_data(spec, 1, 1)
            check_schema(planned.schema, spec, signature)
        digits = [int(planned.fingerprint[i:i + 8], 16) for i in range(0, min(len(planned.fingerprint), 32), 8)]
        return np.array([planned.rows] + digits, dtype=np.float64)

    def notes(self, options, facts):
        if options["curvature"] in ("ekfac", "kfac") and options["fisher_type"] == "mc" and not facts.predictive:
            raise InputError("quantities.influence: fisher_type mc draws labels from the loss's predictive "
                             "distribution, and this loss has none: use fisher_type: empirical or exact")
        curvature = options["curvature"]
        passes = {"ekfac": "factors in the main pass, EK-FAC eigenvalues (1 pass), ",
                  "kfac": "factors in the main pass, ", "ggn": "the dense GGN in the main pass, ",
                  "identity": ""}[curvature]
        queries = query_rows(options)
        memory = 2 * 8.0 * queries * facts.parameters
        lines = [f"{self.name}: {curvature} (damping {options['damping']:g}): {passes}query gradients ({queries:,} "
                 f"queries, one worker), then one scoring pass keeping the top {options['top_k']} rows per query and "
                 f"kind; the preconditioned query gradients V ({queries:,} x {facts.parameters:,}) take "
                 f"{gib(memory)} in each worker"]
        if options["scores"] == "dense":
            lines.append(f"{self.name}: scores: dense writes {queries * facts.rows:,} scores (influence.parquet, "
                         f"{gib(24.0 * queries * facts.rows)} before compression)")
        if options["self"] and facts.rows:
            lines.append(f"{self.name}: self: true adds self_influence to per_example/ ({facts.rows:,} rows)")
        return lines

    def cost(self, options, w, m, asked, prepared=None):
        queries = int(prepared[0]) if prepared is not None else 1
        curvature = options["curvature"]
        layout = Layout.of(w.variables, w.variable_shapes, w.factor_layers, curvature != "ggn") if w.variables \
            else Layout((), (w.parameters,), (), (0,))
        p = w.parameters
        if options["scores"] == "dense" and queries * w.rows > DENSE_LIMIT:
            raise InputError(f"quantities.influence: scores: dense would write {queries:,} queries x {w.rows:,} rows "
                             f"= {queries * w.rows:,} scores, above the {DENSE_LIMIT:,} allowed: use scores: topk "
                             "(the top_k rows per query), or fewer queries (queries.limit)")
        main, passes, worker, driver = 0.0, 1, 0.0, 0.0
        if curvature == "ggn":
            if p > options["max_dimension"]:
                raise InputError(f"quantities.influence: curvature ggn forms the dense {p:,} x {p:,} GGN "
                                 f"({gib(8.0 * p * p)} per copy), above max_dimension={options['max_dimension']:,}: "
                                 "use curvature: ekfac (or kfac), select fewer parameters with variables: [...], or "
                                 "raise quantities.influence.max_dimension")
            main = 1.0 + 4.0 * w.outputs
            worker += 8.0 * p * p * 2 + 8.0 * w.vjp_budget
            driver += 8.0 * p * p * 4
        elif curvature in ("ekfac", "kfac"):
            append = kfac_unit.bias_row
            kfac_unit.check_widths(self.name, w.factor_layers, append, options["max_dimension"])
            columns = {"empirical": 1, "mc": options["samples"], "exact": w.outputs}[options["fisher_type"]]
            factors = kfac_unit.factor_cost(self.name, w, m, kfac_unit.FORWARD_GRADIENTS + 1.0 + columns * 0.8, 2,
                                            append)
            main, worker, driver = factors.main, factors.worker_bytes, factors.driver_bytes
            if layout.rest_size:
                main += 1.0 + 4.0 * w.outputs * layout.rest_size / max(1, p)
            if curvature == "ekfac":
                passes += 1
            # the eigenbases and inverse eigenvalues, in the driver and shipped to every worker
            blocks = sum(layer.d_a ** 2 + layer.d_s ** 2 + layer.size for layer in layout.layers) + layout.rest_size
            worker += 8.0 * blocks
            driver += 8.0 * blocks * 3
        # V [Q, P]: float64 and the compute dtype's copy in a worker; g_q, v_q and copies in the driver.
        worker += queries * p * (8.0 + w.itemsize) + 8.0 * w.batch_size * (queries + layout.rest_size)
        driver += 4 * 8.0 * queries * p
        return cost.QuantityCost(self.name, main=main, passes=passes, worker_bytes=worker, driver_bytes=driver,
                                 remedy="use scores: topk and fewer queries" if options["scores"] == "dense" else
                                 ("use curvature: ekfac" if curvature == "ggn" else ""))

    # -------------------------------------------------------------------- the main pass
    def request(self, options, context):
        curvature = options["curvature"]
        if curvature == "ggn":
            return {"ggn_matrix": True}
        if curvature == "identity":
            return {}
        asked = {"kronecker": (self._kronecker(options),)}
        if self.layout(options, context).rest_size:
            asked["ggn_diagonal"] = "exact"
        return asked

    @staticmethod
    def _kronecker(options, kind: str = "kfac", bases=None) -> KroneckerRequest:
        return KroneckerRequest(kind, fisher_type=options["fisher_type"], samples=options["samples"],
                                reduction="expand", bases=bases or {})

    @staticmethod
    def layout(options, context) -> Layout:
        signature = context.signature
        return Layout.of(signature.variables, signature.variable_shapes, context.factor_layers,
                         options["curvature"] != "ggn")

    def finalize(self, options, sums):
        return {}  # the preconditioner is built after the main pass (``compute``)

    def compute(self, options, context, operator, sums):
        """The preconditioner (``Preconditioner``): EK-FAC's eigenvalues take one more pass."""
        layout = self.layout(options, context)
        curvature, damping = options["curvature"], options["damping"]
        if curvature == "identity":
            pre = Preconditioner.identity(layout, damping)
        elif curvature == "ggn":
            pre = Preconditioner.dense(layout, damping, sums.raw("ggn_matrix") / sums.weight_sum)
        else:
            means = kfac_unit.factor_means(sums, "kfac", ("A", "S")) or {"A": {}, "S": {}, "positions": {}}
            eigen = None
            if curvature == "ekfac" and means["A"]:
                eigen = kfac_unit.ekfac_eigenvalues(means, float(sums.raw("kfac/weight")), operator,
                                                    lambda bases: self._kronecker(options, "kfac_eigen", bases))
                context.say(f"influence: EK-FAC eigenvalues of {len(eigen)} layers in one more pass")
            diagonal = sums.mean("ggn_diagonal") if "ggn_diagonal" in sums else np.zeros(layout.parameters)
            pre = Preconditioner.kronecker(curvature, layout, damping, means, diagonal, eigen)
        return {"preconditioner": pre}

    def manifest(self, options, result):
        pre = result["preconditioner"]
        return {"influence": {"curvature": pre.curvature, "damping": pre.damping, "lambda": pre.lambdas,
                              "queries": int(result.get("queries", 0)), "top_k": options["top_k"],
                              "self": options["self"], "scores": options["scores"],
                              "query_data": options["queries"]["path"]}}

    def tables(self, options, result, context):
        return {TOPK_FILE: tables.influence_topk_table(result["topk"])} if "topk" in result else {}


@contextlib.contextmanager
def about_queries():
    """Input errors found in the query set name its keys (``quantities.influence.queries.path``),
    not the training data's (``data.path``), which the dataset layer's messages name."""
    try:
        yield
    except InputError as err:
        raise InputError(re.sub(r"\bdata\.(?=[a-z_])", QUERIES_KEY + ".", str(err)).replace(
            "data path", "query data path")) from None


def query_rows(options) -> int:
    """Rows of the query set (its files' footers: no data read)."""
    from pipeline.storage.dataset import plan_data  # lazy: see Influence.parse

    with about_queries():
        return plan_data(query_spec(options), 1, 1).rows


def query_spec(options):
    """The query set's ``DataSpec``."""
    from pipeline.job import DataSpec  # lazy: see Influence.parse

    return DataSpec(**options["queries"])


UNIT = Influence()
