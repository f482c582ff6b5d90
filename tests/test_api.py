"""The Python API: ``pipeline.run`` and ``pipeline.load`` on real published runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

import pipeline
import published
from pipeline.read.run import Run, Variable
from pipeline.errors import InputError
from pipeline.job import load_job
from pipeline.plan import Plan

pytestmark = pytest.mark.slow
SHAPES = {"hidden/kernel": (6, 5), "hidden/bias": (5,), "out/kernel": (5, 3), "out/bias": (3,)}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return published.two_runs(tmp_path_factory)


def test_run_returns_the_loaded_run_with_every_table(made):
    run = made["main"]
    assert isinstance(run, Run) and run.run_id == "main" and os.path.isfile(os.path.join(run.run_dir, "manifest.json"))
    assert run.manifest == json.load(open(os.path.join(run.run_dir, "manifest.json")))
    expected = {
        "diagonals": ["variable", "index", "hessian_diagonal", "ggn_diagonal", "fisher_diagonal", "gradient"],
        "summary": ["variable", "quantity", "size", "mean", "std", "min", "max", "abs_mean", "sum", "l2_norm"],
        "hvp": ["vector", "variable", "index", "value"],
        "hvp_vectors": ["vector", "variable", "index", "value"],
        "eigenvalues": ["block", "rank", "eigenvalue", "residual"],
        "trace": ["block", "method", "estimate", "stderr", "matvecs"],
        "spectrum": ["block", "run", "node", "weight"],
    }
    for name, columns in expected.items():
        frame = getattr(run, name)
        assert isinstance(frame, pd.DataFrame) and list(frame.columns) == columns, name
    assert len(run.diagonals) == run.parameters == 53 and len(run.eigenvalues) == 3 and len(run.trace) == 1
    assert len(run.hvp) == 2 * 53 and run.spectrum.groupby("run")["weight"].sum().round(9).tolist() == [1.0, 1.0]
    # The overrides reached the baseline: another seed, fewer rows.
    base = made["base"]
    assert base.manifest["examples"] == 100 and base.manifest["job"]["seed"] == 1


def test_arrays_come_in_each_variables_own_shape(made):
    run = made["main"]
    assert run.variables == list(SHAPES.items())
    diagonals = run.diagonals
    for quantity in ("hessian_diagonal", "ggn_diagonal", "fisher_diagonal", "gradient"):
        arrays = run.arrays(quantity)
        assert {name: a.shape for name, a in arrays.items()} == SHAPES
        for name, array in arrays.items():  # C order: entry `index` of the flat variable
            rows = diagonals[diagonals["variable"] == name].sort_values("index")
            np.testing.assert_array_equal(array.reshape(-1), rows[quantity].to_numpy())
    kernel = run.variable("hidden/kernel")
    assert isinstance(kernel, Variable) and kernel.shape == (6, 5) and kernel.size == 30
    assert kernel.hessian_diagonal.shape == (6, 5) and kernel.hvp.shape == (2, 6, 5)
    hvp = run.hvp
    first = hvp[(hvp["vector"] == 1) & (hvp["variable"] == "out/bias")].sort_values("index")["value"].to_numpy()
    np.testing.assert_array_equal(run.arrays("hvp")["out/bias"][1], first)
    # A quantity that was not computed is named, with what there is.
    with pytest.raises(AttributeError, match="hessian_diagonal_stderr was not computed"):
        kernel.hessian_diagonal_stderr
    with pytest.raises(InputError, match="no variable 'nope'.*hidden/kernel"):
        run.variable("nope")


def test_missing_tables_and_non_runs_are_input_errors(made, tmp_path):
    with pytest.raises(InputError, match="not a complete run"):
        pipeline.load(tmp_path)
    # A run of the gradient alone has diagonals and summary, nothing else.
    only = tmp_path / "only"
    os.makedirs(only)
    for name in ("manifest.json", "diagonals.parquet", "summary.parquet"):
        data = open(os.path.join(made["main"].run_dir, name), "rb").read()
        if name == "manifest.json":
            manifest = json.loads(data)
            manifest["files"] = ["diagonals.parquet", "summary.parquet"]
            data = json.dumps(manifest).encode()
        open(only / name, "wb").write(data)
    run = pipeline.load(only)
    assert not run.has("spectrum") and run.has("summary")
    with pytest.raises(InputError, match=r"no spectrum.parquet \(it has: diagonals, summary\)"):
        run.spectrum
    with pytest.raises(InputError, match="no hvp"):
        run.arrays("hvp")


def test_run_takes_a_path_a_mapping_or_a_jobspec(made, tmp_path):
    job = dict(made["job"])
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    for source in (str(path), job, load_job(job)):
        plan = pipeline.run(source, overrides=["data.batch_size=16"], dry_run=True)
        assert isinstance(plan, Plan) and plan.job.data.batch_size == 16 and plan.parameters == 53


def test_importing_and_loading_need_neither_tensorflow_nor_ray(made):
    code = ("import sys, pipeline; run = pipeline.load(sys.argv[1]); run.summary; run.arrays('hvp'); "
            "heavy = [m for m in ('tensorflow', 'ray', 'keras', 'matplotlib') if m in sys.modules]; "
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code, made["main"].run_dir], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
