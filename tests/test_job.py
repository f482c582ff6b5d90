"""The job file: every key resolved, every mistake one InputError line that names the key."""

from __future__ import annotations

import dataclasses
import doctest
import json
import os
import textwrap

import pytest
import yaml

import pipeline.job
import pipeline.quantities.registry
from pipeline.errors import InputError
from pipeline.job import (
    DEFAULTS,
    KEYS,
    DataSpec,
    JobSpec,
    LossSpec,
    ModelSpec,
    job_keys,
    load_job,
    parse_job,
)

FULL_JOB = """\
name: digits-mlp
model: models/mlp.keras
loss: {name: sparse_categorical_crossentropy, from_logits: true}
data:
  path: data/train/
  features: pixels
  labels: label
  weights: w
  batch_size: 128
  limit: 1000
shards: 8
workers: auto
include_regularization: true
precision: float64
seed: 7
quantities:
  hessian_diagonal: {method: hutchinson}
  ggn_diagonal: {method: mc}
  fisher_diagonal: {}
  gradient:
  hvp: {vectors: vectors.parquet}
  trace: {method: hutchinson, probes: 30}
  eigenvalues: {top: 3, tol: 1e-4}
  spectrum: {}
output: out/
"""

MINIMAL = {
    "name": "mini",
    "model": "/models/m.keras",
    "loss": "mse",
    "data": {"path": "/data/train.parquet", "features": "x", "labels": "y"},
    "quantities": {"gradient": {}},
}


