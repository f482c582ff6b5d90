"""A shard's rows gathered batch by batch: each batch's columns in row order, the projection in
its storage type, the top-k merged across batches as one selection, dense scores by query then
row."""

from __future__ import annotations

import numpy as np

from pipeline.influence import topk
from pipeline.influence.shard_rows import ShardRows


def test_batches_give_their_columns_and_dense_scores_and_the_top_k_of_the_whole_shard():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(10, 3))
    gathered = ShardRows(top_k=4, dense_scores=True, projection_dtype="float16")
    dense = []
    for part in (slice(0, 6), slice(6, 10)):
        rows = np.arange(20, 30)[part]
        columns, scored = gathered.add(rows, ["f"] * len(rows), rows - 20, None, None,
                                       {"loss": rows * 1.0, "gradient_norm": rows * 2.0,
                                        "projection": np.ones((len(rows), 2)), "scores": scores[part]})
        assert list(columns) == ["row", "file", "file_row", "weight", "loss", "gradient_norm", "projection"]
        assert columns["row"].tolist() == rows.tolist() and columns["projection"].dtype == np.float16
        dense.append(scored)
    whole = topk.select(scores.T, np.arange(20, 30), 4, "harmful")
    np.testing.assert_array_equal(gathered.tops["harmful"].rows, whole.rows)
    assert dense[0]["query"].tolist() == [0] * 6 + [1] * 6 + [2] * 6
    np.testing.assert_array_equal(dense[1]["score"], scores[6:].T.ravel())
    assert ShardRows(2, False).add(np.arange(2), ["f", "f"], np.arange(2), None, None,
                                   {"loss": np.ones(2), "gradient_norm": np.ones(2), "scores": np.ones((2, 1))})[1] is None
