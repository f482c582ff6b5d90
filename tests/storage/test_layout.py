"""The run layout: ``OUTPUT/NAME/date=D/run=ID`` for a published run, ``OUTPUT/NAME/.partials/run=ID``
for its staged shards, taken apart again only here; job names and run ids as plain folder names."""

from __future__ import annotations

import os

import pytest

from pipeline.errors import InputError
from pipeline.storage import layout
from pipeline.storage.layout import (MAX_NAME_LENGTH, RUN_DIR_LINE, date_of, output_root_of, partials_dir,
                                     plain_name, run_dir, run_id_of)

DAY = "2026-12-07"


@pytest.mark.parametrize("root", ["/out", "/out/", "/out//"])
def test_run_dir_and_partials_dir_ignore_a_trailing_slash(root):
    assert run_dir(root, "digits", DAY, "r1") == f"/out/digits/{layout.DATE_PART}{DAY}/{layout.RUN_PART}r1"
    assert partials_dir(root, "digits", "r1") == f"/out/digits/.partials/{layout.RUN_PART}r1"


def test_run_dir_of_a_uri_and_of_the_root_folder():
    assert run_dir("s3://bucket/results/", "n", DAY, "x") == f"s3://bucket/results/n/date={DAY}/run=x"
    assert run_dir("/", "n", DAY, "x") == f"/n/date={DAY}/run=x"


def test_date_of_and_run_id_of_take_the_layout_apart():
    path = run_dir("/out", "digits", DAY, "2026-12-07T22-50-00Z")
    assert run_id_of(path) == "2026-12-07T22-50-00Z" and run_id_of(path + "/") == "2026-12-07T22-50-00Z"
    assert date_of(os.path.dirname(path)) == DAY and date_of(f"date={DAY}") == DAY
    # Any other folder is none of them.
    assert date_of(path) is None and run_id_of(os.path.dirname(path)) is None
    assert run_id_of(partials_dir("/out", "digits", "r7")) == "r7"
    assert date_of("/out/digits") is None and run_id_of("/out/digits/.partials") is None


def test_run_dir_line_reads_back_the_line_the_driver_prints_last():
    path = run_dir("/tmp/out", "digits", DAY, "r-1.2_3")
    found = RUN_DIR_LINE.match(f"  {path}  \n")
    assert found is not None and found.group(1) == path
    assert RUN_DIR_LINE.match(run_dir("s3://b/o", "n", DAY, "r")).group(1) == f"s3://b/o/n/date={DAY}/run=r"
    for line in (f"wrote {path} and more", "/out/n/date=2026-1-7/run=r", f"/out/n/date={DAY}/run=a b",
                 partials_dir("/out", "n", "r"), f"/out/n/date={DAY}/run="):
        assert RUN_DIR_LINE.match(line) is None, line


def test_output_root_of_keeps_uris_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert output_root_of("results") == str(tmp_path / "results")
    assert output_root_of(str(tmp_path / "results") + "/") == str(tmp_path / "results")
    assert output_root_of("s3://bucket/results/") == "s3://bucket/results"
    assert output_root_of("s3://") == "s3://"


@pytest.mark.parametrize("name", ["digits", "a.b_c-1", "x" * MAX_NAME_LENGTH, "..a"])
def test_plain_names_pass(name):
    assert plain_name(name, "job name", "name:") is None


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../up", "a b", "run\n", "é", "a:b", 7, None])
def test_other_names_are_refused_naming_the_flag(name):
    with pytest.raises(InputError) as info:
        plain_name(name, "run id", "--run-id")
    assert str(info.value) == f"run id {name!r} is not a plain name (letters, digits, . _ -): fix --run-id"


def test_a_name_over_the_limit_is_refused_by_its_length():
    with pytest.raises(InputError) as info:
        plain_name("x" * (MAX_NAME_LENGTH + 1), "job name", "name:")
    assert str(info.value).startswith(f"job name is {MAX_NAME_LENGTH + 1} characters long, more than the "
                                      f"{MAX_NAME_LENGTH} allowed")
    assert str(info.value).endswith("shorten name:")


def test_a_scheme_only_output_root_stays_a_uri():
    assert output_root_of("file:///") == "file:///"
    assert run_dir("file:///", "n", DAY, "x") == f"file:///n/date={DAY}/run=x"
    assert partials_dir("file:///", "n", "x") == "file:///n/.partials/run=x"
