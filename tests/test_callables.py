"""``"pkg.module:function"`` references (the model builder, a loss, the data transform): the
function itself, or one ``InputError`` line that names the reference and the way out."""

from __future__ import annotations

import os.path
import textwrap

import pytest

from pipeline.callables import import_callable
from pipeline.errors import InputError


def error_of(reference: str, what: str = "model.builder") -> str:
    with pytest.raises(InputError) as info:
        import_callable(reference, what)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{what} {reference!r}"), message
    return message


def test_a_good_reference_is_the_function_itself():
    assert import_callable("os.path:join", "loss") is os.path.join
    # A dotted attribute walks into the module's objects.
    assert import_callable("os:path.join", "loss") is os.path.join


def test_a_module_of_the_users_own_is_imported_from_the_path(tmp_path, monkeypatch):
    (tmp_path / "user_builders.py").write_text(textwrap.dedent("""\
        def build(n=2):
            return ["layer"] * n
    """), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    function = import_callable("user_builders:build", "model.builder")
    assert function(3) == ["layer"] * 3


@pytest.mark.parametrize("reference", ["os.path", "os.path:", ":join", ""])
def test_a_reference_without_module_and_function_is_refused(reference):
    assert "is not of the form 'pkg.module:function'" in error_of(reference)


def test_a_missing_module_is_named_with_the_way_out():
    message = error_of("no_such_module_hp_test:build")
    assert "cannot import module 'no_such_module_hp_test' (ModuleNotFoundError:" in message
    assert "make it importable (installed, or on PYTHONPATH)" in message


def test_a_module_that_fails_while_importing_is_an_input_error(tmp_path, monkeypatch):
    (tmp_path / "broken_transform_hp.py").write_text("raise RuntimeError('no GPU here')\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    message = error_of("broken_transform_hp:fn", "data.transform")
    assert "cannot import module 'broken_transform_hp' (RuntimeError: no GPU here)" in message


@pytest.mark.parametrize("reference", ["os.path:no_such_function", "os:path.no_such_function"])
def test_a_missing_attribute_is_named(reference):
    attr = reference.partition(":")[2]
    assert f"has no {attr!r}: fix the name" in error_of(reference)


def test_something_that_is_not_callable_is_refused():
    assert error_of("os:sep", "loss").endswith("is not callable: name a function")


def test_an_attribute_that_is_none_is_reported_as_not_callable(tmp_path, monkeypatch):
    (tmp_path / "user_none_hp.py").write_text("build = None\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert error_of("user_none_hp:build").endswith("is not callable: name a function")
