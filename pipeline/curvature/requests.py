"""What the engine computes for each batch: the request every quantity unit adds to.

TensorFlow-free, so the driver, the quantity units and the worker pool can build and pass it
without importing TensorFlow. The engine fuses every field of one request into one forward
pass and one gradient per batch (``pipeline.curvature.engine``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np


@dataclass(frozen=True)
class BatchWork:
    """The building blocks to sum over each batch. Vectors are arrays of shape [K, P]: float64,
    or int8 for Rademacher probes (converted to the compute dtype in the worker).

    - ``gradient``: ``sum_i s_i g_i`` (the loss sum ``sum_i s_i l_i`` is always computed);
    - ``hessian_diagonal="exact"``: ``sum_i s_i diag(H_i)`` by P basis-vector HVPs;
    - ``probes``: ``sum_i s_i z_k * (H_i z_k)`` for each row ``z_k`` (Hutchinson; both may be
      asked at once: an exact trace beside a Hutchinson diagonal);
    - ``hvp_vectors``: ``sum_i s_i H_i v_k``;
    - ``ggn_diagonal``: ``"exact"`` (``diag(J^T Lambda J)``) or ``"mc"`` (``ggn_samples``
      labels per example drawn from ``(seed, sample, row)``);
    - ``sum_grad_squared``: ``sum_i s_i g_i**2`` (BackPACK's ``SumGradSquared``);
    - ``hessian_blocks``: ``sum_i s_i (H_i)_bb`` for each block ``b``, given as the positions of
      its variables among the engine's (their entries in flat order), as ``hessian_block_<k>``.
    """

    gradient: bool = True
    hessian_diagonal: str | None = None  # "exact"
    probes: np.ndarray | None = None  # Hutchinson probes z_k
    hvp_vectors: np.ndarray | None = None
    ggn_diagonal: str | None = None  # "exact" | "mc"
    ggn_samples: int = 1
    sum_grad_squared: bool = False
    hessian_blocks: tuple[tuple[int, ...], ...] = ()  # variable positions of each dense block
    seed: int = 0

    def merged(self, **asked) -> "BatchWork":
        """This request with ``asked`` added. A field left at its default takes the asked value;
        a field two quantities set to different values is an error of the units that asked
        (never silently one of them)."""
        changes = {}
        for name, value in asked.items():
            current, default = getattr(self, name), _DEFAULTS[name]
            if _same(value, default) or _same(current, value):
                continue
            if not _same(current, default):
                raise ValueError(f"two quantities ask the engine for different {name}: {current!r} and {value!r}")
            changes[name] = value
        return replace(self, **changes)


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return a is b
    return a == b


_DEFAULTS = {f.name: f.default for f in fields(BatchWork)}

