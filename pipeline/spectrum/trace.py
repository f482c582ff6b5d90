"""The trace of H from matrix-vector products: Hutchinson, Hutch++, and exact from the diagonal.

Probe ``k`` is the Rademacher vector of ``(seed, TRACE_STREAM, k)`` alone
(``pipeline.probes.rademacher``), so the estimate does not depend on the sharding or on how
the probes are split into passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.probes import TRACE_STREAM, rademacher
from pipeline.spectrum._base import (CountingOperator, Matvec, Steps, _chunks, drive, orthogonalise,
                                     orthonormal_rows)

#: Most vectors sent in one pass (bounds the memory of a pass on the workers).
MAX_BLOCK = 64


@dataclass(frozen=True)
class TraceResult:
    """A trace estimate, its standard error (0 when exact) and its cost.

    The fields ``method``, ``estimate``, ``stderr``, ``matvecs`` are the columns of
    ``trace.parquet``.
    """

    method: str
    estimate: float
    stderr: float
    matvecs: int
    passes: int


def trace_passes(method: str, probes: int, max_block: int = MAX_BLOCK) -> int:
    """Passes over the data the trace will take (for plans and ``--dry-run``).

    ``exact``: 0 (the diagonal's own passes); ``hutchinson``: ``ceil(K / max_block)``;
    ``hutch++``: the sketch pass(es) for ``K // 3`` probes, then those of the other ``K - K // 3``.

    >>> trace_passes("hutchinson", 100), trace_passes("hutch++", 100), trace_passes("hutch++", 30)
    (2, 3, 2)
    """
    def ceil(count: int) -> int:
        return -(-count // max_block)

    if method == "exact":
        return 0
    if method == "hutchinson":
        return ceil(probes)
    if method == "hutch++":
        return ceil(probes // 3) + ceil(probes - probes // 3)
    raise ValueError(f"unknown trace method {method!r}: exact, hutchinson or hutch++")


def _mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    """Sample mean and its standard error ``std(ddof=1) / sqrt(K)`` (NaN for one value)."""
    if values.size < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(values.size))


def _check(size: int, probes: int, least: int) -> None:
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if probes < least:
        raise ValueError(f"at least {least} probes are needed, got {probes}")


def hutchinson_trace(matvec: Matvec, size: int, probes: int = 100, seed: int = 0,
                     max_block: int = MAX_BLOCK) -> TraceResult:
    """Hutchinson's estimator (Hutchinson 1989): ``tr(H) ~= (1/K) sum_k z_k^T H z_k``.

    ``z_k`` Rademacher, so ``E z^T H z = tr(H)`` and
    ``Var z^T H z = 2 (||H||_F^2 - sum_i H_ii^2)``. The standard error is the sample standard
    deviation of the ``K`` values ``z_k^T H z_k`` (``ddof=1``) over ``sqrt(K)`` (NaN for K = 1).

    Cost: ``K = probes`` Hessian-vector products in ``ceil(K / max_block)`` passes of nearly
    equal size (2 passes of 50 for the default 100 probes and ``max_block = 64``). When
    ``size <= probes`` (a small block of H), the ``size`` basis vectors give the exact trace for
    fewer products: standard error 0, ``matvecs = size``.

    >>> import numpy as np
    >>> result = hutchinson_trace(lambda V: V @ np.diag([1.0, 2.0, 3.0]), size=3, probes=8)
    >>> result.estimate, result.stderr, result.matvecs, result.passes
    (6.0, 0.0, 3, 1)
    """
    return drive(hutchinson_steps(size, probes, seed, max_block), matvec)


def hutchinson_steps(size: int, probes: int = 100, seed: int = 0, max_block: int = MAX_BLOCK) -> Steps[TraceResult]:
    """``hutchinson_trace`` step by step (``pipeline.spectrum._base.Steps``)."""
    size, probes = int(size), int(probes)
    _check(size, probes, 1)
    operator = CountingOperator(None, size)
    if size <= probes:  # the basis vectors cost no more than the probes, and are exact
        products = yield from operator.ask_in_chunks(np.eye(size), max_block)
        return TraceResult("hutchinson", float(np.trace(products)), 0.0, operator.matvecs, operator.passes)
    quadratic = []
    # Probes are drawn pass by pass: memory is one pass's vectors, not all K of them.
    for indices in _chunks(np.arange(probes), max_block):
        z = rademacher(seed, indices, size, stream=TRACE_STREAM)
        quadratic.append(np.einsum("kp,kp->k", z, (yield from operator.ask(z))))
    quadratic = np.concatenate(quadratic)
    estimate, stderr = _mean_and_stderr(quadratic)
    return TraceResult("hutchinson", estimate, stderr, operator.matvecs, operator.passes)


def hutchpp_trace(matvec: Matvec, size: int, probes: int = 100, seed: int = 0,
                  max_block: int = MAX_BLOCK) -> TraceResult:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021, "Hutch++: Optimal Stochastic Trace Estimation").

    With a budget of ``m = probes`` Hessian-vector products:

    1. sketch: ``Y = H S`` for ``s = m // 3`` Rademacher probes ``S`` (probes ``0..s-1``),
       ``Q`` = orthonormal basis of the range of ``Y`` (numerical rank ``r <= s``);
    2. ``tr(H) = tr(Q^T H Q) + tr((I - QQ^T) H (I - QQ^T))``: the first term exactly from
       ``H Q``, the second by Hutchinson with the remaining ``g = m - s - r`` probes ``G``
       (probes ``s..s+g-1``) projected out of ``Q``.

    ``H Q`` and ``H (I - QQ^T) G`` go in the same pass. When ``H`` has a few large eigenvalues
    ``Q`` captures them and the variance left is that of the small rest: error
    ``O(1/m)`` instead of Hutchinson's ``O(1/sqrt(m))`` for a positive semi-definite ``H``.
    The standard error is that of the Hutchinson part (the low-rank part is exact given
    ``Q``): sample std of ``g_k^T (I-QQ^T) H (I-QQ^T) g_k`` (``ddof=1``) over ``sqrt(g)``; 0 when
    ``Q`` spans the whole space, NaN when ``g = 1``. The estimate is unbiased for any ``Q``
    drawn independently of ``G``.

    When the products left cover the rest of the space (``size - r <= g``: a small block of
    H), step 2 uses an orthonormal basis of the complement of ``Q`` instead of random probes and
    the estimate is exact (standard error 0, ``s + size`` products at most). Before, a
    4-parameter block could report a standard error of 0 by chance (two equal samples).

    Cost: exactly ``m`` Hessian-vector products in 2 passes when ``m - s <= max_block``
    (else the passes are split to at most ``max_block`` vectors each: 3 with ``m = 100``).
    ``probes`` must be at least 3.

    >>> import numpy as np
    >>> H = np.diag([100.0, 10.0] + [0.0] * 8)    # rank 2: the sketch captures all of it
    >>> result = hutchpp_trace(lambda V: V @ H, size=10, probes=9)
    >>> round(result.estimate, 9), round(result.stderr, 9), result.matvecs, result.passes
    (110.0, 0.0, 9, 2)
    """
    return drive(hutchpp_steps(size, probes, seed, max_block), matvec)


def hutchpp_steps(size: int, probes: int = 100, seed: int = 0, max_block: int = MAX_BLOCK) -> Steps[TraceResult]:
    """``hutchpp_trace`` step by step (``pipeline.spectrum._base.Steps``)."""
    size, probes = int(size), int(probes)
    _check(size, probes, 3)
    operator = CountingOperator(None, size)
    sketch = probes // 3
    products = yield from operator.ask_in_chunks(rademacher(seed, range(sketch), size, TRACE_STREAM),
                                                 max_block)
    scale = np.linalg.norm(products, axis=1).max()
    # Directions of the sketch at rounding level carry nothing: drop them, give the
    # products they would have cost to the Hutchinson part.
    basis, _ = orthonormal_rows(products, 1e-12 * scale * np.sqrt(sketch))
    rank = basis.shape[0]
    count = probes - sketch - rank
    exact = size - rank <= count  # the products left span the rest of the space (a small H)
    if exact:  # an orthonormal basis of the complement of Q: that part is exact too
        residual, _ = orthonormal_rows(orthogonalise(np.eye(size), [basis]), 0.5)
    else:
        residual = orthogonalise(
            rademacher(seed, range(sketch, sketch + count), size, TRACE_STREAM), [basis])
    images = yield from operator.ask_in_chunks(np.concatenate([basis, residual]), max_block)
    exact_part = float(np.einsum("kp,kp->", basis, images[:rank]))
    if exact:
        estimate, stderr = exact_part + float(np.einsum("kp,kp->", residual, images[rank:])), 0.0
    else:
        mean, stderr = _mean_and_stderr(np.einsum("kp,kp->k", residual, images[rank:]))
        estimate = exact_part + mean
    return TraceResult("hutch++", estimate, stderr, operator.matvecs, operator.passes)


def exact_trace(diagonal: np.ndarray) -> TraceResult:
    """``tr(H) = sum_i H_ii`` from the exact diagonal (float64 sum; standard error 0).

    ``matvecs`` and ``passes`` are 0: the diagonal's own cost is reported with the diagonal.

    >>> exact_trace([1.0, 2.0, 3.0]).estimate
    6.0
    """
    diagonal = np.asarray(diagonal, dtype=np.float64).reshape(-1)
    return TraceResult("exact", float(np.sum(diagonal)), 0.0, 0, 0)
