"""A local file written whole or not at all: a temporary name beside the target, renamed when
the block ends, removed when it raises; the result has the mode of any new file."""

from __future__ import annotations

import os
import stat

import pytest

from pipeline.exports.files import written_whole


def test_the_file_appears_only_when_the_block_ends(tmp_path):
    out = tmp_path / "model.keras"
    with written_whole(str(out), ".keras") as temporary:
        assert os.path.dirname(temporary) == str(tmp_path)  # same folder: the rename is atomic
        assert temporary.endswith(".keras") and os.path.basename(temporary).startswith(".hessian-pipeline-")
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write("new")
        assert not out.exists()
    assert out.read_text(encoding="utf-8") == "new"
    assert os.listdir(tmp_path) == ["model.keras"]


def test_it_gets_the_mode_of_a_new_file_not_mkstemps_private_one(tmp_path):
    umask = os.umask(0o022)
    try:
        with written_whole(str(tmp_path / "a.npz"), ".npz") as temporary:
            assert stat.S_IMODE(os.stat(temporary).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(tmp_path / "a.npz").st_mode) == 0o644
    finally:
        os.umask(umask)


def test_an_error_leaves_the_old_file_as_it_was_and_no_temporary(tmp_path):
    out = tmp_path / "a.npz"
    out.write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError, match="disk full"):
        with written_whole(str(out), ".npz") as temporary:
            with open(temporary, "w", encoding="utf-8") as handle:
                handle.write("half")
            raise RuntimeError("disk full")
    assert out.read_text(encoding="utf-8") == "old"
    assert os.listdir(tmp_path) == ["a.npz"]
    # Ctrl-C too (BaseException), and a block that removed its temporary itself.
    with pytest.raises(KeyboardInterrupt):
        with written_whole(str(out), ".npz") as temporary:
            os.remove(temporary)
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["a.npz"]


def test_a_missing_folder_fails_before_the_block(tmp_path):
    with pytest.raises(FileNotFoundError):
        with written_whole(str(tmp_path / "no" / "a.npz"), ".npz"):
            pytest.fail("the block must not run")
