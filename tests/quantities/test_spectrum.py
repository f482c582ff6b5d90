"""The spectrum over the whole dataset: trace, top eigenvalues and SLQ density on a real local Ray.

Every published number is checked against the dense float64 Hessian of the whole dataset
(``sum_i s_i H_i / sum_i s_i``), computed in this process. The model is the 53-parameter MLP
of ``cases.mlp`` (6 -> 5 tanh -> 3), so the dense matrix is cheap and no Krylov method
needs more than P passes. Two objectives:

- classification: sparse softmax cross-entropy on logits with per-example weights. Its
  Hessian has exact zero eigenvalues (shift invariance of the softmax, PITFALLS.md), so it is
  used for the top of the spectrum, the traces and the density;
- regression: MSE with targets 10 N(0, 1), far from the model's fit, so that the residual
  term gives large negative curvature: the bottom six eigenvalues are separated (gaps > 0.03
  at |lambda| ~ 1.5) and the five of largest magnitude mix both signs (both checked below).

Six runs in all (start-up dominates each): keep it that way, this file must stay under
about 100 s on 2 cores.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cases
import jobs
from pipeline import blocks, spectrum
from pipeline.curvature.losses import resolve_loss
from pipeline.curvature.model import load_model
from pipeline.curvature.model import to_precision
from pipeline.job import load_job
from pipeline.probes import SPECTRUM_STREAM, rademacher
from pipeline.driver import run

pytestmark = pytest.mark.slow

P = 53  # parameters of cases.mlp: 6*5 + 5 + 5*3 + 3
TOL = 1e-6  # Lanczos tolerance, relative to the largest Ritz value in magnitude

CLASSIFICATION = {
    "eigenvalues": {"top": 5, "which": "largest", "tol": TOL},
    "trace": {"method": "hutch++", "probes": 30},
    "spectrum": {"runs": 6, "steps": 64},  # steps >= P: every run's quadrature is exact
}


# ------------------------------------------------------------------------------ fixtures
def _write_regression(folder, x, seed=7):
    """The features ``x`` with targets ``10 N(0, 1)`` as a fixed-size list column, in 2 files."""
    targets = 10.0 * np.random.default_rng(seed).normal(size=(len(x), 3))
    os.makedirs(folder, exist_ok=True)
    for index, part in enumerate(np.array_split(np.arange(len(x)), 2)):
        table = pa.table({
            "x": pa.FixedSizeListArray.from_arrays(pa.array(x[part].ravel()), x.shape[1]),
            "target": pa.FixedSizeListArray.from_arrays(pa.array(targets[part].ravel()), 3),
        })
        pq.write_table(table, os.path.join(folder, f"part-{index:03d}.parquet"), row_group_size=23)
    return targets


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("spectrum")
    x, labels, weights = jobs.write_data(root / "data")
    targets = _write_regression(str(root / "regression"), x)
    jobs.write_model(str(root / "model.keras"))
    return root, x, labels, weights, targets


def _job(root, quantities, regression=False, **layout):
    extra = {"loss": "mse", "data": {"path": str(root / "regression"), "labels": "target"}} if regression \
        else {"data": {"weights": "weight"}}
    return load_job(jobs.job(root, quantities, **layout, **extra))


def _dense_hessian(model, loss, inputs, labels, weights):
    """``sum_i s_i H_i / sum_i s_i``: the Hessian half of ``cases.reference``.

    ``cases.reference`` also loops over examples for the Fisher and GGN (about 40 s for 230
    rows); this is its first step alone, the Jacobian of the whole-batch gradient.
    ``test_dense_hessian_is_the_reference_one`` checks the two agree.
    """
    import tensorflow as tf

    variables = model.trainable_variables
    x = [tf.constant(a, tf.float64) for a in inputs]
    y = [tf.constant(a) for a in labels]
    s = tf.constant(weights, tf.float64)
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            total = tf.reduce_sum(s * loss(y, [model(x[0], training=False)]))
        grad = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(total, variables)], 0)
    blocks = outer.jacobian(grad, variables)
    hessian = np.concatenate([tf.reshape(h, [P, -1]).numpy() for h in blocks], axis=1)
    return (hessian + hessian.T) / 2 / float(np.sum(weights))


@pytest.fixture(scope="module")
def problems(files):
    """The float64 model, losses and dense Hessians of both objectives over all rows."""
    root, x, labels, weights, targets = files
    spec = _job(root, {"gradient": {}})
    model = to_precision(load_model(spec.model), "float64")
    classification = resolve_loss(spec.loss)
    regression = resolve_loss(_job(root, {"gradient": {}}, regression=True).loss)
    return {
        "model": model,
        "losses": {"classification": classification, "regression": regression},
        "classification": _dense_hessian(model, classification, [x], [labels], weights),
        "regression": _dense_hessian(model, regression, [x], [targets], np.ones(len(x))),
    }


def _read(run_dir, name):
    return pq.read_table(os.path.join(run_dir, name)).to_pydict()


class Runs:
    """Each job run once for the whole module, on first use."""

    def __init__(self, root, output):
        self.root = root
        self.output = output
        self.done = {}

    def __call__(self, name):
        if name not in self.done:
            quantities, regression, layout = RUNS[name]
            spec = _job(self.root, quantities, regression, output=self.output, **layout)
            self.done[name] = run(spec, run_id=name)
        return self.done[name]


RUNS = {
    # name: (quantities, regression, layout)
    "largest": (CLASSIFICATION, False, {"shards": 1, "workers": 1}),
    "largest-sharded": (CLASSIFICATION, False, {"shards": 5, "workers": 2}),
    "magnitude": ({"eigenvalues": {"top": 5, "which": "magnitude", "tol": TOL, "vectors": True},
                   "trace": {"method": "hutchinson", "probes": 40}}, True, {"shards": 3, "workers": 2}),
    "smallest": ({"eigenvalues": {"top": 5, "which": "smallest", "tol": TOL, "vectors": True},
                  "trace": {"method": "exact"}}, True, {"shards": 2, "workers": 1}),
    "exact-trace": ({"trace": {"method": "exact"}}, False, {"shards": 2, "workers": 2}),
    # Contract 5.3: every algorithm on each diagonal block, the blocks side by side.
    "blocks": ({"eigenvalues": {"top": 3, "which": "largest", "tol": TOL, "vectors": True, "blocks": "layer"},
                "trace": {"method": "hutch++", "probes": 30, "blocks": "variable"},
                "spectrum": {"runs": 3, "steps": 64, "blocks": "layer"}}, False, {"shards": 3, "workers": 2}),
}
HESSIAN = {name: "regression" if spec[1] else "classification" for name, spec in RUNS.items()}


@pytest.fixture(scope="module")
def runs(ray_local, files, tmp_path_factory):
    return Runs(files[0], str(tmp_path_factory.mktemp("results")))


def _ordered(eigenvalues, which):
    if which == "largest":
        return np.sort(eigenvalues)[::-1]
    if which == "smallest":
        return np.sort(eigenvalues)
    return eigenvalues[np.argsort(-np.abs(eigenvalues), kind="stable")]


# ------------------------------------------------------------------------------ tests
def test_dense_hessian_is_the_reference_one(files, problems):
    root, x, labels, weights, targets = files
    rows = slice(0, 6)
    for kind, y, s in (("classification", labels, weights), ("regression", targets, np.ones(len(x)))):
        loss = problems["losses"][kind]
        reference = cases.reference(problems["model"], loss, [x[rows]], [y[rows]], s[rows])
        mine = _dense_hessian(problems["model"], loss, [x[rows]], [y[rows]], s[rows])
        np.testing.assert_allclose(mine, reference.hessian / reference.weight_sum, rtol=0,
                                   atol=1e-12 * np.abs(mine).max(), err_msg=kind)
    # The spectra the tests below rely on (see the module docstring).
    bottom = np.linalg.eigvalsh(problems["regression"])[:6]
    assert np.min(np.diff(bottom)) > 0.03
    magnitude = _ordered(np.linalg.eigvalsh(problems["regression"]), "magnitude")[:5]
    assert (magnitude > 0).any() and (magnitude < 0).any()


@pytest.mark.parametrize("name", ["largest", "smallest", "magnitude"])
def test_top_eigenvalues_equal_eigvalsh_of_the_dense_hessian(runs, problems, name):
    result = runs(name)
    hessian = problems[HESSIAN[name]]
    exact = np.linalg.eigvalsh(hessian)
    which = RUNS[name][0]["eigenvalues"]["which"]
    table = _read(result.run_dir, "eigenvalues.parquet")
    assert table["rank"] == [1, 2, 3, 4, 5]
    values, residuals = np.array(table["eigenvalue"]), np.array(table["residual"])
    np.testing.assert_allclose(values, _ordered(exact, which)[:5], rtol=1e-4)
    # Residuals ||Hv - theta v|| of unit Ritz vectors: non-negative, within the stopping
    # rule (tol relative to ||H||_2; it is checked on Lanczos' own estimates, hence the 10%
    # margin for the true residuals published), and a residual r puts an eigenvalue of H
    # within r of theta (symmetric H), which the dense spectrum must confirm.
    norm = np.abs(exact).max()
    assert np.all(residuals >= 0) and np.all(residuals <= TOL * norm * 1.1), residuals
    distance = np.abs(values[:, None] - exact[None, :]).min(axis=1)
    assert np.all(distance <= residuals + 1e-12 * norm)
    if not RUNS[name][0]["eigenvalues"].get("vectors"):
        assert not os.path.exists(os.path.join(result.run_dir, "eigenvectors.parquet"))
        return
    # eigenvalues: {vectors: true}: unit Ritz vectors, signed by their largest entry, along the
    # dense eigenvectors of every eigenvalue separated from the rest of the spectrum.
    vectors = _read(result.run_dir, "eigenvectors.parquet")
    assert set(vectors["block"]) == {"__all__"} and sorted(set(vectors["rank"])) == [1, 2, 3, 4, 5]
    found = np.reshape(vectors["value"], (5, -1))
    np.testing.assert_allclose(np.linalg.norm(found, axis=1), 1.0, rtol=1e-12)
    assert np.all(found[np.arange(5), np.argmax(np.abs(found), axis=1)] > 0)
    dense_values, dense_vectors = np.linalg.eigh(hessian)
    checked = 0
    for rank, value in enumerate(values):
        nearest = int(np.argmin(np.abs(dense_values - value)))
        gap = np.sort(np.abs(np.delete(dense_values, nearest) - dense_values[nearest]))[0]
        if gap > 100 * residuals[rank] + 1e-3 * norm:
            cosine = abs(found[rank] @ dense_vectors[:, nearest])
            assert cosine >= 0.999, (rank, cosine, gap)
            checked += 1
    assert checked >= 3, checked  # the spectra chosen above are separated at the ends asked for


@pytest.mark.parametrize("name,method", [("smallest", "exact"), ("exact-trace", "exact"),
                                         ("magnitude", "hutchinson"), ("largest", "hutch++")])
def test_trace_against_the_dense_hessian(runs, problems, name, method):
    result = runs(name)
    hessian = problems[HESSIAN[name]]
    table = _read(result.run_dir, "trace.parquet")
    assert table["method"] == [method]
    estimate, stderr, matvecs = table["estimate"][0], table["stderr"][0], table["matvecs"][0]
    exact = np.trace(hessian)
    if method == "exact":
        assert estimate == pytest.approx(exact, rel=1e-9)
        assert (stderr, matvecs) == (0.0, 0)
        return
    probes = RUNS[name][0]["trace"]["probes"]
    assert matvecs == probes
    assert 0 < stderr < abs(exact)
    assert abs(estimate - exact) <= 3 * stderr, (estimate, exact, stderr)
    # The probes are functions of (seed, k): the same estimator on the dense matrix in this
    # process gives the same numbers.
    estimator = spectrum.hutchinson_trace if method == "hutchinson" else spectrum.hutchpp_trace
    local = estimator(lambda V: V @ hessian, P, probes, seed=0)
    assert estimate == pytest.approx(local.estimate, rel=1e-9)
    assert stderr == pytest.approx(local.stderr, rel=1e-7)


def test_spectrum_quadrature(runs, problems):
    result = runs("largest")
    hessian = problems["classification"]
    exact = np.linalg.eigvalsh(hessian)
    table = _read(result.run_dir, "spectrum.parquet")
    run_index = np.array(table["run"])
    nodes, weights = np.array(table["node"]), np.array(table["weight"])
    runs_count = CLASSIFICATION["spectrum"]["runs"]
    assert sorted(set(run_index)) == list(range(runs_count))
    norm = np.abs(exact).max()
    assert np.all(weights >= 0)
    assert np.all((nodes >= exact[0] - 1e-9 * norm) & (nodes <= exact[-1] + 1e-9 * norm))
    probes = rademacher(0, range(runs_count), P, SPECTRUM_STREAM) / np.sqrt(P)
    moments = []
    for r in range(runs_count):
        w, theta = weights[run_index == r], nodes[run_index == r]
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
        # A run stops when its Krylov space is invariant (at most P steps, fewer here: H has a
        # null space), so its Gauss quadrature is exact: sum_j w_j theta_j^k = v^T H^k v.
        v = probes[r]
        assert np.sum(w * theta) == pytest.approx(v @ hessian @ v, rel=1e-9, abs=1e-12 * norm)
        assert np.sum(w * theta ** 2) == pytest.approx(v @ hessian @ hessian @ v, rel=1e-9)
        moments.append(np.sum(w * theta))
    # Averaged over runs the first moment is Hutchinson's estimate of tr(H)/P with R
    # Rademacher probes: unbiased, with standard deviation
    # sqrt(2 (||H||_F^2 - sum_i H_ii^2) / R) / P (the exact variance of z^T H z for Rademacher
    # z). Four standard deviations: the probes are fixed by the seed, so this either always
    # holds or never does, and it fails by chance for about 1 seed in 10^4.
    sigma = np.sqrt(2 * (np.sum(hessian ** 2) - np.sum(np.diag(hessian) ** 2)) / runs_count) / P
    assert abs(np.mean(moments) - np.trace(hessian) / P) <= 4 * sigma


def test_result_does_not_depend_on_shards_or_workers(runs):
    one, five = runs("largest"), runs("largest-sharded")
    assert (one.manifest["shards"], one.manifest["workers"]) == (1, 1)
    assert (five.manifest["shards"], five.manifest["workers"]) == (5, 2)
    for name, columns in (("eigenvalues.parquet", ("eigenvalue",)), ("trace.parquet", ("estimate", "stderr")),
                          ("spectrum.parquet", ("node", "weight"))):
        a, b = _read(one.run_dir, name), _read(five.run_dir, name)
        assert len(a[columns[0]]) == len(b[columns[0]]), name
        for column in columns:
            np.testing.assert_allclose(b[column], a[column], rtol=1e-8, atol=1e-14, err_msg=f"{name} {column}")
    assert one.manifest["passes"] == five.manifest["passes"]


def _blocks(result, kind):
    """The run's blocks of ``kind`` and their parameter positions."""
    names = [v["name"] for v in result.manifest["variables"]]
    shapes = [tuple(v["shape"]) for v in result.manifest["variables"]]
    return [(block.name, blocks.positions(block, shapes)) for block in blocks.of(kind, names, shapes)]


