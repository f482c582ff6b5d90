"""A shard's rows gathered batch by batch: columns in row order, the projection in its storage
type, the top-k merged across batches as one selection, dense scores by query then row."""

from __future__ import annotations

import numpy as np

from pipeline.influence import topk
from pipeline.influence.shard_rows import ShardRows


def test_batches_gather_into_the_shards_columns_top_k_and_dense_scores():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(10, 3))
    gathered = ShardRows(top_k=4, dense_scores=True, projection_dtype="float16")
    for part in (slice(0, 6), slice(6, 10)):
        rows = np.arange(20, 30)[part]
        gathered.add(rows, ["f"] * len(rows), rows - 20, None, None,
                     {"loss": rows * 1.0, "gradient_norm": rows * 2.0, "projection": np.ones((len(rows), 2)),
                      "scores": scores[part]})
    columns = gathered.columns()
    assert list(columns) == ["row", "file", "file_row", "weight", "loss", "gradient_norm", "projection"]
    assert columns["row"].tolist() == list(range(20, 30)) and columns["projection"].dtype == np.float16
    whole = topk.select(scores.T, np.arange(20, 30), 4, "harmful")
    np.testing.assert_array_equal(gathered.tops["harmful"].rows, whole.rows)
    dense = gathered.dense()
    assert dense["query"].tolist() == [0] * 10 + [1] * 10 + [2] * 10
    np.testing.assert_array_equal(dense["score"], scores.T.ravel())
