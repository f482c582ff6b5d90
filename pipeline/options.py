"""Checks of job-file values: each takes a value and its dotted key, returns the (possibly
converted) value, or raises ``InputError`` with one line that names the key, what it must be
and the way out. Shared by ``pipeline.job`` and the quantity units (``pipeline.quantities``),
which declare their options with ``Option``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.errors import InputError
from pipeline.storage.uri import absolute

MISSING = object()  # a key without a default: required, or one of a pair (hvp)


def show(value: Any) -> str:
    """A value as the user would recognise it from YAML, short and on one line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        text = "a list " + repr(list(value))
    elif isinstance(value, dict):
        text = "a mapping " + repr(value)
    elif isinstance(value, (str, int, float)):
        text = repr(value)
    else:
        text = f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def fail(key: str, expected: str, value: Any, fix: str) -> None:
    raise InputError(f"{key} must be {expected}, got {show(value)}: {fix}")


def is_int(value: Any) -> bool:
    # YAML `true` is a bool, and bool is an int subclass: `batch_size: true` must not pass as 1.
    return isinstance(value, int) and not isinstance(value, bool)


Check = Callable[[Any, str], Any]


def positive_int(example: int) -> Check:
    def check(value: Any, key: str) -> int:
        if not is_int(value) or value < 1:
            fail(key, "a positive integer", value, f"set it to e.g. {example}")
        return value

    return check


def non_negative_int(example: int) -> Check:
    def check(value: Any, key: str) -> int:
        if not is_int(value) or value < 0:
            fail(key, "an integer of 0 or more", value, f"set it to e.g. {example}")
        return value

    return check


def auto_or_positive_int(example: int) -> Check:
    """``"auto"`` or a positive integer."""
    def check(value: Any, key: str) -> int | str:
        if isinstance(value, str) and value == "auto":
            return value
        if not is_int(value) or value < 1:
            fail(key, "auto or a positive integer", value, f"set it to auto or e.g. {example}")
        return value

    return check


def positive_float(example: float) -> Check:
    def check(value: Any, key: str) -> float:
        ok = (is_int(value) or isinstance(value, float)) and math.isfinite(value) and value > 0
        if not ok:
            fail(key, "a positive number", value, f"set it to e.g. {example:g}")
        return float(value)

    return check


def optional(check: Check) -> Check:
    """``check``, or ``None`` (the option is unset)."""
    def wrapped(value: Any, key: str) -> Any:
        return None if value is None else check(value, key)

    return wrapped


def choice(*allowed: str, example: str | None = None) -> Check:
    def check(value: Any, key: str) -> str:
        if not isinstance(value, str) or value not in allowed:
            fail(key, "one of " + ", ".join(allowed), value,
                  f"set it to e.g. {example or allowed[0]}")
        return value

    return check


def boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        fail(key, "true or false", value, "set it to true or false")
    return value


def column_name(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        fail(key, "a column name", value, "name a column of the Parquet data")
    return value


def resolved_path(base_dir: str, what: str) -> Check:
    """A checker that resolves a local path against ``base_dir`` and keeps URIs as written."""

    def check(value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            fail(key, f"a path or URI of {what}", value, f"set it to {what}")
        return absolute(value, base_dir)

    return check


def check_keys(mapping: dict, allowed: tuple[str, ...] | list[str], where: str) -> None:
    """Unknown keys are an error: a misspelt key would otherwise silently use the default."""
    for key in mapping:
        if key in allowed:
            continue
        dotted = f"{where}.{key}" if where else str(key)
        hint = ""
        close = difflib.get_close_matches(str(key), list(allowed), n=1)
        if close:
            hint = f" (did you mean {where + '.' if where else ''}{close[0]}?)"
        place = f"in {where}" if where else "at the top level"
        raise InputError(
            f"unknown key {dotted}{hint}: the keys allowed {place} are {', '.join(allowed)}"
        )


@dataclass(frozen=True)
class Option:
    """One option of a quantity: its check, its default (``MISSING``: none) and its help line."""

    check: Check
    default: Any
    help: str
