"""pipeline.spectrum against dense NumPy matrices: the operator is ``V @ A`` with A symmetric.

Stochastic estimators are checked for unbiasedness over seeds and against exact answers of
small matrices; every algorithm's reported cost is checked against a CountingOperator.
"""

from __future__ import annotations

import doctest

import numpy as np
import pytest

import pipeline.spectrum as spectrum
from pipeline.probes import SPECTRUM_STREAM, rademacher
from pipeline.spectrum import (CountingOperator, default_block, density, exact_trace,
                               hutchinson_trace, hutchpp_trace, spectral_density, top_eigenvalues)
from pipeline.spectrum import _base, lanczos, slq, trace


def symmetric(eigenvalues, seed=0) -> np.ndarray:
    """``Q diag(eigenvalues) Q^T`` with a random orthogonal ``Q``."""
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((eigenvalues.size,) * 2))
    return (q * eigenvalues) @ q.T


def operator_of(matrix) -> CountingOperator:
    return CountingOperator(lambda V: V @ matrix, matrix.shape[0])


# Outliers at both ends over a bulk in (-1, 1): separated top, bottom and magnitude ends.
OUTLIERS = [10.0, 9.0, 8.0, 7.0, 6.0, -9.5, -8.5, -5.0, -4.5, -4.0]
SEPARATED = symmetric(OUTLIERS + list(np.random.default_rng(1).uniform(-1, 1, 190)), seed=2)
EXPECTED = {
    "largest": [10.0, 9.0, 8.0, 7.0, 6.0],
    "smallest": [-9.5, -8.5, -5.0, -4.5, -4.0],
    "magnitude": [10.0, -9.5, 9.0, -8.5, 8.0],
}


# ---------------------------------------------------------------- Lanczos


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_top_eigenvalues_match_eigvalsh(which):
    exact = np.linalg.eigvalsh(SEPARATED)
    np.testing.assert_allclose(np.sort(exact)[[-1, 0]], [10.0, -9.5], atol=1e-12)
    operator = operator_of(SEPARATED)
    tol = 1e-9
    result = top_eigenvalues(operator, 200, top=5, which=which, tol=tol, seed=3)

    assert result.converged
    np.testing.assert_allclose(result.eigenvalues, EXPECTED[which], rtol=0, atol=1e-8 * 10)
    # Reported residuals are true residuals of the returned unit Ritz vectors, within tol.
    vectors = result.eigenvectors
    assert vectors.shape == (5, 200)
    np.testing.assert_allclose(vectors @ vectors.T, np.eye(5), atol=1e-10)
    true = np.linalg.norm(vectors @ SEPARATED - result.eigenvalues[:, None] * vectors, axis=1)
    np.testing.assert_allclose(result.residuals, true, rtol=1e-6, atol=1e-13)
    assert np.all(result.residuals <= tol * np.abs(exact).max())
    # Cost: one pass per block step of b vectors, plus one pass with the 5 Ritz vectors.
    assert (result.passes, result.matvecs) == (operator.passes, operator.matvecs)
    b = default_block(5)
    assert result.matvecs == b * (result.passes - 1) + 5
    assert result.passes <= 60


def test_top_eigenvalues_block_and_seed():
    operator = operator_of(SEPARATED)
    one = top_eigenvalues(operator, 200, top=2, block=1, tol=1e-9, seed=5)
    np.testing.assert_allclose(one.eigenvalues, [10.0, 9.0], atol=1e-7)
    assert one.matvecs == one.passes - 1 + 2 == operator.matvecs
    # The start block is a function of the seed: same seed, same numbers.
    again = top_eigenvalues(operator_of(SEPARATED), 200, top=2, block=1, tol=1e-9, seed=5)
    np.testing.assert_array_equal(one.eigenvalues, again.eigenvalues)
    assert top_eigenvalues(operator_of(SEPARATED), 200, top=2, eigenvectors=False).eigenvectors is None


