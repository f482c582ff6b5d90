"""Stand-alone reproduction of the crash behind the zoo's xfail ``transformer_block-float32``
(not a test; run it by hand): ``tf.vectorized_map`` of per-example squared gradients through
a keras MultiHeadAttention in float32 corrupts the heap with TensorFlow's oneDNN CPU kernels.

    python tests/zoo/repro_mha_onednn.py            # dies: free(): invalid size / malloc(): ...
    TF_ENABLE_ONEDNN_OPTS=0 python tests/zoo/repro_mha_onednn.py   # prints OK

``python tests/zoo/repro_mha_onednn.py dense`` (no attention) prints OK with oneDNN on.
"""

import sys

import keras
import numpy as np
import tensorflow as tf


def main(which="mha"):
    keras.utils.set_random_seed(0)
    tokens = keras.Input((6,), dtype="int32")
    e = keras.layers.Embedding(12, 8)(tokens)
    if which == "mha":
        h = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(e, e)
    else:
        h = keras.layers.Dense(8, activation="gelu")(e)
    out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model(tokens, out)
    variables = [v.value for v in model.trainable_variables]
    x = tf.constant(np.random.default_rng(0).integers(0, 12, (10, 6)).astype(np.int32))
    u = tf.constant(np.random.default_rng(1).normal(size=(10, 3)).astype(np.float32))

    @tf.function
    def fisher_like(x, u):
        def one(args):
            xi, ui = args
            with tf.GradientTape() as tape:
                value = tf.reduce_sum(model(xi[None], training=False)[0] * ui)
            g = tf.concat([tf.reshape(tf.convert_to_tensor(t), [-1]) for t in tape.gradient(value, variables)], 0)
            return g * g

        return tf.reduce_sum(tf.vectorized_map(one, (x, u)), 0)

    print("OK", which, fisher_like(x, u).numpy()[:3])


if __name__ == "__main__":
    main(*sys.argv[1:2])
