"""``per_example`` and ``influence`` end to end (real Ray, real Parquet, a saved Keras model)
against references computed here by another route: per-example gradients one example at a time
(a ``GradientTape`` per row), the dense GGN from per-example Jacobians and the softmax's Hessian,
explicit ``kron(A, S)`` matrices inverted densely, and ``numpy`` top-k selections. Float64
throughout: 1e-8 (contract 7, issue "Which training rows")."""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
import yaml

import jobs
import pipeline
from pipeline.errors import InputError
from pipeline.influence import projection
from pipeline.influence.layout import Layout
from pipeline.job import load_job
from pipeline.plan import make_plan

ROWS, QUERIES, DAMPING, K = 60, 4, 0.1, 12


def _write(folder, rows, seed, name="part"):
    """Features ``x`` (6 wide), ``label``, ``weight`` and a string ``key``, in two files."""
    rng = np.random.default_rng(seed)
    x, labels, weights = rng.normal(size=(rows, 6)), rng.integers(0, 3, rows), rng.uniform(0.5, 2.0, rows)
    keys = np.array([f"{name}-{i:03d}" for i in range(rows)])
    os.makedirs(folder, exist_ok=True)
    for index, part in enumerate(np.array_split(np.arange(rows), 2)):
        pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x[part].ravel()), 6),
                                 "label": pa.array(labels[part]), "weight": pa.array(weights[part]),
                                 "key": pa.array(keys[part])}),
                       os.path.join(folder, f"{name}-{index}.parquet"), row_group_size=7)
    return x, labels, weights, keys


def _job(root, influence: dict, per_example=None, **extra):
    return load_job(_mapping(root, influence, per_example, **extra))


def _mapping(root, influence: dict, per_example=None, **extra):
    quantities = {"influence": {"queries": {"path": str(root / "queries"), "features": "x", "labels": "label",
                                            "id": "key"}, "damping": DAMPING, "top_k": 5, **influence}}
    if per_example is not None:
        quantities["per_example"] = per_example
    quantities.update(extra.pop("quantities", {}))
    return jobs.job(root, quantities, data={"id": "key", **extra.pop("data", {})}, **extra)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("influence")
    train = _write(root / "data", ROWS, 0, "train")
    queries = _write(root / "queries", QUERIES, 1, "query")
    jobs.write_model(str(root / "model.keras"), dtype="float64")  # the references compute in float64
    return root, train, queries


def _run(root, spec, run_id):
    return pipeline.run(spec, run_id=run_id, stream=open(os.devnull, "w"))


# ------------------------------------------------------------------------------ references
def _gradients(root, x, labels):
    """Per-example gradients ``[N, P]`` and losses ``[N]``, one example at a time (unweighted)."""
    model = keras.models.load_model(str(root / "model.keras"))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None, dtype="float64")
    out, losses = [], []
    for row in range(len(x)):
        with tf.GradientTape() as tape:
            value = loss(labels[row:row + 1], model(x[row:row + 1], training=False))[0]
        grads = tape.gradient(value, model.trainable_variables)
        out.append(np.concatenate([g.numpy().ravel() for g in grads]))
        losses.append(float(value))
    return np.array(out), np.array(losses)


def _dense_ggn(root, x, weights):
    """``sum_i s_i J_i^T Lambda_i J_i / sum_i s_i`` from per-example Jacobians of the logits."""
    model = keras.models.load_model(str(root / "model.keras"))
    total = 0.0
    for row in range(len(x)):
        with tf.GradientTape() as tape:
            logits = model(x[row:row + 1], training=False)[0]
        jac = tape.jacobian(logits, model.trainable_variables)
        j = np.concatenate([g.numpy().reshape(3, -1) for g in jac], axis=1)
        p = tf.nn.softmax(logits).numpy()
        total = total + weights[row] * j.T @ (np.diag(p) - np.outer(p, p)) @ j
    return total / weights.sum()


def _layers(run):
    """``[(path, flat slice)]`` of the MLP's two Dense layers (kernel then bias, as [W; b])."""
    return [("hidden", slice(0, 35)), ("out", slice(35, 53))]


def _kfac_inverse(run, ekfac: bool):
    """The block-diagonal ``(C + lambda I)^-1`` ``[P, P]`` built densely from the published
    factors: ``kron(A, S)`` (R = 1), or EK-FAC's ``K diag(E) K^T`` with ``K = kron(Q_A, Q_S)``."""
    inverse = np.zeros((53, 53))
    for path, where in _layers(run):
        a, s = run.kfac(path)
        if ekfac:
            q = np.kron(np.linalg.eigh(a)[1], np.linalg.eigh(s)[1])
            values = run.kfac_eigen(path).ravel()
            lam = DAMPING * values.mean()
            inverse[where, where] = q @ np.diag(1.0 / (values + lam)) @ q.T
        else:
            block = np.kron(a, s)
            lam = DAMPING * np.trace(a) * np.trace(s) / (len(a) * len(s))  # the mean of kron's eigenvalues
            inverse[where, where] = np.linalg.inv(block + lam * np.eye(len(block)))
    return inverse