def test_rank_deficient_gives_nonzero_eigenvalues_and_zeros():
    u = np.linalg.qr(np.random.default_rng(4).standard_normal((50, 3)))[0]
    matrix = (u * [3.0, 2.0, 1.0]) @ u.T
    for block in (None, 1):  # with b = 1 the Krylov space is invariant after 4 dimensions
        operator = operator_of(matrix)
        result = top_eigenvalues(operator, 50, top=5, block=block)
        np.testing.assert_allclose(result.eigenvalues, [3.0, 2.0, 1.0, 0.0, 0.0], atol=1e-10)
        assert result.converged and np.all(result.residuals < 1e-10)
        assert result.passes == operator.passes < 10
    smallest = top_eigenvalues(operator_of(matrix), 50, top=4, which="smallest")
    np.testing.assert_allclose(smallest.eigenvalues, np.zeros(4), atol=1e-10)


def test_small_problem_is_exact():
    # size 6 < top * b: the Krylov space is the whole space after two steps.
    matrix = symmetric([5.0, 4.0, 3.0, -1.0, -2.0, 0.5], seed=6)
    result = top_eigenvalues(operator_of(matrix), 6, top=5, tol=1e-14)
    np.testing.assert_allclose(result.eigenvalues, [5.0, 4.0, 3.0, 0.5, -1.0], atol=1e-12)
    assert result.passes <= 3
    everything = top_eigenvalues(operator_of(matrix), 6, top=10)
    assert everything.eigenvalues.size == 6


def test_iteration_bound_and_not_converged():
    matrix = symmetric(np.linspace(-1, 1, 200), seed=7)  # no gap: slow
    operator = operator_of(matrix)
    result = top_eigenvalues(operator, 200, top=3, iterations=2, tol=1e-12)
    assert not result.converged
    assert result.passes == operator.passes == 3
    assert result.matvecs == 2 * default_block(3) + 3


def test_top_eigenvalues_rejects_bad_arguments():
    with pytest.raises(ValueError, match="which"):
        top_eigenvalues(lambda V: V, 10, which="biggest")
    with pytest.raises(ValueError, match="tol"):
        top_eigenvalues(lambda V: V, 10, tol=0)
    with pytest.raises(ValueError, match="shape"):
        top_eigenvalues(lambda V: V[:, :-1], 10)


# ---------------------------------------------------------------- trace

TRACE_MATRIX = symmetric(np.random.default_rng(8).uniform(-1.0, 3.0, 100), seed=9)


@pytest.mark.parametrize("estimator", [hutchinson_trace, hutchpp_trace])
def test_trace_estimators_are_unbiased_within_stderr(estimator):
    exact = np.trace(TRACE_MATRIX)
    inside = 0
    for seed in range(50):
        result = estimator(lambda V: V @ TRACE_MATRIX, 100, probes=30, seed=seed)
        inside += abs(result.estimate - exact) <= 3 * result.stderr
    assert inside >= 45


def test_hutchpp_beats_hutchinson_on_low_rank_dominated_matrix():
    eigenvalues = np.concatenate([np.linspace(10, 100, 10),
                                  0.01 * np.random.default_rng(10).standard_normal(190)])
    matrix = symmetric(eigenvalues, seed=11)
    exact = np.trace(matrix)
    plain = [abs(hutchinson_trace(lambda V: V @ matrix, 200, 60, seed).estimate - exact)
             for seed in range(10)]
    plus = [abs(hutchpp_trace(lambda V: V @ matrix, 200, 60, seed).estimate - exact)
            for seed in range(10)]
    assert np.mean(plus) < 0.01 * np.mean(plain)


def test_trace_costs_equal_the_budget():
    operator = operator_of(TRACE_MATRIX)
    result = hutchinson_trace(operator, 100, probes=100)
    assert (result.matvecs, result.passes) == (operator.matvecs, operator.passes) == (100, 2)
    assert result.method == "hutchinson"
    for probes, passes in [(30, 2), (100, 3), (3, 2), (5, 2)]:
        operator = operator_of(TRACE_MATRIX)
        result = hutchpp_trace(operator, 100, probes=probes)
        assert (result.matvecs, result.passes) == (operator.matvecs, operator.passes)
        assert (result.matvecs, result.passes) == (probes, passes)
        assert trace.trace_passes("hutch++", probes) == passes
        assert result.method == "hutch++"
    # A rank-2 matrix: the sketch has rank 2, the unused budget goes to Hutchinson probes.
    low = symmetric([50.0, 20.0] + [0.0] * 98, seed=12)
    result = hutchpp_trace(lambda V: V @ low, 100, probes=30)
    assert result.matvecs == 30
    assert result.estimate == pytest.approx(70.0, abs=1e-9)
    assert result.stderr == pytest.approx(0.0, abs=1e-9)


