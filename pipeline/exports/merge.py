"""Fisher-weighted averaging of same-architecture models (Matena and Raffel 2022, "Merging
models with Fisher-weighted averaging"), contract 6.3.

Per parameter ``j``: ``w_j = sum_m F_mj w_mj / sum_m F_mj``, the plain average where every
``F_mj`` is 0; ``F_m`` is model ``m``'s diagonal from its own run (the Fisher diagonal by
default). Variables no run measured (non-trainable state such as BatchNorm statistics, or those a
run's ``variables:`` left out) are averaged plainly. Cost: one pass over the weights; the models
are loaded with Keras and the merged model is written whole or not at all.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import InputError


def fisher_weighted(weights: list[dict[str, np.ndarray]], fishers: list[dict[str, np.ndarray]]) -> dict:
    """``{path: merged array}`` from each model's ``{path: w}`` and ``{path: F}`` (same keys and
    shapes in every model; a path missing from a model's ``fishers`` is averaged plainly)."""
    merged = {}
    for path in weights[0]:
        stacked = np.stack([np.asarray(w[path], np.float64) for w in weights])
        if all(path in f for f in fishers):
            mass = np.stack([np.asarray(f[path], np.float64) for f in fishers])
            if np.any(mass < 0):
                raise InputError(f"the curvature of {path} has negative entries: merge with a Fisher or GGN diagonal "
                                 "(the default --quantity)")
            total = mass.sum(axis=0)
            weighted = (mass * stacked).sum(axis=0) / np.where(total > 0, total, 1.0)
            merged[path] = np.where(total > 0, weighted, stacked.mean(axis=0))
        else:
            merged[path] = stacked.mean(axis=0)
    return merged