@pytest.mark.parametrize("name", list(RUNS))
def test_manifest_counts_the_passes(runs, problems, name):
    """``passes`` = 1 (per-example sums) + the spectral algorithms' own passes; per block, as
    many as the slowest block (the blocks share their passes).

    The algorithms are deterministic given the operator: run in this process on the dense
    matrix's blocks, they take the same number of passes.
    """
    result = runs(name)
    quantities = RUNS[name][0]
    hessian = problems[HESSIAN[name]]

    def slowest(options, steps_of):
        return max(spectrum.drive(steps_of(len(where)), lambda V, w=where: V @ hessian[np.ix_(w, w)]).passes
                   for _, where in _blocks(result, options.get("blocks", "full")))

    expected = 1
    if "trace" in quantities:
        method, probes = quantities["trace"]["method"], quantities["trace"].get("probes", 100)
        expected += spectrum.trace_passes(method, probes)
    if "eigenvalues" in quantities:
        e = quantities["eigenvalues"]
        expected += slowest(e, lambda size: spectrum.top_eigenvalues_steps(size, top=e["top"], which=e["which"],
                                                                            tol=e["tol"]))
    if "spectrum" in quantities:
        s = quantities["spectrum"]
        expected += slowest(s, lambda size: spectrum.spectral_density_steps(size, runs=s["runs"],
                                                                             steps=min(s["steps"], size)))
    manifest = json.load(open(os.path.join(result.run_dir, "manifest.json")))
    assert manifest["passes"] == expected
    if quantities.keys() == {"trace"} and quantities["trace"]["method"] == "exact":
        assert manifest["passes"] == 1
    else:
        assert manifest["passes"] > 2


