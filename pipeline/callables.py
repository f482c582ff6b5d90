"""Importing the ``"pkg.module:function"`` references a job names: the model builder, a loss
function, the data transform. No TensorFlow: the storage layer resolves the data transform."""

from __future__ import annotations

import importlib

from pipeline.errors import InputError


def import_callable(reference: str, what: str):
    """Imports ``"pkg.module:function"``; an ``InputError`` names the reference otherwise."""
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise InputError(f"{what} {reference!r} is not of the form 'pkg.module:function': fix it")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's input
        raise InputError(
            f"{what} {reference!r}: cannot import module {module_name!r} ({type(exc).__name__}: "
            f"{exc}); make it importable (installed, or on PYTHONPATH)"
        ) from None
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise InputError(f"{what} {reference!r}: module {module_name!r} has no {attr!r}: fix the name")
        target = getattr(target, part)
    if not callable(target):
        raise InputError(f"{what} {reference!r} is not callable: name a function")
    return target
