"""Bad input: one clear line, exit status 2, nothing published, nothing existing touched.

A representative few go through the command line for real (subprocess); the rest through
the library (``load_job``, ``make_plan``, ``run``), which raises the same ``InputError`` that
the command line prints as ``error: ...`` with exit status 2. Run with ``-s`` to see every
message (docs/failures.md lists them).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import jobs
import paths
from pipeline.errors import InputError
from pipeline.job import load_job
from pipeline.quantities.hessian_diagonal import EXACT_DIAGONAL_LIMIT
from pipeline.driver import run
from pipeline.plan import make_plan

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
ENV.pop("HESSIAN_PIPELINE_FAULT", None)
CLUSTER = {"CPU": 2}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    jobs.write_data(root / "data", rows=60, files=2)
    jobs.write_model(str(root / "model.keras"))
    return root


def expect(call, needle):
    """``call()`` raises an InputError (exit status 2) whose one line contains ``needle``."""
    with pytest.raises(InputError) as raised:
        call()
    message = str(raised.value)
    print(f"\nerror: {message}")
    assert raised.value.exit_status == 2
    assert "\n" not in message.strip() and "Traceback" not in message
    assert needle in message, message
    return message


def plan(root, overrides=(), **extra):
    return make_plan(load_job(jobs.job(root, {"gradient": {}}, **extra), list(overrides)), cluster=CLUSTER)


def cli(*args, cwd=None):
    done = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=600)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    print("\n" + "\n".join(errors))
    assert done.returncode == 2, done.stderr
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    # Default mode: no TensorFlow/CUDA start-up lines, no Ray warnings. Only `run` may print its
    # own plan and progress before the error; every other command prints the error alone.
    lines = done.stderr.strip().splitlines()
    noise = [line for line in lines if re.match(r"^[EWI]\d{4} |WARNING|.*\(raylet\)|.*absl|.*cuda", line)]
    assert not noise, done.stderr
    if args[0] != "run":
        assert lines == errors, done.stderr
    return errors[0]


def _nothing_under(path):
    """No published run (no run=... folder) and no staged partials under ``path``."""
    found = [d for d, _, _ in os.walk(path) if os.path.basename(d).startswith(("run=", ".partials"))]
    return not found


# ------------------------------------------------------------------------- the job file
def test_missing_job_file_cli(tmp_path):
    assert "not found" in cli("run", str(tmp_path / "missing.yaml"))


def test_yaml_syntax_error_cli(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: x\ndata: {path: data/, features: [a, b\nloss: mse\n")
    assert "YAML syntax error" in cli("validate", str(path))


def test_unreadable_job_file(tmp_path):
    expect(lambda: load_job(str(tmp_path)), "is a directory")
    binary = tmp_path / "job.yaml"
    binary.write_bytes(b"name: \xff\xfe\x00bad\n")
    expect(lambda: load_job(str(binary)), "is not UTF-8 text")


def test_unknown_key(root):
    expect(lambda: load_job(jobs.job(root, {"gradient": {}}, shard=3)), "unknown key shard (did you mean shards?)")
    expect(lambda: load_job(jobs.job(root, {"gradient": {}}, data={"batchsize": 3})), "unknown key data.batchsize")


@pytest.mark.parametrize("override,needle", [
    ("data.batch_size=0", "data.batch_size must be a positive integer, got 0"),
    ("data.batch_size=ten", "data.batch_size must be a positive integer, got 'ten'"),
    ("quantities.hessian_diagonal={method: hutchinson, probes: -1}",
     "quantities.hessian_diagonal.probes must be a positive integer, got -1"),
    ("seed=-1", "seed must be an integer from 0 to 2147483647"),
    ("quantities.trace={method: hutch++, probes: 2, blocks: variable}",
     "quantities.trace.probes: hutch++ needs at least 3 products"),
])
def test_wrong_type_or_range(root, override, needle):
    expect(lambda: load_job(jobs.job(root, {"gradient": {}}), [override]), needle)


# ------------------------------------------------------------------------- the model and the loss
def test_missing_model_file(root, tmp_path):
    expect(lambda: plan(root, model=str(tmp_path / "nope.keras")), "not found")


def test_variables_that_match_nothing_or_are_not_patterns(root):
    expect(lambda: plan(root, variables=["out/*", "dense_9/*"]),
           "pattern 'dense_9/*' matches no trainable variable (the model's are: hidden/kernel, hidden/bias, "
           "out/kernel, out/bias)")
    expect(lambda: plan(root, variables=[]), "variables must be all or a non-empty list of glob patterns")
    expect(lambda: plan(root, variables={"out": 1}), "variables must be all or a non-empty list of glob patterns")


def test_variables_with_one_path_are_refused_not_merged(root, tmp_path):
    """Two nested models each with a layer ``dense``: after loading, two variables are called
    ``dense/kernel``. Every table and block is keyed by the path, so they would be merged."""
    import keras

    first = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="tanh", name="dense")], name="m1")
    second = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, name="dense")], name="m2")
    inputs = keras.Input((6,))
    keras.Model(inputs, second(first(inputs))).save(tmp_path / "nested.keras")
    expect(lambda: plan(root, model=str(tmp_path / "nested.keras")),
           "several trainable variables with the path 'dense/bias' (and 1 more repeated paths): results are keyed "
           "by variable path")


def test_file_that_is_not_a_model(root, tmp_path):
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"this is not a zip file")
    expect(lambda: plan(root, model=str(junk)), "is not a Keras 3 model file")


def test_model_that_needs_safe_mode_off(root, tmp_path, monkeypatch):
    """A .keras file holding code (a Lambda) is refused with safe_mode on, and its code never runs
    (a job file may come from elsewhere; README: a job file is code only through builders)."""
    import keras

    witness = tmp_path / "the-lambda-ran"

    def doubled(x):
        if os.environ.get("ARMED"):
            witness.write_text("ran")
        return x * 2.0

    model = keras.Sequential([keras.Input((6,)), keras.layers.Lambda(lambda x: doubled(x)), keras.layers.Dense(3)])
    path = str(tmp_path / "lambda.keras")
    model.save(path)
    monkeypatch.setenv("ARMED", "1")
    expect(lambda: plan(root, model=path), "needs safe_mode off")
    assert not witness.exists()


def test_keras_file_with_an_unregistered_custom_class_names_it(root, tmp_path):
    import keras

    @keras.saving.register_keras_serializable(package="zoo")
    class Doubler(keras.layers.Layer):
        def call(self, x):
            return 2.0 * x

    model = keras.Sequential([keras.Input((6,)), Doubler(name="doubler"), keras.layers.Dense(3)])
    path = str(tmp_path / "custom.keras")
    model.save(path)
    keras.saving.get_custom_objects().pop("zoo>Doubler")  # as in a process that never imported it
    message = expect(lambda: plan(root, model=path), "uses the custom class")
    assert "Doubler" in message and "builder" in message


def test_model_builder_that_exits(root, monkeypatch):
    monkeypatch.syspath_prepend(paths.TESTS)
    expect(lambda: plan(root, model={"builder": "kinds:exits"}), "model builder 'kinds:exits' failed: SystemExit")


def _builder_job(root, tmp_path, model):
    spec = jobs.job(root, {"gradient": {}}, model=model, workers=1, output=str(tmp_path / "out"))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    return str(tmp_path / "job.yaml")


def test_model_builder_that_aborts_cli(root, tmp_path):
    """os.abort() in the builder killed validate and run (exit 134, no error line): the builder is
    first called in a child process, whose death is an input error naming the builder."""
    job_file = _builder_job(root, tmp_path, {"builder": "kinds:aborts"})
    for command in ("validate", "run"):
        message = cli(command, job_file, cwd=paths.TESTS)
        assert message.startswith("error: model builder 'kinds:aborts' ended the process that called it (signal "
                                  "SIGABRT"), message
    assert not (tmp_path / "out").exists()  # the run made no folder it left behind


def test_builder_weights_that_do_not_fit_print_only_the_error_cli(root, tmp_path):
    """Keras' UserWarnings while a builder model loads weights of another architecture came
    before the error line: in default mode only the error line reaches stderr."""
    import keras

    other = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, name="hidden"), keras.layers.Dense(3, name="out")])
    other.save_weights(str(tmp_path / "other.weights.h5"))
    job_file = _builder_job(root, tmp_path, {"builder": "kinds:warns_then_builds",
                                              "weights": str(tmp_path / "other.weights.h5")})
    for command in ("validate", "run"):
        message = cli(command, job_file, cwd=paths.TESTS)
        assert "does not fit the built model" in message


# Wrong labels for the loss are found by running the loss on the first rows (validate).
def test_one_hot_labels_given_to_a_sparse_loss(root, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 6))
    (tmp_path / "d").mkdir()
    pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 6),
                             "y": pa.FixedSizeListArray.from_arrays(pa.array(np.eye(3)[rng.integers(0, 3, 12)].ravel()), 3)}),
                   str(tmp_path / "d" / "p.parquet"))
    expect(lambda: plan(root, data={"path": str(tmp_path / "d"), "features": "x", "labels": "y"}),
           "fails on output")


def test_class_ids_given_to_categorical_crossentropy(root):
    expect(lambda: plan(root, loss={"name": "categorical_crossentropy", "from_logits": True}),
           "the loss categorical_crossentropy fails on output")


def test_loss_function_with_the_wrong_signature(root, monkeypatch):
    monkeypatch.syspath_prepend(paths.TESTS)
    expect(lambda: plan(root, loss="kinds:three_arguments"), "fails on output")


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    levels = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcdef", "bcdefg"):
        levels.append(f"{name}: &{name} [{','.join(['*' + prev] * 9)}]")
    text = "\n".join(levels) + "\nname: x\nmodel: m.keras\nloss: {name: mse, opt: *g}\n" \
        "data: {path: d, features: x, labels: y}\nquantities: {gradient: {}}\n"
    assert len(text) < 500
    (tmp_path / "bomb.yaml").write_text(text)
    assert "aliases expand to 11,434,312 values" in cli("validate", str(tmp_path / "bomb.yaml"))


@pytest.mark.parametrize("shape", ["long-alias-chain", "deep-nesting"])
def test_yaml_that_would_exhaust_the_stack_is_refused_cli(tmp_path, shape):
    """20,000 aliases each doubling the last (a count with 6,000 digits, which Python refuses to
    print, found by a recursive walk) and 1,000 nested brackets (PyYAML's reader recurses): one
    error line each, for validate and run alike."""
    if shape == "long-alias-chain":
        lines = ["l0: &l0 [x, x]"] + [f"l{i}: &l{i} [*l{i - 1}, *l{i - 1}]" for i in range(1, 20000)]
        text, needle = "\n".join(lines) + "\nname: x\n", "aliases expand to more than 1,000,000,000,000,000,000 values"
    else:
        text, needle = "name: x\nloss: {name: mse, opt: " + "[" * 1000 + "]" * 1000 + "}\n", "nested hundreds of levels deep"
    (tmp_path / "bomb.yaml").write_text(text)
    for command in ("validate", "run"):
        assert needle in cli(command, str(tmp_path / "bomb.yaml"))


def test_model_that_does_not_fit_the_labels_cli(root, tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(jobs.job(root, {"gradient": {}}, loss="categorical_crossentropy")))
    assert "the loss categorical_crossentropy fails on output" in cli("validate", str(path))


def test_unknown_loss(root):
    expect(lambda: plan(root, loss="not_a_loss"), "unknown loss 'not_a_loss'")


def test_piecewise_linear_loss_is_warned_about(root):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Class ids against a 3-wide output do not fit mae either (Keras would fail in fit):
        # the trial run on the first rows says so, after the warning.
        expect(lambda: plan(root, loss="mae"), "the loss mae fails on output")
    said = [str(w.message) for w in caught if "piecewise linear" in str(w.message)]
    print(f"\nwarning: {said[0]}")
    assert said and "second derivative is zero" in said[0]


# ------------------------------------------------------------------------- the data
def test_data_path_without_parquet_files(root, tmp_path):
    (tmp_path / "empty").mkdir()
    expect(lambda: plan(root, data={"path": str(tmp_path / "empty")}), "no Parquet files under")
    expect(lambda: plan(root, data={"path": str(tmp_path / "absent")}), "does not exist")


def test_missing_column(root):
    expect(lambda: plan(root, ["data.features=pixels"]), "column 'pixels' not in data (columns: x, label, weight)")


def test_feature_width_does_not_fit_the_model(root, tmp_path):
    jobs.write_data(tmp_path / "narrow", rows=20, files=1, width=5)
    expect(lambda: plan(root, data={"path": str(tmp_path / "narrow")}),
           "column 'x' holds 5 values per row but model input")


def test_empty_dataset(root, tmp_path):
    (tmp_path / "none").mkdir()
    table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array([], pa.float64()), 6),
                      "label": pa.array([], pa.int64())})
    pq.write_table(table, str(tmp_path / "none" / "part-0.parquet"))
    expect(lambda: plan(root, data={"path": str(tmp_path / "none")}), "is empty")


def test_labels_out_of_range_cli(root, tmp_path):
    """Found by the worker while reading; exit 2 from ``run``, nothing published or staged."""
    x, labels, _ = jobs.write_data(tmp_path / "data", rows=60, files=1)
    labels = labels.copy()
    labels[41] = 7
    table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 6), "label": pa.array(labels)})
    pq.write_table(table, str(tmp_path / "data" / "part-000.parquet"))
    spec = jobs.job(root, {"gradient": {}}, shards=2, workers=1, output=str(tmp_path / "out" / "deep"))
    spec["data"]["path"] = str(tmp_path / "data")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    line = cli("run", str(tmp_path / "job.yaml"), "--run-id", "labels")
    assert "column 'label' has label 7 at row 41 (shard 1), outside the valid range 0-2" in line
    # Not even an empty date= folder, nor the output root the run created (out/deep).
    assert not (tmp_path / "out").exists(), list((tmp_path / "out").rglob("*"))


def test_input_error_before_start_leaves_no_folder(root, tmp_path):
    """The model and the loss refuse the first rows: ``run`` exits 2 and the output root holds
    nothing it made (an existing folder beside it is untouched)."""
    (tmp_path / "out" / "other").mkdir(parents=True)
    spec = load_job(jobs.job(root, {"gradient": {}}, loss="categorical_crossentropy", output=str(tmp_path / "out")))
    expect(lambda: run(spec, run_id="early"), "the loss categorical_crossentropy fails on output")
    assert sorted(os.listdir(tmp_path / "out")) == ["other"]


# ------------------------------------------------------------------------- HVP vectors
@pytest.mark.parametrize("damage,needle", [
    ("missing", "vector 0, variable 'hidden/kernel', index 0 is missing"),
    ("extra", "more than once"),
    ("unknown", "names unknown variable 'hidden/bogus'"),
])
def test_hvp_vectors_file(root, tmp_path, damage, needle):
    from pipeline.storage.tables import vectors_table

    signature = plan(root).signature
    table = vectors_table(signature.variables, signature.variable_shapes,
                          np.ones((2, signature.parameters))).to_pydict()
    if damage == "missing":
        table = {k: v[1:] for k, v in table.items()}
    elif damage == "extra":
        table = {k: v + v[:1] for k, v in table.items()}
    else:
        table["variable"][3] = "hidden/bogus"
    path = str(tmp_path / "vectors.parquet")
    pq.write_table(pa.table(table), path)
    expect(lambda: make_plan(load_job(jobs.job(root, {"hvp": {"vectors": path}})), cluster=CLUSTER), needle)


# ------------------------------------------------------------------------- the output and the run id
def test_output_that_cannot_be_written_cli(root, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    spec = jobs.job(root, {"gradient": {}}, output=str(blocker / "results"))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert "cannot write to output" in cli("run", str(tmp_path / "job.yaml"))
    assert blocker.read_text() == "not a folder"


def test_run_id_that_is_not_a_plain_name(root, tmp_path):
    spec = load_job(jobs.job(root, {"gradient": {}}, output=str(tmp_path / "out")))
    expect(lambda: run(spec, run_id="../x"), "run id '../x' is not a plain name")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["run-id", "job-name"])
def test_names_ending_in_a_newline_are_refused_cli(root, tmp_path, where):
    """`$` matches before a final newline: "x\\n" passed the name check and became a folder."""
    spec = jobs.job(root, {"gradient": {}}, output=str(tmp_path / "out"))
    if where == "job-name":
        spec["name"] = "x\n"
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
        assert "name must be a string of letters" in cli("validate", str(tmp_path / "job.yaml"))
        assert "name must be a string of letters" in cli("run", str(tmp_path / "job.yaml"), "--run-id", "r")
    else:
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
        assert "run id 'x\\n' is not a plain name" in cli("run", str(tmp_path / "job.yaml"), "--run-id", "x\n")
    assert not (tmp_path / "out").exists()


def test_a_run_id_too_long_for_a_folder_is_refused_for_its_length_cli(root, tmp_path):
    spec = jobs.job(root, {"gradient": {}}, output=str(tmp_path / "out"))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    message = cli("run", str(tmp_path / "job.yaml"), "--run-id", "a" * 300)
    assert "run id is 300 characters long, more than the 200 allowed" in message and "credentials" not in message
    spec["name"] = "n" * 300
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert "name is 300 characters long, more than the 200 allowed" in cli("validate", str(tmp_path / "job.yaml"))
    assert not (tmp_path / "out").exists()


def test_run_id_already_published_cli(root, tmp_path):
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    existing = tmp_path / "out" / "test-job" / f"date={date}" / "run=done"
    existing.mkdir(parents=True)
    (existing / "manifest.json").write_text(json.dumps({"status": "complete"}))
    before = os.stat(existing / "manifest.json").st_mtime_ns
    spec = jobs.job(root, {"gradient": {}}, output=str(tmp_path / "out"))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert "run done already published" in cli("run", str(tmp_path / "job.yaml"), "--run-id", "done")
    assert os.listdir(existing) == ["manifest.json"]
    assert os.stat(existing / "manifest.json").st_mtime_ns == before


@pytest.mark.parametrize("damage,needle", [
    ("garbage", "manifest.json is not valid JSON ('utf-8' codec can't decode byte 0xff"),
    ("alone", "manifest.json lacks run_id, date, job, examples, loss, files: the run is damaged"),
    ("the-file", "manifest.json is a file, not a run directory: give the run's folder"),
])
def test_a_bare_or_damaged_manifest_is_one_error_line_cli(tmp_path, damage, needle):
    """A run folder whose manifest.json is binary garbage (was a UnicodeDecodeError traceback),
    a manifest.json alone that says "complete" and nothing else (was shown as an empty run, exit
    0), and the manifest file given in place of its folder."""
    run_dir = tmp_path / "job" / "date=2026-01-02" / "run=r"
    run_dir.mkdir(parents=True)
    if damage == "garbage":
        (run_dir / "manifest.json").write_bytes(b"\x00\xff\xfe garbage {")
    else:
        (run_dir / "manifest.json").write_text(json.dumps({"status": "complete"}))
    given = str(run_dir / "manifest.json") if damage == "the-file" else str(run_dir)
    for command in (["show", given], ["report", given, "--out", str(tmp_path / "report")], ["compare", given, given]):
        assert needle in cli(*command)
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("where", ["inside-data", "data-is-the-job-folder", "inside-a-published-run"])
def test_output_that_overlaps_the_data_or_a_published_run_cli(root, tmp_path, where):
    """--output inside data.path (the next run would read the results as data), data.path that
    is OUTPUT/NAME itself, and --output inside a published run: refused before anything is
    written, naming both paths."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    published_run = tmp_path / "runs" / "test-job" / "date=2026-01-02" / "run=done"
    published_run.mkdir(parents=True)
    (published_run / "manifest.json").write_text(json.dumps({"status": "complete"}))
    spec = jobs.job(root, {"gradient": {}}, output=str(tmp_path / "unused"))
    if where == "data-is-the-job-folder":
        (data / "test-job").mkdir()
        shutil.move(str(data / "part-000.parquet"), str(data / "test-job" / "part-000.parquet"))
        spec["data"]["path"], output = str(data / "test-job"), data
    else:
        spec["data"]["path"] = str(data)
        output = data / "results" if where == "inside-data" else published_run / "more"
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    message = cli("run", str(tmp_path / "job.yaml"), "--output", str(output), "--run-id", "r")
    if where == "inside-a-published-run":
        assert f"output {output} is inside the published run {published_run}, which is never written to" in message
    else:
        assert f"output {output} puts the runs ({output}/test-job/...) inside data.path {spec['data']['path']}" in message
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_report_into_a_published_run_is_refused_cli(tmp_path):
    from plots import synthetic_run

    run_dir = synthetic_run(tmp_path, np.array([1.0, 2.0]))
    before = sorted(os.listdir(run_dir))
    for out in (run_dir, os.path.join(run_dir, "plots")):
        message = cli("report", run_dir, "--out", out)
        assert f"report folder {out} is inside the published run {run_dir}, which is never written to: choose " \
               "another --out" in message
    assert "is inside the published run" in cli("report", ".", cwd=run_dir)  # the default ./report-NAME-ID
    assert sorted(os.listdir(run_dir)) == before


def test_exact_diagonal_that_would_take_days(tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(2000, activation="tanh"), keras.layers.Dense(3)])
    model.save(str(tmp_path / "model.keras"))
    jobs.write_data(tmp_path / "data", rows=3000, files=1)
    spec = jobs.job(tmp_path, {"hessian_diagonal": {"method": "exact"}}, data={"batch_size": 1})
    assert 20003 * 3000 > EXACT_DIAGONAL_LIMIT
    message = expect(lambda: make_plan(load_job(spec), cluster=CLUSTER), "60,009,000 Hessian-vector products")
    assert "hutchinson" in message and "force=true" in message
    forced = make_plan(load_job(spec, ["quantities.hessian_diagonal.force=true"]), cluster=CLUSTER)
    assert any("60,009,000" in note for note in forced.notes)


