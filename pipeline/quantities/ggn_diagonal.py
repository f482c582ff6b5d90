"""``ggn_diagonal``: the diagonal of the generalised Gauss-Newton matrix
``G = (1/N) sum_i s_i J_i^T Lambda_i J_i``, ``Lambda_i = d2 l_i / d f_i2``.

- ``method: exact``: ``Lambda_i`` factored by its eigendecomposition, one vector-Jacobian
  product per output value (C per example): with per-layer rules
  (``pipeline.curvature.layer_rules``) one backward pass to the layer outputs per output value
  for the whole batch, about 1.5 + 0.8 C gradients per batch; about 1 + 4 C by per-example
  products of the whole model for the variables without a rule.
- ``method: mc``: ``samples`` labels per example drawn from the model's predictive
  distribution (keyed by ``(seed, sample, row)``, so shard-invariant), one product each, with a
  conservative standard error ``sqrt(sum_r w_r^2 (q_r - mean)^2) / sum_i s_i``: each row's draw
  is independent and ``E (q_r - c)^2 >= Var q_r`` for any constant c, so it over-estimates the
  sampling error rather than hiding it (it also holds with one sample per example).

Source: Martens (2014), "New insights and perspectives on the natural gradient method";
BackPACK (Dangel et al., 2020) for the exact and Monte Carlo GGN diagonal.
"""

from __future__ import annotations

import numpy as np

from pipeline import cost
from pipeline.options import Option, choice, positive_int
from pipeline.quantities._base import Quantity


def per_example_notes(facts) -> list[str]:
    """The plan's notes on how the Fisher and GGN products are formed: per-layer rules for how
    many parameters, per-example products for which variables, and whether those run one
    example at a time."""
    notes = []
    routes, sizes = facts.layer_routes, facts.variable_sizes
    if routes:
        covered = sum(sizes.get(name, 0) for name, how in routes.items() if how == "layer rule")
        rest = [name for name, how in routes.items() if how != "layer rule"]
        line = (f"Fisher/GGN products: per-layer rules for {covered:,} of {sum(sizes.values()):,} parameters "
                "(Dense, Conv1D/2D, Embedding, normalisation scale/shift)")
        if rest:
            shown = ", ".join(rest[:6]) + (f" and {len(rest) - 6} more" if len(rest) > 6 else "")
            line += f"; per-example products of the whole model for {shown}"
        notes.append(line)
    checked = facts.route_checks.get("per_example_route")
    if checked and (not routes or any(h != "layer rule" for h in routes.values())):
        notes.append(f"Fisher/GGN per-example products: {checked}")
    elif facts.per_example_route == "loop" and (not routes or any(h != "layer rule" for h in routes.values())):
        notes.append("the Fisher/GGN per-example products run one example at a time (recurrent loops, or "
                     "einsum/attention in float32 on CPU, which vectorised crashes TensorFlow's oneDNN kernels): "
                     "slower")
    return notes


class GgnDiagonal(Quantity):
    name = "ggn_diagonal"
    help = "diagonal of the generalised Gauss-Newton matrix"
    options = {
        "method": Option(choice("exact", "mc"), "exact", "exact, or mc (Monte Carlo with labels sampled from the model)"),
        "samples": Option(positive_int(1), 1, "Monte Carlo samples per example (with mc)"),
    }
    columns = ("ggn_diagonal", "ggn_diagonal_stderr")
    label, color, line_width = "GGN", "#ff7f0e", 1.4

    def routes(self, options):
        return ("per_example_route",)

    def notes(self, options, facts):
        return per_example_notes(facts)

    def cost(self, options, w, m, asked, prepared=None):
        products = w.outputs if options.get("method") == "exact" else int(options.get("samples", 1))
        main, held = cost.per_example(w, m, products)
        held += 8 * w.batch_size * w.outputs * (w.outputs + 2)  # output derivatives and their Hessians
        exact = options.get("method") == "exact" and w.outputs > 1
        return cost.QuantityCost(self.name, main=main, worker_bytes=held,
                                 driver_bytes=2 * cost.diagonal_driver_bytes(w),
                                 remedy="set quantities.ggn_diagonal.method=mc (one sampled label per example "
                                        f"instead of {w.outputs} output columns)" if exact else "")

    def request(self, options, context):
        return {"ggn_diagonal": options["method"], "ggn_samples": options["samples"]}

    def finalize(self, options, sums):
        if "ggn_mc" in sums and (options is None or options["method"] == "mc"):
            w = sums.weight_sum
            estimate = sums.raw("ggn_mc") / w
            spread = (sums.raw("ggn_mc_w2q2") - 2.0 * estimate * sums.raw("ggn_mc_w2q")
                      + estimate**2 * sums.raw("ggn_mc_w2"))
            return {"ggn_diagonal": estimate, "ggn_diagonal_stderr": np.sqrt(np.maximum(spread, 0.0)) / w}
        if "ggn_diagonal" in sums:
            return {"ggn_diagonal": sums.mean("ggn_diagonal")}
        return {}


UNIT = GgnDiagonal()
