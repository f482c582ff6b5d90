"""The diagonal Laplace approximation around trained weights, as laplace-torch defines it.

With the weights ``w*`` (a MAP estimate), a prior ``N(0, 1/delta I)`` and the data's curvature
``H_j = c * W * F_j`` (``F`` the run's mean GGN, Fisher or Hessian diagonal of the loss, ``W``
the weight sum, which is the example count ``N`` for unweighted data, and ``c`` the factor that
turns the loss into the negative log-likelihood, below):

- posterior precision ``H_j + delta``, posterior variance ``1 / (H_j + delta)``: contract 6.3's
  ``1 / (N F + delta)`` with the likelihood's scale written out;
- log marginal likelihood (Laplace's evidence, MacKay 1992; laplace-torch's
  ``log_marginal_likelihood``):
  ``log Z(delta) = log p(D | w*) - 1/2 (sum_j log(H_j + delta) - P log delta + delta ||w*||^2)``,
  where ``log p(D | w*) = -W (c * loss + b)``.

The loss-to-likelihood factor ``c`` and the constant ``b`` per example (``K`` the output's last
dimension, which Keras losses average over; ``sigma`` the noise scale of a Gaussian likelihood):

- sparse/categorical cross-entropy: ``c = 1``, ``b = 0`` (the loss is the negative log-likelihood);
- binary cross-entropy: ``c = K``, ``b = 0`` (a sum of ``K`` Bernoulli terms);
- mean squared error: ``c = K / (2 sigma^2)``, ``b = K/2 log(2 pi sigma^2)``.

``prior_precision="auto"`` maximises ``log Z`` over ``delta``: ``d log Z / d delta =
1/2 (P/delta - sum_j 1/(H_j + delta) - ||w*||^2)`` decreases in ``delta`` (it is ``1/2 (sum_j
H_j / (delta (H_j + delta)) - ||w*||^2)``), so the optimum is its one root, found by bisection on
``log delta`` after a grid brackets it; with ``||w*|| = 0`` or all ``H_j = 0`` there is none and
``InputError`` says so. Cost: ``O(P)`` per ``delta``, numpy only.

Sources: MacKay (1992), "A practical Bayesian framework for backpropagation networks";
Daxberger et al. (2021), "Laplace Redux" (laplace-torch, ``DiagLaplace``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.errors import InputError

# The grid reported with every result: delta from 1e-6 to 1e6 times the mean data precision
# (or 1 when that is 0), 121 points, log-spaced.
GRID_DECADES, GRID_POINTS = 6.0, 121
BISECTION_STEPS = 200


@dataclass(frozen=True)
class Likelihood:
    """How a loss is a negative log-likelihood: ``-log p(y | x, w) = c * loss + b`` per example."""

    scale: float  # c
    constant: float  # b


def likelihood(family: str, outputs: int, sigma: float = 1.0) -> Likelihood:
    """The factor ``c`` and constant ``b`` of a loss family (``pipeline.curvature.losses.FAMILIES``):
    ``categorical_sparse``, ``categorical_onehot``, ``bernoulli`` or ``gaussian``; ``outputs`` is
    the output's last dimension ``K``. ``InputError`` for a loss that is no log-likelihood."""
    if family in ("categorical_sparse", "categorical_onehot"):
        return Likelihood(1.0, 0.0)
    if family == "bernoulli":
        return Likelihood(float(outputs), 0.0)
    if family == "gaussian":
        if not sigma > 0:
            raise InputError(f"--sigma-noise must be positive, got {sigma}: e.g. --sigma-noise 1")
        return Likelihood(outputs / (2.0 * sigma ** 2), 0.5 * outputs * math.log(2.0 * math.pi * sigma ** 2))
    raise InputError("the Laplace approximation needs a loss that is a negative log-likelihood (cross-entropy or "
                     "mean squared error): run a job with such a loss")


