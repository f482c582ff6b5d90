"""Cotangents (``pipeline.curvature.cotangents``): a Fisher type turned into the output-space
vectors and row weights whose squares the Fisher and GGN diagonals and the Kronecker factors sum."""

from __future__ import annotations

import numpy as np

import families
from pipeline.curvature.cotangents import cotangents, empirical, joined, square_root
from pipeline.curvature.example_products import ExampleProducts


def test_cotangents_square_root_rebuilds_each_examples_output_hessian_with_its_signs():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(4, 4, 4)))[0]
    values = np.array([[3.0, -2.0, 0.5, 0.0], [1.0, 1.0, -1e-3, 2.0], [0.0, 0.0, 0.0, 0.0], [5.0, 4.0, 3.0, 2.0]])
    lam = np.einsum("bij,bj,bkj->bik", basis, values, basis)
    weights = np.array([1.0, 0.5, 2.0, 3.0])
    u, w = square_root(lam, weights)
    assert u.shape == (4, 4, 4) and w.shape == (4, 4)
    np.testing.assert_allclose(np.einsum("bc,bci,bcj->bij", w, u, u), weights[:, None, None] * lam, atol=1e-12)
    assert np.count_nonzero(w[2]) == 0 and np.count_nonzero(w[0]) == 3  # zero eigenvalues weigh nothing


def test_cotangents_of_each_fisher_type_on_a_batch():
    core, batch, _ = families.setup("mlp", n=5)
    examples = ExampleProducts(core)
    derivatives = examples.batch_derivatives(batch, True)
    _, dl, lam, _ = derivatives
    (u, w), = cotangents(batch, "empirical", derivatives, examples, core.dtype)
    expected_u, expected_w = empirical(dl.numpy(), batch.weight_values)
    np.testing.assert_array_equal(u, expected_u)
    np.testing.assert_array_equal(w, expected_w)
    (u, w), = cotangents(batch, "exact", derivatives, examples, core.dtype)
    np.testing.assert_allclose(np.einsum("bc,bci,bcj->bij", w, u, u),
                               batch.weight_values[:, None, None] * lam.numpy(), atol=1e-12)
    draws = cotangents(batch, "mc", derivatives, examples, core.dtype, samples=3, seed=7)
    again = cotangents(batch, "mc", derivatives, examples, core.dtype, samples=3, seed=7)
    assert len(draws) == 3
    for (u, w), (u2, _) in zip(draws, again):
        assert u.shape == (5, 1, dl.shape[1])
        np.testing.assert_array_equal(u, u2)  # keyed by (seed, sample, row): the same draws
        np.testing.assert_allclose(w[:, 0], batch.weight_values / 3)
    (u, w), = joined(draws)
    assert u.shape == (5, 3, dl.shape[1]) and w.shape == (5, 3)