def write(tmp_path, text, name="job.yaml"):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def error_of(source, overrides=()) -> str:
    with pytest.raises(InputError) as info:
        load_job(source, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    assert ": " in message, message  # the problem, then the way out
    return message


def with_(key: str, value):
    """MINIMAL with one dotted key set (or removed, for value=...)."""
    raw = json.loads(json.dumps(MINIMAL))
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    if value is ...:
        node.pop(last, None)
    else:
        node[last] = value
    return raw


# ------------------------------------------------------------------------------ valid jobs


def test_full_job_resolves_every_default_and_path(tmp_path):
    job_dir = tmp_path / "jobs"
    spec = load_job(write(job_dir, FULL_JOB))

    assert spec.name == "digits-mlp"
    assert spec.job_path == str(job_dir / "job.yaml")
    assert spec.model == ModelSpec(path=str(job_dir / "models/mlp.keras"), builder=None,
                                   weights=None)
    assert spec.loss == LossSpec(name="sparse_categorical_crossentropy",
                                 options={"from_logits": True}, function=None)
    assert spec.data == DataSpec(path=str(job_dir / "data/train"), features="pixels",
                                 labels="label", weights="w", batch_size=128, limit=1000)
    assert (spec.shards, spec.workers) == (8, "auto")
    assert spec.include_regularization is True
    assert (spec.precision, spec.seed) == ("float64", 7)
    assert spec.output == str(job_dir / "out")
    assert spec.quantities == {
        "hessian_diagonal": {"method": "hutchinson", "probes": 100, "probes_per_pass": "auto", "force": False},
        "ggn_diagonal": {"method": "mc", "samples": 1},
        "fisher_diagonal": {},
        "gradient": {},
        "hvp": {"vectors": str(job_dir / "vectors.parquet")},
        "trace": {"method": "hutchinson", "probes": 30, "blocks": "full"},
        "eigenvalues": {"top": 3, "which": "largest", "iterations": 100, "tol": 1e-4, "vectors": False,
                        "blocks": "full"},
        "spectrum": {"runs": 4, "steps": 64, "blocks": "full"},
    }
    assert list(spec.quantities) == ["hessian_diagonal", "ggn_diagonal", "fisher_diagonal",
                                     "gradient", "hvp", "trace", "eigenvalues", "spectrum"]


def test_minimal_job_takes_the_documented_defaults():
    spec = load_job(MINIMAL)
    assert spec.job_path is None
    assert (spec.shards, spec.workers, spec.precision, spec.seed) == ("auto", "auto",
                                                                     "float32", 0)
    assert spec.include_regularization is False
    assert spec.output == os.path.join(os.getcwd(), "results")
    assert (spec.data.batch_size, spec.data.limit, spec.data.weights) == (256, None, None)
    assert spec.loss == LossSpec(name="mse", options={}, function=None)


def test_every_quantity_default_as_documented():
    # hvp and influence have a required option (the vectors, the query set): given here.
    asked = {q: None for q in pipeline.quantities.registry.REGISTRY if q not in ("hvp", "influence")}
    asked["influence"] = {"queries": {"path": "q.parquet", "features": "x", "labels": "y"}}
    spec = load_job(with_("quantities", asked))
    for quantity, options in spec.quantities.items():
        for option, value in options.items():
            if (quantity, option) != ("influence", "queries"):
                assert DEFAULTS[f"quantities.{quantity}.{option}"] == value
    assert spec.quantities["influence"]["queries"]["features"] == "x"
    assert spec.quantities["trace"] == {"method": "hutch++", "probes": 100, "blocks": "full"}
    assert spec.quantities["eigenvalues"]["tol"] == 1e-6


def test_relative_paths_follow_the_job_file_not_the_current_directory(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    job = write(tmp_path / "jobs", """\
        name: j
        model: {builder: "mypkg.models:build", weights: ../weights/w.weights.h5}
        loss: mse
        data: {path: "data/*.parquet", features: [a, b], labels: [y1, y2]}
        quantities: {hvp: {vectors: v/vectors.parquet}}
        """)
    spec = load_job(os.path.relpath(job))  # a relative job path works too
    jobs = tmp_path / "jobs"
    assert spec.model == ModelSpec(path=None, builder="mypkg.models:build",
                                   weights=str(tmp_path / "weights/w.weights.h5"))
    assert spec.data.path == str(jobs / "data/*.parquet")
    assert spec.data.features == ("a", "b")
    assert spec.data.labels == ("y1", "y2")
    assert spec.quantities["hvp"] == {"vectors": str(jobs / "v/vectors.parquet")}
    assert spec.output == str(jobs / "results")
    assert spec.job_path == str(job)


def test_a_mapping_source_is_relative_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = with_("data.path", "train/")
    spec = load_job(raw)
    assert spec.data.path == str(tmp_path / "train")
    assert raw["data"]["path"] == "train/"  # the caller's mapping is untouched


def test_home_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    spec = load_job(with_("model", "~/m.keras"))
    assert spec.model.path == str(tmp_path / "m.keras")


def test_uris_are_kept_as_written(tmp_path):
    spec = load_job(write(tmp_path, """\
        name: j
        model: gs://bucket/models/m.keras
        loss: my.losses:per_example
        data: {path: s3://bucket/train/, features: {image: pixels, meta: m}, labels: y}
        quantities: {hvp: {vectors: "file:///tmp/v.parquet"}}
        output: s3://bucket/results
        """))
    assert spec.model.path == "gs://bucket/models/m.keras"
    assert spec.loss == LossSpec(name=None, options={}, function="my.losses:per_example")
    assert spec.data.path == "s3://bucket/train/"
    assert spec.data.features == {"image": "pixels", "meta": "m"}
    assert spec.quantities["hvp"] == {"vectors": "file:///tmp/v.parquet"}
    assert spec.output == "s3://bucket/results"


def test_loss_function_in_a_mapping_keeps_its_options():
    spec = load_job(with_("loss", {"name": "my.losses:focal", "gamma": 2.0}))
    assert spec.loss == LossSpec(name=None, options={"gamma": 2.0}, function="my.losses:focal")


def test_hvp_random_and_a_null_partner():
    spec = load_job(with_("quantities", {"hvp": {"vectors": None, "random": 4}}))
    assert spec.quantities["hvp"] == {"random": 4}


def test_yaml_reads_exponents_as_floats_and_dates_as_text(tmp_path):
    spec = load_job(write(tmp_path, """\
        name: 2024-01-01
        model: m.keras
        loss: mse
        data: {path: d, features: x, labels: y}
        quantities: {eigenvalues: {tol: 1e-3}}
        """))
    assert spec.name == "2024-01-01"
    assert spec.quantities["eigenvalues"]["tol"] == 1e-3


def test_integer_tolerance_becomes_a_float():
    spec = load_job(with_("quantities", {"eigenvalues": {"tol": 1}}))
    tol = spec.quantities["eigenvalues"]["tol"]
    assert tol == 1.0 and isinstance(tol, float)


# ------------------------------------------------------------------------------ round trip


def test_to_dict_is_json_and_round_trips_through_yaml(tmp_path):
    spec = load_job(write(tmp_path / "a", FULL_JOB))
    resolved = spec.to_dict()
    assert json.loads(json.dumps(resolved)) == resolved
    assert list(resolved) == [k for k in job_keys() if "." not in k]

    again = load_job(write(tmp_path / "b", yaml.safe_dump(resolved, sort_keys=False)))
    assert again.job_path != spec.job_path
    assert dataclasses.replace(again, job_path=spec.job_path) == spec


@pytest.mark.parametrize("source", [
    with_("model", {"builder": "a.b:c"}),
    with_("data.features", ["a", "b"]),
    with_("loss", "pkg.mod:fn"),
    with_("quantities", {"hvp": {"random": 3}, "eigenvalues": None}),
])
def test_round_trip_of_other_shapes(source, tmp_path):
    spec = load_job(source)
    text = yaml.safe_dump(json.loads(json.dumps(spec.to_dict())))
    assert load_job(write(tmp_path, text)) == dataclasses.replace(
        spec, job_path=str(tmp_path / "job.yaml"))


def test_parse_job_takes_the_folder_explicitly(tmp_path):
    spec = parse_job(with_("data.path", "d"), str(tmp_path), job_path="/x/job.yaml")
    assert spec.data.path == str(tmp_path / "d")
    assert spec.job_path == "/x/job.yaml"
    assert isinstance(spec, JobSpec)


# ------------------------------------------------------------------------------ overrides


def test_overrides_set_nested_keys_and_add_quantities(tmp_path):
    job = write(tmp_path, FULL_JOB)
    spec = load_job(job, [
        "data.batch_size=64",
        "quantities.hessian_diagonal.method=exact",
        "quantities.spectrum.steps=16",
        "quantities.trace.probes=10",
        "workers=3",
        "loss.from_logits=false",
        "data.weights=null",
    ])
    assert spec.data.batch_size == 64
    assert spec.quantities["hessian_diagonal"]["method"] == "exact"
    assert spec.quantities["spectrum"] == {"runs": 4, "steps": 16, "blocks": "full"}
    assert spec.quantities["trace"]["probes"] == 10
    assert spec.workers == 3
    assert spec.loss.options == {"from_logits": False}
    assert spec.data.weights is None


def test_override_adds_a_quantity_and_widens_a_loss_name():
    spec = load_job(MINIMAL, ("quantities.trace={}", "quantities.eigenvalues.top=2",
                              "loss.from_logits=true", "data.features=[a, b]"))
    assert list(spec.quantities) == ["gradient", "trace", "eigenvalues"]
    assert spec.quantities["eigenvalues"]["top"] == 2
    assert spec.loss == LossSpec(name="mse", options={"from_logits": True}, function=None)
    assert spec.data.features == ("a", "b")


def test_override_of_a_path_is_relative_to_the_job_file(tmp_path):
    spec = load_job(write(tmp_path / "jobs", FULL_JOB), ["output=other"])
    assert spec.output == str(tmp_path / "jobs/other")


def test_override_switches_hvp_to_random(tmp_path):
    spec = load_job(write(tmp_path, FULL_JOB),
                    ["quantities.hvp.vectors=null", "quantities.hvp.random=2"])
    assert spec.quantities["hvp"] == {"random": 2}


@pytest.mark.parametrize("override, named", [
    ("data.batch_size", "data.batch_size"),  # no '='
    ("=64", "KEY"),
    ("data..batch_size=64", "KEY"),
    ("data.batch_size=[1, 2", "not valid YAML"),
    ("data.batch_size=0", "data.batch_size"),  # checked like the file
    ("data.batchsize=64", "data.batchsize"),
    ("model.weights=w.h5", "model"),  # model is a path, not a mapping
    ("name.x=1", "name"),
    ("quantities.trace={probes: 1, probes: 2}", "duplicate"),
])
def test_bad_overrides(override, named):
    assert named in error_of(MINIMAL, [override])


def test_override_must_be_a_string():
    assert "KEY=VALUE" in error_of(MINIMAL, [42])


# ------------------------------------------------------------------------------ file errors


def test_missing_job_file(tmp_path):
    message = error_of(tmp_path / "nope.yaml")
    assert "nope.yaml" in message and "not found" in message


def test_job_file_is_a_directory(tmp_path):
    assert "directory" in error_of(tmp_path)


def test_yaml_syntax_error_names_the_line(tmp_path):
    message = error_of(write(tmp_path, "name: j\nmodel: m.keras\ndata: [1, 2\n"))
    assert "line" in message and "YAML" in message


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just text\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    assert "job.yaml" in error_of(write(tmp_path, text))


@pytest.mark.parametrize("text, key, line", [
    ("name: a\nname: b\n", "'name'", 2),
    ("quantities:\n  trace: {}\n  gradient: {}\n  trace: {probes: 3}\n", "'trace'", 4),
    ("data: {path: a, path: b}\n", "'path'", 1),
])
def test_duplicate_keys_at_any_level(tmp_path, text, key, line):
    message = error_of(write(tmp_path, text))
    assert "duplicate" in message and key in message and f"line {line}" in message


def test_source_of_the_wrong_type():
    assert "mapping" in error_of(42)


def test_parse_job_refuses_a_non_mapping():
    with pytest.raises(InputError):
        parse_job(["a"], "/tmp")


# ------------------------------------------------------------------------------ key errors

BAD = [
    # (dotted key to set, value, text the message must contain); ... removes the key
    ("name", ..., "name"),
    ("name", "my job", "name"),
    ("name", "..", "name"),
    ("name", 12, "name"),
    ("model", ..., "model"),
    ("model", "m.h5", "model"),
    ("model", "pkg.mod:build", 'builder: "pkg.mod:build"'),
    ("model", 3, "model"),
    ("model", {"weights": "w.h5"}, "model.builder"),
    ("model", {"builder": "not a callable"}, "model.builder"),
    ("model", {"builder": "a:b", "weights": 5}, "model.weights"),
    ("model", {"builder": "a:b", "path": "x"}, "model.path"),
    ("loss", ..., "loss"),
    ("loss", "mean squared error", "loss"),
    ("loss", "pkg.mod:", "loss"),
    ("loss", ["mse"], "loss"),
    ("loss", {"from_logits": True}, "loss.name"),
    ("loss", {"name": "mse", "reduction": "sum"}, "loss.reduction"),
    ("loss", {"name": "mse", "from-logits": True}, "loss.from-logits"),
    ("loss", {"name": "mse", "x": {1: 2}}, "loss.x"),
    ("data", ..., "data"),
    ("data", "d/", "data"),
    ("data.path", ..., "data.path"),
    ("data.path", "", "data.path"),
    ("data.features", ..., "data.features"),
    ("data.features", "", "data.features"),
    ("data.features", [], "data.features"),
    ("data.features", ["a", 1], "data.features"),
    ("data.features", ["a", "a"], "data.features"),
    ("data.features", {}, "data.features"),
    ("data.features", {"image": 3}, "data.features.image"),
    ("data.labels", ..., "data.labels"),
    ("data.labels", [], "data.labels"),
    ("data.labels", {"a": 3}, "data.labels.a"),
    ("data.weights", 1, "data.weights"),
    ("data.batch_size", 0, "data.batch_size"),
    ("data.batch_size", -3, "data.batch_size"),
    ("data.batch_size", "64", "data.batch_size"),
    ("data.batch_size", 64.0, "data.batch_size"),
    ("data.batch_size", True, "data.batch_size"),
    ("data.limit", 0, "data.limit"),
    ("data.limit", "all", "data.limit"),
    ("data.shuffle", True, "data.shuffle"),
    ("data.format", "csv", "data.format"),
    ("data.schema", {"x": {"dtype": "float32", "shape": [2]}}, "data.schema describes TFRecord features"),
    ("data.transform", "not a reference", "data.transform"),
    ("data.transform", 3, "data.transform"),
    ("shards", 0, "shards"),
    ("shards", "many", "shards"),
    ("workers", -1, "workers"),
    ("workers", 2.5, "workers"),
    ("precision", "float16", "precision"),
    ("seed", -1, "seed"),
    ("seed", "0", "seed"),
    ("seed", 2**40, "seed"),
    ("include_regularization", "yes please", "include_regularization"),
    ("include_regularization", 1, "include_regularization"),
    ("output", None, "output"),
    ("output", 5, "output"),
    ("epochs", 3, "epochs"),
    ("quantities", ..., "quantities"),
    ("quantities", {}, "quantities"),
    ("quantities", ["gradient"], "quantities"),
    ("quantities", {"hessian_full": {}}, "quantities.hessian_full"),
    ("quantities", {"gradient": {"method": "exact"}}, "quantities.gradient"),
    ("quantities", {"fisher_diagonal": {"samples": 2}}, "quantities.fisher_diagonal"),
    ("quantities", {"trace": 10}, "quantities.trace"),
    ("quantities", {"hessian_diagonal": {"method": "bfgs"}}, "quantities.hessian_diagonal.method"),
    ("quantities", {"hessian_diagonal": {"probes": 0}}, "quantities.hessian_diagonal.probes"),
    ("quantities", {"hessian_diagonal": {"force": "yes!"}}, "quantities.hessian_diagonal.force"),
    ("quantities", {"ggn_diagonal": {"method": "exact", "samples": 0}},
     "quantities.ggn_diagonal.samples"),
    ("quantities", {"ggn_diagonal": {"method": "hutchinson"}}, "quantities.ggn_diagonal.method"),
    ("quantities", {"hvp": {}}, "quantities.hvp"),
    ("quantities", {"hvp": None}, "quantities.hvp"),
    ("quantities", {"hvp": {"vectors": "v.parquet", "random": 2}}, "quantities.hvp"),
    ("quantities", {"hvp": {"random": 0}}, "quantities.hvp.random"),
    ("quantities", {"hvp": {"vectors": 3}}, "quantities.hvp.vectors"),
    ("quantities", {"hvp": {"random": 2, "seed": 1}}, "quantities.hvp.seed"),
    ("quantities", {"trace": {"method": "hutch"}}, "quantities.trace.method"),
    ("quantities", {"trace": {"probes": "10"}}, "quantities.trace.probes"),
    ("quantities", {"eigenvalues": {"top": 0}}, "quantities.eigenvalues.top"),
    ("quantities", {"eigenvalues": {"which": "biggest"}}, "quantities.eigenvalues.which"),
    ("quantities", {"eigenvalues": {"iterations": 1.5}}, "quantities.eigenvalues.iterations"),
    ("quantities", {"eigenvalues": {"tol": 0}}, "quantities.eigenvalues.tol"),
    ("quantities", {"eigenvalues": {"tol": "1e-6"}}, "quantities.eigenvalues.tol"),
    ("quantities", {"eigenvalues": {"tol": float("nan")}}, "quantities.eigenvalues.tol"),
    ("quantities", {"spectrum": {"runs": 0}}, "quantities.spectrum.runs"),
    ("quantities", {"spectrum": {"steps": None}}, "quantities.spectrum.steps"),
    ("quantities", {"spectrum": {"nodes": 3}}, "quantities.spectrum.nodes"),
]


@pytest.mark.parametrize("key, value, named", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_each_mistake_is_one_line_naming_the_key(key, value, named):
    assert named in error_of(with_(key, value))


def test_unknown_key_lists_the_allowed_keys_and_a_close_match():
    message = error_of(with_("data.batchsize", 64))
    assert "did you mean data.batch_size?" in message
    assert "path, features, labels, weights, batch_size, limit" in message


def test_errors_from_a_yaml_file_name_the_key(tmp_path):
    message = error_of(write(tmp_path, FULL_JOB.replace("batch_size: 128", "batch_size: 0")))
    assert message.startswith("data.batch_size must be a positive integer, got 0: ")


# ------------------------------------------------------------------------------ documentation


def test_job_keys_cover_the_template_of_the_contract():
    keys = set(job_keys())
    for key in ["name", "model", "model.builder", "model.weights", "loss", "loss.name",
                "data.path", "data.features", "data.labels", "data.weights",
                "data.batch_size", "data.limit", "shards", "workers",
                "include_regularization", "precision", "seed", "output",
                "quantities.hessian_diagonal.method", "quantities.hessian_diagonal.probes",
                "quantities.hessian_diagonal.force", "quantities.ggn_diagonal.samples",
                "quantities.fisher_diagonal", "quantities.gradient",
                "quantities.hvp.vectors", "quantities.hvp.random",
                "quantities.trace.method", "quantities.trace.probes",
                "quantities.eigenvalues.top", "quantities.eigenvalues.which",
                "quantities.eigenvalues.iterations", "quantities.eigenvalues.tol",
                "quantities.spectrum.runs", "quantities.spectrum.steps"]:
        assert key in keys
    assert all(KEYS[k].help for k in keys)


def test_every_key_of_a_full_job_is_a_job_key(tmp_path):
    """to_dict's keys (flattened) are all documented: nothing resolved is undocumented."""
    spec = load_job(write(tmp_path, FULL_JOB))

    def flatten(node, prefix=""):
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            yield dotted
            if isinstance(value, dict) and not dotted.startswith(("data.features", "loss")):
                yield from flatten(value, dotted + ".")

    assert set(flatten(spec.to_dict())) <= set(job_keys())


def test_module_examples_run():
    assert doctest.testmod(pipeline.job).failed == 0


def test_no_tensorflow_or_ray_import():
    import subprocess
    import sys

    code = ("import sys, pipeline.job; "
            "print(sorted(m for m in ('tensorflow', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)), check=True).stdout
    assert out.strip() == "[]"


def test_a_tfrecord_schema_is_checked_and_recorded():
    """``data.format: tfrecord`` needs ``data.schema``: each feature's dtype, shape ([null]: variable
    length) and optional default, as ``tf.io.parse_example`` reads it (contract 5.4)."""
    schema = {"x": {"dtype": "float32", "shape": [2, 3]}, "y": {"dtype": "int64", "default": 0},
              "text": {"dtype": "string", "shape": [None]}}
    spec = load_job(with_("data", {"path": "/d/", "features": "x", "labels": "y", "format": "tfrecord",
                                   "schema": schema, "transform": "pkg.mod:decode"}))
    assert spec.data.schema == {"x": {"dtype": "float32", "shape": [2, 3], "default": None},
                                "y": {"dtype": "int64", "shape": [], "default": 0},
                                "text": {"dtype": "string", "shape": [None], "default": None}}
    assert load_job(spec.to_dict()) == spec and spec.data.transform == "pkg.mod:decode"
    base = {"path": "/d/", "features": "x", "labels": "y", "format": "tfrecord"}
    assert "data.schema is required" in error_of(with_("data", base))
    for entry, named in [({"dtype": "float64"}, "data.schema.x.dtype must be one of float32, int64, string"),
                         ({"shape": [2]}, "data.schema.x.dtype is required"),
                         ({"dtype": "float32", "shape": [None, 3]}, "data.schema.x.shape"),
                         ({"dtype": "float32", "shape": [-1]}, "data.schema.x.shape"),
                         ({"dtype": "float32", "shape": [None], "default": 0}, "data.schema.x.default"),
                         ({"dtype": "float32", "size": 3}, "unknown key data.schema.x.size")]:
        assert named in error_of(with_("data", {**base, "schema": {"x": entry}})), entry


def test_a_tfrecord_default_must_fit_its_feature():
    base = {"path": "/d/", "features": "x", "labels": "y", "format": "tfrecord"}
    for entry in ({"dtype": "int64", "default": 1.5}, {"dtype": "float32", "default": "abc"},
                  {"dtype": "float32", "shape": [8], "default": 0.0}, {"dtype": "int64", "default": [1, 2]}):
        assert "data.schema.x.default" in error_of(with_("data", {**base, "schema": {"x": entry}})), entry
    assert load_job(with_("data", {**base, "schema": {"x": {"dtype": "float32", "shape": [2], "default": [0, 1.5]}}}))
