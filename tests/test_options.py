"""Checks of job-file values: each converts a good value or raises one ``InputError`` line
``KEY must be WHAT, got VALUE: WAY OUT``; unknown keys name the allowed ones."""

from __future__ import annotations

import math
import os

import pytest

from pipeline.errors import InputError
from pipeline.options import (MISSING, Option, auto_or_positive_int, boolean, check_keys, choice, column_name, fail,
                              is_int, optional, positive_float, positive_int, resolved_path, show)


def error_of(check, value, key="data.batch_size") -> str:
    with pytest.raises(InputError) as info:
        check(value, key)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{key} must be "), message
    return message


@pytest.mark.parametrize("value, shown", [
    (None, "null"), (True, "true"), (False, "false"), (3, "3"), (1.5, "1.5"), ("x", "'x'"),
    ([1, 2], "a list [1, 2]"), ((1,), "a list [1]"), ({"a": 1}, "a mapping {'a': 1}"), (object(), "a object"),
])
def test_show_writes_values_as_yaml_would(value, shown):
    assert show(value) == shown


def test_show_cuts_long_values_at_80_characters():
    text = show("y" * 200)
    assert len(text) == 80 and text.endswith("...") and text.startswith("'yyy")


def test_fail_is_one_line_naming_the_key_the_value_and_the_fix():
    with pytest.raises(InputError, match=r"^shards must be a positive integer, got 'x': set it to 8$"):
        fail("shards", "a positive integer", "x", "set it to 8")


def test_is_int_refuses_booleans():
    assert is_int(3) and is_int(0) and not is_int(True) and not is_int(3.0) and not is_int("3")


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "8", None])
def test_positive_int_refuses(value):
    message = error_of(positive_int(128), value)
    assert f"must be a positive integer, got {show(value)}: set it to e.g. 128" in message


def test_positive_int_and_auto_accept_theirs():
    assert positive_int(128)(64, "k") == 64
    check = auto_or_positive_int(4)
    assert check("auto", "workers") == "auto" and check(3, "workers") == 3
    for value in ("Auto", 0, True, 2.0):
        assert "auto or a positive integer" in error_of(check, value, "workers")


def test_positive_float_converts_and_refuses_non_finite():
    check = positive_float(1e-6)
    assert check(2, "tol") == 2.0 and isinstance(check(2, "tol"), float)
    for value in (0, -1.0, math.nan, math.inf, True, "1e-6"):
        assert "must be a positive number" in error_of(check, value, "tol")
    assert error_of(check, 0, "tol").endswith("set it to e.g. 1e-06")


def test_optional_passes_none_and_checks_the_rest():
    check = optional(positive_int(5))
    assert check(None, "k") is None and check(5, "k") == 5
    error_of(check, 0, "k")


def test_choice_boolean_and_column_name():
    check = choice("exact", "hutchinson", example="hutchinson")
    assert check("exact", "m") == "exact"
    assert error_of(check, "Exact", "m") == "m must be one of exact, hutchinson, got 'Exact': set it to e.g. hutchinson"
    assert boolean(False, "b") is False
    assert "must be true or false" in error_of(boolean, "true", "b")
    assert column_name("pixels", "data.features") == "pixels"
    for value in ("", "   ", 3, None):
        assert "a column name" in error_of(column_name, value, "data.features")


def test_resolved_path_makes_local_paths_absolute_against_the_job_folder_and_keeps_uris(tmp_path):
    check = resolved_path(str(tmp_path), "a Parquet file")
    assert check("v.parquet", "k") == os.path.join(str(tmp_path), "v.parquet")
    assert check("/abs/v.parquet", "k") == "/abs/v.parquet"
    assert check("s3://bucket/v.parquet", "k") == "s3://bucket/v.parquet"
    assert "a path or URI of a Parquet file" in error_of(check, " ", "k")


def test_check_keys_passes_known_keys_and_suggests_the_close_one():
    check_keys({"batch_size": 1, "limit": 2}, ("batch_size", "limit", "path"), "data")
    with pytest.raises(InputError) as info:
        check_keys({"batch_sise": 1}, ("batch_size", "limit", "path"), "data")
    assert str(info.value) == ("unknown key data.batch_sise (did you mean data.batch_size?): the keys allowed in "
                               "data are batch_size, limit, path")


def test_check_keys_at_the_top_level_and_without_a_close_match():
    with pytest.raises(InputError) as info:
        check_keys({"qqq": 1}, ("model", "loss"), "")
    assert str(info.value) == "unknown key qqq: the keys allowed at the top level are model, loss"
    with pytest.raises(InputError, match=r"^unknown key modle \(did you mean model\?\)"):
        check_keys({"modle": 1}, ("model", "loss"), "")


def test_option_holds_its_check_default_and_help():
    option = Option(positive_int(5), MISSING, "how many")
    assert option.default is MISSING and option.check(7, "top") == 7 and option.help == "how many"
    with pytest.raises(AttributeError):
        option.default = 3  # frozen: the units share their options