def test_trace_probes_depend_on_seed_and_index_only():
    def run(estimator, seed, max_block):
        return estimator(lambda V: V @ TRACE_MATRIX, 100, 40, seed, max_block=max_block)

    for estimator in (hutchinson_trace, hutchpp_trace):
        first = run(estimator, 3, 64)
        assert run(estimator, 3, 64) == first
        chunked = run(estimator, 3, 7)  # the same probes, in more passes
        assert chunked.estimate == pytest.approx(first.estimate, rel=1e-12)
        assert chunked.passes > first.passes
        assert run(estimator, 4, 64).estimate != first.estimate


def test_trace_edge_cases():
    with pytest.raises(ValueError, match="at least 3"):
        hutchpp_trace(lambda V: V, 10, probes=2)
    single = hutchinson_trace(lambda V: V @ TRACE_MATRIX, 100, probes=1)
    assert np.isnan(single.stderr) and single.matvecs == 1
    exact = exact_trace(np.diag(TRACE_MATRIX))
    assert exact.estimate == pytest.approx(np.trace(TRACE_MATRIX), rel=1e-14)
    assert (exact.method, exact.stderr, exact.matvecs, exact.passes) == ("exact", 0.0, 0, 0)


# ---------------------------------------------------------------- SLQ

SLQ_EIGENVALUES = np.random.default_rng(13).uniform(0.5, 1.5, 120)
SLQ_MATRIX = symmetric(SLQ_EIGENVALUES, seed=14)


def test_slq_nodes_weights_and_cost():
    operator = operator_of(SLQ_MATRIX)
    result = spectral_density(operator, 120, runs=4, steps=12, seed=1)
    assert (result.passes, result.matvecs) == (operator.passes, operator.matvecs) == (12, 48)
    assert len(result.nodes) == len(result.weights) == 4
    low, high = SLQ_EIGENVALUES.min(), SLQ_EIGENVALUES.max()
    for run, (nodes, weights) in enumerate(zip(result.nodes, result.weights)):
        assert nodes.shape == weights.shape == (12,)
        assert weights.sum() == pytest.approx(1.0, abs=1e-12)
        assert np.all(weights >= 0)
        assert np.all((nodes >= low - 1e-10) & (nodes <= high + 1e-10))
        # Gauss quadrature is exact up to degree 2 * steps - 1: sum_j w_j theta_j^k = v^T A^k v.
        v = rademacher(1, [run], 120, SPECTRUM_STREAM)[0] / np.sqrt(120)
        power = v.copy()
        for k in range(8):
            assert weights @ nodes ** k == pytest.approx(v @ power, rel=1e-9)
            power = SLQ_MATRIX @ power


def test_slq_moments_estimate_normalised_traces():
    runs = 32
    result = spectral_density(lambda V: V @ SLQ_MATRIX, 120, runs=runs, steps=6, seed=2)
    for k in (1, 2, 3):
        power = np.linalg.matrix_power(SLQ_MATRIX, k)
        exact = np.trace(power) / 120
        estimate = np.mean([w @ n ** k for n, w in zip(result.nodes, result.weights)])
        # Rademacher variance of v^T A^k v, v = z / sqrt(P): 2 (||A^k||_F^2 - sum diag^2) / P^2.
        std = np.sqrt(2 * (np.sum(power ** 2) - np.sum(np.diag(power) ** 2))) / 120
        assert abs(estimate - exact) <= 4 * std / np.sqrt(runs)


