"""Extreme eigenvalues of H by block Lanczos with full reorthogonalisation.

Block Lanczos (Golub and Underwood 1977; Cullum and Donath 1974) builds an orthonormal basis
``X_0, X_1, ...`` (blocks of ``b`` vectors) of the block Krylov space
``span{X_0, H X_0, H^2 X_0, ...}`` by the three-term recurrence

    H X_j = X_{j-1} B_{j-1}^T + X_j A_j + X_{j+1} B_j,      A_j = X_j^T H X_j,

so that the projected matrix ``T = X^T H X`` is block tridiagonal (``A_j`` on the diagonal,
``B_j`` below it). The eigenpairs ``(theta, s)`` of ``T`` give Ritz pairs ``(theta, X s)`` that
converge first at both ends of the spectrum, and the residual of a Ritz pair costs nothing:
``||H X s - theta X s|| = ||B_j s_j||`` with ``s_j`` the last block of ``s``.

Each block step is ONE pass over the data (one call of ``matvec`` with ``b`` vectors), and a
pass with ``b`` vectors costs much less than ``b`` passes, so the block buys passes: the
Krylov space grows by ``b`` dimensions per pass, and a block at least as big as the number of
wanted eigenvalues converges to clustered or repeated ones. The basis is kept and every new
block is reorthogonalised against all of it (no spurious copies of converged eigenvalues);
memory is ``8 * P * b * steps`` bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.probes import EIGENVALUE_STREAM, gaussian
from pipeline.spectrum._base import CountingOperator, Matvec, Steps, drive, orthogonalise, orthonormal_rows

# Lanczos start (and refill) vector k comes from (seed, EIGENVALUE_STREAM, k) alone.

WHICH = ("largest", "smallest", "magnitude")

#: Largest default block: the engine computes HVPs in chunks of 16 vectors (``hvp_block``),
#: and a bigger block makes each pass and the basis heavier for few passes saved.
MAX_DEFAULT_BLOCK = 16


@dataclass(frozen=True)
class EigenResult:
    """Ritz approximations of the wanted eigenpairs, rank 1 first (in the order of ``which``).

    ``residuals[i] = ||H v_i - eigenvalues[i] v_i||`` for the unit Ritz vector ``v_i``, computed
    with a true matrix-vector product (not the Lanczos estimate). ``passes`` and ``matvecs``
    include that final pass. ``converged`` is whether every reported residual meets the
    tolerance.
    """

    eigenvalues: np.ndarray
    residuals: np.ndarray
    eigenvectors: np.ndarray | None
    passes: int
    matvecs: int
    converged: bool


def default_block(top: int) -> int:
    """Block size used when none is given: ``min(max(top, 4), 16)``.

    At least the number of wanted eigenvalues, so repeated and clustered ones are found and
    every pass advances all of them. Bigger blocks always took fewer passes in our tests
    (P = 1500, tol 1e-6, passes for b = 1 / 4 / 8 / 16): top 1 of a Hessian-like spectrum
    (10 outliers over a bulk near 0) 16 / 7 / 6 / 5; its 5 smallest (the bulk edge)
    100 / 44 / 30 / 24. But a pass also pays one backward pass per vector (``HvpProducts.products``),
    so past about 4 vectors the passes saved stop paying for the vectors added; the floor of
    4 takes the big early gain (16 -> 7). At most ``MAX_DEFAULT_BLOCK``, which bounds each
    pass and the basis memory.
    """
    return int(min(max(top, 4), MAX_DEFAULT_BLOCK))


def _order(theta: np.ndarray, which: str) -> np.ndarray:
    if which == "largest":
        return np.argsort(-theta, kind="stable")
    if which == "smallest":
        return np.argsort(theta, kind="stable")
    return np.argsort(-np.abs(theta), kind="stable")


def _block_tridiagonal(diagonal: list[np.ndarray], below: list[np.ndarray]) -> np.ndarray:
    """``T`` from its diagonal blocks ``A_j`` ``[b_j, b_j]`` and ``B_j`` ``[b_{j+1}, b_j]``."""
    sizes = [a.shape[0] for a in diagonal]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    projected = np.zeros((starts[-1], starts[-1]))
    for j, a in enumerate(diagonal):
        projected[starts[j]:starts[j + 1], starts[j]:starts[j + 1]] = a
        if j + 1 < len(diagonal):
            coupling = below[j]
            projected[starts[j + 1]:starts[j + 2], starts[j]:starts[j + 1]] = coupling
            projected[starts[j]:starts[j + 1], starts[j + 1]:starts[j + 2]] = coupling.T
    return projected


def top_eigenvalues(matvec: Matvec, size: int, top: int = 5, which: str = "largest",
                    iterations: int = 100, tol: float = 1e-6, seed: int = 0,
                    block: int | None = None, eigenvectors: bool = True,
                    start: np.ndarray | None = None) -> EigenResult:
    """The ``top`` extreme eigenvalues of the symmetric ``H`` (``size x size``) by block Lanczos.

    ``matvec(V)`` returns ``H V`` row by row (``V`` is ``[K, size]``; one call = one pass over the
    data). ``which``: ``"largest"`` (algebraic, descending), ``"smallest"`` (algebraic,
    ascending) or ``"magnitude"`` (by ``|lambda|``, descending); rank 1 comes first.

    Stopping rule, checked after every block step with the recurrence's free residual
    estimates: every wanted Ritz pair has ``||H v - theta v|| <= tol * max_i |theta_i|``, i.e.
    ``tol`` is *relative* to the largest Ritz value in magnitude (an estimate of ``||H||_2``),
    so rescaling the loss does not change when Lanczos stops. ``iterations`` bounds the block
    steps. Then one more pass applies ``H`` to all wanted Ritz vectors at once and the
    reported residuals are these true ``||H v - theta v||``; ``converged`` says whether they
    all meet the tolerance. The eigenvalue error of a converged pair is at most its residual
    (and about ``residual**2 / gap`` when it is separated from the rest of the spectrum).

    Block size ``b = block`` or ``default_block(top)``. The start block is ``b`` Gaussian
    vectors ``(seed, EIGENVALUE_STREAM, k)``, ``k = 0..b-1``; with ``start`` (``[k, size]``, e.g.
    the Ritz vectors of a previous checkpoint of the same model) its first ``min(k, b)`` rows
    replace the first random ones: a warm start, which needs fewer steps when the wanted
    eigenvectors changed little and gives the same eigenvalues (the stopping rule and the
    residuals do not depend on the start). When part of the new block
    vanishes (an invariant subspace: H of low rank, or ``size`` reached) those directions are
    deflated and replaced by fresh seeded random vectors orthogonal to the basis, so a
    rank-deficient ``H`` gives its nonzero eigenvalues and exact zeros. Once the basis spans
    the whole space (``size`` small) the results are exact.

    Cost: at most ``iterations + 1`` passes and ``b * iterations + top`` Hessian-vector
    products; memory ``8 * size * b * steps`` bytes for the basis.

    >>> import numpy as np
    >>> H = np.diag(np.arange(1.0, 101.0))
    >>> result = top_eigenvalues(lambda V: V @ H, size=100, top=3)
    >>> np.round(result.eigenvalues, 6).tolist(), result.converged
    ([100.0, 99.0, 98.0], True)
    """
    return drive(top_eigenvalues_steps(size, top, which, iterations, tol, seed, block, eigenvectors, start), matvec)


def _checked(size: int, top: int, which: str, iterations: int, tol: float, block: int | None):
    """``(size, top, iterations, width)`` of a Lanczos run as integers, ``top`` and the block
    ``width`` at most ``size``; a ``ValueError`` for an argument out of its range."""
    size, top, iterations = int(size), int(top), int(iterations)
    if which not in WHICH:
        raise ValueError(f"which must be one of {', '.join(WHICH)}, got {which!r}")
    if size < 1 or top < 1 or iterations < 1:
        raise ValueError(f"size, top and iterations must be positive, got {size}, {top}, {iterations}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    width = default_block(top) if block is None else int(block)
    if width < 1:
        raise ValueError(f"block must be positive, got {block}")
    top, width = min(top, size), min(width, size)
    return size, top, iterations, width


def top_eigenvalues_steps(size: int, top: int = 5, which: str = "largest", iterations: int = 100,
                          tol: float = 1e-6, seed: int = 0, block: int | None = None,
                          eigenvectors: bool = True, start: np.ndarray | None = None) -> Steps[EigenResult]:
    """``top_eigenvalues`` step by step (``pipeline.spectrum._base.Steps``): yields each block of
    vectors to multiply by ``H`` and returns the ``EigenResult``."""
    size, top, iterations, width = _checked(size, top, which, iterations, tol, block)
    operator = CountingOperator(None, size)

    def draw(first: int, count: int) -> np.ndarray:
        return gaussian(seed, range(first, first + count), size, EIGENVALUE_STREAM)

    # Vectors this small after orthogonalisation are rounding noise, not new directions.
    fresh_floor = 1e-10 * np.sqrt(size)
    initial = draw(0, width)
    if start is not None:
        start = np.asarray(start, dtype=np.float64).reshape(-1, size)[:width]
        initial[:len(start)] = start / np.maximum(np.linalg.norm(start, axis=1, keepdims=True), 1e-300)
    current, _ = orthonormal_rows(initial, fresh_floor)
    drawn = width
    basis: list[np.ndarray] = []
    diagonal: list[np.ndarray] = []
    below: list[np.ndarray] = []
    scale = 0.0  # running lower bound on ||H||_2
    for _ in range(iterations):
        products = yield from operator.ask(current)
        scale = max(scale, float(np.linalg.norm(products, axis=1).max()))
        a = current @ products.T
        a = (a + a.T) / 2
        residual = products - a @ current
        if basis:
            residual -= below[-1] @ basis[-1]
        basis.append(current)
        diagonal.append(a)
        residual = orthogonalise(residual, basis)
        # A residual direction at rounding level of ||H|| means an invariant subspace: deflate.
        following, coupling = orthonormal_rows(residual, 1e-11 * scale)
        dimension = sum(x.shape[0] for x in basis)
        room = size - dimension
        if following.shape[0] > room:  # cannot happen in exact arithmetic; rounding guard
            following, coupling = following[:room], coupling[:room]
        missing = min(width, room) - following.shape[0]
        if missing > 0:
            fresh = orthogonalise(draw(drawn, missing), basis + [following])
            drawn += missing
            fresh, _ = orthonormal_rows(fresh, fresh_floor)
            following = np.concatenate([following, fresh])
            coupling = np.concatenate([coupling, np.zeros((fresh.shape[0], coupling.shape[1]))])

        theta, ritz = np.linalg.eigh(_block_tridiagonal(diagonal, below))
        last = ritz[dimension - current.shape[0]:]
        estimates = np.linalg.norm(coupling @ last, axis=0)
        wanted = _order(theta, which)[:top]
        threshold = tol * float(np.abs(theta).max())
        if following.shape[0] == 0:
            break
        if wanted.size == top and np.all(estimates[wanted] <= threshold):
            break
        below.append(coupling)
        current = following

    starts = np.cumsum([0] + [x.shape[0] for x in basis])
    vectors = sum(ritz[starts[j]:starts[j + 1], wanted].T @ x for j, x in enumerate(basis))
    values = theta[wanted]
    residuals = np.linalg.norm((yield from operator.ask(vectors)) - values[:, None] * vectors, axis=1)
    return EigenResult(
        eigenvalues=values,
        residuals=residuals,
        eigenvectors=vectors if eigenvectors else None,
        passes=operator.passes,
        matvecs=operator.matvecs,
        converged=bool(np.all(residuals <= threshold)),
    )
