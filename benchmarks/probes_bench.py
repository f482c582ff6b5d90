"""Hutchinson diagonal memory against the number of probes: peak worker and driver memory of
real runs with K = 10, 100 and 1,000 probes, in one run of this script.

Run from the repository root::

    python benchmarks/probes_bench.py                 # about 2 minutes on 2 CPU cores
    python benchmarks/probes_bench.py --probes 10,100 --rows 32   # quicker

The model is the scale issue's CNN (32x32x3 inputs; Conv2D 32, 64, 64 3x3 relu with max
pooling, 'same' padding, Dense 128, Dense 10; 582,026 parameters, random weights), saved as a ``.keras``
file; the data are ``--rows`` random images in a Parquet file. Each K runs the command line
(``hessian-pipeline run``, one worker) and prints, from the run's ``manifest.json``: passes,
wall time, and the peak resident memory of the worker and of the driver beside the plan's
estimate. The probes go in passes of ``probes_per_pass`` (auto: 64 MiB of per-probe sums, at
most 14 probes here, shared out evenly), so the peaks should stay within about 10% of each
other while the time grows with K.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before Keras imports TensorFlow (in _cnn)


def _cnn():
    import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    return keras.Sequential([
        keras.Input((32, 32, 3), name="image"),
        layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1"), layers.MaxPooling2D(name="pool1"),
        layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2"), layers.MaxPooling2D(name="pool2"),
        layers.Conv2D(64, 3, padding="same", activation="relu", name="conv3"),
        layers.Flatten(name="flatten"),
        layers.Dense(128, activation="relu", name="dense"), layers.Dense(10, name="logits"),
    ], name="cnn")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", default="10,100,1000", help="comma-separated K values")
    parser.add_argument("--rows", type=int, default=64, help="rows of data (one batch)")
    args = parser.parse_args()
    from pipeline.storage.dataset import write_columns

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    with tempfile.TemporaryDirectory() as folder:
        model = _cnn()
        model.save(os.path.join(folder, "model.keras"))
        parameters = model.count_params()
        rng = np.random.default_rng(0)
        write_columns(os.path.join(folder, "data"), {
            "image": rng.uniform(0, 1, size=(args.rows, 32 * 32 * 3)).astype(np.float32),
            "label": rng.integers(0, 10, args.rows)})
        job = {"name": "probes", "model": "model.keras",
               "loss": {"name": "sparse_categorical_crossentropy", "from_logits": True},
               "data": {"path": "data", "features": "image", "labels": "label", "batch_size": args.rows},
               "workers": 1, "shards": 1, "quantities": {"hessian_diagonal": {"method": "hutchinson"}},
               "output": "out"}
        path = os.path.join(folder, "job.yaml")
        with open(path, "w", encoding="utf-8") as handle:
            yaml.safe_dump(job, handle)
        print(f"CNN of {parameters:,} parameters, {args.rows} rows, one worker")
        print(f"{'K':>6} {'passes':>7} {'wall s':>8} {'worker peak':>12} {'(plan)':>9} {'driver peak':>12} "
              f"{'(plan)':>9}")
        peaks = []
        for k in [int(p) for p in args.probes.split(",")]:
            done = subprocess.run([sys.executable, "-m", "pipeline", "run", path, "--set",
                                   f"quantities.hessian_diagonal.probes={k}"], capture_output=True, text=True,
                                  env=env, cwd=ROOT)
            if done.returncode != 0:
                print(done.stderr)
                return 1
            with open(os.path.join(done.stdout.strip().splitlines()[-1], "manifest.json"), encoding="utf-8") as f:
                manifest = json.load(f)
            memory, estimate = manifest["memory"], manifest["estimate"]
            worker = max(memory["worker_peak_bytes"])
            peaks.append(worker)
            mib = 1 << 20
            print(f"{k:>6} {manifest['passes']:>7} {manifest['seconds']:>8.1f} {worker / mib:>9,.0f} MiB "
                  f"{estimate['worker_bytes'] / mib:>5,.0f} MiB {memory['driver_peak_bytes'] / mib:>9,.0f} MiB "
                  f"{estimate['driver_bytes'] / mib:>5,.0f} MiB")
        print(f"largest worker peak / smallest: {max(peaks) / min(peaks):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
