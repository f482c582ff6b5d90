"""The reducer: adds partials as they arrive and divides once by the global count.

NumPy only. ``Reducer.add`` keeps one running ``Partial`` (never a list of them), so memory
does not grow with the number of shards. ``Reducer.result`` turns sums into the contract's
quantities (``../shared/CONTRACT.md`` section 1):

- means: ``sum_i s_i x_i / sum_i s_i`` (``s_i = 1`` without weights);
- regularization terms (computed once, not per example) are added after the division;
- Hutchinson diagonal: the mean over probes of ``z_k * (H z_k)``, with standard error
  ``std_k / sqrt(K)`` (sample standard deviation over the K probe estimates);
- Monte Carlo GGN diagonal: the weighted mean of ``q_r = (J^T dl(y'_r)/df)**2`` over rows
  (examples x samples), with a conservative standard error
  ``sqrt(sum_r w_r^2 (q_r - mean)^2) / sum_i s_i``: each row's draw is independent, and
  ``E (q_r - c)^2 >= Var q_r`` for any constant c, so it over-estimates the sampling error
  rather than hiding it (it also holds with one sample per example).
"""

from __future__ import annotations

import numpy as np

from pipeline.partial import Partial


class Reducer:
    """Running sum of partials; ``result()`` divides once."""

    def __init__(self) -> None:
        self.total = Partial()
        self.regularization: Partial | None = None
        self.shards = 0

    def add(self, partial: Partial) -> None:
        self.total.add(partial)
        self.shards += 1

    def add_regularization(self, partial: Partial) -> None:
        self.regularization = Partial().add(partial)

    def result(self) -> dict[str, np.ndarray]:
        return finalize(self.total, self.regularization)


def finalize(total: Partial, regularization: Partial | None = None) -> dict[str, np.ndarray]:
    """Quantities from summed partials (see the module docstring for the formulas)."""
    if total.weight_sum <= 0:
        raise ValueError("the sum of example weights is not positive: nothing to average")
    w = total.weight_sum
    sums = total.sums
    extra = regularization.sums if regularization is not None else {}

    def mean(key):
        value = sums[key] / w
        if key in extra:
            value = value + extra[key]
        return value

    out: dict[str, np.ndarray] = {"loss": np.asarray(mean("loss"), dtype=np.float64)}
    for key in ("gradient", "hessian_diagonal", "ggn_diagonal", "fisher_diagonal", "hvp"):
        if key in sums:
            out[key] = mean(key)
    if "hessian_probes" in sums:
        estimates = mean("hessian_probes")  # [K, P], one unbiased estimate per probe
        out["hessian_probes"] = estimates
        out["hessian_diagonal"] = estimates.mean(axis=0)
        k = estimates.shape[0]
        out["hessian_diagonal_stderr"] = (estimates.std(axis=0, ddof=1) / np.sqrt(k) if k > 1
                                          else np.full(estimates.shape[1], np.nan))
    if "ggn_mc" in sums:
        estimate = sums["ggn_mc"] / w
        spread = sums["ggn_mc_w2q2"] - 2.0 * estimate * sums["ggn_mc_w2q"] + estimate**2 * sums["ggn_mc_w2"]
        out["ggn_diagonal"] = estimate
        out["ggn_diagonal_stderr"] = np.sqrt(np.maximum(spread, 0.0)) / w
    return out
