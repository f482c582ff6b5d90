"""One shard's per-example rows as a worker gathers them, batch by batch (NumPy only).

``ShardRows.add`` takes a batch's rows (global row, file name, file row, id, weight) and the
engine's per-example arrays (``ExampleRows.rows``); ``columns()`` gives the shard's
``per_example/`` columns (contract 7.1, row order), ``tops`` its top-k selection per query and
kind (``topk``, merged batch by batch, so memory stays ``Q x k``), ``dense()`` every score as
``(query, row, score)`` columns when asked. Memory: the shard's per-example columns (the
projection ``rows x k``), written once per shard.
"""

from __future__ import annotations

import numpy as np

from pipeline.influence import topk


class ShardRows:
    def __init__(self, top_k: int, dense_scores: bool, projection_dtype: str = "float32"):
        self.top_k = top_k
        self.dense_scores = dense_scores
        self.projection_dtype = np.float16 if projection_dtype == "float16" else np.float32
        self._columns: dict[str, list] = {}
        self._dense: list = []
        self.tops: dict[str, topk.Top] = {}

    def add(self, rows, files, file_rows, ids, weights, got: dict) -> None:
        """One batch: ``rows`` [B] global rows, ``files`` [B] names, ``file_rows`` [B], ``ids``
        [B] or None, ``weights`` [B] or None (1.0), ``got`` the engine's arrays."""
        n = len(rows)
        fixed = {"row": np.asarray(rows, np.int64), "file": np.asarray(files, object),
                 "file_row": np.asarray(file_rows, np.int64)}
        if ids is not None:
            fixed["id"] = np.asarray(ids)
        fixed["weight"] = np.ones(n) if weights is None else np.asarray(weights, np.float64)
        fixed["loss"] = got["loss"]
        fixed["gradient_norm"] = got["gradient_norm"]
        if "self_influence" in got:
            fixed["self_influence"] = got["self_influence"]
        if "projection" in got:
            fixed["projection"] = got["projection"].astype(self.projection_dtype)
        for name, value in fixed.items():
            self._columns.setdefault(name, []).append(value)
        scores = got.get("scores")
        if scores is None:
            return
        by_query = np.ascontiguousarray(scores.T)  # [Q, B]
        for kind in topk.KINDS:
            chosen = topk.select(by_query, rows, self.top_k, kind, ids)
            self.tops[kind] = chosen if kind not in self.tops else self.tops[kind].merged(chosen)
        if self.dense_scores:
            queries = by_query.shape[0]
            self._dense.append((np.repeat(np.arange(queries, dtype=np.int64), n),
                                np.tile(np.asarray(rows, np.int64), queries), by_query.ravel()))

    def columns(self) -> dict[str, np.ndarray]:
        """The shard's per-example columns, in row order (the order its batches came)."""
        return {name: np.concatenate(parts, axis=0) for name, parts in self._columns.items()}

    def dense(self) -> dict[str, np.ndarray] | None:
        """``{query, row, score}`` of every score of the shard, by query then row; None when not asked."""
        if not self.dense_scores or not self._dense:
            return None
        query, row, score = (np.concatenate(parts) for parts in zip(*self._dense))
        order = np.lexsort((row, query))
        return {"query": query[order], "row": row[order], "score": score[order]}