def test_vectors_too_large_for_memory_are_refused_before_they_are_built(root):
    """hvp: {random: 20,000,000} on 53 parameters would be 7.9 GiB per copy: refused by the plan's
    cost estimate, before anything that size is allocated (the test process would be killed)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    message = expect(lambda: plan(root, ["quantities={hvp: {random: 20000000}}"]), "quantities.hvp: ")
    assert "GiB" in message and "fewer probes, vectors or iterations" in message and "limits.force=true" in message
    # Hutchinson probes go in passes of what fits (probes_per_pass: auto); all in one pass do not.
    expect(lambda: plan(root, ["quantities={hessian_diagonal: {method: hutchinson, probes: 10000000, "
                               "probes_per_pass: 10000000}}"]), "quantities.hessian_diagonal: ")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1 << 20  # KiB: under 1 GiB more


def test_damaged_parquet_data_page_names_the_file(root, tmp_path):
    """A footer that reads but a data page that does not: found by the worker that reads it,
    an input error naming the file (never retried as a compute failure)."""
    import io

    x, labels, _ = jobs.write_data(tmp_path / "data", rows=400, files=1, row_group=100)
    path = tmp_path / "data" / "part-000.parquet"
    page = pq.ParquetFile(str(path)).metadata.row_group(2).column(0).data_page_offset  # rows 200-299
    raw = bytearray(path.read_bytes())
    for i in range(page, page + 40):  # the page header: the footer still reads
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))
    spec = load_job(jobs.job(root, {"gradient": {}}, shards=2, workers=1, output=str(tmp_path / "out")))
    spec = load_job({**spec.to_dict(), "data": {**spec.to_dict()["data"], "path": str(tmp_path / "data")}})
    log = io.StringIO()
    message = expect(lambda: run(spec, run_id="damaged", stream=log), "part-000.parquet")
    assert "the file is damaged" in message
    assert "trying again" not in log.getvalue()


@pytest.mark.parametrize("damage", ["page-header", "page-values", "page-checksum"])
def test_corrupt_parquet_data_page_names_the_file_cli(root, tmp_path, damage):
    """Through the command line: a page header that no longer parses, and page bytes that still
    decode but to a NaN (no page checksum, no statistics: the footer still matches). Either way
    one error line that names the damaged file (the second of two), exit 2, nothing left."""
    data = tmp_path / "data"
    x, _ = jobs.write_bare_data(data, rows=200, cut=100, row_group=25, seed=5, checksum=damage == "page-checksum")
    path = data / "part-001.parquet"
    raw = bytearray(path.read_bytes())
    if damage == "page-header":
        page = pq.ParquetFile(str(path)).metadata.row_group(2).column(0).data_page_offset  # its rows 50-74
        for i in range(page, page + 40):
            raw[i] ^= 0x5A
        needle = f"cannot read rows 0-99 of {path}: Couldn't deserialize thrift"
    elif damage == "page-values":
        at = bytes(raw).index(x[160, 4].tobytes())  # row 60 of that file
        raw[at:at + 8] = np.float64(np.nan).tobytes()
        needle = f"column 'x' has a NaN or infinite value at row 160 (shard 1); in {path}, its row 60"
    else:  # a finite value changed, caught only by the page's CRC
        at = bytes(raw).index(x[160, 4].tobytes())
        raw[at:at + 8] = np.float64(7.0).tobytes()
        needle = f"of {path}: could not verify page integrity, CRC checksum verification failed"
    path.write_bytes(bytes(raw))
    spec = jobs.job(root, {"gradient": {}}, shards=2, workers=1, output=str(tmp_path / "out"))
    spec["data"]["path"] = str(data)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert needle in cli("run", str(tmp_path / "job.yaml"), "--run-id", "damaged")
    assert not (tmp_path / "out").exists()


def test_all_zero_weights_column(root, tmp_path):
    """Every weight 0: the weighted mean is undefined. One line, exit 2, nothing left (it can
    only be known after the last row)."""
    x, labels, _ = jobs.write_data(tmp_path / "data", rows=50, files=1)
    table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 6), "label": pa.array(labels),
                      "weight": pa.array(np.zeros(50))})
    pq.write_table(table, str(tmp_path / "data" / "part-000.parquet"))
    raw = jobs.job(root, {"gradient": {}}, workers=1, output=str(tmp_path / "out"))
    raw["data"].update(path=str(tmp_path / "data"), weights="weight")
    expect(lambda: run(load_job(raw), run_id="zero"), "column 'weight' sums to 0 over all 50 rows")
    assert _nothing_under(tmp_path / "out")


def test_symbolic_link_in_place_of_the_run_folder(root, tmp_path):
    """OUTPUT/NAME/date=.../run=ID is a link to someone's folder: refused before computing, and
    nothing behind the link is deleted."""
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    folder = tmp_path / "out" / "test-job" / f"date={date}"
    folder.mkdir(parents=True)
    os.symlink(elsewhere, folder / "run=linked")
    spec = load_job(jobs.job(root, {"gradient": {}}, output=str(tmp_path / "out")))
    expect(lambda: run(spec, run_id="linked"), "is a symbolic link, not a run folder")
    assert (elsewhere / "keep.txt").read_text() == "mine"
