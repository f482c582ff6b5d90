"""The bundled image examples: the digits of ``pipeline.examples.digits`` stored as PNG bytes.

Real image datasets are kept as encoded files, not as columns of floats. This module makes the
same 4,000 8x8 digits as the bundled example, quantised to 8-bit grey levels and encoded as
PNG, twice (``python -m pipeline.examples.images jobs/example``):

- ``images/part-*.parquet``: a binary column ``png`` and an int64 column ``label``;
- ``records/part-*.tfrecord.gz``: the same rows as GZIP TFRecord files of ``tf.train.Example``
  (features ``png``: bytes, ``label``: int64).

``decode`` is the jobs' ``data.transform``: it decodes each row's PNG and scales it to [0, 1]
as the bundled model was trained (``jobs/images.yaml``, ``jobs/records.yaml``).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import tensorflow as tf

from pipeline.examples.digits import make_data
from pipeline.storage.dataset import write_columns

PARQUET_FILES = 4
RECORD_FILES = 2


def decode(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``data.transform``: adds ``pixels`` [B, 8, 8, 1] float32 in [0, 1] from the ``png`` bytes.

    Each row is decoded on its own (``tf.io.decode_png``) and divided by 255, so a row's pixels
    never depend on the other rows of its batch.
    """
    pixels = np.stack([tf.io.decode_png(png, channels=1).numpy() for png in batch["png"]])
    return {**batch, "pixels": pixels.astype(np.float32) / np.float32(255)}


def quantised(pixels: np.ndarray) -> np.ndarray:
    """The 8-bit grey levels [rows, 8, 8, 1] uint8 that the PNGs hold."""
    return np.round(np.asarray(pixels).reshape(-1, 8, 8, 1) * 255).astype(np.uint8)


def encode(levels: np.ndarray) -> list[bytes]:
    """One PNG (bytes) per image of ``levels`` [rows, 8, 8, 1] uint8."""
    return [tf.io.encode_png(image).numpy() for image in levels]


def write_parquet(folder: str, pngs: list[bytes], labels: np.ndarray, files: int = PARQUET_FILES) -> None:
    """``folder/part-0000.parquet``, ...: columns ``png`` (binary) and ``label`` (int64)."""
    png = np.empty(len(pngs), dtype=object)
    png[:] = pngs
    write_columns(folder, {"png": png, "label": np.asarray(labels, np.int64)}, files, row_group_size=250)


def write_records(folder: str, columns: dict[str, np.ndarray | list], files: int = RECORD_FILES,
                  gzip: bool = True) -> None:
    """``folder/part-0000.tfrecord[.gz]``, ...: one ``tf.train.Example`` per row of ``columns``
    (bytes values as bytes_list, integers as int64_list, floats as float_list; a row that is an
    array becomes a list of its values in C order)."""
    os.makedirs(folder, exist_ok=True)
    rows = len(next(iter(columns.values())))
    suffix = ".tfrecord.gz" if gzip else ".tfrecord"
    for index, part in enumerate(np.array_split(np.arange(rows), files)):
        path = os.path.join(folder, f"part-{index:04d}{suffix}")
        with tf.io.TFRecordWriter(path, options="GZIP" if gzip else None) as writer:
            for i in part:
                features = {name: _feature(values[i]) for name, values in columns.items()}
                writer.write(tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString())


def _feature(value) -> tf.train.Feature:
    if isinstance(value, bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    array = np.asarray(value).reshape(-1)
    if array.dtype.kind in "SO":
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[bytes(v) for v in array]))
    if array.dtype.kind in "iub":
        return tf.train.Feature(int64_list=tf.train.Int64List(value=array.astype(np.int64)))
    return tf.train.Feature(float_list=tf.train.FloatList(value=array.astype(np.float32)))


def build(folder: str) -> None:
    """Writes ``folder/images/`` (Parquet) and ``folder/records/`` (GZIP TFRecord)."""
    pixels, labels, _ = make_data()
    pngs = encode(quantised(pixels))
    write_parquet(os.path.join(folder, "images"), pngs, labels)
    write_records(os.path.join(folder, "records"), {"png": pngs, "label": labels})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="jobs/example")
    build(parser.parse_args().folder)


if __name__ == "__main__":
    main()
