"""``kfac``: per layer, the Kronecker factors of K-FAC, ``A`` and ``S``, and optionally EK-FAC's
eigenvalues (contract 6.1), the structure Laplace, influence and natural-gradient tools consume.

    A_l = sum_i s_i sum_p x_ip x_ip^T / sum_i s_i,   S_l = sum_i s_i sum_p g_ip g_ip^T / sum_i s_i

``x_ip``: the layer's input at position p (a trailing 1 where the layer's bias is selected);
``g_ip``: the gradient of example i's loss with respect to the layer's pre-activation output at
p, for labels per ``fisher_type``: ``empirical`` (the data's), ``mc`` (``samples`` draws from the
model's predictive distribution, as the Monte Carlo GGN draws them, each weighted 1/samples) or
``exact`` (one column per output of a square root of the loss's output Hessian: S is then the
layer-output GGN). ``reduction: reduce`` takes ``x_i = mean_p x_ip`` and ``g_i = sum_p g_ip``
(Eschenhagen et al. 2023). The layer's GGN/Fisher block is approximated by ``kron(A, S)`` in the
engine's flat order (kernel ``[d_in, d_out]`` in C order, then the bias). With
``eigen_correction: true``, a second pass sums EK-FAC's ``sum_i s_i (Q_A^T G_i Q_S)**2 / sum_i
s_i`` for ``G_i = sum_p x_ip g_ip^T``, in the eigenbases ``Q_A``, ``Q_S`` of the published factors
(``numpy.linalg.eigh``, ascending eigenvalues): a ``[d_A, d_S]`` matrix per layer.

Cost per batch: a tapped forward pass and one backward pass to the layers' outputs per label
column (1, ``samples`` or C), plus the output derivatives; EK-FAC one more pass with
``B x d_A x d_S`` per-example gradients per chunk. Published as ``kfac.parquet`` (``block``,
``factor``, ``index``, ``row``) and ``kfac_eigen.parquet`` (``block``, ``index``, ``value``).
API: ``run.kfac(layer) -> (A, S)``, ``run.kfac_eigen(layer)``.

Sources: Martens and Grosse (2015), K-FAC; Grosse and Martens (2016), KFC for convolutions;
George et al. (2018), EK-FAC; Eschenhagen et al. (2023), K-FAC expand and reduce; curvlinops'
``KFACLinearOperator`` (its ``fisher_type`` and ``kfac_approx``).
"""

from __future__ import annotations

import numpy as np

from pipeline.curvature.requests import KroneckerRequest
from pipeline.options import Option, boolean, choice, positive_int
from pipeline.quantities import _factors
from pipeline.quantities._base import Quantity
from pipeline.storage import tables

#: Backward passes per label column, in gradients (as the per-layer rules measure them).
COLUMN_GRADIENTS = 0.8


def _bias(layer) -> bool:
    return bool(layer[4])


class Kfac(Quantity):
    name = "kfac"
    help = "per layer, K-FAC's Kronecker factors A and S (and EK-FAC's eigenvalues)"
    options = {
        "fisher_type": Option(choice("empirical", "mc", "exact"), "empirical",
                              "labels of S: the data's, sampled from the model, or the exact GGN's columns"),
        "samples": Option(positive_int(1), 1, "label draws per example (fisher_type: mc)"),
        "reduction": Option(choice("expand", "reduce"), "expand",
                            "positions as examples (expand), or averaged inputs and summed gradients (reduce)"),
        "eigen_correction": Option(boolean, False, "EK-FAC: a second pass for the eigenvalues in the factors' bases"),
        "max_dimension": _factors.MAX_DIMENSION,
    }
    files = ("kfac.parquet", "kfac_eigen.parquet")

    def per_layer(self, options):
        return True

    def notes(self, options, facts):
        return _factors.layer_lines(self.name, facts.factor_layers, _bias, "AS")

    def cost(self, options, w, m, asked, prepared=None):
        _factors.check_widths(self.name, w.factor_layers, _bias, options["max_dimension"])
        columns = {"empirical": 1, "mc": options["samples"], "exact": w.outputs}[options["fisher_type"]]
        main = _factors.FORWARD_GRADIENTS + 1.0 + columns * COLUMN_GRADIENTS
        return _factors.factor_cost(self.name, w, m, main, 2, _bias, passes=1 if options["eigen_correction"] else 0)

    def _request(self, options, kind="kfac", bases=None) -> KroneckerRequest:
        return KroneckerRequest(kind, fisher_type=options["fisher_type"], samples=options["samples"],
                                reduction=options["reduction"], bases=bases or {})

    def request(self, options, context):
        return {"kronecker": (self._request(options),)}

    def finalize(self, options, sums):
        if "kfac/weight" not in sums:
            return {}
        weight = float(sums.raw("kfac/weight"))
        return {self.name: {
            "A": {path: _factors.symmetric(a / weight) for path, a in _factors.layer_sums(sums, "kfac", "A").items()},
            "S": {path: _factors.symmetric(s / weight) for path, s in _factors.layer_sums(sums, "kfac", "S").items()},
            "positions": {path: float(p) / weight for path, p in _factors.layer_sums(sums, "kfac", "positions").items()},
        }}

    def compute(self, options, context, operator, sums):
        """EK-FAC (``eigen_correction``): one pass over the data with the factors' eigenbases."""
        result = self.finalize(options, sums).get(self.name)
        if result is None or not options["eigen_correction"]:
            return None
        bases = {path: (np.linalg.eigh(result["A"][path])[1], np.linalg.eigh(result["S"][path])[1])
                 for path in result["A"]}
        eigen_sums = operator.kronecker(self._request(options, "kfac_eigen", bases))
        weight = float(sums.raw("kfac/weight"))
        result["eigen"] = {path: eigen.reshape(len(bases[path][0]), len(bases[path][1])) / weight
                           for path, eigen in _factors.layer_sums(eigen_sums, "kfac_eigen", "eigen").items()}
        context.say(f"kfac: EK-FAC eigenvalues of {len(result['eigen'])} layers in one more pass")
        return result

    def manifest(self, options, result):
        return {"layer_positions": result["positions"]}

    def tables(self, options, result, context):
        out = {"kfac.parquet": tables.factors_table(
            [(path, factor, result[factor][path]) for path in result["A"] for factor in ("A", "S")])}
        if "eigen" in result:
            out["kfac_eigen.parquet"] = tables.eigen_table([(path, values) for path, values in result["eigen"].items()])
        return out


UNIT = Kfac()
