"""Per-block spectra side by side against one block after another, on the bundled example.

Run from the repository root::

    python benchmarks/blocks_bench.py            # all 4,000 rows (about a minute on 2 CPU cores)
    python benchmarks/blocks_bench.py --quick    # first 1,024 rows

The bundled example's model (64-32-10 MLP, P = 2,410) and data, in this process (no Ray): a
pass over the data is ``CurvatureEngine.partial`` with ``hvp_vectors`` on every batch of 256,
summed and divided by the rows, as a worker would. For ``blocks: layer`` (2 blocks) and
``blocks: variable`` (4 blocks), each of ``eigenvalues`` (top 3 largest, tol 1e-5, at most 30
iterations), ``trace`` (hutch++, 30 products) and ``spectrum`` (2 runs of 16 steps) is run

(a) side by side (``pipeline.spectrum.side_by_side``: one pass carries every block's vectors),
(b) one block after another (``pipeline.spectrum.drive`` on each block's own operator, each
    pass sending that block's vectors alone, still embedded in all P parameters),

and the script prints passes over the data and seconds of each (the second of two runs: the
engine traces one HVP function per number of vectors in a pass, which on 4,000 rows would
outweigh the passes themselves), the ratio (b)/(a), and the
largest difference between their results (they run the same algorithm on the same blocks
with the same seeds, so it must be at rounding level: the exit status is 1 otherwise).
Nothing is asserted about time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

import _common  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

BATCH = 256


def example(limit: int | None):
    """The example's engine and its batches ``(inputs, labels, rows)``."""
    from pipeline.curvature.engine import CurvatureEngine
    from pipeline.curvature.losses import resolve_loss
    from pipeline.curvature.model import load_model
    from pipeline.job import load_job

    job = load_job(os.path.join(ROOT, "jobs", "example.yaml"))
    engine = CurvatureEngine(load_model(job.model), resolve_loss(job.loss), precision="float32")
    table = pq.read_table(job.data.path, columns=["pixels", "label"])
    if limit:
        table = table.slice(0, limit)
    pixels = np.stack(table.column("pixels").to_numpy(zero_copy_only=False)).astype(np.float32).reshape(-1, 8, 8, 1)
    labels = table.column("label").to_numpy().astype(np.int64)
    batches = [([pixels[i:i + BATCH]], [labels[i:i + BATCH]], np.arange(i, min(i + BATCH, len(labels))))
               for i in range(0, len(labels), BATCH)]
    return engine, batches, len(labels)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="first 1,024 rows")
    args = parser.parse_args()
    env = _common.environment(args.quick)
    _common.print_header("blocks", env, " (first 1,024 rows)")

    from pipeline import blocks, spectrum
    from pipeline.curvature.requests import BatchWork

    engine, batches, rows = example(1024 if args.quick else None)
    names, shapes = engine.signature.variables, engine.signature.variable_shapes
    size = engine.signature.parameters
    passes = {"count": 0}

    def matvec(vectors):
        passes["count"] += 1
        total = np.zeros_like(vectors)
        for inputs, labels, where in batches:
            total += engine.partial(inputs, labels, None, where, BatchWork(gradient=False, hvp_vectors=vectors)).sums["hvp"]
        return total / rows

    algorithms = {
        "eigenvalues": lambda b: spectrum.top_eigenvalues_steps(b, top=3, iterations=30, tol=1e-5, seed=0),
        "trace": lambda b: spectrum.hutchpp_steps(b, probes=30, seed=0),
        "spectrum": lambda b: spectrum.spectral_density_steps(b, runs=2, steps=min(16, b), seed=0),
    }
    matvec(np.ones((1, size)))  # traces the HVP function: not part of either timing
    print(f"\n{'blocks':<20}{'quantity':<13}{'side by side':>22}{'one block at a time':>28}{'ratio':>8}"
          f"{'max difference':>17}")
    worst = 0.0
    for kind in ("layer", "variable"):
        named = blocks.of(kind, names, shapes)
        where = [blocks.positions(block, shapes) for block in named]
        for quantity, steps in algorithms.items():
            # Each variant twice, the second timed: the engine compiles one HVP function per
            # number of vectors in a pass, and on 4,000 rows tracing would outweigh the passes.
            for _ in range(2):
                passes["count"], began = 0, time.perf_counter()
                together = spectrum.side_by_side([steps(b.size) for b in named], where, matvec, size)
                side = (passes["count"], time.perf_counter() - began)
                passes["count"], began = 0, time.perf_counter()
                alone = [spectrum.side_by_side([steps(b.size)], [w], matvec, size)[0] for b, w in zip(named, where)]
                one = (passes["count"], time.perf_counter() - began)
            difference = max(_difference(a, b) for a, b in zip(together, alone))
            worst = max(worst, difference)
            print(f"{kind + f' ({len(named)} blocks)':<20}{quantity:<13}{side[0]:>8} passes {side[1]:>6.1f} s"
                  f"{one[0]:>14} passes {one[1]:>6.1f} s{one[1] / side[1]:>8.2f}{difference:>17.1e}")
    print("\nratio = seconds one block at a time / seconds side by side; max difference relative to the result")
    return 0 if worst < 1e-8 else 1


def _difference(a, b) -> float:
    """Largest relative difference between two results of one algorithm."""
    if hasattr(a, "eigenvalues"):
        x, y = a.eigenvalues, b.eigenvalues
    elif hasattr(a, "estimate"):
        x, y = np.array([a.estimate]), np.array([b.estimate])
    else:
        x, y = np.concatenate(a.nodes), np.concatenate(b.nodes)
    return float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-300))


if __name__ == "__main__":
    sys.exit(main())
