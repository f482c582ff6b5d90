"""Makes the bundled example: synthetic 8x8 "digits", a trained 64-32-10 MLP, Parquet files.

The result ships in ``jobs/example/`` so the quick start needs no download; this module is
how it was made (``python -m pipeline.examples.digits jobs/example``). The images are ten
smooth random prototypes plus noise, so the classes overlap a little and the trained model
has a non-trivial, well-conditioned Hessian. The model has 2,410 parameters, small enough
for an exact Hessian diagonal.
"""

from __future__ import annotations

import argparse
import os

import keras
import numpy as np

from pipeline.storage.dataset import write_columns

ROWS = 4000
FILES = 4
ROW_GROUP = 250


def make_data(rows: int = ROWS, seed: int = 0):
    """Pixels [rows, 64] float32 in [0, 1], labels [rows] int64, weights [rows] float64."""
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0, 1, size=(10, 10, 10))
    kernel = np.array([0.25, 0.5, 0.25])
    for axis in (1, 2):  # smooth, then crop to 8x8: digit-like blobs
        prototypes = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="same"), axis, prototypes)
    prototypes = prototypes[:, 1:9, 1:9].reshape(10, 64)
    prototypes = (prototypes - prototypes.min()) / (prototypes.max() - prototypes.min())
    labels = rng.integers(0, 10, size=rows)
    pixels = np.clip(prototypes[labels] + rng.normal(0, 0.25, size=(rows, 64)), 0, 1).astype(np.float32)
    weights = rng.uniform(0.5, 1.5, size=rows)
    return pixels, labels.astype(np.int64), weights


def make_model(seed: int = 0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((8, 8, 1), name="pixels"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(32, activation="tanh", name="hidden"),
        keras.layers.Dense(10, name="logits"),
    ], name="digits_mlp")


def write_dataset(folder: str, pixels, labels, weights) -> None:
    write_columns(folder, {"pixels": pixels, "label": labels, "weight": weights}, FILES, ROW_GROUP)


def build(folder: str, epochs: int = 8) -> None:
    """Writes ``folder/model.keras`` and ``folder/data/part-*.parquet``."""
    os.makedirs(folder, exist_ok=True)
    pixels, labels, weights = make_data()
    model = make_model()
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(pixels.reshape(-1, 8, 8, 1), labels, batch_size=64, epochs=epochs, verbose=0, shuffle=False)
    model.save(os.path.join(folder, "model.keras"))
    write_dataset(os.path.join(folder, "data"), pixels, labels, weights)


def checkpoints(folder: str, count: int = 5, steps: int = 20, learning_rate: float = 0.05) -> list[str]:
    """A nightly series: the bundled model (``folder/model.keras``) trained ``steps`` more SGD
    steps (batch 64, plain SGD with ``learning_rate``) before each of ``count`` checkpoints,
    written to ``folder/checkpoints/night-KK.keras``; returns their paths. Deterministic."""
    pixels, labels, _ = make_data()
    keras.utils.set_random_seed(1)
    model = keras.models.load_model(os.path.join(folder, "model.keras"), compile=False)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    out = os.path.join(folder, "checkpoints")
    os.makedirs(out, exist_ok=True)
    paths = []
    for night in range(1, count + 1):
        start = ((night - 1) * steps * 64) % len(labels)
        rows = np.arange(start, start + steps * 64) % len(labels)
        model.fit(pixels[rows].reshape(-1, 8, 8, 1), labels[rows], batch_size=64, epochs=1, verbose=0, shuffle=False)
        paths.append(os.path.join(out, f"night-{night:02d}.keras"))
        model.save(paths[-1])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="jobs/example")
    parser.add_argument("--checkpoints", type=int, metavar="N",
                        help="instead: write N checkpoints of the folder's model, each trained a few more steps")
    args = parser.parse_args()
    if args.checkpoints:
        for path in checkpoints(args.folder, args.checkpoints):
            print(path)
    else:
        build(args.folder)


if __name__ == "__main__":
    main()
