"""The Fisher and GGN diagonals of one batch (``OuterProducts``) against the dense float64
reference, by the layer rules and with the rules off (per-example products only)."""

from __future__ import annotations

import numpy as np
import pytest

import families
from pipeline.curvature.example_products import ExampleProducts
from pipeline.curvature.layer_products import LayerProducts
from pipeline.curvature.outer_products import OuterProducts
from pipeline.curvature.requests import BatchWork
from pipeline.curvature.rule_checks import checked_rules
from pipeline.curvature import layer_rules
from pipeline.partial import Partial


@pytest.mark.parametrize("rules", [True, False], ids=["layer rules", "per-example"])
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_fisher_and_exact_ggn_diagonals_match_the_reference(model_name, rules):
    core, batch, ref = families.setup(model_name)
    layers = LayerProducts(core, enabled=rules)
    outer = OuterProducts(core, ExampleProducts(core), layers)
    part = Partial()
    outer.answer(part, batch, BatchWork(sum_grad_squared=True, ggn_diagonal="exact"))
    expected = "layer rule" if rules else "per-example"
    assert set(layers.routes(batch.inputs).values()) == {expected}
    scale = families.scale_of(ref)
    np.testing.assert_allclose(part.sums["sum_grad_squared"], ref.fisher, atol=1e-11 * scale)
    np.testing.assert_allclose(part.sums["ggn_diagonal"], np.diag(ref.ggn), atol=1e-11 * scale)


def test_monte_carlo_ggn_keeps_the_sums_its_standard_error_needs():
    core, batch, _ = families.setup("mlp")
    outer = OuterProducts(core, ExampleProducts(core), LayerProducts(core, enabled=False))
    part = Partial()
    outer.answer(part, batch, BatchWork(ggn_diagonal="mc", ggn_samples=2, seed=3))
    weights = batch.weight_values
    assert float(part.sums["ggn_mc_w2"]) == pytest.approx(2 * np.sum((weights / 2) ** 2))
    assert part.sums["ggn_mc"].shape == part.sums["ggn_mc_w2q"].shape == (core.parameters,)
    assert np.all(part.sums["ggn_mc"] >= 0) and np.all(part.sums["ggn_mc_w2q2"] >= 0)


def test_every_dense_rule_of_an_mlp_passes_its_checks():
    core, batch, _ = families.setup("mlp")
    found = layer_rules.find_rules(core.model, core.names)
    assert found and checked_rules(core, found, batch.inputs) == found