def _top(scores, kind, k=5):
    """Per query, the k best rows by (score, then the smaller row)."""
    out = []
    for q in scores:
        order = sorted(range(len(q)), key=lambda i: ((-q[i] if kind == "helpful" else q[i]), i))[:k]
        out.append(order)
    return np.array(out)


def _close(a, b, tol=1e-8):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    assert np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b))), np.max(np.abs(a - b))


def _check_topk(run, scores, keys):
    table = run.influence()
    for kind in ("helpful", "harmful"):
        mine = table[table["kind"] == kind].sort_values(["query", "rank"])
        rows = mine["row"].to_numpy().reshape(QUERIES, 5)
        np.testing.assert_array_equal(rows, _top(scores, kind))
        _close(mine["score"].to_numpy().reshape(QUERIES, 5), np.take_along_axis(scores, rows, axis=1))
        assert list(mine["id"]) == [keys[r] for r in rows.ravel()]
    assert list(table["query_id"].unique()) == [f"query-{q:03d}" for q in range(QUERIES)]


# ------------------------------------------------------------------------------ tests
@pytest.mark.slow
def test_ggn_influence_and_self_influence_equal_the_dense_reference_and_every_score_is_published(setup):
    root, (x, labels, weights, keys), (xq, lq, _, _) = setup
    run = pipeline.load(_run(root, _job(root, {"curvature": "ggn", "scores": "dense"},
                                        data={"weights": "weight"}), "ggn").run_dir)
    g, losses = _gradients(root, x, labels)
    gq, _ = _gradients(root, xq, lq)
    ggn = _dense_ggn(root, x, weights)
    lam = DAMPING * np.trace(ggn) / len(ggn)
    inverse = np.linalg.inv(ggn + lam * np.eye(len(ggn)))
    scores = gq @ inverse @ g.T
    per_example = run.per_example().to_pandas()
    _close(per_example["self_influence"], np.einsum("np,pq,nq->n", g, inverse, g))
    _close(per_example["loss"], losses)  # l_i unweighted, though the data has weights
    _close(per_example["gradient_norm"], np.linalg.norm(g, axis=1))
    _close(per_example["weight"], weights)
    dense = run.table("influence").sort_values(["query", "row"])
    _close(dense["score"].to_numpy().reshape(QUERIES, ROWS), scores)
    _check_topk(run, scores, keys)
    assert run.manifest["influence"]["lambda"] == {"__all__": pytest.approx(lam, rel=1e-10)}


@pytest.mark.slow
def test_kfac_and_ekfac_influence_equal_references_built_from_the_published_factors(setup):
    root, (x, labels, _, keys), (xq, lq, _, _) = setup
    g, _ = _gradients(root, x, labels)
    gq, _ = _gradients(root, xq, lq)
    for curvature in ("kfac", "ekfac"):
        spec = _job(root, {"curvature": curvature, "fisher_type": "mc"},
                    quantities={"kfac": {"fisher_type": "mc", "eigen_correction": curvature == "ekfac"}})
        run = pipeline.load(_run(root, spec, curvature).run_dir)
        inverse = _kfac_inverse(run, curvature == "ekfac")
        _close(run.per_example(columns=["self_influence"])["self_influence"].to_numpy(),
               np.einsum("np,pq,nq->n", g, inverse, g))
        _check_topk(run, gq @ inverse @ g.T, keys)
        assert set(run.manifest["influence"]["lambda"]) == {"hidden", "out"}


@pytest.mark.slow
def test_identity_is_the_gradient_dot_product_and_one_or_seven_shards_give_the_same_tables(setup):
    root, (x, labels, _, keys), (xq, lq, _, _) = setup
    g, _ = _gradients(root, x, labels)
    gq, _ = _gradients(root, xq, lq)
    runs = [pipeline.load(_run(root, _job(root, {"curvature": "identity"}, {"projection": K}, shards=shards,
                                          workers=workers), f"identity-{shards}").run_dir)
            for shards, workers in ((1, 1), (7, 2))]
    one, seven = runs
    _check_topk(one, gq @ g.T, keys)
    first, second = one.per_example().to_pandas(), seven.per_example().to_pandas()
    _close(first["self_influence"], np.sum(g * g, axis=1))
    assert list(first["row"]) == list(range(ROWS)) and list(first["id"]) == list(keys)
    assert list(first["file"]) == ["train-0.parquet"] * 30 + ["train-1.parquet"] * 30
    assert list(first["file_row"]) == list(range(30)) * 2
    for column in ("loss", "gradient_norm", "self_influence"):
        _close(second[column], first[column], 1e-10)
    _close(np.stack(second["projection"]), np.stack(first["projection"]), 1e-6)
    a, b = one.influence(), seven.influence()
    assert a[["query", "kind", "rank", "row", "file", "file_row", "id"]].equals(
        b[["query", "kind", "rank", "row", "file", "file_row", "id"]])
    _close(a["score"], b["score"], 1e-10)
    assert seven.manifest["per_example"]["parts"] == 7 and len(os.listdir(seven.run_dir + "/per_example")) == 7
    # The projection: Phi g_i with the Phi drawn from the seed alone (Kronecker per layer here).
    layout = Layout.of([v for v, _ in one.variables], [s for _, s in one.variables],
                       [("hidden", 6, 5, 1, True), ("out", 5, 3, 1, True)])
    expected = projection.project(layout, K, 0, g)
    _close(np.stack(first["projection"]), expected, 1e-6)


