"""What the report tests share: PNG sizes read from their headers, a report's images, and a
published run of diagonals only (no Ray, no TensorFlow) to draw."""

from __future__ import annotations

import os
import re
import struct

import numpy as np

from pipeline.read.report import PLOT_PIXELS
from pipeline.storage import tables
from pipeline.storage.publish import RunPublisher


def png_size(path) -> tuple[int, int]:
    """Width and height from the PNG header (signature, then the IHDR chunk)."""
    with open(path, "rb") as handle:
        head = handle.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", path
    return struct.unpack(">II", head[16:24])


def image_sources(html_path) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', open(html_path, encoding="utf-8").read())


def check_plots(out_dir, names):
    for name in names:
        path = os.path.join(out_dir, name)
        assert os.path.getsize(path) > 5000, name  # a drawn plot, not an empty canvas
        assert png_size(path) == PLOT_PIXELS, name


def synthetic_run(root, values: np.ndarray, quantities=("hessian_diagonal",)) -> str:
    """A published run holding only diagonals (no Ray, no TensorFlow)."""
    shapes = [(len(values),)]
    columns = {q: values for q in quantities}
    manifest = {"run_id": "synthetic", "date": "2026-01-01", "status": "complete", "examples": 1, "loss": 0.0,
                "parameters": len(values), "job": {"name": "synthetic", "quantities": {q: {} for q in quantities}},
                "variables": [{"name": "w", "shape": [len(values)]}]}
    with RunPublisher(str(root), "synthetic", "synthetic", "2026-01-01") as publisher:
        publisher.write_table("diagonals.parquet", tables.diagonals_table(["w"], shapes, columns), {})
        publisher.write_table("summary.parquet", tables.summary_table(["w"], shapes, columns), {})
        return publisher.publish(manifest)
