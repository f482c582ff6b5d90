"""The top-k training rows per query, kept per shard and merged exactly.

For each query q a shard keeps the ``k`` rows with the largest scores (``helpful``) and the
``k`` with the smallest (``harmful``); ties go to the smaller row. Merging two such selections
and selecting again gives the selection of the union, so the merged table does not depend on
how the rows were sharded (contract 7.2). Arrays: ``rows`` int64 ``[Q, k]`` (-1 where fewer
than k rows were seen), ``scores`` float64 ``[Q, k]``, best first.

    >>> top = select(np.array([[0.5, 2.0, 2.0]]), np.array([7, 9, 8]), 2, "helpful")
    >>> top.rows.tolist(), top.scores.tolist()
    ([[8, 9]], [[2.0, 2.0]])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("helpful", "harmful")


@dataclass
class Top:
    """One kind's selection: ``rows`` [Q, k] and ``scores`` [Q, k], best first."""

    kind: str
    rows: np.ndarray
    scores: np.ndarray
    # The rows' ``data.id`` values [Q, k] (numbers or str), when the job names an id column.
    ids: np.ndarray | None = None

    def merged(self, other: "Top") -> "Top":
        """The selection of both together (same kind and k)."""
        k = self.rows.shape[1]
        ids = None if self.ids is None or other.ids is None else _joined_ids(self.ids, other.ids)
        return _best(np.concatenate([self.scores, other.scores], axis=1),
                     np.concatenate([self.rows, other.rows], axis=1), k, self.kind, ids)

    def copy(self) -> "Top":
        """A writable copy (arrays from ``ray.get`` are read-only)."""
        return Top(self.kind, np.array(self.rows), np.array(self.scores), None if self.ids is None else
                   np.array(self.ids))


def select(scores: np.ndarray, rows: np.ndarray, k: int, kind: str, ids: np.ndarray | None = None) -> Top:
    """The ``k`` best of ``scores`` [Q, B] for rows ``rows`` [B] (``kind``: largest for
    ``helpful``, smallest for ``harmful``), padded with row -1 when B < k; ``ids`` [B] travel
    with their rows."""
    scores = np.asarray(scores, np.float64)
    ids = None if ids is None else np.broadcast_to(_plain_ids(ids), scores.shape)
    return _best(scores, np.broadcast_to(np.asarray(rows, np.int64), scores.shape), k, kind, ids)


def empty(queries: int, k: int, kind: str) -> Top:
    fill = -np.inf if kind == "helpful" else np.inf
    return Top(kind, np.full((queries, k), -1, np.int64), np.full((queries, k), fill))


def _plain_ids(ids: np.ndarray) -> np.ndarray:
    """Ids as NumPy numbers or fixed-width strings (never Python objects: staged without pickle)."""
    ids = np.asarray(ids)
    return ids.astype(str) if ids.dtype.kind in "OSU" else ids


def _joined_ids(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype.kind == "U" or b.dtype.kind == "U":
        a, b = a.astype(str), b.astype(str)
    return np.concatenate([a, b], axis=1)


def _best(scores: np.ndarray, rows: np.ndarray, k: int, kind: str, ids: np.ndarray | None = None) -> Top:
    queries, n = scores.shape
    if n < k:  # pad so that every selection has k columns (row -1 sorts after any real row)
        pad = empty(queries, k - n, kind)
        scores, rows = np.concatenate([scores, pad.scores], axis=1), np.concatenate([rows, pad.rows], axis=1)
        if ids is not None:
            ids = np.concatenate([ids, np.zeros((queries, k - n), ids.dtype)], axis=1)
    key = -scores if kind == "helpful" else scores
    # Padding (row -1) must lose every tie: order by the key, then real rows before padding,
    # then the smaller row.
    order = np.lexsort((np.where(rows < 0, np.iinfo(np.int64).max, rows), key), axis=1)[:, :k]
    return Top(kind, np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1),
               None if ids is None else np.take_along_axis(ids, order, axis=1))