def test_slq_breakdown_and_small_size():
    # Three distinct eigenvalues: every Krylov space is invariant after 3 steps.
    matrix = symmetric([1.0] * 30 + [2.0] * 30 + [4.0] * 30, seed=15)
    operator = operator_of(matrix)
    result = spectral_density(operator, 90, runs=3, steps=10)
    assert (result.passes, result.matvecs) == (operator.passes, operator.matvecs) == (3, 9)
    for nodes, weights in zip(result.nodes, result.weights):
        np.testing.assert_allclose(nodes, [1.0, 2.0, 4.0], atol=1e-10)
        assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    tiny = spectral_density(lambda V: V @ symmetric([1.0, 2.0, 3.0, 4.0, 5.0], 16), 5, runs=2)
    assert all(n.size <= 5 for n in tiny.nodes) and tiny.passes <= 5


def test_density_is_a_smoothed_average():
    result = spectral_density(lambda V: V @ SLQ_MATRIX, 120, runs=3, steps=8)
    grid = np.linspace(-1.0, 3.0, 2001)
    values = density(result.nodes, result.weights, grid, sigma=0.05)
    assert values.shape == grid.shape and np.all(values >= 0)
    assert np.sum(values) * (grid[1] - grid[0]) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="sigma"):
        density(result.nodes, result.weights, grid, sigma=0.0)


def test_counting_operator_and_docstring_examples():
    operator = CountingOperator(lambda V: 2 * V, 4)
    operator(np.ones((3, 4)))
    operator(np.ones((1, 4)))
    assert (operator.passes, operator.matvecs) == (2, 4)
    with pytest.raises(ValueError, match="shape"):
        operator(np.ones(4))
    for module in (spectrum, _base, lanczos, trace, slq):
        assert doctest.testmod(module).failed == 0


# ---------------------------------------------------------------- blocks side by side


def _coupled(sizes, seed=21) -> tuple[np.ndarray, list[np.ndarray]]:
    """A symmetric H whose diagonal blocks (interleaved positions, as variables of a model are
    not contiguous in general) have separated spectra, plus strong off-block coupling that
    ``side_by_side`` must drop."""
    rng = np.random.default_rng(seed)
    size = sum(sizes)
    order = rng.permutation(size)
    positions = np.split(order, np.cumsum(sizes)[:-1])
    matrix = rng.normal(size=(size, size))
    matrix = (matrix + matrix.T) * 3.0  # the coupling, larger than the blocks' own entries
    for b, p in enumerate(positions):
        spectrum_b = np.concatenate([[20.0 + 5 * b, 15.0 + 5 * b, 10.0 + 5 * b, -8.0 - b],
                                     rng.uniform(-1, 1, p.size - 4)])
        matrix[np.ix_(p, p)] = symmetric(spectrum_b, seed=seed + b)
    return matrix, positions


@pytest.mark.parametrize("algorithm", ["lanczos", "hutchinson", "hutch++", "slq"])
def test_side_by_side_equals_each_block_alone_in_the_passes_of_the_slowest(algorithm):
    sizes = [40, 7, 25]
    matrix, positions = _coupled(sizes)

    def steps(size):
        if algorithm == "lanczos":
            return spectrum.top_eigenvalues_steps(size, top=3, tol=1e-9, seed=4)
        if algorithm == "hutchinson":
            return spectrum.hutchinson_steps(size, probes=70, seed=4, max_block=32)
        if algorithm == "hutch++":
            return spectrum.hutchpp_steps(size, probes=30, seed=4)
        return spectrum.spectral_density_steps(size, runs=3, steps=min(20, size), seed=4)

    operator = operator_of(matrix)
    together = spectrum.side_by_side([steps(s) for s in sizes], positions, operator, sum(sizes))
    alone = [spectrum.drive(steps(s), operator_of(matrix[np.ix_(p, p)])) for s, p in zip(sizes, positions)]
    for block, (mine, theirs) in enumerate(zip(together, alone)):
        assert (mine.passes, mine.matvecs) == (theirs.passes, theirs.matvecs), block
        if algorithm == "lanczos":
            # The blocks' own eigenvalues: the coupling (which would change them) is dropped.
            np.testing.assert_allclose(mine.eigenvalues, [20.0 + 5 * block, 15.0 + 5 * block, 10.0 + 5 * block],
                                       atol=1e-7)
            np.testing.assert_allclose(mine.eigenvalues, theirs.eigenvalues, rtol=1e-12)
            np.testing.assert_allclose(np.abs(mine.eigenvectors @ theirs.eigenvectors.T).diagonal(), 1.0,
                                       atol=1e-9)
            assert mine.eigenvectors.shape == (3, sizes[block])
        elif algorithm == "slq":
            for a, b in zip(mine.nodes + mine.weights, theirs.nodes + theirs.weights):
                np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
        else:
            assert mine.estimate == pytest.approx(theirs.estimate, rel=1e-12)
            assert mine.stderr == pytest.approx(theirs.stderr, rel=1e-9)
    # One pass carries every unfinished block's vectors: as many passes as the slowest block.
    assert operator.passes == max(r.passes for r in alone)
    assert operator.matvecs == sum(r.matvecs for r in alone)


