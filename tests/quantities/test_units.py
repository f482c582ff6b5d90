"""Each quantity unit on its own, without a model or Ray: its options (documented defaults
filled, a wrong key or value one ``InputError`` naming it), its columns and files as the
registry lists them, and the small numeric steps it owns (finishing sums, symmetrising blocks,
normalising Ritz vectors, reading per-layer factor sums)."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

from pipeline.curvature.requests import KroneckerRequest
from pipeline.errors import InputError
from pipeline.partial import Partial
from pipeline.quantities import (eigenvalues, fisher_diagonal, gradient, hessian, hvp, kfac, layer_inputs, registry,
                                 spectrum, trace)
from pipeline.quantities._base import Context, PlanFacts
from pipeline.reduce import Sums
from pipeline.signature import ModelSignature, TensorSpec

MODULES = {module.UNIT.name: module for module in
           (eigenvalues, fisher_diagonal, gradient, hessian, hvp, kfac, layer_inputs, spectrum, trace)}

# The defaults each module's docstring and help document (hvp has none: it needs vectors or random).
DEFAULTS = {
    "eigenvalues": {"top": 5, "which": "largest", "iterations": 100, "tol": 1e-6, "vectors": False, "blocks": "full"},
    "fisher_diagonal": {},
    "gradient": {},
    "hessian": {"blocks": "full", "max_parameters": 10000},
    "kfac": {"fisher_type": "empirical", "samples": 1, "reduction": "expand", "eigen_correction": False,
             "max_dimension": 8192},
    "layer_inputs": {"bias": False, "max_dimension": 8192},
    "spectrum": {"runs": 4, "steps": 64, "blocks": "full"},
    "trace": {"method": "hutch++", "probes": 100, "blocks": "full"},
}
WITH_OPTIONS = sorted(name for name, d in DEFAULTS.items() if d) + ["hvp"]

SIGNATURE = ModelSignature(inputs=(TensorSpec("x", (3,), "float32"),), outputs=(TensorSpec("y", (2,), "float32"),),
                           variables=("hidden/kernel", "hidden/bias", "out/kernel"),
                           variable_shapes=((3, 2), (2,), (2, 2)))
P = 6 + 2 + 4


def parse(name, options, base_dir="/jobs"):
    return MODULES[name].UNIT.parse(options, f"quantities.{name}", base_dir)


def error_of(name, options) -> str:
    with pytest.raises(InputError) as info:
        parse(name, options)
    message = str(info.value)
    assert "\n" not in message and ": " in message, message
    return message


def sums(total: dict, weight: float = 4.0) -> Sums:
    return Sums(Partial(examples=4, weight_sum=weight, batches=1, sums={k: np.asarray(v, np.float64)
                                                                         for k, v in total.items()}))


# ------------------------------------------------------------------ registration
@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_module_is_the_registered_unit_of_its_name(name):
    assert registry.UNITS[name] is MODULES[name].UNIT and MODULES[name].UNIT.name == name
    assert MODULES[name].UNIT.help


@pytest.mark.parametrize("name", sorted(MODULES))
def test_its_files_and_columns_are_those_the_registry_lists(name):
    unit = MODULES[name].UNIT
    assert set(unit.files) <= set(registry.FILES) and set(unit.columns) <= set(registry.DIAGONAL_COLUMNS)
    assert all(f.endswith(".parquet") for f in unit.files)
    assert set(unit.columns + unit.vector_tables) <= set(registry.ARRAY_QUANTITIES)


def test_the_registry_lists_every_units_files_once_in_order():
    own = [f for unit in registry.UNITS.values() for f in unit.files]
    assert registry.FILES == ("diagonals.parquet", "summary.parquet", *own) and len(set(own)) == len(own)
    assert fisher_diagonal.UNIT.columns == ("fisher_diagonal",) and gradient.UNIT.columns == ("gradient",)
    assert trace.UNIT.files == ("trace.parquet",) and spectrum.UNIT.files == ("spectrum.parquet",)
    assert hessian.UNIT.files == ("hessian.parquet",) and layer_inputs.UNIT.files == ("layer_inputs.parquet",)
    assert kfac.UNIT.files == ("kfac.parquet", "kfac_eigen.parquet")
    assert eigenvalues.UNIT.files == ("eigenvalues.parquet", "eigenvectors.parquet")
    assert hvp.UNIT.files == ("hvp.parquet", "hvp_vectors.parquet") and hvp.UNIT.vector_tables == ("hvp", "hvp_vectors")


# ------------------------------------------------------------------ options
@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_parse_fills_the_documented_defaults(name):
    assert parse(name, None) == DEFAULTS[name]
    assert parse(name, {}) == DEFAULTS[name]


@pytest.mark.parametrize("name", WITH_OPTIONS)
def test_a_misspelt_option_is_named_with_the_allowed_ones(name):
    message = error_of(name, {"bogus": 1})
    assert message.startswith(f"unknown key quantities.{name}.bogus: the keys allowed in quantities.{name} are ")
    assert ", ".join(MODULES[name].UNIT.options) in message


@pytest.mark.parametrize("name", ["fisher_diagonal", "gradient"])
def test_a_quantity_without_options_refuses_any(name):
    assert error_of(name, {"method": "mc"}) == \
        f"quantities.{name} takes no options, got a mapping {{'method': 'mc'}}: write {name}: {{}}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_options_must_be_a_mapping(name):
    assert error_of(name, [1]).startswith(f"quantities.{name} must be a mapping of options (or {{}}), got a list [1]")


@pytest.mark.parametrize("name, options, key", [
    ("eigenvalues", {"top": 0}, "top"), ("eigenvalues", {"which": "biggest"}, "which"),
    ("eigenvalues", {"tol": -1.0}, "tol"), ("eigenvalues", {"vectors": "yes"}, "vectors"),
    ("eigenvalues", {"learning_rate": 0}, "learning_rate"), ("hessian", {"blocks": "row"}, "blocks"),
    ("hessian", {"max_parameters": True}, "max_parameters"), ("kfac", {"fisher_type": "true"}, "fisher_type"),
    ("kfac", {"reduction": "sum"}, "reduction"), ("kfac", {"samples": 0}, "samples"),
    ("layer_inputs", {"bias": 1}, "bias"), ("layer_inputs", {"max_dimension": 0}, "max_dimension"),
    ("spectrum", {"steps": 2.5}, "steps"), ("trace", {"method": "hutch"}, "method"), ("hvp", {"random": 0}, "random"),
])
def test_a_wrong_value_names_its_key(name, options, key):
    assert error_of(name, options).startswith(f"quantities.{name}.{key} must be ")


def test_eigenvalues_keeps_a_learning_rate_and_leaves_an_unset_one_out():
    assert parse("eigenvalues", {"learning_rate": 0.1, "top": 2})["learning_rate"] == 0.1
    assert "learning_rate" not in parse("eigenvalues", {"learning_rate": None})


def test_trace_hutchpp_needs_three_products():
    assert error_of("trace", {"probes": 2}).startswith("quantities.trace.probes: hutch++ needs at least 3 products")
    assert parse("trace", {"method": "hutchinson", "probes": 1})["probes"] == 1
    assert parse("trace", {"probes": 3})["method"] == "hutch++"
    assert trace.UNIT.routes(parse("trace", {"method": "exact"})) == ("route",)
    assert trace.UNIT.routes(parse("trace", None)) == ()


def test_hvp_takes_exactly_one_of_vectors_and_random(tmp_path):
    assert error_of("hvp", None).startswith("quantities.hvp needs vectors or random: write e.g.")
    assert error_of("hvp", {"vectors": "v.parquet", "random": 2}).startswith(
        "quantities.hvp takes either vectors or random, not both")
    assert parse("hvp", {"random": 4}) == {"random": 4}
    assert parse("hvp", {"vectors": None, "random": 4}) == {"random": 4}  # --set ...vectors=null switches
    assert parse("hvp", {"vectors": "v.parquet"}, str(tmp_path)) == {"vectors": os.path.join(str(tmp_path), "v.parquet")}
    assert parse("hvp", {"vectors": "s3://b/v.parquet"}) == {"vectors": "s3://b/v.parquet"}


def test_registry_parse_checks_every_quantity_by_name():
    assert registry.parse({"trace": {"method": "hutchinson"}}, ".") == {"trace": {"method": "hutchinson", "probes": 100,
                                                                                  "blocks": "full"}}
    with pytest.raises(InputError, match=r"^unknown key quantities.spectra \(did you mean quantities.spectrum\?\)"):
        registry.parse({"spectra": {}}, ".")


# ------------------------------------------------------------------ the main pass and its sums
def context(log=None) -> Context:
    return Context(signature=SIGNATURE, seed=3, log=log)


def test_gradient_and_fisher_ask_for_their_sums_and_divide_by_the_weights():
    assert gradient.UNIT.request({}, context()) == {"gradient": True}
    assert fisher_diagonal.UNIT.request({}, context()) == {"sum_grad_squared": True}
    assert fisher_diagonal.UNIT.routes({}) == ("per_example_route",)
    total = sums({"gradient": np.arange(P), "sum_grad_squared": np.arange(P) ** 2})
    np.testing.assert_array_equal(gradient.UNIT.finalize({}, total)["gradient"], np.arange(P) / 4.0)
    np.testing.assert_array_equal(fisher_diagonal.UNIT.finalize({}, total)["fisher_diagonal"], np.arange(P) ** 2 / 4.0)
    assert gradient.UNIT.finalize({}, sums({"loss": 1.0})) == {} == fisher_diagonal.UNIT.finalize({}, sums({"loss": 1.0}))


def test_hvp_random_vectors_are_rademacher_of_the_seed_and_finish_as_means():
    options = parse("hvp", {"random": 3})
    vectors = hvp.UNIT.vectors(options, context())
    assert vectors.shape == (3, P) and set(np.unique(vectors)) == {-1.0, 1.0}
    np.testing.assert_array_equal(hvp.UNIT.request(options, context())["hvp_vectors"], vectors)
    other = hvp.UNIT.vectors(options, Context(signature=SIGNATURE, seed=4))
    assert not np.array_equal(vectors, other)
    assert hvp.UNIT.prepare(options, SIGNATURE, 3) is None
    np.testing.assert_array_equal(hvp.UNIT.finalize(options, sums({"hvp": 8.0 * vectors}))["hvp"], 2.0 * vectors)


def test_hessian_refuses_a_block_over_max_parameters_at_plan_time():
    assert hessian.UNIT.prepare(parse("hessian", {"max_parameters": 12}), SIGNATURE, 0) is None
    with pytest.raises(InputError, match=r"^quantities.hessian: block '__all__' has 12 parameters, more than "
                                         r"max_parameters=11 "):
        hessian.UNIT.prepare(parse("hessian", {"max_parameters": 11}), SIGNATURE, 0)
    # Per layer, the largest block is the hidden layer's 8 parameters.
    assert hessian.UNIT.prepare(parse("hessian", {"blocks": "layer", "max_parameters": 8}), SIGNATURE, 0) is None
    with pytest.raises(InputError, match="block 'hidden' has 8 parameters"):
        hessian.UNIT.prepare(parse("hessian", {"blocks": "layer", "max_parameters": 7}), SIGNATURE, 0)


def test_hessian_blocks_are_asked_per_layer_and_published_symmetrised():
    options = parse("hessian", {"blocks": "layer"})
    assert hessian.UNIT.request(options, context()) == {"hessian_blocks": ((0, 1), (2,))}
    rng = np.random.default_rng(0)
    raw = [rng.normal(size=(8, 8)), rng.normal(size=(4, 4))]
    log = io.StringIO()
    result = hessian.UNIT.compute(options, context(log), None,
                                  sums({"hessian_block_0": 4 * raw[0], "hessian_block_1": 4 * raw[1]}))
    assert [number for number, _, _ in result] == [0, 1]
    for (_, matrix, asymmetry), r in zip(result, raw):
        np.testing.assert_allclose(matrix, (r + r.T) / 2)
        assert asymmetry == pytest.approx(np.abs(r - r.T).max() / np.abs(r).max())
    assert log.getvalue().splitlines()[0].startswith("hessian block hidden: 8 parameters, raw asymmetry ")


def test_eigenvectors_are_published_unit_and_signed():
    vectors = np.array([[3.0, -4.0, 0.0], [-1.0, 0.5, 0.25], [0.0, 0.0, -2.0]])
    unit = eigenvalues.unit_vectors(vectors)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0)
    np.testing.assert_allclose(unit[0], [-0.6, 0.8, 0.0])  # its largest entry (-4) made positive
    assert unit[1, 0] > 0 and unit[2, 2] == 1.0
    np.testing.assert_allclose(np.abs(unit), np.abs(vectors) / np.linalg.norm(vectors, axis=1, keepdims=True))


# ------------------------------------------------------------------ per-layer factors
LAYERS = (("hidden", 3, 2, 1, True), ("out", 2, 2, 5, False))


def test_factor_widths_and_the_refusal_of_a_wide_one():
    assert kfac.widths(LAYERS[0], True) == (4, 2) and kfac.widths(LAYERS[0], False) == (3, 2)
    kfac.check_widths("kfac", LAYERS, lambda layer: layer[4], 4)
    with pytest.raises(InputError, match=r"^quantities.layer_inputs: layer 'hidden' has a factor of 4 x 4 .*wider "
                                         r"than max_dimension=3: "):
        kfac.check_widths("layer_inputs", LAYERS, lambda layer: True, 3)


def test_the_plans_line_per_factored_layer():
    facts = PlanFacts(parameters=P, batches=1, route=None, per_example_route=None, factor_layers=LAYERS)
    lines = kfac.UNIT.notes(parse("kfac", None), facts)
    assert len(lines) == 1 and lines[0].startswith("kfac: 2 layers: hidden: A 4 x 4, S 2 x 2 (")
    assert lines[0].endswith("out: A 2 x 2, S 2 x 2 (0 MiB float64), 5 positions per example")
    (line,) = layer_inputs.UNIT.notes(parse("layer_inputs", {"bias": True}), facts)
    assert line.startswith("layer_inputs: 2 layers: hidden: A 4 x 4 (") and "S " not in line
    assert kfac.UNIT.notes(parse("kfac", None), PlanFacts(P, 1, None, None)) == []


def test_kfac_mc_needs_a_predictive_distribution():
    facts = PlanFacts(parameters=P, batches=1, route=None, per_example_route=None, factor_layers=LAYERS,
                      predictive=False)
    with pytest.raises(InputError, match="^quantities.kfac: fisher_type mc draws labels"):
        kfac.UNIT.notes(parse("kfac", {"fisher_type": "mc"}), facts)
    assert kfac.UNIT.notes(parse("kfac", {"fisher_type": "exact"}), facts)


def test_the_factor_units_ask_for_their_kronecker_sums():
    assert layer_inputs.UNIT.request(parse("layer_inputs", {"bias": True}), context()) == \
        {"kronecker": (KroneckerRequest("layer_inputs", bias=True),)}
    (request,) = kfac.UNIT.request(parse("kfac", {"fisher_type": "mc", "samples": 3}), context())["kronecker"]
    assert (request.kind, request.fisher_type, request.samples, request.reduction) == ("kfac", "mc", 3, "expand")
    assert kfac.UNIT.per_layer({}) and layer_inputs.UNIT.per_layer({}) and not trace.UNIT.per_layer({})
    assert registry.per_layer({"gradient": {}, "layer_inputs": {}}) and not registry.per_layer({"gradient": {}})


def test_factor_sums_become_symmetric_means_and_positions():
    a = np.array([[2.0, 1.0], [3.0, 4.0]])
    total = sums({"layer_inputs/weight": 2.0, "layer_inputs/hidden/A": a, "layer_inputs/hidden/positions": 6.0,
                  "layer_inputs/out/A": np.eye(3), "layer_inputs/out/positions": 2.0, "gradient": np.zeros(P)})
    result = layer_inputs.UNIT.finalize(parse("layer_inputs", None), total)["layer_inputs"]
    assert list(result["A"]) == ["hidden", "out"]  # in the order summed
    np.testing.assert_array_equal(result["A"]["hidden"], [[1.0, 1.0], [1.0, 2.0]])
    assert result["positions"] == {"hidden": 3.0, "out": 1.0}
    assert layer_inputs.UNIT.manifest({}, result) == {"layer_positions": {"hidden": 3.0, "out": 1.0}}
    assert layer_inputs.UNIT.finalize({}, sums({"gradient": np.zeros(P)})) == {}
    assert kfac.UNIT.finalize(parse("kfac", None), total) == {}  # no kfac sums


def test_kfac_mc_standard_error_of_s():
    # One layer, S a 1 x 1 factor: per-example values q = (1, 3) with weights w = 1: S = 2, and
    # the ratio estimator's error sqrt(sum w^2 (q - S)^2) / sum w = sqrt(2) / 2.
    total = sums({"kfac/weight": 2.0, "kfac/l/A": [[2.0]], "kfac/l/S": [[4.0]], "kfac/l/positions": 2.0,
                  "kfac/l/S_w2q": [[4.0]], "kfac/l/S_w2q2": [[10.0]], "kfac/l/S_w2": [[2.0]]}, weight=2.0)
    result = kfac.UNIT.finalize(parse("kfac", {"fisher_type": "mc"}), total)["kfac"]
    np.testing.assert_allclose(result["S"]["l"], [[2.0]])
    np.testing.assert_allclose(result["S_stderr"]["l"], [[np.sqrt(2.0) / 2.0]])
    assert "S_stderr" not in kfac.UNIT.finalize(parse("kfac", None), total)["kfac"]