# ------------------------------------------------------------------------------ per block (contract 5.3)
def test_per_block_eigenvalues_traces_and_spectra_equal_those_of_the_dense_blocks(runs, problems):
    """``blocks: layer`` eigenvalues and eigenvectors, ``blocks: variable`` traces and
    ``blocks: layer`` spectra, against ``eigh``/``trace`` of the dense diagonal blocks ``H_bb``
    (the off-block part of H plays no part), and against the same estimator run on ``H_bb`` in
    this process (the same probes: a block's result is that of a run with ``variables:`` set
    to the block)."""
    result = runs("blocks")
    hessian = problems["classification"]
    layers = _blocks(result, "layer")
    assert [name for name, _ in layers] == ["hidden", "out"]

    values = _read(result.run_dir, "eigenvalues.parquet")
    vectors = _read(result.run_dir, "eigenvectors.parquet")
    assert values["block"] == ["hidden"] * 3 + ["out"] * 3 and values["rank"] == [1, 2, 3] * 2
    checked = 0
    for name, where in layers:
        block = hessian[np.ix_(where, where)]
        dense_values, dense_vectors = np.linalg.eigh(block)
        mine = np.array([v for b, v in zip(values["block"], values["eigenvalue"]) if b == name])
        residuals = np.array([r for b, r in zip(values["block"], values["residual"]) if b == name])
        norm = np.abs(dense_values).max()
        np.testing.assert_allclose(mine, dense_values[::-1][:3], rtol=1e-4, atol=1e-8 * norm, err_msg=name)
        assert np.all(residuals <= TOL * norm * 1.1), (name, residuals)
        # Eigenvectors over the block's parameters only, unit norm, signed, along the dense ones.
        found = np.reshape([v for b, v in zip(vectors["block"], vectors["value"]) if b == name], (3, -1))
        assert found.shape == (3, len(where))
        np.testing.assert_allclose(np.linalg.norm(found, axis=1), 1.0, rtol=1e-12)
        assert np.all(found[np.arange(3), np.argmax(np.abs(found), axis=1)] > 0)
        for rank, value in enumerate(mine):
            nearest = int(np.argmin(np.abs(dense_values - value)))
            gap = np.sort(np.abs(np.delete(dense_values, nearest) - dense_values[nearest]))[0]
            if gap > 100 * residuals[rank] + 1e-3 * norm:
                assert abs(found[rank] @ dense_vectors[:, nearest]) >= 0.999, (name, rank)
                checked += 1
    assert checked >= 3, checked

    traces = _read(result.run_dir, "trace.parquet")
    variables = _blocks(result, "variable")
    assert traces["block"] == [name for name, _ in variables] and set(traces["method"]) == {"hutch++"}
    for (name, where), estimate, stderr, matvecs in zip(variables, traces["estimate"], traces["stderr"],
                                                        traces["matvecs"]):
        block = hessian[np.ix_(where, where)]
        local = spectrum.hutchpp_trace(lambda V, b=block: V @ b, len(where), 30, seed=0)
        assert estimate == pytest.approx(local.estimate, rel=1e-8, abs=1e-12), name
        assert matvecs == local.matvecs <= 30
        assert abs(estimate - np.trace(block)) <= 3 * stderr + 1e-9 * abs(np.trace(block)), name
        if len(where) <= 20:  # the 30 products cover a small block: exact, and said so
            assert stderr == 0 and estimate == pytest.approx(np.trace(block), rel=1e-9, abs=1e-12), name

    table = _read(result.run_dir, "spectrum.parquet")
    for name, where in layers:
        block = hessian[np.ix_(where, where)]
        probes = rademacher(0, range(3), len(where), SPECTRUM_STREAM) / np.sqrt(len(where))
        for r in range(3):
            rows = [i for i, (b, run_index) in enumerate(zip(table["block"], table["run"])) if b == name and run_index == r]
            w, theta = np.array(table["weight"])[rows], np.array(table["node"])[rows]
            assert w.sum() == pytest.approx(1.0, abs=1e-12)
            assert np.sum(w * theta) == pytest.approx(probes[r] @ block @ probes[r], rel=1e-8, abs=1e-12)


