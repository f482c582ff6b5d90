"""The layer-rule family alone (``LayerProducts``): its routes, squares, the fused Fisher pass and
the fused Monte Carlo GGN pass, against the dense references and the per-example family on the
same draws."""

from __future__ import annotations

import ast
import os

import numpy as np
import pytest
import tensorflow as tf

import families
import paths
from pipeline.curvature.example_products import ExampleProducts
from pipeline.curvature.layer_products import LayerProducts
from pipeline.curvature.requests import BatchWork
from pipeline.partial import Partial

FAMILIES = ["hvp_products", "exact_blocks", "example_products", "layer_products"]


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_squares_and_the_fused_fisher_pass_match_the_references(model_name):
    core, batch, ref = families.setup(model_name)
    layers = LayerProducts(core)
    assert set(layers.routes(batch.inputs).values()) == {"layer rule"}
    assert layers.cover_every_variable(batch.inputs)
    _, dl, _, _ = (t.numpy() for t in ExampleProducts(core).batch_derivatives(batch, False))
    totals = [np.zeros(core.parameters)]
    layers.squares(batch.inputs, dl[:, None, :], batch.weight_values[:, None], False, totals)
    scale = families.scale_of(ref)
    np.testing.assert_allclose(totals[0], ref.fisher, atol=1e-11 * scale)
    part = Partial()
    layers.loss_gradient_fisher(part, batch, with_gradient=True)
    assert float(part.sums["loss"]) == pytest.approx(ref.loss, rel=1e-12)
    np.testing.assert_allclose(part.sums["gradient"], ref.gradient, atol=1e-12 * scale)
    np.testing.assert_allclose(part.sums["sum_grad_squared"], ref.fisher, atol=1e-11 * scale)


def test_fused_monte_carlo_pass_equals_the_per_example_route_on_the_same_draws():
    """Labels come from ``(seed, sample, row)``: the layer family's in-graph draws and the
    per-example family's eager draws are the same labels, so the sums agree to rounding."""
    core, batch, ref = families.setup()
    work = BatchWork(ggn_diagonal="mc", ggn_samples=2, seed=11)
    layers = LayerProducts(core)
    assert layers.take_monte_carlo(batch.inputs)
    part = Partial()
    layers.monte_carlo(part, batch, work, with_loss=True)
    examples = ExampleProducts(core)
    flat, _, _, valid = (t.numpy() for t in examples.batch_derivatives(batch, False))
    everything = tuple(range(len(core.variables)))
    want = np.zeros(core.parameters)
    for sample in range(work.ggn_samples):
        labels, scale = examples.sample_labels(flat, valid, batch.rows, work.seed, sample)
        labels = [tf.constant(a, tf.float64 if a.dtype.kind == "f" else a.dtype) for a in labels]
        dl = examples.sampled_gradient(batch, labels).numpy() * scale
        want += examples.squares(batch.inputs, np.arange(batch.size), dl, batch.weight_values / work.ggn_samples,
                                 False, everything)[0]
    np.testing.assert_allclose(part.sums["ggn_mc"], want, rtol=1e-10, atol=1e-13)
    assert float(part.sums["loss"]) == pytest.approx(ref.loss, rel=1e-12)
    assert not np.allclose(want, np.diag(ref.ggn))  # one draw is not the exact GGN: the check is the draws'


def test_no_family_imports_another():
    """Each family reads the ``Core`` and the ``Pass``; the engine alone combines them."""
    folder = os.path.join(paths.REPO, "pipeline", "curvature")
    found = {}
    for family in FAMILIES:
        with open(os.path.join(folder, f"{family}.py"), encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
        names = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        names |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        found[family] = sorted(name for name in names if name.rsplit(".", 1)[-1] in FAMILIES + ["engine", "routes"])
    assert found == {family: [] for family in FAMILIES}
