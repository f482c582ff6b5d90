"""Real files for end-to-end tests: a saved Keras model, Parquet data, a job mapping."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import cases


def write_data(folder, rows=230, files=3, row_group=17, seed=0, width=6, classes=3):
    """Features ``x`` (fixed-size list of ``width``), int ``label`` and float ``weight``,
    split unevenly over ``files`` files with small row groups."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, width))
    labels = rng.integers(0, classes, rows)
    weights = rng.uniform(0.5, 2.0, rows)
    os.makedirs(folder, exist_ok=True)
    cuts = np.sort(rng.choice(np.arange(1, rows), size=files - 1, replace=False))
    for index, part in enumerate(np.split(np.arange(rows), cuts)):
        table = pa.table({
            "x": pa.FixedSizeListArray.from_arrays(pa.array(x[part].ravel()), width),
            "label": pa.array(labels[part]),
            "weight": pa.array(weights[part]),
        })
        pq.write_table(table, os.path.join(folder, f"part-{index:03d}.parquet"), row_group_size=row_group)
    return x, labels, weights


def write_model(path, dtype="float32"):
    model = cases.mlp(dtype=dtype)
    model.save(path)
    return model


def job(tmp_path, quantities, **extra):
    """A job mapping over the data and model written under ``tmp_path``."""
    data = extra.pop("data", {})
    spec = {
        "name": "test-job",
        "model": str(tmp_path / "model.keras"),
        "loss": {"name": "sparse_categorical_crossentropy", "from_logits": True},
        "data": {"path": str(tmp_path / "data"), "features": "x", "labels": "label", "batch_size": 32, **data},
        "precision": "float64",
        "quantities": quantities,
        "output": str(tmp_path / "results"),
    }
    spec.update(extra)
    return spec
