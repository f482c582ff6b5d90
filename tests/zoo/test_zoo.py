"""The model zoo: the curvature engine on many kinds of Keras models, against float64 dense
references computed without the engine (``zoo_models.reference``).

Every run checks every quantity of one batch: loss, gradient, exact Hessian diagonal, two
Hessian-vector products, exact GGN diagonal and empirical Fisher diagonal. Errors are
``max |engine - reference| / max |reference|`` per quantity (the Hessian's largest entry for
the Hessian diagonal and the HVPs): at most 1e-8 for a float64 engine, 2e-4 for a float32
one (float32 model, or a mixed-precision one, run with ``precision="float32"``).
The measured errors are printed at the end of the run (conftest.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

import zoo_models
from pipeline.curvature.engine import CurvatureEngine
from pipeline.curvature.losses import resolve_loss

# Case 7 names its dict keys differently from its Inputs on purpose; Keras warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:When providing `inputs` as a dict:UserWarning")

HERE = os.path.dirname(os.path.abspath(__file__))
TOLERANCE = {"float64": 1e-8, "float32": 2e-4}

SINGLE_BATCH = [name for name in zoo_models.CASES if name != "variable_length_sequences"]
ENGINES: dict = {}  # (case, precision) -> engine, so that one engine can see several batches
MIXED = ["mixed_precision_mixed_float16", "mixed_precision_mixed_bfloat16",
         "mixed_float16_preprocessing_state"]  # float32 runs only
FLOAT32 = ["residual_mlp_layernorm", "transformer_block", "softmax_sparse_ce_saturated",
           "masked_lstm_sequence", "grouped_conv2d", "sigmoid_binary_focal_saturated",
           "preprocessing_state_float64", "stateful_rnn", "int8_dense"] + MIXED
RUNS = [(name, "float64") for name in SINGLE_BATCH if name not in MIXED] + [(name, "float32") for name in FLOAT32]

# Runs in a child process: a crash there must fail one test, not end the run (the
# Fisher/GGN of a float32 MultiHeadAttention model once crashed TensorFlow, see KNOWN).
ISOLATED = {("transformer_block", "float32")}


class EngineProcessDied(AssertionError):
    """The child process running the engine ended without a result (a crash inside TensorFlow)."""


# Failures the zoo has found and that are fixed keep their case here: the float32 Transformer's
# Fisher/GGN once crashed the process (vectorised per-example products through an einsum with
# TensorFlow 2.21's oneDNN kernels, repro_mha_onednn.py); the engine now runs them one example
# at a time on CPU. Still run in a child process: a crash must fail one test, not the suite.
KNOWN: dict = {}


def _max(a):
    return float(np.max(np.abs(a)))


def _params(runs):
    return [pytest.param(n, p, id=f"{n}-{p}", marks=[KNOWN[(n, p)]] if (n, p) in KNOWN else [])
            for n, p in runs]


def errors_of(part, ref, vectors):
    h = _max(ref.hessian)
    errors = {
        "loss": abs(part.sums["loss"] - ref.loss) / abs(ref.loss),
        "gradient": _max(part.sums["gradient"] - ref.gradient) / _max(ref.gradient),
        "hessian_diagonal": _max(part.sums["hessian_diagonal"] - np.diag(ref.hessian)) / h,
        "hvp": _max(part.sums["hvp"] - vectors @ ref.hessian) / h,  # H symmetric: row k = (H v_k)^T
        "hessian": _max(part.sums["hessian_block_0"] - ref.hessian) / h,  # the dense block, every entry
    }
    if "ggn_diagonal" in part.sums:
        errors["ggn_diagonal"] = _max(part.sums["ggn_diagonal"] - ref.ggn) / _max(ref.ggn)
    if "sum_grad_squared" in part.sums:
        errors["fisher_diagonal"] = _max(part.sums["sum_grad_squared"] - ref.fisher) / _max(ref.fisher)
    return errors


def check(name, precision, part, ref, vectors):
    errors = errors_of(part, ref, vectors)
    key = (name, precision)
    previous = zoo_models.MEASURED.get(key, {})
    zoo_models.MEASURED[key] = {q: max(e, previous.get(q, 0.0)) for q, e in errors.items()}
    tolerance = TOLERANCE[precision]
    assert part.weight_sum == pytest.approx(ref.weight_sum, rel=tolerance)  # float32: weights rounded
    bad = {q: f"{e:.3g}" for q, e in errors.items() if not e <= tolerance}  # NaN fails too
    assert not bad, f"{name} ({precision}): relative errors above {tolerance:g}: {bad}"


def _load(path):
    with np.load(path) as saved:
        sums = {key[4:]: saved[key] for key in saved.files if key.startswith("sum_")}
        part = SimpleNamespace(sums={k: (float(v) if v.ndim == 0 else v) for k, v in sums.items()},
                               weight_sum=float(saved["weight_sum"]))
        return part, saved["vectors"]


def run_isolated(case, name, precision, ref, tmp_path):
    """The engine in a child process (zoo_isolated.py): its first stage (no per-example
    products) is checked even when the second one crashes the process."""
    weights = tmp_path / "weights.npz"
    prefix = str(tmp_path / "out")
    np.savez(weights, **{f"w{i}": w for i, w in enumerate(case.model.get_weights())})
    proc = subprocess.run([sys.executable, os.path.join(HERE, "zoo_isolated.py"), name, precision,
                           str(weights), prefix], capture_output=True, text=True, timeout=600)
    if not os.path.exists(prefix + ".curvature.npz"):
        raise AssertionError(f"engine child process exited with {proc.returncode} in its first stage: "
                             f"{proc.stderr[-2000:]}")
    part, vectors = _load(prefix + ".curvature.npz")
    check(f"{name} (no Fisher/GGN)", precision, part, ref, vectors)
    if proc.returncode != 0 or not os.path.exists(prefix + ".all.npz"):
        tail = [line for line in proc.stderr.splitlines() if line.strip()][-3:]
        raise EngineProcessDied(f"engine child process exited with {proc.returncode} computing Fisher/GGN: {tail}")
    return _load(prefix + ".all.npz")


@pytest.mark.parametrize("name,precision", _params(RUNS))
def test_engine_matches_dense_reference(name, precision, tmp_path):
    case = zoo_models.get_case(name)
    ref = zoo_models.get_reference(name)
    if (name, precision) in ISOLATED:
        part, vectors = run_isolated(case, name, precision, ref, tmp_path)
    else:
        engine, part, vectors = zoo_models.run_engine(case, precision, engine=ENGINES.get((name, precision)))
        ENGINES[(name, precision)] = engine
        assert engine.parameters == len(ref.gradient)
        assert [tuple(s) for s in engine.shapes] == [tuple(v.shape) for v in case.reference_model.trainable_variables]
    check(name, precision, part, ref, vectors)


# Each quantity asked alone takes other routes than all of them together (the Fisher alone comes
# with the gradient by layer rules in one pass, the Monte Carlo GGN alone in its own pass...):
# the kinds where routes have disagreed before are checked alone too, each on a fresh engine.
ALONE_CASES = [("masked_lstm_sequence", "float64"), ("softmax_sparse_ce_saturated", "float64"),
               ("softmax_sparse_ce_saturated", "float32"), ("sigmoid_binary_focal_saturated", "float64"),
               ("sigmoid_binary_focal_saturated", "float32"), ("grouped_conv2d", "float64"),
               ("grouped_conv2d", "float32"), ("preprocessing_state_float64", "float64"),
               ("mixed_float16_preprocessing_state", "float32"), ("stateful_rnn", "float64"),
               ("stateful_rnn", "float32"), ("int8_dense", "float64")]
ALONE = {"gradient": (dict(gradient=True), "gradient", lambda ref: ref.gradient),
         "hessian_diagonal": (dict(hessian_diagonal="exact"), "hessian_diagonal", lambda ref: np.diag(ref.hessian)),
         "ggn_diagonal": (dict(ggn_diagonal="exact"), "ggn_diagonal", lambda ref: ref.ggn),
         "fisher_diagonal": (dict(sum_grad_squared=True), "sum_grad_squared", lambda ref: ref.fisher)}


@pytest.mark.parametrize("quantity", list(ALONE))
@pytest.mark.parametrize("name,precision", ALONE_CASES, ids=[f"{n}-{p}" for n, p in ALONE_CASES])
def test_each_quantity_alone_matches_the_reference(name, precision, quantity):
    from pipeline.curvature.requests import BatchWork

    case = zoo_models.get_case(name)
    ref = zoo_models.get_reference(name)
    work, key, expected = ALONE[quantity]
    engine = CurvatureEngine(case.model, resolve_loss(case.loss.spec), precision=precision, builder=case.builder)
    part = engine.partial(case.inputs, case.labels, case.weights, np.arange(len(case.weights)), BatchWork(**work))
    want = expected(ref)
    scale = _max(ref.hessian) if quantity == "hessian_diagonal" else _max(want)
    error = _max(part.sums[key] - want) / scale
    assert part.weight_sum == pytest.approx(ref.weight_sum, rel=TOLERANCE[precision])
    assert error <= TOLERANCE[precision], f"{name} ({precision}) {quantity} alone: relative error {error:.3g}"


@pytest.mark.parametrize("name,precision", _params([run for run in RUNS if run not in ISOLATED]))
def test_per_example_rows_match_the_references_per_example_gradients(name, precision):
    """Contract 7 on every kind: each example's loss, gradient norm, scores against vectors,
    identity self-influence and projection (``engine.rows``) from the reference's per-example
    gradients ``g_i`` (each example alone, by a tape of the hand-written loss)."""
    from pipeline.curvature.requests import RowsRequest
    from pipeline.influence import projection

    case = zoo_models.get_case(name)
    ref = zoo_models.get_reference(name)
    engine = CurvatureEngine(case.model, resolve_loss(case.loss.spec), precision=precision, builder=case.builder)
    g = ref.gradients
    vectors = np.random.default_rng(0).normal(size=(3, g.shape[1]))
    got = engine.rows(case.inputs, case.labels, RowsRequest(projection=16, self_influence=True, vectors=vectors))
    norms = np.linalg.norm(g, axis=1)
    layout = engine.example_rows.layout(True)[0]
    for what, value, want in (("loss", got["loss"], ref.per_example), ("gradient_norm", got["gradient_norm"], norms),
                              ("scores", got["scores"], g @ vectors.T),
                              ("self_influence", got["self_influence"], norms ** 2),
                              ("projection", got["projection"], projection.project(layout, 16, 0, g))):
        error = _max(value - want) / max(_max(want), 1e-300)
        assert error <= TOLERANCE[precision], f"{name} ({precision}) {what}: relative error {error:.3g}"


def test_variable_length_batches_through_one_engine():
    """Case 13's masked LSTM engine (the one its own test used, when it ran) takes its batch
    padded to 5 and then another padded to 8: each matches its own reference."""
    engine = ENGINES.get(("masked_lstm_sequence", "float64"))
    for name in ("masked_lstm_sequence", "variable_length_sequences"):
        case = zoo_models.get_case(name)
        engine, part, vectors = zoo_models.run_engine(case, "float64", engine=engine)
        check("variable_length_sequences", "float64", part, zoo_models.get_reference(name), vectors)
    ENGINES[("masked_lstm_sequence", "float64")] = engine
    assert zoo_models.get_case("masked_lstm_sequence").inputs[0].shape[1] == 5
    assert zoo_models.get_case("variable_length_sequences").inputs[0].shape[1] == 8


@pytest.mark.parametrize("name", list(zoo_models.CASES))
def test_reference_loss_is_keras_evaluate(name):
    """The hand-written per-example losses of the reference are Keras' own: ``model.evaluate``
    on each example alone (float64), on the model handed to the engine (for the saturated
    softmax/sigmoid cases: the probability model, while the reference takes its logits twin)."""
    case = zoo_models.get_case(name)
    ref = zoo_models.get_reference(name)
    evaluated = zoo_models.evaluate_losses(case)
    np.testing.assert_allclose(evaluated, ref.per_example, rtol=1e-12, atol=1e-13 * _max(ref.per_example))
    assert ref.loss == pytest.approx(float(np.sum(case.weights * evaluated)), rel=1e-12)


@pytest.mark.parametrize("name", ["masked_lstm_sequence", "variable_length_sequences"])
def test_masked_objective_is_token_weighted_as_keras_evaluate(name):
    """With a sequence mask the objective is Keras' ``evaluate`` over the batch,
    ``sum_it m_it l_it / sum_it m_it`` (not a mean of per-example means): the reference's sums
    divided by its ``sum_i n_i`` (weights 1) give it, and a mean of means would not."""
    case = zoo_models.get_case(name)
    ref = zoo_models.reference(case, weights=np.ones(len(case.weights)))
    counts = zoo_models.positions(case)
    assert ref.loss / ref.weight_sum == pytest.approx(zoo_models.evaluate_batch(case), rel=1e-12)
    assert ref.weight_sum == pytest.approx(counts.sum())
    # The two definitions differ here far beyond the 1e-12 agreement asserted above.
    assert abs(np.mean(ref.per_example / counts) - ref.loss / ref.weight_sum) > 1e-6 * abs(ref.loss / ref.weight_sum)


def test_pairings_would_be_caught():
    """Dict inputs and dict outputs: a wrong pairing changes the loss (the checks above can fail)."""
    case = zoo_models.get_case("dict_outputs")
    x = tf.constant(case.inputs[0])
    outs = case.unpack_outputs(case.reference_model(x, training=False))
    labels = [tf.constant(a) for a in case.labels]
    right = case.hand_loss(labels, outs, [x]).numpy()
    swapped = case.hand_loss(labels[::-1], outs, [x]).numpy()
    assert np.all(np.abs(swapped - right) > 0.1 * right)

    case = zoo_models.get_case("dict_inputs")
    xs = [tf.constant(a) for a in case.inputs]
    y = [tf.constant(case.labels[0])]
    right = case.hand_loss(y, [case.reference_model(case.pack_inputs(xs), training=False)], xs).numpy()
    swapped = case.hand_loss(y, [case.reference_model(case.pack_inputs(xs[::-1]), training=False)], xs).numpy()
    assert np.abs(right - swapped).max() > 1e-2
    engine = CurvatureEngine(case.model, resolve_loss(case.loss.spec), precision="float32")
    assert [s.name for s in engine.signature.inputs] == ["a", "b"]  # sorted dict keys, not Input names


def test_saturated_examples_are_saturated():
    """Cases 9/10 really have examples past float32 probability resolution, both ways."""
    case = zoo_models.get_case("softmax_sparse_ce_saturated")
    p = case.model64(case.inputs[0][:2], training=False).numpy()
    assert p[0, case.labels[0][0]] > 1 - 1e-8 and p[1, case.labels[0][1]] < 1e-8
    case = zoo_models.get_case("sigmoid_binary_ce_saturated")
    p = case.model64(case.inputs[0][:2], training=False).numpy()
    confident = np.where(case.labels[0][:2] > 0.5, p, 1 - p)
    assert np.all(confident[0] > 1 - 1e-8) and np.all(confident[1] < 1e-8)


def test_references_are_not_trivial():
    """The GGN differs from the Hessian diagonal where the model is non-linear, and the Hessian
    diagonal from its row sums: the comparisons above could fail."""
    for name in ("residual_mlp_layernorm", "transformer_block", "loss_user"):
        ref = zoo_models.get_reference(name)
        diag = np.diag(ref.hessian)
        assert np.abs(ref.ggn - diag).max() > 1e-3 * np.abs(diag).max(), name
        assert np.abs(ref.hessian.sum(axis=1) - diag).max() > 1e-3 * np.abs(diag).max(), name
        np.testing.assert_allclose(ref.hessian, ref.hessian.T, atol=1e-10 * np.abs(ref.hessian).max())
