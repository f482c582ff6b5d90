"""Every quantity on a model of more than 5 million parameters: what the plan estimated against
what the run measured (time, peak memory of the worker and the driver), or the plan's refusal.

Run from the repository root::

    python benchmarks/large_bench.py                    # about 15 minutes on 2 CPU cores
    python benchmarks/large_bench.py --only fisher_diagonal,ggn_mc --rows 32   # a few

The model is a ResNet-style CNN with random weights (32x32x3 inputs; a 3x3 stem, three stages
of two residual blocks of two 3x3 convolutions with BatchNormalization, 64/128/256 filters,
a fourth of one block with 512, strided 1x1 shortcuts between stages, global average pooling,
Dense 10: 6.4M parameters), saved as a ``.keras`` file; the data are ``--rows`` random images in a Parquet
file. Each quantity runs alone through the command line (``hessian-pipeline run``, one worker,
one shard) and the script prints, from the run's ``manifest.json``, passes, the plan's time
estimate beside the run's compute time, and the peak resident memory of the worker and of the
driver beside the plan's estimates; a quantity the plan refuses (the exact Hessian diagonal:
5M HVPs per batch; the dense Hessian) prints its one-line refusal. The issue's target for the
estimates is "within 2x of the measured run".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (label, quantities entry); each runs alone.
QUANTITIES = [
    ("gradient", {"gradient": {}}),
    ("fisher_diagonal", {"fisher_diagonal": {}}),
    ("ggn_exact", {"ggn_diagonal": {"method": "exact"}}),
    ("ggn_mc", {"ggn_diagonal": {"method": "mc", "samples": 1}}),
    ("hutchinson_10", {"hessian_diagonal": {"method": "hutchinson", "probes": 10}}),
    ("hvp_4", {"hvp": {"random": 4}}),
    ("trace_hutchpp_12", {"trace": {"method": "hutch++", "probes": 12}}),
    ("eigenvalues_top2", {"eigenvalues": {"top": 2, "iterations": 8}}),
    ("spectrum_1x8", {"spectrum": {"runs": 1, "steps": 8}}),
    ("hessian_diagonal_exact", {"hessian_diagonal": {"method": "exact"}}),
    ("hessian_full", {"hessian": {}}),
]


def _resnet():
    import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers

    def block(h, filters, stride):
        shortcut = h
        h = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(h)
        h = layers.Activation("relu")(layers.BatchNormalization()(h))
        h = layers.Conv2D(filters, 3, padding="same", use_bias=False)(h)
        h = layers.BatchNormalization()(h)
        if stride != 1 or shortcut.shape[-1] != filters:
            shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False)(shortcut)
        return layers.Activation("relu")(layers.Add()([h, shortcut]))

    x = keras.Input((32, 32, 3), name="image")
    h = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    for filters, stride, blocks in ((64, 1, 2), (128, 2, 2), (256, 2, 2), (512, 2, 1)):
        h = block(h, filters, stride)
        for _ in range(blocks - 1):
            h = block(h, filters, 1)
    h = layers.GlobalAveragePooling2D()(h)
    return keras.Model(x, layers.Dense(10, name="logits")(h), name="resnet")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64, help="rows of data")
    parser.add_argument("--batch", type=int, default=32, help="data.batch_size")
    parser.add_argument("--only", default="", help="comma-separated labels of the quantities to run")
    args = parser.parse_args()
    from pipeline.storage.dataset import write_columns

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    chosen = [q for q in QUANTITIES if not args.only or q[0] in args.only.split(",")]
    mib = 1 << 20
    with tempfile.TemporaryDirectory() as folder:
        model = _resnet()
        model.save(os.path.join(folder, "model.keras"))
        rng = np.random.default_rng(0)
        write_columns(os.path.join(folder, "data"), {
            "image": rng.uniform(0, 1, size=(args.rows, 32 * 32 * 3)).astype(np.float32),
            "label": rng.integers(0, 10, args.rows)})
        print(f"ResNet-style CNN of {model.count_params():,} parameters ({sum(int(np.prod(v.shape)) for v in model.trainable_variables):,} "
              f"trainable), {args.rows} rows in batches of {args.batch}, one worker")
        print(f"{'quantity':<24} {'passes':>6} {'run s':>7} {'plan s':>7} {'worker peak':>12} {'(plan)':>10} "
              f"{'driver peak':>12} {'(plan)':>10}")
        for label, quantities in chosen:
            job = {"name": label, "model": "model.keras",
                   "loss": {"name": "sparse_categorical_crossentropy", "from_logits": True},
                   "data": {"path": "data", "features": "image", "labels": "label", "batch_size": args.batch},
                   "workers": 1, "shards": 1, "quantities": quantities, "output": "out"}
            path = os.path.join(folder, f"{label}.yaml")
            with open(path, "w", encoding="utf-8") as handle:
                yaml.safe_dump(job, handle)
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "pipeline", "run", path], capture_output=True, text=True,
                                  env=env, cwd=folder)
            wall = time.perf_counter() - started
            if done.returncode == 2:
                print(f"{label:<24} refused by the plan ({wall:.0f} s): {done.stderr.strip()[:300]}")
                continue
            if done.returncode != 0:
                print(f"{label:<24} FAILED (exit {done.returncode}): {done.stderr.strip()[-500:]}")
                return 1
            with open(os.path.join(done.stdout.strip().splitlines()[-1], "manifest.json"), encoding="utf-8") as f:
                manifest = json.load(f)
            memory, estimate = manifest["memory"], manifest["estimate"]
            print(f"{label:<24} {manifest['passes']:>6} {manifest['seconds']:>7.1f} {estimate['seconds']:>7.1f} "
                  f"{max(memory['worker_peak_bytes']) / mib:>8,.0f} MiB {estimate['worker_bytes'] / mib:>6,.0f} MiB "
                  f"{memory['driver_peak_bytes'] / mib:>8,.0f} MiB {estimate['driver_bytes'] / mib:>6,.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
