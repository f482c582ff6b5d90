"""``kfac``: per layer, the Kronecker factors of K-FAC, ``A`` and ``S``, and optionally EK-FAC's
eigenvalues (contract 6.1), the structure Laplace, influence and natural-gradient tools consume.

    A_l = sum_i s_i sum_p x_ip x_ip^T / sum_i s_i,   S_l = sum_i s_i sum_p g_ip g_ip^T / sum_i s_i

``x_ip``: the layer's input at position p (a trailing 1 where the layer's bias is selected);
``g_ip``: the gradient of example i's loss with respect to the layer's pre-activation output at
p, for labels per ``fisher_type``: ``empirical`` (the data's), ``mc`` (``samples`` draws from the
model's predictive distribution, as the Monte Carlo GGN draws them, each weighted 1/samples) or
``exact`` (one column per output of a square root of the loss's output Hessian: S is then the
layer-output GGN). ``reduction: reduce`` takes ``x_i = mean_p x_ip`` and ``g_i = sum_p g_ip``
(Eschenhagen et al. 2023). The layer's GGN/Fisher block is approximated by ``kron(A, S) / R``
(expand; R its positions per example, manifest ``layer_positions``) or ``kron(A, S)`` (reduce),
as kfac-jax, curvlinops and Grosse & Martens (2016) define it (contract 6.1; the published A and
S are unscaled), in the engine's flat order (kernel ``[d_in, d_out]`` in C order, then the bias):
``Run.kfac_curvature``. ``fisher_type: mc`` also publishes ``S_stderr`` (``s_stderr``). With
``eigen_correction: true``, a second pass sums EK-FAC's ``sum_i s_i (Q_A^T G_i Q_S)**2 / sum_i
s_i`` for ``G_i = sum_p x_ip g_ip^T``, in the eigenbases ``Q_A``, ``Q_S`` of the published factors
(``numpy.linalg.eigh``, ascending eigenvalues): a ``[d_A, d_S]`` matrix per layer.

Cost per batch: a tapped forward pass and one backward pass to the layers' outputs per label
column (1, ``samples`` or C), plus the output derivatives; EK-FAC one more pass with
``B x d_A x d_S`` per-example gradients per chunk. Published as ``kfac.parquet`` (``block``,
``factor``, ``index``, ``row``) and ``kfac_eigen.parquet`` (``block``, ``index``, ``value``).
API: ``run.kfac(layer) -> (A, S)``, ``run.kfac_curvature(layer)``, ``run.kfac_stderr(layer)``,
``run.kfac_eigen(layer)``. EK-FAC's eigenvalues come from the per-example gradients themselves,
so they need no 1/R: only the eigenbases come from A and S.

Sources: Martens and Grosse (2015), K-FAC; Grosse and Martens (2016), KFC for convolutions;
George et al. (2018), EK-FAC; Eschenhagen et al. (2023), K-FAC expand and reduce; curvlinops'
``KFACLinearOperator`` (its ``fisher_type`` and ``kfac_approx``).
"""

from __future__ import annotations

import numpy as np

from pipeline import cost
from pipeline.curvature.requests import KroneckerRequest
from pipeline.errors import InputError
from pipeline.memory import gib
from pipeline.options import Option, boolean, choice, positive_int
from pipeline.quantities._base import Quantity
from pipeline.reduce import Sums
from pipeline.storage import tables

# ------------------------------------------------------------------------------ per-layer factors
# What kfac and layer_inputs share: their factored layers as the plan found them, each
# ``(path, d_in, d_out, positions per example, bias)`` (``Workload.factor_layers``), the cost of
# per-layer ``d x d`` factors, the plan's lines about them, and reading their sums.

#: A tapped forward pass, in gradients: the forward is about a third of a gradient.
FORWARD_GRADIENTS = 1.0 / 3.0

MAX_DIMENSION = Option(positive_int(8192), 8192, "widest factor allowed (d x d float64 sums per layer)")

#: Copies of each factor held: a worker's running sum and its float64 copy; the driver's running
#: sum, an arriving partial, staging's copy, the mean, its eigendecomposition and the table.
WORKER_COPIES, DRIVER_COPIES = 3, 6


def widths(layer: tuple, append: bool) -> tuple[int, int]:
    """``(d_A, d_S)``: the factors' widths of a factored layer, a 1 appended to the input or not."""
    _, inputs, outputs, _, _ = layer
    return inputs + (1 if append else 0), outputs


