"""``(C + lambda I)^-1`` by blocks equals the dense inverse of the block-diagonal matrix it
stands for: K-FAC's ``kron(A, S) / R``, EK-FAC's eigenvalues in the Kronecker eigenbasis, the
GGN diagonal for the rest, the dense GGN; a zero block is a pseudo-inverse, not a division by 0."""

from __future__ import annotations

import numpy as np

from pipeline.influence.layout import Layout
from pipeline.influence.preconditioner import Preconditioner

NAMES = ["d/kernel", "d/bias", "n/gamma"]
SHAPES = [(3, 2), (2,), (4,)]


def _spd(rng, n):
    m = rng.normal(size=(n, n))
    return m @ m.T / n + 0.05 * np.eye(n)


def _setup(seed=0):
    rng = np.random.default_rng(seed)
    layout = Layout.of(NAMES, SHAPES, [("d", 3, 2, 4, True)])
    a, s = _spd(rng, 4), _spd(rng, 2)
    diagonal = rng.uniform(0.2, 2.0, layout.parameters)
    return rng, layout, {"A": {"d": a}, "S": {"d": s}, "positions": {"d": 4.0}}, diagonal


def test_kfac_equals_the_dense_inverse_of_kron_over_r_and_the_damped_diagonal():
    rng, layout, factors, diagonal = _setup()
    pre = Preconditioner.kronecker("kfac", layout, 0.3, factors, diagonal)
    block = np.kron(factors["A"]["d"], factors["S"]["d"]) / 4.0
    lam = 0.3 * np.trace(block) / len(block)
    rest = diagonal[8:]
    dense = np.zeros((12, 12))
    dense[:8, :8] = np.linalg.inv(block + lam * np.eye(8))
    dense[8:, 8:] = np.diag(1.0 / (rest + 0.3 * rest.mean()))
    g = rng.normal(size=(5, 12))
    np.testing.assert_allclose(pre.apply(g), g @ dense, rtol=1e-10)
    np.testing.assert_allclose(pre.self_influence(g), np.einsum("np,pq,nq->n", g, dense, g), rtol=1e-10)
    assert pre.lambdas["d"] == np.float64(lam) or abs(pre.lambdas["d"] - lam) < 1e-12
    assert set(pre.lambdas) == {"d", "n/gamma"}


def test_ekfac_uses_its_own_eigenvalues_in_the_kronecker_eigenbasis():
    rng, layout, factors, diagonal = _setup(1)
    eigen = rng.uniform(0.0, 3.0, size=(4, 2))
    pre = Preconditioner.kronecker("ekfac", layout, 0.1, factors, diagonal, {"d": eigen})
    q = np.kron(np.linalg.eigh(factors["A"]["d"])[1], np.linalg.eigh(factors["S"]["d"])[1])
    block = q @ np.diag(1.0 / (eigen.ravel() + 0.1 * eigen.mean())) @ q.T
    g = rng.normal(size=(3, 12))
    np.testing.assert_allclose(pre.apply(g)[:, :8], g[:, :8] @ block, rtol=1e-10)


def test_dense_ggn_identity_and_a_zero_block():
    rng = np.random.default_rng(2)
    layout = Layout.of(NAMES, SHAPES, [], structured=False)
    ggn = _spd(rng, 12)
    pre = Preconditioner.dense(layout, 0.1, ggn)
    g = rng.normal(size=(3, 12))
    lam = 0.1 * np.trace(ggn) / 12
    np.testing.assert_allclose(pre.apply(g), g @ np.linalg.inv(ggn + lam * np.eye(12)), rtol=1e-9)
    np.testing.assert_array_equal(Preconditioner.identity(layout, 0.1).apply(g), g)
    zero = Preconditioner.kronecker("kfac", Layout.of(NAMES, SHAPES, [("d", 3, 2, 1, True)]), 0.1,
                                    {"A": {"d": np.zeros((4, 4))}, "S": {"d": np.eye(2)}, "positions": {"d": 1}},
                                    np.zeros(12))
    assert np.all(np.isfinite(zero.apply(g))) and np.all(zero.apply(g) == 0)
