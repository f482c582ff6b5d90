"""Spectral density of H by stochastic Lanczos quadrature (SLQ).

Ubaru, Chen, Saad 2017, "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature";
Ghorbani, Krishnan, Xiao 2019, "An investigation into neural net optimization via Hessian
eigenvalue density". For a unit vector ``v`` the spectral measure
``mu_v = sum_i (u_i^T v)^2 delta(lambda_i)`` has, after ``m`` Lanczos steps started at ``v``
with tridiagonal ``T = U diag(theta) U^T``, the Gauss quadrature

    integral f d mu_v ~= sum_j w_j f(theta_j),    w_j = U[0, j]^2,

exact for polynomials of degree up to ``2m - 1``. With ``v = z / sqrt(P)``, ``z`` Rademacher,
``E mu_v = (1/P) sum_i delta(lambda_i)``, the spectral density: averaged over runs,
``sum_j w_j theta_j^k`` estimates ``tr(H^k) / P``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.probes import SPECTRUM_STREAM, rademacher
from pipeline.spectrum._base import CountingOperator, Matvec, Steps, drive


@dataclass(frozen=True)
class SpectrumResult:
    """Quadrature nodes and weights of each run (a run's weights sum to 1) and their cost.

    ``nodes[r]`` and ``weights[r]`` have one entry per Lanczos step of run ``r`` (fewer than
    ``steps`` when its Krylov space became invariant early: the quadrature is then exact).
    """

    nodes: list[np.ndarray]
    weights: list[np.ndarray]
    passes: int
    matvecs: int


def spectral_density(matvec: Matvec, size: int, runs: int = 4, steps: int = 64,
                     seed: int = 0) -> SpectrumResult:
    """Stochastic Lanczos quadrature of H: ``runs`` Lanczos runs of ``steps`` steps each.

    Run ``r`` starts at ``z_r / sqrt(size)``, ``z_r`` the Rademacher vector of
    ``(seed, SPECTRUM_STREAM, r)``. The runs advance side by side: step ``j`` of every run
    still going is ONE pass with one vector per run. Each run is fully reorthogonalised
    against its own basis (no ghost copies of extreme eigenvalues); a run whose next Lanczos
    vector vanishes (``beta <= 1e-10 ||H||``, or ``size`` steps reached) stops there with an
    exact quadrature.

    Cost: ``steps`` passes (fewer if every run stops early) and ``runs * steps``
    Hessian-vector products; memory ``8 * runs * steps * size`` bytes for the bases.

    >>> import numpy as np
    >>> result = spectral_density(lambda V: V @ np.diag([1.0, 1.0, 2.0, 3.0]), size=4, runs=2)
    >>> [np.round(n, 9).tolist() for n in result.nodes], [round(float(np.sum(w)), 12) for w in result.weights]
    ([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], [1.0, 1.0])
    """
    return drive(spectral_density_steps(size, runs, steps, seed), matvec)


def spectral_density_steps(size: int, runs: int = 4, steps: int = 64, seed: int = 0) -> Steps[SpectrumResult]:
    """``spectral_density`` step by step (``pipeline.spectrum._base.Steps``)."""
    size, runs, steps = int(size), int(runs), int(steps)
    if size < 1 or runs < 1 or steps < 1:
        raise ValueError(f"size, runs and steps must be positive, got {size}, {runs}, {steps}")
    operator = CountingOperator(None, size)
    steps = min(steps, size)  # a Krylov space has at most `size` dimensions
    current = rademacher(seed, range(runs), size, SPECTRUM_STREAM) / np.sqrt(size)
    previous = np.zeros_like(current)
    basis = np.empty((runs, steps, size))
    alphas = np.zeros((runs, steps))
    betas = np.zeros((runs, steps))
    lengths = np.zeros(runs, dtype=int)
    scale = np.zeros(runs)  # running lower bound on ||H||_2, per run
    active = np.arange(runs)
    for step in range(steps):
        basis[active, step] = current[active]
        products = yield from operator.ask(current[active])
        scale[active] = np.maximum(scale[active], np.linalg.norm(products, axis=1))
        alpha = np.einsum("kp,kp->k", current[active], products)
        alphas[active, step] = alpha
        lengths[active] = step + 1
        if step == steps - 1:
            break
        residual = products - alpha[:, None] * current[active]
        if step:
            residual -= betas[active, step - 1, None] * previous[active]
        for row, run in enumerate(active):
            own = basis[run, :step + 1]
            for _ in range(2):  # twice is enough (Giraud, Langou, Rozloznik 2005)
                residual[row] -= own.T @ (own @ residual[row])
        beta = np.linalg.norm(residual, axis=1)
        betas[active, step] = beta
        going = beta > 1e-10 * scale[active]
        previous[active] = current[active]
        current[active[going]] = residual[going] / beta[going, None]
        active = active[going]
        if active.size == 0:
            break

    nodes, weights = [], []
    for run in range(runs):
        length = lengths[run]
        tridiagonal = (np.diag(alphas[run, :length]) + np.diag(betas[run, :length - 1], 1)
                       + np.diag(betas[run, :length - 1], -1))
        theta, vectors = np.linalg.eigh(tridiagonal)
        nodes.append(theta)
        weights.append(vectors[0] ** 2)
    return SpectrumResult(nodes, weights, operator.passes, operator.matvecs)


def density(nodes, weights, grid, sigma: float) -> np.ndarray:
    """Gaussian-smoothed spectral density on ``grid``, averaged over runs (for plots).

    ``phi(t) = (1/R) sum_r sum_j w_rj N(t; theta_rj, sigma^2)``; it integrates to 1 when the
    grid covers the nodes by a few ``sigma``. ``nodes`` and ``weights`` are the per-run lists of
    a ``SpectrumResult`` (or the columns of ``spectrum.parquet`` grouped by run).

    >>> import numpy as np
    >>> grid = np.linspace(-5.0, 5.0, 1001)
    >>> round(float(np.sum(density([np.array([0.0])], [np.array([1.0])], grid, 1.0)) * 0.01), 4)
    1.0
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if len(nodes) != len(weights) or len(nodes) == 0:
        raise ValueError(f"need the same positive number of runs of nodes and weights, "
                         f"got {len(nodes)} and {len(weights)}")
    grid = np.asarray(grid, dtype=np.float64)
    total = np.zeros(grid.shape)
    for theta, weight in zip(nodes, weights):
        theta = np.asarray(theta, dtype=np.float64).reshape(-1)
        weight = np.asarray(weight, dtype=np.float64).reshape(-1)
        gaps = (grid[..., None] - theta) / sigma
        total += np.exp(-0.5 * gaps ** 2) @ weight
    return total / (len(nodes) * sigma * np.sqrt(2 * np.pi))