@dataclass(frozen=True)
class Laplace:
    """A fitted diagonal Laplace approximation: ``delta``, ``log Z(delta)``, the variances and
    the grid ``(deltas, log Z)``."""

    prior_precision: float
    log_marginal_likelihood: float
    posterior_variance: np.ndarray  # [P], 1 / (H + delta)
    grid_prior_precision: np.ndarray  # [G]
    grid_log_marginal_likelihood: np.ndarray  # [G]


def data_precision(curvature: np.ndarray, weight_sum: float, like: Likelihood) -> np.ndarray:
    """``H_j = c * W * F_j``: the likelihood's precision per parameter (``[P]``, float64)."""
    return like.scale * float(weight_sum) * np.asarray(curvature, dtype=np.float64)


def log_marginal_likelihood(delta, precision: np.ndarray, weights: np.ndarray, loss: float, weight_sum: float,
                            like: Likelihood) -> np.ndarray:
    """``log Z(delta)`` for one or many ``delta`` (see the module's docstring)."""
    delta = np.atleast_1d(np.asarray(delta, dtype=np.float64))
    log_likelihood = -float(weight_sum) * (like.scale * float(loss) + like.constant)
    squared = float(np.dot(weights, weights))
    size = precision.size
    log_det = np.array([np.sum(np.log(precision + d)) for d in delta])
    return log_likelihood - 0.5 * (log_det - size * np.log(delta) + delta * squared)


def _slope(delta: float, precision: np.ndarray, squared: float) -> float:
    """``2 d log Z / d delta``, decreasing in ``delta``."""
    return float(np.sum(precision / (delta * (precision + delta)))) - squared


def fit(curvature: np.ndarray, weights: np.ndarray, loss: float, weight_sum: float, like: Likelihood,
        prior_precision: float | str = "auto") -> Laplace:
    """The diagonal Laplace approximation at ``weights`` (``[P]``, the trained ``w*``) with the
    run's mean ``curvature`` (``[P]``; negative entries, possible in a Hessian diagonal, are
    clipped to 0 as laplace-torch's GGN never has them), its mean ``loss`` and ``weight_sum``;
    ``prior_precision`` a positive number or ``"auto"`` (maximise the evidence)."""
    precision = np.clip(data_precision(curvature, weight_sum, like), 0.0, None)
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    if weights.shape != precision.shape:
        raise InputError(f"the weights hold {weights.size} values and the curvature {precision.size}: the model is "
                         "not the run's")
    scale = float(np.mean(precision)) or 1.0
    grid = scale * np.logspace(-GRID_DECADES, GRID_DECADES, GRID_POINTS)
    if prior_precision == "auto":
        delta = _optimum(precision, float(np.dot(weights, weights)), grid)
    else:
        delta = float(prior_precision)
        if not (math.isfinite(delta) and delta > 0):
            raise InputError(f"--prior-precision must be a positive number or auto, got {prior_precision}")
    curve = log_marginal_likelihood(grid, precision, weights, loss, weight_sum, like)
    value = float(log_marginal_likelihood(delta, precision, weights, loss, weight_sum, like)[0])
    return Laplace(delta, value, 1.0 / (precision + delta), grid, curve)


def _optimum(precision: np.ndarray, squared: float, grid: np.ndarray) -> float:
    """The root of the evidence's slope in ``delta`` (bisection on ``log delta``)."""
    if squared == 0 or not np.any(precision > 0):
        raise InputError("the evidence has no maximum over the prior precision (the weights are all zero or the "
                         "curvature is): give --prior-precision VALUE")
    low, high = float(grid[0]), float(grid[-1])
    while _slope(low, precision, squared) <= 0:
        low /= 1e3
        if low < 1e-300:
            raise InputError("the evidence's maximum lies below any representable prior precision: give "
                             "--prior-precision VALUE")
    while _slope(high, precision, squared) >= 0:
        high *= 1e3
        if high > 1e300:
            raise InputError("the evidence's maximum lies above any representable prior precision: give "
                             "--prior-precision VALUE")
    for _ in range(BISECTION_STEPS):
        middle = math.sqrt(low * high)
        if _slope(middle, precision, squared) > 0:
            low = middle
        else:
            high = middle
        if high / low < 1 + 1e-13:
            break
    return math.sqrt(low * high)
