"""The per-example family alone (``ExampleProducts``): output-space derivatives, the Fisher's and
the exact GGN's squared per-example products on both routes, and its own check, against the
dense float64 references."""

from __future__ import annotations

import numpy as np
import pytest

import families
from pipeline.curvature.example_products import ExampleProducts

MSE = ("mse", {}, "regression")


@pytest.mark.parametrize("route", ["vectorised", "loop"])
@pytest.mark.parametrize("model_name,loss", [("mlp", families.LOGITS), ("two_outputs", MSE)])
def test_fisher_and_ggn_squares_match_the_references(model_name, loss, route):
    core, batch, ref = families.setup(model_name, loss)
    core.routes.per_example = route
    examples = ExampleProducts(core)
    examples.check(batch)
    _, dl, lam, _ = (t.numpy() for t in examples.batch_derivatives(batch, True))
    assert examples.batch_derivatives(batch, True)[1] is batch.derivatives[True][1]  # computed once
    everything = tuple(range(len(core.variables)))
    n = batch.size
    fisher = examples.squares(batch.inputs, np.arange(n), dl, batch.weight_values, False, everything)[0]
    scale = families.scale_of(ref)
    np.testing.assert_allclose(fisher, ref.fisher, atol=1e-11 * scale)
    cotangents, row_weights = families.ggn_cotangents(batch, lam)
    example, column = np.nonzero(row_weights)
    ggn = examples.squares(batch.inputs, example, cotangents[example, column], row_weights[example, column], False,
                           everything)[0]
    np.testing.assert_allclose(ggn, np.diag(ref.ggn), atol=1e-11 * scale)
    assert not np.allclose(np.diag(ref.ggn), ref.fisher)  # the two oracles differ: each check can fail


def test_squares_of_some_variables_are_their_entries():
    core, batch, ref = families.setup()
    examples = ExampleProducts(core)
    _, dl, _, _ = (t.numpy() for t in examples.batch_derivatives(batch, False))
    last = len(core.variables) - 1
    got = examples.squares(batch.inputs, np.arange(batch.size), dl, batch.weight_values, False, (last,))[0]
    np.testing.assert_allclose(got, ref.fisher[int(core.offsets[last]):], atol=1e-11 * families.scale_of(ref))
