"""Deterministic randomness: every random number is a function of the seed and an index.

Probe ``k`` comes from ``(seed, k)`` alone, so every shard and worker uses the same probes and
a result does not depend on the sharding. Monte Carlo labels for example ``i`` come from
``(seed, sample, global row index)``, for the same reason. NumPy only (no TensorFlow), so the
driver and the workers draw identical numbers.
"""

from __future__ import annotations

import numpy as np

# Streams keep the draws of different quantities apart while staying (seed, index) functions.
PROBE_STREAM = 0
HVP_STREAM = 1
LABEL_STREAM = 2
TRACE_STREAM = 3
SPECTRUM_STREAM = 4
EIGENVALUE_STREAM = 5


def rademacher(seed: int, indices, size: int, stream: int = PROBE_STREAM, dtype=np.float64) -> np.ndarray:
    """Rademacher vectors (entries +-1), one row per index in ``indices``: shape [K, size]."""
    rows = []
    for k in indices:
        rng = np.random.default_rng([int(seed), int(stream), int(k)])
        rows.append(rng.integers(0, 2, size=size, dtype=np.int8))
    if not rows:
        return np.zeros((0, size), dtype=dtype)
    return (np.stack(rows).astype(dtype) * 2 - 1).astype(dtype)


def gaussian(seed: int, indices, size: int, stream: int) -> np.ndarray:
    """Standard normal vectors, one row per index: shape [K, size] (float64)."""
    return np.stack([np.random.default_rng([int(seed), int(stream), int(k)]).standard_normal(size)
                     for k in indices]) if len(indices) else np.zeros((0, size))


def _splitmix64(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def row_uniforms(seed: int, sample: int, rows: np.ndarray, count: int, stream: int = LABEL_STREAM) -> np.ndarray:
    """Uniform numbers in (0, 1), shape [len(rows), count], a pure function of
    ``(seed, stream, sample, row, j)`` (a SplitMix64 hash; vectorised, no generator per row)."""
    rows = np.asarray(rows, dtype=np.uint64)[:, None]
    j = np.arange(count, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed) * np.uint64(0x100000001B3) + np.uint64(stream))
        key = _splitmix64(key ^ np.uint64(sample))
        z = _splitmix64(_splitmix64(key ^ rows) ^ j)
    # 53 random bits -> (0, 1), never exactly 0 (safe for logs).
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)
