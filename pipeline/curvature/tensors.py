"""The TensorFlow plumbing every family of products shares: batches as tensors, their
signatures, rows and chunks, the model's outputs as one flat tensor, dense gradients.

Nothing here knows a curvature quantity; the families (``hvp_products``, ``exact_blocks``,
``example_products``, ``layer_products``) and the engine build on it.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def set_threads(threads: int | None) -> None:
    """TensorFlow's pools can be sized once per process, before any op runs."""
    if not threads:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(int(threads))
        tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, int(threads))))
    except RuntimeError:
        pass  # already initialised in this (reused) process: keep what it has


def row_slices(n: int, chunk: int) -> list:
    """Row ranges of at most ``chunk`` rows over a batch of n; ``[None]`` when one takes all
    (``take_rows`` then passes the tensors as they are: no slicing op per call)."""
    if chunk >= n:
        return [None]
    return [slice(start, start + chunk) for start in range(0, n, chunk)]


def take_rows(tensors, pick):
    return list(tensors) if pick is None else [t[pick] for t in tensors]


def vector_spec(count, parameters, dtype):
    return tf.TensorSpec([count, parameters], dtype)


def flat_outputs(outputs, dtype):
    """The model's outputs as one [B, C] tensor in the compute dtype (C order per output)."""
    return tf.concat([tf.reshape(tf.cast(o, dtype), [tf.shape(o)[0], -1]) for o in outputs], axis=1)


def dense(gradients):
    """Gradients as dense tensors (an Embedding's gradient is ``tf.IndexedSlices``)."""
    return [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in gradients]


def valid_fraction(mask, output, dtype):
    """[B]: the fraction of an output's positions the loss averages over (``sampling.draw_labels``'s
    ``valid``): all of them without a mask (ones); one with a mask, whose positions the
    token-weighted objective sums (``1 / positions``, positions = every axis but the batch and
    the last)."""
    batch = tf.shape(output)[0]
    if mask is None:
        return tf.ones([batch], dtype)
    positions = tf.cast(tf.reduce_prod(tf.shape(output)[1:-1]), dtype)
    return tf.fill([batch], 1.0 / positions)


def input_dtype(name: str) -> str:
    """The dtype a model input takes floats in (other inputs keep their own)."""
    return name if name.startswith(("float", "bfloat")) else "float32"


def _is_text(array) -> bool:
    return np.asarray(array).dtype.kind in "OSU"


def batch_tensor(array, dtype):
    """A batch array as a tensor: floats in the compute dtype, text as tf.string."""
    array = np.asarray(array)
    if array.dtype.kind == "f":
        return tf.constant(array, dtype=dtype)
    if _is_text(array):
        return tf.constant(array.astype(object), dtype=tf.string)
    return tf.constant(array)


def tensor_spec(array, model_shape, dtype):
    """TensorSpec for a batch array: axes the model leaves open (None) stay open."""
    array = np.asarray(array)
    # Leading axes line up with the model's (a sparse label [T] beside an output [T, C]).
    shape = [None if k < len(model_shape) and model_shape[k] is None else d
             for k, d in enumerate(array.shape[1:])]
    if array.dtype.kind == "f":
        kind = dtype
    elif _is_text(array):
        kind = tf.string
    else:
        kind = tf.as_dtype(array.dtype)
    return tf.TensorSpec([None, *shape], kind)


def as_dtype(array, dtype):
    return tf.constant(np.asarray(array), dtype=dtype)
