"""Top-k selections merge exactly: any split of the rows, merged in any order, selects what one
selection over all rows does (ties by the smaller row; fewer rows than k padded with -1)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.influence import topk


@pytest.mark.parametrize("kind", topk.KINDS)
def test_merging_any_split_in_any_order_equals_one_selection(kind):
    rng = np.random.default_rng(0)
    scores = rng.integers(-3, 4, size=(3, 40)).astype(float)  # many ties
    rows = rng.permutation(1000)[:40]
    ids = np.array([f"id{r}" for r in rows])
    whole = topk.select(scores, rows, 7, kind, ids)
    for seed in range(5):
        cut = np.sort(np.random.default_rng(seed).choice(np.arange(1, 40), 5, replace=False))
        pieces = [topk.select(scores[:, p], rows[p], 7, kind, ids[p]) for p in np.split(np.arange(40), cut)]
        np.random.default_rng(seed).shuffle(pieces)
        merged = pieces[0]
        for piece in pieces[1:]:
            merged = merged.merged(piece)
        np.testing.assert_array_equal(merged.rows, whole.rows)
        np.testing.assert_array_equal(merged.scores, whole.scores)
        np.testing.assert_array_equal(merged.ids, whole.ids)
    # the order: best first, ties to the smaller row
    for q in range(3):
        expected = sorted(range(40), key=lambda i: (-scores[q, i] if kind == "helpful" else scores[q, i], rows[i]))[:7]
        np.testing.assert_array_equal(whole.rows[q], rows[expected])


def test_fewer_rows_than_k_are_padded_and_padding_never_wins():
    top = topk.select(np.array([[-np.inf, 1.0]]), np.array([5, 3]), 4, "helpful")
    assert top.rows.tolist() == [[3, 5, -1, -1]]
    merged = top.merged(topk.select(np.array([[0.5]]), np.array([9]), 4, "helpful"))
    assert merged.rows.tolist() == [[3, 9, 5, -1]]
