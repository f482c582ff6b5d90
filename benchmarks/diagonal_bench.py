"""The exact Hessian diagonal's two routes, in plain gradients, measured in one run.

Run from the repository root::

    python benchmarks/diagonal_bench.py            # about two minutes on 2 CPU cores
    python benchmarks/diagonal_bench.py --quick    # fewer repetitions

``pfor`` cannot vectorise the ``while`` loops of recurrent layers, so the engine forms the exact
diagonal of such models by TensorFlow's ``while_loop`` Jacobian of blocks of the gradient
("loop": one backward pass per parameter).
On models where both routes work (an MLP, a CNN) this prints the loop's time over the
vectorised route's (target: within 3x), and for an LSTM tagger the loop's time over a plain
compiled gradient on the same batch (its cost is about P backward passes). The two routes'
diagonals must agree (float32 tolerance) before anything is timed. Ratios are medians of
paired timings (each repetition times both members back to back).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from types import SimpleNamespace

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import _common  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from pipeline.curvature.engine import CurvatureEngine  # noqa: E402
from pipeline.curvature.losses import resolve_loss  # noqa: E402
from pipeline.curvature.requests import BatchWork  # noqa: E402

LOSS = resolve_loss(SimpleNamespace(name="sparse_categorical_crossentropy", options={"from_logits": True},
                                    function=None))


def mlp():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="tanh"), keras.layers.Dense(10)])


def cnn():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, activation="tanh"),
                             keras.layers.MaxPooling2D(2), keras.layers.Flatten(), keras.layers.Dense(10)])


def tagger():
    keras.utils.set_random_seed(0)
    tokens = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(50, 8, mask_zero=True)(tokens)
    h = keras.layers.LSTM(8, return_sequences=True)(h)
    return keras.Model(tokens, keras.layers.Dense(5)(h))


def batch(model, n, rng):
    if model.inputs[0].dtype == "int32":
        x = rng.integers(1, 50, size=(n, 12))
        x[:, 9:] = 0
        return [x], [rng.integers(0, 5, size=(n, 12))]
    return [rng.normal(size=(n, *model.inputs[0].shape[1:])).astype("float32")], [rng.integers(0, 10, n)]


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    env = _common.environment(args.quick)
    _common.print_header("exact-diagonal routes", env, " (3 repetitions)")
    repetitions = 3 if args.quick else 7
    rng = np.random.default_rng(0)
    work = BatchWork(gradient=False, hessian_diagonal="exact")
    plain = BatchWork(gradient=True)
    for name, build, n in (("MLP 64-32-10", mlp, 128), ("CNN 8x8 conv8", cnn, 128), ("LSTM tagger", tagger, 32)):
        model = build()
        x, y = batch(model, n, rng)
        rows = np.arange(n)
        loop = CurvatureEngine(model, LOSS, route="loop")
        vectorised = CurvatureEngine(model, LOSS)
        reference = loop.partial(x, y, None, rows, work).sums["hessian_diagonal"]  # traces, untimed
        route = vectorised.vectorisation_routes(x, y)[0]
        other = vectorised.partial(x, y, None, rows, plain if route == "loop" else work)
        if route == "vectorised":
            np.testing.assert_allclose(other.sums["hessian_diagonal"], reference,
                                       atol=2e-4 * np.abs(reference).max())
        ratios = []
        for _ in range(repetitions):
            t_loop = timed(lambda: loop.partial(x, y, None, rows, work))
            if route == "vectorised":
                t_other = timed(lambda: vectorised.partial(x, y, None, rows, work))
            else:
                t_other = timed(lambda: vectorised.partial(x, y, None, rows, plain))
            ratios.append(t_loop / t_other)
        ratio = statistics.median(ratios)
        if route == "vectorised":
            print(f"  {name:14s} P={loop.parameters:6,d}  loop / vectorised = {ratio:5.2f}x   "
                  f"(target <= 3x: {_common.verdict(ratio <= 3.0)})")
        else:
            print(f"  {name:14s} P={loop.parameters:6,d}  route {route}; loop / one gradient = {ratio:7.1f}x "
                  f"({ratio / loop.parameters:.2f} gradients per parameter)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
