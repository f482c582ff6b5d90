"""The blocks of the parameters: a factored layer's [W; b] matrix in K-FAC's order, the rest flat."""

from __future__ import annotations

import numpy as np

from pipeline.influence.layout import Layout


def test_layer_blocks_take_kernel_then_bias_and_the_rest_keeps_flat_order():
    names = ["emb/embeddings", "d/kernel", "d/bias", "n/gamma", "o/kernel"]
    shapes = [(4, 2), (2, 3), (3,), (3,), (3, 2)]
    layout = Layout.of(names, shapes, [("d", 2, 3, 1, True), ("o", 3, 2, 5, False), ("missing", 9, 9, 1, False)])
    assert [(b.path, b.d_a, b.d_s) for b in layout.layers] == [("d", 3, 3), ("o", 3, 2)]
    assert [names[k] for k in layout.rest] == ["emb/embeddings", "n/gamma"]
    flat = np.arange(2 * layout.parameters, dtype=float).reshape(2, -1)
    d = layout.matrix(flat, layout.layers[0])
    np.testing.assert_array_equal(d[0], np.vstack([np.arange(8, 14).reshape(2, 3), np.arange(14, 17)[None]]))
    again = np.zeros_like(flat)
    for layer in layout.layers:
        layout.put_matrix(again, layer, layout.matrix(flat, layer))
    again[:, layout.rest_positions()] = layout.rest_of(flat)
    np.testing.assert_array_equal(again, flat)
    assert Layout.of(names, shapes, [("d", 2, 3, 1, True)], structured=False).layers == ()
