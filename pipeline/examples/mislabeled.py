"""A worked example of per-example outputs and influence (contract 7): finding mislabeled rows.

``python -m pipeline.examples.mislabeled OUT_DIR`` builds the bundled digits (``pipeline.examples.
digits``: 4,000 synthetic 8x8 digits and 100 more rows from the same generator as held-out
queries), flips the labels of 5% of the training rows (seeded; the flipped rows are written to
``OUT_DIR/flipped.json``), trains the digits MLP on the flipped labels as ``digits.build`` trains
(Adam 0.01, batch 64, 8 epochs), and runs a job asking

    per_example: {}
    influence: {curvature: ekfac, self: true, queries: <the 100 held-out rows>, top_k: 10}

through ``pipeline.run``. It then counts the flipped rows among the top 5% of the training rows
by ``self_influence`` (``g_i^T (C + lambda I)^-1 g_i``), by ``loss`` and by ``gradient_norm``
alone, beside what a random 5% holds on average, and prints the counts as a Markdown table.
About a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from pipeline.examples import digits
from pipeline.storage.dataset import write_columns

QUERIES = 100
FRACTION = 0.05
RANKINGS = (("self_influence", "self-influence (EK-FAC)"), ("loss", "loss"), ("gradient_norm", "gradient norm"))


def flip(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(flipped labels, the flipped rows sorted)``: ``fraction`` of the rows, each given one of
    the nine other classes at random."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(labels), size=int(round(fraction * len(labels))), replace=False))
    out = labels.copy()
    out[rows] = (labels[rows] + rng.integers(1, 10, size=len(rows))) % 10
    return out, rows


def build(folder: str, rows: int = digits.ROWS, queries: int = QUERIES, fraction: float = FRACTION,
          epochs: int = 8, seed: int = 1) -> np.ndarray:
    """Writes ``folder/model.keras`` (trained on the flipped labels), ``folder/data/`` (training
    rows with the flipped labels), ``folder/queries/`` (held-out rows, true labels) and
    ``folder/flipped.json``; returns the flipped rows."""
    import keras  # lazy: the counting helpers and the command line's --help need no TensorFlow

    os.makedirs(folder, exist_ok=True)
    # One draw of rows + queries: the same prototypes (the generator draws them first).
    pixels, labels, weights = digits.make_data(rows + queries)
    train_labels, flipped = flip(labels[:rows], fraction, seed)
    model = digits.make_model()
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(pixels[:rows].reshape(-1, 8, 8, 1), train_labels, batch_size=64, epochs=epochs, verbose=0,
              shuffle=False)
    model.save(os.path.join(folder, "model.keras"))
    digits.write_dataset(os.path.join(folder, "data"), pixels[:rows], train_labels, weights[:rows])
    write_columns(os.path.join(folder, "queries"), {"pixels": pixels[rows:], "label": labels[rows:]}, 1, 250)
    with open(os.path.join(folder, "flipped.json"), "w", encoding="utf-8") as handle:
        json.dump({"seed": seed, "fraction": fraction, "rows": flipped.tolist()}, handle)
    return flipped


def job(folder: str) -> dict:
    """The job mapping over ``build``'s files."""
    return {
        "name": "mislabeled",
        "model": os.path.join(folder, "model.keras"),
        "loss": {"name": "sparse_categorical_crossentropy", "from_logits": True},
        "data": {"path": os.path.join(folder, "data"), "features": "pixels", "labels": "label", "batch_size": 256},
        "precision": "float32",
        "quantities": {
            "per_example": {},
            "influence": {"curvature": "ekfac", "self": True, "top_k": 10,
                          "queries": {"path": os.path.join(folder, "queries"), "features": "pixels",
                                      "labels": "label"}},
        },
        "output": os.path.join(folder, "results"),
    }


def counts(per_example, flipped: np.ndarray, fraction: float = FRACTION) -> list[dict]:
    """Per ranking, the flipped rows among the top ``fraction`` of the rows (largest first, ties to
    the smaller row), then a random pick's expected count."""
    rows = np.asarray(per_example["row"])
    top = int(round(fraction * len(rows)))
    wrong = np.isin(rows, flipped)
    out = []
    for column, name in RANKINGS:
        values = np.asarray(per_example[column], np.float64)
        order = np.lexsort((rows, -values))[:top]
        out.append({"ranking": name, "column": column, "top": top, "flipped": int(wrong[order].sum())})
    out.append({"ranking": "a random pick (expected)", "column": None, "top": top,
                "flipped": float(top * wrong.mean())})
    return out


def table(found: list[dict], total: int) -> str:
    """The counts as a Markdown table."""
    lines = [f"| top {found[0]['top']:,} rows by | flipped rows among them | share of the {total} flipped rows |",
             "|---|---|---|"]
    for entry in found:
        value = entry["flipped"]
        shown = f"{value:.1f}" if isinstance(value, float) else f"{value}"
        lines.append(f"| {entry['ranking']} | {shown} | {value / total:.0%} |")
    return "\n".join(lines)


def run_example(folder: str, rows: int = digits.ROWS, queries: int = QUERIES, stream=None, **options) -> dict:
    """Builds, runs and counts; returns ``{"flipped", "counts", "table", "run_dir"}``."""
    import pipeline  # lazy: as in build
    from pipeline.job import load_job  # lazy: as in build

    flipped = build(folder, rows, queries, **options)
    published = pipeline.run(load_job(job(folder)), run_id="mislabeled", stream=stream or open(os.devnull, "w"))
    per_example = pipeline.load(published.run_dir).per_example(
        columns=["row", "loss", "gradient_norm", "self_influence"]).to_pydict()
    found = counts(per_example, flipped)
    return {"flipped": flipped, "counts": found, "table": table(found, len(flipped)), "run_dir": published.run_dir}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="where the data, the model and the run go (OUT_DIR)")
    parser.add_argument("--rows", type=int, default=digits.ROWS, help="training rows (default 4,000)")
    parser.add_argument("--queries", type=int, default=QUERIES, help="held-out query rows (default 100)")
    args = parser.parse_args(argv)
    from pipeline import quiet  # lazy: TensorFlow's noise is silenced before anything imports it

    quiet.import_tensorflow()
    result = run_example(args.folder, args.rows, args.queries, stream=sys.stderr)
    print(f"{len(result['flipped'])} of {args.rows:,} training labels flipped (seed 1; rows in "
          f"{os.path.join(args.folder, 'flipped.json')}); run {result['run_dir']}\n")
    print(result["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