def check_widths(name: str, layers, append, limit: int) -> None:
    """Refuses a factor wider than ``limit`` (``max_dimension``) with its size and memory."""
    for layer in layers:
        for width in widths(layer, append(layer)):
            if width > limit:
                raise InputError(
                    f"quantities.{name}: layer {layer[0]!r} has a factor of {width:,} x {width:,} (float64 sums: "
                    f"{gib(8.0 * width * width)} per copy, {DRIVER_COPIES} in the driver), wider than "
                    f"max_dimension={limit:,}: leave the layer out with variables: [...], or raise "
                    f"quantities.{name}.max_dimension")


def factor_cost(name: str, w: cost.Workload, m: cost.Measurement, main: float, factors: int,
                append, passes: int = 0) -> cost.QuantityCost:
    """The cost of ``factors`` (1: A; 2: A and S) per factored layer: ``main`` gradients per batch
    in the main pass, ``passes`` more, and the factors' float64 copies in a worker and the driver
    (beside one batch's ``B x R x d`` rows per layer in the compute dtype)."""
    entries = 0.0
    rows = 0.0
    for layer in w.factor_layers:
        d_a, d_s = widths(layer, append(layer))
        entries += d_a * d_a + (d_s * d_s if factors > 1 else 0)
        rows += w.batch_size * max(1, layer[3]) * (d_a + (d_s if factors > 1 else 0))
    return cost.QuantityCost(name, main=main, passes=passes,
                             worker_bytes=8.0 * entries * WORKER_COPIES + rows * w.itemsize + m.activation_bytes,
                             driver_bytes=8.0 * entries * DRIVER_COPIES)


def layer_lines(name: str, layers, append, factors: str) -> list[str]:
    """The plan's line per factored layer: its factors' sizes, memory and positions."""
    shown = []
    for layer in layers:
        path, _, _, positions, _ = layer
        d_a, d_s = widths(layer, append(layer))
        sizes = [f"A {d_a:,} x {d_a:,}"] + ([f"S {d_s:,} x {d_s:,}"] if factors == "AS" else [])
        held = 8.0 * (d_a * d_a + (d_s * d_s if factors == "AS" else 0))
        shown.append(f"{path}: {', '.join(sizes)} ({gib(held)} float64), {positions:,} position"
                     f"{'' if positions == 1 else 's'} per example")
    return [f"{name}: {len(shown)} layer{'' if len(shown) == 1 else 's'}: " + "; ".join(shown)] if shown else []


def layer_sums(sums: Sums, kind: str, factor: str) -> dict[str, np.ndarray]:
    """``{layer path: sum}`` of one factor of one request kind, in the order summed (model order)."""
    prefix, suffix = f"{kind}/", f"/{factor}"
    return {key[len(prefix):-len(suffix)]: sums.raw(key) for key in sums.total.sums
            if key.startswith(prefix) and key.endswith(suffix)}


def factor_means(sums: Sums, kind: str, factors: tuple[str, ...]) -> dict | None:
    """``{factor: {layer path: sum / sum_i s_i, symmetrised}}`` for each of ``factors``, and
    ``positions``: each layer's positions per example; None when no batch summed ``kind``."""
    if f"{kind}/weight" not in sums:
        return None
    weight = float(sums.raw(f"{kind}/weight"))
    means = {factor: {path: symmetric(value / weight) for path, value in layer_sums(sums, kind, factor).items()}
             for factor in factors}
    means["positions"] = {path: float(p) / weight for path, p in layer_sums(sums, kind, "positions").items()}
    return means


def s_stderr(sums: Sums) -> dict[str, np.ndarray]:
    """``{layer path: standard error of S}`` for ``fisher_type: mc``: the ratio estimator's, as
    ``ggn_diagonal_stderr`` (``sum_i s_i^2 (S_i - S)**2`` over the examples, each entry's square
    root over ``sum_i s_i``), ``S_i`` example i's own factor over its draws."""
    weight = float(sums.raw("kfac/weight"))
    out = {}
    for path, total in layer_sums(sums, "kfac", "S").items():
        estimate = total / weight
        spread = (sums.raw(f"kfac/{path}/S_w2q2") - 2.0 * estimate * sums.raw(f"kfac/{path}/S_w2q")
                  + estimate ** 2 * sums.raw(f"kfac/{path}/S_w2"))
        out[path] = symmetric(np.sqrt(np.maximum(spread, 0.0)) / weight)
    return out


