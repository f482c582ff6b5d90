"""The projection Phi: drawn from the seed alone, E[Phi^T Phi] = I (inner products unbiased),
within the Johnson-Lindenstrauss bound for a dense block of k = 1024, and its Kronecker
blocks equal the dense Kronecker product they stand for."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import InputError
from pipeline.influence import projection
from pipeline.influence.layout import Layout


def test_a_dense_block_of_1024_keeps_inner_products_within_the_johnson_lindenstrauss_bound():
    layout = Layout.of(["w"], [(3000,)], [])
    rng = np.random.default_rng(0)
    n, k = 40, 1024
    g = rng.normal(size=(n, 3000)) * rng.uniform(0.1, 3.0, size=(n, 1))
    p = projection.project(layout, k, 7, g)
    # JL (Dasgupta and Gupta 2003): with k >= 8 ln(n) / eps^2, every pair's inner product moves by
    # at most eps |g| |h| (with high probability).
    eps = np.sqrt(8 * np.log(n) / k)
    norms = np.linalg.norm(g, axis=1)
    distortion = np.abs(p @ p.T - g @ g.T) / np.outer(norms, norms)
    assert distortion.max() <= eps, (distortion.max(), eps)
    assert distortion.max() > 0.2 * eps  # it is random: not the identity


def test_inner_products_are_unbiased_over_seeds_and_kronecker_blocks_are_the_kronecker_product():
    layout = Layout.of(["d/kernel", "d/bias", "n/gamma"], [(4, 3), (3,), (5,)], [("d", 4, 3, 1, True)])
    rng = np.random.default_rng(1)
    g, h = rng.normal(size=(2, layout.parameters))
    shares = projection.shares(layout, 24)
    assert sum(s.k for s in shares) == 24 and [s.name for s in shares] == ["d", "__rest__"]
    estimates = [float(np.dot(*projection.project(layout, 24, seed, np.stack([g, h])))) for seed in range(3000)]
    spread = np.std(estimates) / np.sqrt(len(estimates))
    assert abs(np.mean(estimates) - g @ h) < 4 * spread
    phi = projection.matrices(layout, 24, 5)
    dense = np.kron(phi["d/in"], phi["d/out"])  # [d_A d_S, k_in k_out]
    got = projection.project(layout, 24, 5, g[None])[0]
    np.testing.assert_allclose(got[:dense.shape[1]], layout.matrix(g, layout.layers[0]).ravel() @ dense)
    np.testing.assert_array_equal(projection.matrices(layout, 24, 5)["__rest__"], phi["__rest__"])


def test_k_below_the_number_of_blocks_is_refused():
    layout = Layout.of(["a/kernel", "b/kernel", "c"], [(2, 2), (2, 2), (3,)], [("a", 2, 2, 1, False),
                                                                               ("b", 2, 2, 1, False)])
    with pytest.raises(InputError, match="smaller than the 3 blocks"):
        projection.shares(layout, 2)
