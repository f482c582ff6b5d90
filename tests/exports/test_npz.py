"""``export --format npz`` without Ray: where it may write (``writable_out``), the file whole or
absent (``write_npz``), and the arrays of a run published by hand (``handmade.py``: a manifest
and a ``diagonals.parquet`` in the contract's layout, read through ``pipeline.load``)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from handmade import publish
from pipeline.errors import InputError
from pipeline.exports import npz


# ------------------------------------------------------------------ writable_out
def test_writable_out_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert npz.writable_out("a.npz", ".npz") == str(tmp_path / "a.npz")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert npz.writable_out("~/b.npz", ".npz") == str(tmp_path / "b.npz")


def refusal(out, suffix=".npz", inputs=()) -> str:
    with pytest.raises(InputError) as info:
        npz.writable_out(str(out), suffix, inputs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_writable_out_refuses_a_folder_a_wrong_suffix_and_a_missing_folder(tmp_path):
    assert refusal(tmp_path).startswith(f"--out {tmp_path} is a folder: give a file name")
    assert refusal(f"{tmp_path}/new/").startswith(f"--out {tmp_path}/new/ is a folder")
    assert refusal(tmp_path / "a.npy") == f"--out {tmp_path / 'a.npy'} must end with .npz (what it holds): e.g. --out " \
                                          f"{tmp_path / 'a.npz'}"
    assert refusal(tmp_path / "w.h5", ".weights.h5").endswith(f"e.g. --out {tmp_path / 'w.weights.h5'}")
    assert refusal(tmp_path / "no" / "a.npz") == f"folder {tmp_path / 'no'} does not exist: create it or choose " \
                                                 "another --out"


def test_writable_out_refuses_an_input_of_the_command(tmp_path):
    model = tmp_path / "a.keras"
    model.write_bytes(b"model")
    os.symlink(model, tmp_path / "link.keras")
    assert "is one of the inputs" in refusal(tmp_path / "link.keras", ".keras", inputs=(str(model),))
    # A missing input, or an input that is another file, is no reason to refuse.
    assert npz.writable_out(str(tmp_path / "m.keras"), ".keras", (str(model), str(tmp_path / "gone"))) == \
        str(tmp_path / "m.keras")


def test_writable_out_refuses_a_place_inside_a_published_run(tmp_path):
    run = publish(tmp_path, {"gradient": np.zeros(8)})
    os.makedirs(os.path.join(run.run_dir, "sub"))
    for out in (os.path.join(run.run_dir, "a.npz"), os.path.join(run.run_dir, "sub", "a.npz")):
        assert refusal(out) == f"{out} is inside the published run {run.run_dir}, which is never written to: " \
                               "choose another --out"


# ------------------------------------------------------------------ write_npz
def test_write_npz_round_trips(tmp_path):
    values = {"gradient/dense/kernel": np.arange(6.0).reshape(3, 2), "examples": np.asarray(40, np.int64)}
    out = str(tmp_path / "a.npz")
    assert npz.write_npz(values, out) == out
    with np.load(out) as loaded:
        assert sorted(loaded.files) == sorted(values)
        np.testing.assert_array_equal(loaded["gradient/dense/kernel"], values["gradient/dense/kernel"])
        assert loaded["examples"].dtype == np.int64 and loaded["examples"] == 40


def test_write_npz_that_fails_leaves_the_old_file_and_nothing_else(tmp_path):
    out = tmp_path / "a.npz"
    npz.write_npz({"x": np.ones(3)}, str(out))
    before = out.read_bytes()
    unpicklable = np.array([lambda: 0], dtype=object)  # np.savez fails on it after writing "x"
    with pytest.raises(Exception):
        npz.write_npz({"x": np.zeros(3), "y": unpicklable}, str(out))
    assert out.read_bytes() == before and os.listdir(tmp_path) == ["a.npz"]


# ------------------------------------------------------------------ the arrays of a run
def test_arrays_are_shaped_like_the_variables_with_the_counts(tmp_path):
    flat = np.arange(8.0)
    run = publish(tmp_path, {"fisher_diagonal": flat, "gradient": -flat}, {"weight_sum": 12.5})
    assert npz.per_variable(run) == ["fisher_diagonal", "gradient"]
    values = npz.arrays(run)
    assert sorted(values) == ["examples", "fisher_diagonal/dense/bias", "fisher_diagonal/dense/kernel",
                              "gradient/dense/bias", "gradient/dense/kernel", "weight_sum"]
    np.testing.assert_array_equal(values["fisher_diagonal/dense/kernel"], flat[:6].reshape(3, 2))
    np.testing.assert_array_equal(values["gradient/dense/bias"], -flat[6:])
    assert values["examples"] == 40 and values["examples"].dtype == np.int64
    assert values["weight_sum"] == 12.5 and values["weight_sum"].dtype == np.float64
    assert sorted(npz.arrays(run, ["gradient"])) == ["examples", "gradient/dense/bias", "gradient/dense/kernel",
                                                      "weight_sum"]
    assert npz.default_out(run) == os.path.abspath("toy-r1.npz")
    assert npz.default_out(run, ".weights.h5") == os.path.abspath("toy-r1.weights.h5")


def test_weight_sum_of_a_run_published_before_it_was_kept_is_the_example_count(tmp_path):
    assert npz.weight_sum(publish(tmp_path, {"gradient": np.zeros(8)})) == 40.0


def test_a_missing_quantity_is_named_with_what_the_run_has(tmp_path):
    run = publish(tmp_path, {"gradient": np.zeros(8)})
    with pytest.raises(InputError, match=r"^run r1 has no fisher_diagonal \(it has: gradient\): add e.g. "
                                         r"fisher_diagonal to the job"):
        npz.arrays(run, ["fisher_diagonal"])
    with pytest.raises(InputError, match=r"^run r1 has no per-parameter quantity \(it has: gradient\)"):
        npz.arrays(run, [])


def test_laplace_takes_the_ggn_first_then_the_fisher_and_refuses_others(tmp_path):
    run = publish(tmp_path, {"hessian_diagonal": np.ones(8), "fisher_diagonal": np.ones(8), "gradient": np.ones(8)})
    assert npz.laplace_quantity(run, None) == "fisher_diagonal"
    assert npz.laplace_quantity(run, "hessian_diagonal") == "hessian_diagonal"
    with pytest.raises(InputError, match=r"^--quantity must be one of ggn_diagonal, fisher_diagonal, "
                                         r"hessian_diagonal, got 'gradient'"):
        npz.laplace_quantity(run, "gradient")
    with pytest.raises(InputError, match=r"^run r1 has no ggn_diagonal \(it has: hessian_diagonal, fisher_diagonal, "
                                         r"gradient\)"):
        npz.laplace_quantity(run, "ggn_diagonal")


def test_laplace_without_any_curvature_diagonal_is_refused(tmp_path):
    run = publish(tmp_path, {"gradient": np.ones(8)})
    with pytest.raises(InputError, match="has no curvature diagonal for a Laplace approximation"):
        npz.laplace_quantity(run, None)
