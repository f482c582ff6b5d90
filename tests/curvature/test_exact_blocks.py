"""The exact family alone (``ExactBlocks``): the Hessian diagonal and dense blocks on both
routes, against the dense float64 Hessian."""

from __future__ import annotations

import numpy as np
import pytest

import families
from pipeline.curvature.exact_blocks import ExactBlocks
from pipeline.curvature.requests import BatchWork
from pipeline.partial import Partial


@pytest.mark.parametrize("route", ["vectorised", "loop"])
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_diagonal_and_blocks_match_the_dense_hessian_on_both_routes(model_name, route):
    core, batch, ref = families.setup(model_name)
    core.routes.route = route
    last = len(core.variables) - 1
    part = Partial()
    ExactBlocks(core).answer(part, batch, BatchWork(hessian_diagonal="exact", hessian_blocks=((0, 1), (last,))))
    scale = families.scale_of(ref)
    np.testing.assert_allclose(part.sums["hessian_diagonal"], np.diag(ref.hessian), atol=1e-11 * scale)
    first = slice(0, core.sizes[0] + core.sizes[1])
    np.testing.assert_allclose(part.sums["hessian_block_0"], ref.hessian[first, first], atol=1e-11 * scale)
    tail = slice(int(core.offsets[last]), core.parameters)
    np.testing.assert_allclose(part.sums["hessian_block_1"], ref.hessian[tail, tail], atol=1e-11 * scale)
    # The check can fail: a block is not its rows' sums, nor the diagonal the row sums.
    assert not np.allclose(np.diag(ref.hessian), ref.hessian.sum(axis=1))
    assert core.routes.route == route  # both routes ran as asked (no silent fall-back)