def test_side_by_side_checks_its_blocks():
    with pytest.raises(ValueError, match="2 algorithms but 1 blocks"):
        spectrum.side_by_side([spectrum.hutchinson_steps(2, 4), spectrum.hutchinson_steps(2, 4)],
                              [np.arange(2)], lambda V: V, 4)
    # A single block of every parameter is the algorithm alone, to the bit.
    matrix = symmetric(np.linspace(-3, 9, 30), seed=5)
    alone = spectrum.top_eigenvalues(lambda V: V @ matrix, 30, top=2, seed=1)
    (together,) = spectrum.side_by_side([spectrum.top_eigenvalues_steps(30, top=2, seed=1)], [np.arange(30)],
                                        lambda V: V @ matrix, 30)
    assert np.array_equal(together.eigenvalues, alone.eigenvalues)
    assert np.array_equal(together.eigenvectors, alone.eigenvectors)


@pytest.mark.parametrize("size,probes", [(4, 6), (10, 30), (1, 3)])
def test_traces_of_small_blocks_are_exact_when_the_products_cover_them(size, probes):
    """A block of H no bigger than the products (a bias vector): Hutchinson takes its basis
    vectors, Hutch++ the complement of its sketch. Exact, standard error 0, never more products
    than asked. (A 4-parameter block once reported a stochastic estimate with stderr 0.)"""
    matrix = symmetric(np.linspace(-2.0, 5.0, size), seed=size)
    for estimator in (hutchinson_trace, hutchpp_trace):
        operator = operator_of(matrix)
        result = estimator(operator, size, probes, seed=3)
        assert result.estimate == pytest.approx(np.trace(matrix), abs=1e-12), estimator.__name__
        assert result.stderr == 0.0 and result.matvecs == operator.matvecs <= probes


def test_lanczos_warm_started_from_a_nearby_matrix_needs_fewer_passes_and_finds_the_same_eigenvalues():
    """A series of checkpoints: H changes a little from night to night. Started from the last
    night's Ritz vectors, Lanczos converges in fewer passes to the same eigenvalues (within the
    reported residuals) as from a random start."""
    from pipeline.spectrum.lanczos import top_eigenvalues

    rng = np.random.default_rng(0)
    size = 300
    q, _ = np.linalg.qr(rng.normal(size=(size, size)))
    spectrum = np.concatenate([[10.0, 8.0, 7.0, 5.0, 4.5], rng.uniform(0, 1, size - 5)])
    yesterday = (q * spectrum) @ q.T
    noise = rng.normal(size=(size, size)) * 1e-3
    today = yesterday + (noise + noise.T) / 2
    before = top_eigenvalues(lambda v: v @ yesterday, size, top=3, tol=1e-8, iterations=200)
    cold = top_eigenvalues(lambda v: v @ today, size, top=3, tol=1e-8, iterations=200)
    warm = top_eigenvalues(lambda v: v @ today, size, top=3, tol=1e-8, iterations=200, start=before.eigenvectors)
    assert cold.converged and warm.converged
    np.testing.assert_allclose(warm.eigenvalues, cold.eigenvalues, atol=float(np.max(cold.residuals + warm.residuals)))
    np.testing.assert_allclose(warm.eigenvalues, np.linalg.eigvalsh(today)[::-1][:3], rtol=1e-7)
    assert warm.passes < cold.passes
