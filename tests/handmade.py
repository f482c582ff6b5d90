"""A published run made by hand, without Ray or a model: a ``manifest.json`` and a
``diagonals.parquet`` in the contract's layout, for tests of what reads runs (exports)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq

from pipeline.read.run import Run, load
from pipeline.storage.layout import run_dir
from pipeline.storage.tables import diagonals_table

VARIABLES = (("dense/kernel", (3, 2)), ("dense/bias", (2,)))
PARAMETERS = 8


def publish(root, columns: dict, manifest: dict | None = None, variables=VARIABLES) -> Run:
    """The run ``toy``/``r1`` under ``root/results`` with ``columns`` of ``diagonals.parquet``
    (each flat, one value per parameter of ``variables``); ``manifest`` adds or replaces entries."""
    folder = run_dir(os.path.join(str(root), "results"), "toy", "2026-12-07", "r1")
    os.makedirs(folder)
    pq.write_table(diagonals_table([v for v, _ in variables], [s for _, s in variables], columns),
                   os.path.join(folder, "diagonals.parquet"))
    with open(os.path.join(folder, "manifest.json"), "w", encoding="utf-8") as handle:
        json.dump({"status": "complete", "run_id": "r1", "date": "2026-12-07", "job": {"name": "toy"},
                   "examples": 40, "loss": 0.5, "files": ["diagonals.parquet", "manifest.json"],
                   "parameters": sum(int(np.prod(s)) for _, s in variables),
                   "variables": [{"name": v, "shape": list(s)} for v, s in variables], **(manifest or {})}, handle)
    return load(folder)