def ekfac_eigenvalues(means: dict, weight: float, operator, request_of) -> dict[str, np.ndarray]:
    """EK-FAC's eigenvalues ``{layer path: [d_A, d_S]}``: one pass over the data summing the
    squared per-example gradients in the eigenbases of ``means`` (``factor_means``: ``A``, ``S``;
    ``numpy.linalg.eigh``, ascending), divided by ``weight`` (``sum_i s_i``); ``request_of(bases)``
    gives the pass's ``KroneckerRequest`` of kind ``kfac_eigen``."""
    bases = {path: (np.linalg.eigh(means["A"][path])[1], np.linalg.eigh(means["S"][path])[1]) for path in means["A"]}
    eigen_sums = operator.kronecker(request_of(bases))
    return {path: eigen.reshape(len(bases[path][0]), len(bases[path][1])) / weight
            for path, eigen in layer_sums(eigen_sums, "kfac_eigen", "eigen").items()}


def symmetric(matrix: np.ndarray) -> np.ndarray:
    """``(M + M^T) / 2``: a sum of outer products, symmetric up to float rounding."""
    return (matrix + matrix.T) / 2


# ------------------------------------------------------------------------------ the unit

#: Backward passes per label column, in gradients (as the per-layer rules measure them).
COLUMN_GRADIENTS = 0.8


def bias_row(layer) -> bool:
    """Whether a factored layer's ``A`` has the bias's trailing 1 (its bias is selected)."""
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
        "max_dimension": MAX_DIMENSION,
    }
    files = ("kfac.parquet", "kfac_eigen.parquet")

    def per_layer(self, options):
        return True

    def notes(self, options, facts):
        """The plan's line per layer; refuses ``fisher_type: mc`` for a loss without a predictive
        distribution to draw labels from."""
        if options["fisher_type"] == "mc" and not facts.predictive:
            raise InputError("quantities.kfac: fisher_type mc draws labels from the loss's predictive distribution, "
                             "and this loss has none (crossentropy and mse have): use fisher_type: empirical or exact")
        return layer_lines(self.name, facts.factor_layers, bias_row, "AS")

    def cost(self, options, w, m, asked, prepared=None):
        check_widths(self.name, w.factor_layers, bias_row, options["max_dimension"])
        columns = {"empirical": 1, "mc": options["samples"], "exact": w.outputs}[options["fisher_type"]]
        main = FORWARD_GRADIENTS + 1.0 + columns * COLUMN_GRADIENTS
        # The EK-FAC pass repeats the factors' passes and adds the rotated products: its time is
        # counted here (a pass's own unit is one gradient).
        eigen = options["eigen_correction"]
        return factor_cost(self.name, w, m, main * (2 if eigen else 1), 2, bias_row, passes=1 if eigen else 0)

    def _request(self, options, kind="kfac", bases=None) -> KroneckerRequest:
        return KroneckerRequest(kind, fisher_type=options["fisher_type"], samples=options["samples"],
                                reduction=options["reduction"], bases=bases or {})

    def request(self, options, context):
        return {"kronecker": (self._request(options),)}

    @staticmethod
    def _means(options, sums) -> dict | None:
        means = factor_means(sums, "kfac", ("A", "S"))
        if means is not None and options["fisher_type"] == "mc":
            means["S_stderr"] = s_stderr(sums)
        return means

    def finalize(self, options, sums):
        means = self._means(options, sums)
        return {} if means is None else {self.name: means}

    def compute(self, options, context, operator, sums):
        """EK-FAC (``eigen_correction``): one pass over the data with the factors' eigenbases."""
        if not options["eigen_correction"]:
            return None
        result = self._means(options, sums)
        if result is None:
            return None
        result["eigen"] = ekfac_eigenvalues(result, float(sums.raw("kfac/weight")), operator,
                                            lambda bases: self._request(options, "kfac_eigen", bases))
        context.say(f"kfac: EK-FAC eigenvalues of {len(result['eigen'])} layers in one more pass")
        return result

    def manifest(self, options, result):
        return {"layer_positions": result["positions"]}

    def tables(self, options, result, context):
        factors = ("A", "S", "S_stderr") if "S_stderr" in result else ("A", "S")
        out = {"kfac.parquet": tables.factors_table(
            [(path, factor, result[factor][path]) for path in result["A"] for factor in factors])}
        if "eigen" in result:
            out["kfac_eigen.parquet"] = tables.eigen_table([(path, values) for path, values in result["eigen"].items()])
        return out


UNIT = Kfac()
