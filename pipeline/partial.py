"""Additive partial sums: what a shard turns into, and what the reducer adds up.

A shard never emits a mean. It emits float64 *sums* over its examples (each weighted by the
example's weight ``s_i``, 1 without a weights column) and the counts needed to divide once,
at the very end, by the global totals. Adding partials is therefore exact up to float
rounding, whatever the sharding.

Keys of ``Partial.sums`` (P = number of parameters, K = vectors or probes):

=========================  ==========  =================================================
key                        shape       sum over examples i (rows r for Monte Carlo)
=========================  ==========  =================================================
``loss``                   ()          s_i * l_i
``gradient``               (P,)        s_i * g_i
``hessian_diagonal``       (P,)        s_i * diag(H_i)                    (exact)
``hessian_probes``         (K, P)      s_i * z_k * (H_i z_k)              (Hutchinson)
``ggn_diagonal``           (P,)        s_i * diag(J_i^T Lambda_i J_i)     (exact)
``ggn_mc``                 (P,)        w_r * q_r,  q_r = (J_i^T d l(y'_r) / df)**2 (MC)
``ggn_mc_w2q``             (P,)        w_r**2 * q_r          (for the MC standard error)
``ggn_mc_w2q2``            (P,)        w_r**2 * q_r**2
``ggn_mc_w2``              ()          w_r**2
``sum_grad_squared``       (P,)        s_i * g_i**2                       (empirical Fisher)
``hvp``                    (K, P)      s_i * H_i v_k
=========================  ==========  =================================================

``w_r = s_i / M`` for each of the M label samples of example i.

The rows pass (contract 7) also carries ``tops``: per kind (``helpful``, ``harmful``) the top-k
training rows per query (``pipeline.influence.topk.Top``), which add by an exact merge (ties
by the smaller row), not a sum: the merged selection does not depend on the sharding either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Partial:
    """Float64 sums over some examples plus the counts to divide by.

    ``examples`` counts rows, ``weight_sum`` is ``sum_i s_i`` (equal to ``examples`` without
    weights). ``batches`` is informational.
    """

    examples: int = 0
    weight_sum: float = 0.0
    batches: int = 0
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    tops: dict = field(default_factory=dict)  # kind -> topk.Top (the rows pass)

    def add(self, other: "Partial") -> "Partial":
        """Adds ``other`` into ``self`` in place and returns ``self``.

        Arrays coming from ``ray.get`` are read-only views of shared memory, so the first
        time a key is seen it is copied rather than aliased.
        """
        self.examples += int(other.examples)
        self.weight_sum += float(other.weight_sum)
        self.batches += int(other.batches)
        for key, value in other.sums.items():
            value = np.asarray(value, dtype=np.float64)
            if key in self.sums:
                self.sums[key] += value
            else:
                self.sums[key] = np.array(value, dtype=np.float64, copy=True)
        for kind, top in other.tops.items():
            self.tops[kind] = top.merged(self.tops[kind]) if kind in self.tops else top.copy()
        return self

    def __add__(self, other: "Partial") -> "Partial":
        return Partial().add(self).add(other)

    @property
    def nbytes(self) -> int:
        return sum(value.nbytes for value in self.sums.values())
