"""One shard's per-example rows as a worker gathers them, batch by batch (NumPy only).

``ShardRows.add`` takes a batch's rows (global row, file name, file row, id, weight) and the
engine's per-example arrays (``ExampleRows.rows``) and returns the batch's ``per_example/``
columns (contract 7.1) and, when asked, its dense scores as ``(query, row, score)`` columns: the
worker writes both at once (``storage.parts.PartWriter``), so memory stays one batch whatever the
shard's size. Only ``tops``, the shard's top-k rows per query and kind (``topk``), is kept:
``Q x k`` per kind.
"""

from __future__ import annotations

import numpy as np

from pipeline.influence import topk


class ShardRows:
    def __init__(self, top_k: int, dense_scores: bool, projection_dtype: str = "float32"):
        self.top_k = top_k
        self.dense_scores = dense_scores
        self.projection_dtype = np.float16 if projection_dtype == "float16" else np.float32
        self.tops: dict[str, topk.Top] = {}

    def add(self, rows, files, file_rows, ids, weights, got: dict) -> tuple[dict, dict | None]:
        """One batch: ``rows`` [B] global rows, ``files`` [B] names, ``file_rows`` [B], ``ids``
        [B] or None, ``weights`` [B] or None (1.0), ``got`` the engine's arrays. Returns its
        per-example columns in order and its dense scores (by query, then row; None unless asked)."""
        n = len(rows)
        columns = {"row": np.asarray(rows, np.int64), "file": np.asarray(files, object),
                   "file_row": np.asarray(file_rows, np.int64)}
        if ids is not None:
            columns["id"] = np.asarray(ids)
        columns["weight"] = np.ones(n) if weights is None else np.asarray(weights, np.float64)
        columns["loss"] = got["loss"]
        columns["gradient_norm"] = got["gradient_norm"]
        if "self_influence" in got:
            columns["self_influence"] = got["self_influence"]
        if "projection" in got:
            columns["projection"] = np.asarray(got["projection"]).astype(self.projection_dtype)
        scores = got.get("scores")
        if scores is None:
            return columns, None
        by_query = np.ascontiguousarray(scores.T)  # [Q, B]
        for kind in topk.KINDS:
            chosen = topk.select(by_query, rows, self.top_k, kind, ids)
            self.tops[kind] = chosen if kind not in self.tops else self.tops[kind].merged(chosen)
        if not self.dense_scores:
            return columns, None
        queries = by_query.shape[0]
        return columns, {"query": np.repeat(np.arange(queries, dtype=np.int64), n),
                         "row": np.tile(np.asarray(rows, np.int64), queries), "score": by_query.ravel()}
