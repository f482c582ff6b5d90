"""A published run made by hand, without Ray or a model: a ``manifest.json`` and a
``diagonals.parquet`` in the contract's layout, for tests of what reads runs (exports); and
``publish_examples``, such a run with per-example outputs and influence scores (contract 7) of
known values over a small training dataset of 4 x 4 images."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.read.run import Run, load
from pipeline.storage.layout import run_dir
from pipeline.storage.tables import diagonals_table, summary_table

VARIABLES = (("dense/kernel", (3, 2)), ("dense/bias", (2,)))
PARAMETERS = 8


def publish(root, columns: dict, manifest: dict | None = None, variables=VARIABLES,
            tables: dict[str, pa.Table] | None = None) -> Run:
    """The run ``toy``/``r1`` under ``root/results`` with ``columns`` of ``diagonals.parquet``
    (each flat, one value per parameter of ``variables``); ``manifest`` adds or replaces entries;
    ``tables`` adds files ``{name relative to the run: table}`` (``per_example/part-00000.parquet``)."""
    folder = run_dir(os.path.join(str(root), "results"), "toy", "2026-12-07", "r1")
    os.makedirs(folder)
    pq.write_table(diagonals_table([v for v, _ in variables], [s for _, s in variables], columns),
                   os.path.join(folder, "diagonals.parquet"))
    for name, table in (tables or {}).items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        pq.write_table(table, os.path.join(folder, name))
    with open(os.path.join(folder, "manifest.json"), "w", encoding="utf-8") as handle:
        json.dump({"status": "complete", "run_id": "r1", "date": "2026-12-07", "job": {"name": "toy"},
                   "examples": 40, "loss": 0.5, "files": ["diagonals.parquet", *(tables or {}), "manifest.json"],
                   "parameters": sum(int(np.prod(s)) for _, s in variables),
                   "variables": [{"name": v, "shape": list(s)} for v, s in variables], **(manifest or {})}, handle)
    return load(folder)


# ------------------------------------------------------------------------------ per-example outputs
# 8 training rows in two data files of 4 (rows 0-3 in part-0.parquet, 4-7 in part-1.parquet):
# loss 0.1 (row + 1), gradient_norm row + 1, self_influence largest for row 5 (the "mislabeled" one).
EXAMPLE_ROWS = 8
SELF_INFLUENCE = np.array([0.5, 1.0, 1.5, 2.0, 2.5, 40.0, 3.0, 3.5])
# Scores of query q on training row i; rows 1 and 2 tie on query 0 (the smaller row ranks first).
SCORES = np.array([[0.3, 0.9, 0.9, -0.2, 0.0, -0.8, 0.1, 0.5],
                   [-0.5, 0.2, 0.4, 0.7, -0.9, 0.6, -0.1, 0.05]])


def training_data(folder) -> str:
    """Two Parquet files of 4 rows: ``pixels`` fixed_size_list<float32>[16] (a 4 x 4 image whose
    pixel ``row`` is lit), ``label`` int64 (``row % 3``) and ``id`` string (``ex ROW``)."""
    os.makedirs(folder, exist_ok=True)
    for file in range(2):
        rows = np.arange(4 * file, 4 * file + 4)
        pixels = np.zeros((4, 16), np.float32)
        pixels[np.arange(4), rows] = 1.0
        pq.write_table(pa.table({"pixels": pa.FixedSizeListArray.from_arrays(pa.array(pixels.ravel()), 16),
                                 "label": pa.array(rows % 3, pa.int64()), "id": [f"ex{r}" for r in rows]}),
                       os.path.join(folder, f"part-{file}.parquet"))
    return str(folder)


def topk_table(scores: np.ndarray, top_k: int) -> pa.Table:
    """``influence_topk.parquet`` of a dense ``[Q, N]`` score matrix over the training rows above:
    per query the ``top_k`` largest (helpful) and smallest (harmful), ties to the smaller row."""
    columns: dict[str, list] = {k: [] for k in ("query", "query_id", "kind", "rank", "row", "file", "file_row", "id",
                                               "score")}
    for query, row_scores in enumerate(scores):
        rows = np.arange(row_scores.size)
        for kind, order in (("helpful", np.lexsort((rows, -row_scores))), ("harmful", np.lexsort((rows, row_scores)))):
            for rank, row in enumerate(order[:top_k], start=1):
                for key, value in (("query", query), ("query_id", f"q{query}"), ("kind", kind), ("rank", rank),
                                   ("row", int(row)), ("file", f"part-{row // 4}.parquet"), ("file_row", int(row % 4)),
                                   ("id", f"ex{row}"), ("score", float(row_scores[row]))):
                    columns[key].append(value)
    types = {"query": pa.int64(), "rank": pa.int32(), "row": pa.int64(), "file_row": pa.int64(), "score": pa.float64()}
    return pa.table({k: pa.array(v, types.get(k)) for k, v in columns.items()})


def per_example_parts(projection: int = 2) -> dict[str, pa.Table]:
    """Two parts of ``per_example/``, each holding its shard's rows in reverse (workers write as
    they go: a reader must sort by ``row``)."""
    parts = {}
    for part in range(2):
        rows = np.arange(4 * part + 3, 4 * part - 1, -1)
        columns = {"row": pa.array(rows, pa.int64()), "file": [f"part-{part}.parquet"] * 4,
                   "file_row": pa.array(rows % 4, pa.int64()), "id": [f"ex{r}" for r in rows],
                   "weight": pa.array(np.ones(4)), "loss": pa.array(0.1 * (rows + 1.0)),
                   "gradient_norm": pa.array(rows + 1.0), "self_influence": pa.array(SELF_INFLUENCE[rows])}
        if projection:
            values = np.repeat(rows.astype(np.float32), projection)
            columns["projection"] = pa.FixedSizeListArray.from_arrays(pa.array(values), projection)
        parts[f"per_example/part-{part:05d}.parquet"] = pa.table(columns)
    return parts


def publish_examples(root, *, data: bool = True, top_k: int = 3) -> Run:
    """A hand-made run with ``per_example/`` (two parts), ``influence_topk.parquet`` (two queries,
    ``top_k`` of each kind, from ``SCORES``) and ``influence.parquet`` (every score), its
    manifest entries, and (``data``) the training data its job names under ``root/data``."""
    folder = os.path.join(str(root), "data")
    if data:
        training_data(folder)
    parts = per_example_parts()
    dense = pa.table({"query": pa.array(np.repeat(np.arange(2), EXAMPLE_ROWS), pa.int64()),
                      "row": pa.array(np.tile(np.arange(EXAMPLE_ROWS), 2), pa.int64()),
                      "score": pa.array(SCORES.ravel())})
    columns = ["row", "file", "file_row", "id", "weight", "loss", "gradient_norm", "self_influence", "projection"]
    manifest = {
        "job": {"name": "toy", "data": {"path": folder, "format": "parquet", "features": "pixels", "labels": "label",
                                        "id": "id"},
                "quantities": {"per_example": {"projection": 2}, "influence": {"top_k": top_k}}},
        "per_example": {"rows": EXAMPLE_ROWS, "parts": 2, "projection": 2, "projection_dtype": "float32",
                        "columns": columns},
        "influence": {"curvature": "ekfac", "damping": 0.1, "lambda": {"dense": 0.02}, "queries": 2, "top_k": top_k,
                      "self": True, "scores": "dense", "query_data": folder},
    }
    diagonal = {"hessian_diagonal": np.arange(1.0, PARAMETERS + 1)}
    summary = summary_table([v for v, _ in VARIABLES], [s for _, s in VARIABLES], diagonal)  # report draws it
    return publish(root, diagonal, manifest, tables={"summary.parquet": summary, **parts,
                                                     "influence_topk.parquet": topk_table(SCORES, top_k),
                                                     "influence.parquet": dense})
