"""The HVP family alone (``HvpProducts``): products, Hutchinson probe products and the loss and
gradient they record on the pass, against the dense float64 Hessian."""

from __future__ import annotations

import numpy as np
import pytest

import families
from pipeline.curvature.hvp_products import HvpProducts
from pipeline.curvature.requests import BatchWork
from pipeline.partial import Partial


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_products_and_probes_match_the_dense_hessian_and_record_the_gradient(model_name):
    core, batch, ref = families.setup(model_name)
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(3, core.parameters))  # hvp_block=2: blocks of 2 and 1
    probes = rng.choice([-1, 1], size=(2, core.parameters)).astype(np.int8)
    part = Partial()
    HvpProducts(core, xla=False).answer(part, batch, BatchWork(hvp_vectors=vectors, probes=probes))
    scale = families.scale_of(ref)
    np.testing.assert_allclose(part.sums["hvp"], vectors @ ref.hessian, atol=1e-10 * scale)
    np.testing.assert_allclose(part.sums["hessian_probes"], probes * (probes @ ref.hessian), atol=1e-10 * scale)
    assert float(batch.loss) == pytest.approx(ref.loss, rel=1e-12)
    np.testing.assert_allclose(batch.gradient.numpy(), ref.gradient, atol=1e-12 * scale)


def test_no_vectors_no_pass():
    core, batch, _ = families.setup()
    part = Partial()
    HvpProducts(core, xla=False).answer(part, batch, BatchWork(gradient=True))
    assert part.sums == {} and batch.loss is None and batch.gradient is None
