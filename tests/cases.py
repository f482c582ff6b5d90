"""Small models of several shapes and a dense float64 reference for every quantity.

The reference is deliberately naive: the full Hessian by ``tape.jacobian`` of the gradient,
per-example Jacobians in a Python loop. It is slow and obviously right on tiny models.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import keras
import tensorflow as tf

from pipeline.curvature.losses import resolve_loss


def loss_spec(name, **options):
    return SimpleNamespace(name=name, options=options, function=None)


def _dense(units, activation=None, name=None):
    return keras.layers.Dense(units, activation=activation, name=name)


def mlp(dtype="float64", seed=0, activation=None):
    keras.utils.set_random_seed(seed)
    with _Policy(dtype):
        return keras.Sequential([keras.Input((6,), dtype=dtype), _dense(5, "tanh", "hidden"), _dense(3, activation, name="out")], name="mlp")


def cnn(dtype="float64", seed=0):
    keras.utils.set_random_seed(seed)
    with _Policy(dtype):
        return keras.Sequential([
            keras.Input((6, 6, 1), dtype=dtype),
            keras.layers.Conv2D(3, 3, activation="tanh", name="conv"),
            keras.layers.MaxPooling2D(2, name="pool"),
            keras.layers.Flatten(name="flat"),
            _dense(3, name="out"),
        ], name="cnn")


def batchnorm(dtype="float64", seed=0):
    keras.utils.set_random_seed(seed)
    with _Policy(dtype):
        model = keras.Sequential([
            keras.Input((4,), dtype=dtype),
            _dense(5, name="hidden"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Activation("tanh"),
            keras.layers.Dropout(0.5, name="drop"),
            _dense(3, name="out"),
        ], name="bnmodel")
    bn = model.get_layer("bn")
    rng = np.random.default_rng(seed)
    bn.moving_mean.assign(rng.normal(size=5))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=5))
    bn.gamma.assign(rng.uniform(0.5, 1.5, size=5))
    bn.beta.assign(rng.normal(size=5) * 0.1)
    return model


def two_inputs(dtype="float64", seed=0):
    keras.utils.set_random_seed(seed)
    with _Policy(dtype):
        a = keras.Input((3,), dtype=dtype, name="a")
        b = keras.Input((2,), dtype=dtype, name="b")
        h = keras.layers.Concatenate()([_dense(4, "tanh", "ha")(a), b])
        out = _dense(3, name="out")(h)
        return keras.Model([a, b], out, name="two_inputs")


def two_outputs(dtype="float64", seed=0):
    keras.utils.set_random_seed(seed)
    with _Policy(dtype):
        x = keras.Input((4,), dtype=dtype, name="x")
        h = _dense(4, "tanh", "shared")(x)
        first = _dense(2, name="first")(h)
        second = _dense(1, name="second")(h)
        return keras.Model(x, [first, second], name="two_outputs")


class _Policy:
    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.old = keras.config.dtype_policy()
        keras.config.set_dtype_policy(self.dtype)

    def __exit__(self, *exc):
        keras.config.set_dtype_policy(self.old)


def batch_for(model, n=7, seed=1, classes=None, regression=False):
    """Inputs, labels and weights that fit ``model`` (labels per output)."""
    rng = np.random.default_rng(seed)
    inputs = [rng.normal(size=(n, *[int(d) for d in t.shape[1:]])) for t in model.inputs]
    labels = []
    for out in model.outputs:
        width = int(np.prod(out.shape[1:]))
        if regression:
            labels.append(rng.normal(size=(n, width)))
        elif classes == "onehot":
            labels.append(np.eye(width)[rng.integers(0, width, n)])
        elif classes == "binary":
            labels.append(rng.integers(0, 2, size=(n, width)).astype(np.float64))
        else:
            labels.append(rng.integers(0, width, n))
    weights = rng.uniform(0.5, 2.0, size=n)
    return inputs, labels, weights


def reference(model, loss, inputs, labels, weights):
    """Dense float64 sums: loss, gradient, Hessian, Fisher and GGN diagonals.

    Returns numbers summed over examples with weights (divide by sum(weights) for means).
    """
    variables = model.trainable_variables
    x = [tf.constant(a, tf.float64) for a in inputs]
    y = [tf.constant(a) for a in labels]
    s = tf.constant(weights, tf.float64)

    def outputs(xs):
        out = model(xs[0] if len(xs) == 1 else xs, training=False)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def flat(ts):
        return tf.concat([tf.reshape(t, [-1]) for t in ts], 0)

    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            total = tf.reduce_sum(s * loss(y, outputs(x)))
        grad = flat(inner.gradient(total, variables))
    hessian = outer.jacobian(grad, variables)
    P = int(grad.shape[0])
    hessian = np.concatenate([tf.reshape(h, [P, -1]).numpy() for h in hessian], axis=1)
    fisher = np.zeros(P)
    ggn = np.zeros((P, P))
    for i in range(len(weights)):
        xi = [t[i:i + 1] for t in x]
        yi = [t[i:i + 1] for t in y]
        with tf.GradientTape(persistent=True) as tape:
            outs = outputs(xi)
            f = tf.concat([tf.reshape(o, [-1]) for o in outs], 0)
            li = tf.reduce_sum(loss(yi, outs))
        g = flat(tape.gradient(li, variables)).numpy()
        fisher += weights[i] * g * g
        jac = tape.jacobian(f, variables)
        J = np.concatenate([tf.reshape(j, [int(f.shape[0]), -1]).numpy() for j in jac], axis=1)
        shapes = [o.shape for o in outs]
        sizes = [int(np.prod(sh)) for sh in shapes]

        fv = tf.Variable(f)
        with tf.GradientTape() as t2:
            with tf.GradientTape() as t1:
                parts = tf.split(fv, sizes)
                li2 = tf.reduce_sum(loss(yi, [tf.reshape(p, sh) for p, sh in zip(parts, shapes)]))
            d1 = t1.gradient(li2, fv)
        lam = t2.jacobian(d1, fv).numpy()
        ggn += weights[i] * J.T @ lam @ J
        del tape
    return SimpleNamespace(loss=float(total.numpy()), gradient=grad.numpy(), hessian=hessian,
                           fisher=fisher, ggn=ggn, weight_sum=float(np.sum(weights)))


MODELS = {"mlp": mlp, "cnn": cnn, "batchnorm": batchnorm, "two_inputs": two_inputs, "two_outputs": two_outputs}


def resolved(name, **options):
    return resolve_loss(loss_spec(name, **options))
MODELS["mlp_softmax"] = lambda dtype="float64", seed=0: mlp(dtype, seed, activation="softmax")
