"""The TensorFlow plumbing the families share: row chunks, batches as tensors, dtypes, the
fraction of an output's positions the loss averages over."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
import tensorflow as tf

from pipeline.curvature.tensors import (as_dtype, batch_tensor, dense, flat_outputs, input_dtype, row_slices,
                                        take_rows, tensor_spec, valid_fraction)


@pytest.mark.parametrize("n,chunk", [(5, 5), (5, 9), (1, 1)])
def test_one_chunk_takes_the_tensors_as_they_are(n, chunk):
    assert row_slices(n, chunk) == [None]
    tensors = [tf.zeros([n, 2]), tf.ones([n])]
    taken = take_rows(tensors, None)
    assert isinstance(taken, list) and all(a is b for a, b in zip(taken, tensors))


@pytest.mark.parametrize("n,chunk", [(7, 3), (6, 3), (10, 1), (9, 8)])
def test_chunks_cover_every_row_once_in_order(n, chunk):
    slices = row_slices(n, chunk)
    assert len(slices) == -(-n // chunk)
    x = tf.reshape(tf.range(n * 2), [n, 2])
    y = tf.range(n)
    pieces = [take_rows([x, y], pick) for pick in slices]
    assert all(int(tf.shape(p[0])[0]) <= chunk for p in pieces)
    np.testing.assert_array_equal(tf.concat([p[0] for p in pieces], 0).numpy(), x.numpy())
    np.testing.assert_array_equal(tf.concat([p[1] for p in pieces], 0).numpy(), y.numpy())


def test_floats_take_the_compute_dtype_and_other_arrays_keep_theirs():
    x = np.array([[1.5, 2.25]], np.float64)
    assert batch_tensor(x, tf.float32).dtype == tf.float32
    assert batch_tensor(x.astype(np.float32), tf.float64).dtype == tf.float64
    np.testing.assert_array_equal(batch_tensor(x, tf.float32).numpy(), x)
    assert batch_tensor(np.array([1, 2], np.int32), tf.float64).dtype == tf.int32
    assert batch_tensor(np.array([1, 2], np.int64), tf.float32).dtype == tf.int64
    text = batch_tensor(np.array(["a cat", "dog"]), tf.float32)
    assert text.dtype == tf.string and text.numpy().tolist() == [b"a cat", b"dog"]
    assert batch_tensor(np.array([b"x", b"yz"], dtype=object), tf.float32).dtype == tf.string


def test_as_dtype_converts_any_array():
    t = as_dtype([1, 2, 3], tf.float64)
    assert t.dtype == tf.float64 and t.numpy().tolist() == [1.0, 2.0, 3.0]
    assert as_dtype(np.array([0.5], np.float64), "float32").dtype == tf.float32


@pytest.mark.parametrize("name,expected", [("float64", "float64"), ("float32", "float32"), ("float16", "float16"),
                                           ("bfloat16", "bfloat16"), ("int32", "float32"), ("int64", "float32"),
                                           ("string", "float32")])
def test_input_dtype_names_the_float_dtype_an_input_takes(name, expected):
    assert input_dtype(name) == expected


def test_without_a_mask_every_position_counts():
    fraction = valid_fraction(None, tf.zeros([4, 5, 3]), tf.float64)
    assert fraction.dtype == tf.float64
    np.testing.assert_array_equal(fraction.numpy(), np.ones(4))


@pytest.mark.parametrize("shape,positions", [((3, 5, 2), 5), ((2, 4, 3, 7), 12), ((4, 3), 1)])
def test_with_a_mask_one_position_of_every_axis_but_the_batch_and_the_last(shape, positions):
    mask = tf.ones(shape[:-1], tf.bool)
    fraction = valid_fraction(mask, tf.zeros(shape), tf.float32)
    assert fraction.dtype == tf.float32
    np.testing.assert_allclose(fraction.numpy(), np.full(shape[0], 1.0 / positions), rtol=1e-7)


def test_flat_outputs_concatenates_each_output_row_by_row_in_c_order():
    a = tf.reshape(tf.range(12, dtype=tf.float32), [2, 3, 2])
    b = tf.constant([[100], [200]], tf.int32)
    flat = flat_outputs([a, b], tf.float64)
    assert flat.dtype == tf.float64 and tuple(flat.shape) == (2, 7)
    np.testing.assert_array_equal(flat.numpy()[1], [6, 7, 8, 9, 10, 11, 200])


def test_dense_turns_indexed_slices_into_tensors_and_keeps_the_rest():
    table = tf.Variable(tf.ones([4, 2]))
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(tf.gather(table, [1, 1, 3]))
    gradient = tape.gradient(total, table)
    assert isinstance(gradient, tf.IndexedSlices)
    other = tf.ones([2])
    out = dense([gradient, other])
    assert out[1] is other
    np.testing.assert_array_equal(out[0].numpy(), [[0, 0], [2, 2], [0, 0], [1, 1]])


def test_tensor_spec_keeps_the_axes_the_model_leaves_open():
    spec = tensor_spec(np.zeros((5, 7, 3)), (None, 3), tf.float64)
    assert spec.shape.as_list() == [None, None, 3] and spec.dtype == tf.float64
    # A sparse label [T] beside an output [T, C]: its one axis lines up with the output's first.
    assert tensor_spec(np.zeros((5, 7), np.int64), (None, 4), tf.float32).shape.as_list() == [None, None]
    assert tensor_spec(np.zeros((5, 7), np.int32), (7, 4), tf.float32) == tf.TensorSpec([None, 7], tf.int32)
    assert tensor_spec(np.array(["a", "b"]), (), tf.float32).dtype == tf.string