@pytest.mark.slow
def test_the_plan_states_the_passes_and_refuses_dense_ggn_and_dense_scores_above_their_limits(setup, monkeypatch):
    root = setup[0]
    plan = make_plan(_job(root, {"curvature": "ekfac"}, {"projection": 16}), None, "p", 1, {"CPU": 2})
    said = "\n".join(plan.notes)
    assert "influence: ekfac" in said and "EK-FAC eigenvalues (1 pass)" in said and "per_example: projection" in said
    with pytest.raises(InputError, match="max_dimension=10"):
        make_plan(_job(root, {"curvature": "ggn", "max_dimension": 10}), None, "p", 1, {"CPU": 2})
    from pipeline.quantities import influence

    # A limit this data is above, as 10^8 is for real data.
    monkeypatch.setattr(influence, "DENSE_LIMIT", QUERIES * ROWS - 1)
    with pytest.raises(InputError, match="scores: topk"):
        make_plan(_job(root, {"scores": "dense"}), None, "p", 1, {"CPU": 2})


@pytest.mark.slow
def test_a_run_killed_in_its_rows_pass_resumes_and_rewrites_no_finished_part(setup, tmp_path):
    root = setup[0]
    output = tmp_path / "out"
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(_mapping(root, {"curvature": "ekfac"}, {"projection": K}, shards=4, workers=1,
                                                 output=str(output))))
    log = tmp_path / "log"
    log.mkdir()
    env = {**os.environ, "HESSIAN_PIPELINE_FAULT": "kill-driver:shards=2:pass=rows",
           "HESSIAN_PIPELINE_FAULT_DIR": str(log)}
    command = [sys.executable, "-m", "pipeline", "run", str(job_file), "--run-id", "again"]
    killed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert killed.returncode == 1 and "error:" not in killed.stderr, killed.stderr
    staged = output / "test-job" / ".partials" / "run=again" / "per_example"
    before = {name: os.stat(staged / name) for name in sorted(os.listdir(staged))}
    assert len(before) == 2
    env.pop("HESSIAN_PIPELINE_FAULT")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "resumed 4 of 4 shards" in done.stderr and "resumed 2 of 4 shards" in done.stderr
    run = pipeline.load(done.stdout.strip().splitlines()[-1])
    for name, stat in before.items():  # moved into the run, never written again
        now = os.stat(os.path.join(run.run_dir, "per_example", name))
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert run.manifest["per_example"]["resumed_parts"] == 2
    whole = pipeline.load(_run(root, _job(root, {"curvature": "ekfac"}, {"projection": K}), "whole").run_dir)
    a, b = run.per_example().to_pandas(), whole.per_example().to_pandas()
    for column in ("loss", "gradient_norm", "self_influence"):
        _close(a[column], b[column], 1e-10)
    _close(run.influence()["score"], whole.influence()["score"], 1e-10)
    assert not (output / "test-job" / ".partials").exists()


@pytest.mark.slow
def test_a_bad_label_in_the_query_set_is_one_input_error_naming_its_file_and_leaves_nothing(setup, tmp_path):
    root = setup[0]
    rng = np.random.default_rng(3)
    os.makedirs(tmp_path / "bad")
    pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(rng.normal(size=18)), 6),
                             "label": pa.array([0, 7, 1]), "key": pa.array(["a", "b", "c"])}),
                   str(tmp_path / "bad" / "queries.parquet"))
    mapping = _mapping(root, {"curvature": "identity"}, output=str(tmp_path / "out"))
    mapping["quantities"]["influence"]["queries"]["path"] = str(tmp_path / "bad")
    with pytest.raises(InputError) as raised:  # found by the worker that reads the query set
        pipeline.run(load_job(mapping), run_id="bad", stream=open(os.devnull, "w"))
    said = str(raised.value)
    assert "\n" not in said and "ray::" not in said and "Traceback" not in said, said
    assert "outside the valid range" in said and "queries.parquet, its row 1" in said
    assert not [f for _, _, files in os.walk(tmp_path / "out") for f in files]
