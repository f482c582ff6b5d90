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


def write_bare_data(folder, rows: int, cut: int, row_group: int, seed: int, checksum: bool = False):
    """Two files (rows ``[0, cut)`` and ``[cut, rows)``) of features ``x`` (6 wide) and int
    ``label`` with no statistics, dictionary or compression, so that one stored value can change,
    or be damaged, without the footer noticing (page checksums only with ``checksum``). Returns
    ``(x, labels)``."""
    rng = np.random.default_rng(seed)
    x, labels = rng.normal(size=(rows, 6)), rng.integers(0, 3, rows)
    os.makedirs(folder, exist_ok=True)
    for index, part in enumerate((slice(0, cut), slice(cut, rows))):
        table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x[part].ravel()), 6),
                          "label": pa.array(labels[part])})
        pq.write_table(table, os.path.join(folder, f"part-{index:03d}.parquet"), row_group_size=row_group,
                       write_statistics=False, use_dictionary=False, compression="NONE", write_page_checksum=checksum)
    return x, labels


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
