"""Batch transforms (``data.transform``) for the tests: ``transforms:name``. The tests folder is
on ``PYTHONPATH`` (pytest's rootdir; Ray workers get it through their runtime environment)."""

from __future__ import annotations

import numpy as np


def pair(batch):
    """Adds ``x`` [B, 2] = (a, 2 b) and keeps every column."""
    return {**batch, "x": np.stack([batch["a"], 2.0 * batch["b"]], axis=1)}


def lengths(batch):
    """Adds ``tail``: each ``target`` row without its first value (a variable-length column),
    and ``size``: the number of values in each ``target`` row."""
    return {**batch, "tail": np.array([row[1:] for row in batch["target"]] + [None], dtype=object)[:-1],
            "size": np.array([len(row) for row in batch["target"]], dtype=np.int64)}


def fails_on_7(batch):
    if np.any(batch["id"] == 7):
        raise ValueError("id 7 is cursed")
    return pair(batch)


def drops_a_row(batch):
    return {name: values[1:] for name, values in pair(batch).items()}


def not_a_dict(batch):
    return [batch["a"]]


def text_label(batch):
    return {**pair(batch), "label": batch["label"].astype(str)}


def batch_mean(batch):
    """Centres ``a`` on the batch's mean: a row's value depends on its batch."""
    out = pair(batch)
    out["x"] = out["x"] - out["x"].mean(axis=0)
    return out


def fill_nulls(batch):
    """Replaces null ``a`` values (NaN) by -1."""
    a = np.where(np.isnan(batch["a"].astype(np.float64)), -1.0, batch["a"])
    return {**batch, "x": np.stack([a, np.zeros_like(a)], axis=1)}


def exits(batch):
    """Calls sys.exit on the batch holding id 7."""
    import sys  # lazy: only this transform needs it

    if np.any(batch["id"] == 7):
        sys.exit(3)
    return pair(batch)


def numbers_as_objects(batch):
    """x as an object array of Python floats (what pandas often gives)."""
    return {**batch, "x": pair(batch)["x"].astype(object)}