def test_per_block_results_read_show_report_and_compare(runs, tmp_path):
    """The per-block files through ``pipeline.load``, ``show``, ``report`` and ``compare``."""
    from pipeline.read.compare import compare_runs
    from pipeline.read.report import write_report
    from pipeline.read.show import show_run
    import pipeline

    result, full = runs("blocks"), runs("largest")
    loaded = pipeline.load(result.run_dir)
    assert loaded.blocks("eigenvalues") == ["hidden", "out"] and loaded.blocks("trace")[0] == "hidden/kernel"
    assert loaded.block_size("hidden") == 35 and loaded.block_size("out/bias") == 3
    nodes, weights = loaded.spectrum_runs("out")
    assert len(nodes) == 3 and all(w.sum() == pytest.approx(1.0) for w in weights)
    text = show_run(result.run_dir)
    assert "block" in text.split("\neigenvalues\n")[1].splitlines()[0]
    assert "spectrum hidden" in text and "eigenvectors" in text and "6 unit eigenvectors of 2 blocks" in text
    report = write_report(loaded, str(tmp_path / "report"), baseline=full.run_dir)
    # Per-block traces are not estimates of tr(H) (the trace plot's subject): they go to blocks.png.
    assert report.plots == ["blocks.png", "spectrum.png"]
    page = open(report.html, encoding="utf-8").read()
    assert "<h2>Per block</h2>" in page and "hidden/kernel" in page and "rank-1 eigenvalue (largest)" in page
    # A baseline whose eigenvalues are the other end of the spectrum is not paired with these.
    other = write_report(loaded, str(tmp_path / "other"), baseline=runs("smallest").run_dir)
    page = open(other.html, encoding="utf-8").read()
    assert "The baseline's eigenvalues are the smallest, these the largest: not shown side by side" in page
    # compare: per block, against itself zero change; against the full run, no block shared.
    same = compare_runs(result.run_dir, result.run_dir)
    keys = {(c.variable, c.quantity, c.statistic) for c in same.changes}
    assert ("hidden", "eigenvalues", "rank_1") in keys and ("out/bias", "trace", "estimate") in keys
    assert all(c.change == 0 for c in same.changes) and same.warnings == []
    mixed = compare_runs(full.run_dir, result.run_dir)
    assert any("blocks hidden, out" in w or "blocks __all__" in w for w in mixed.warnings), mixed.warnings
