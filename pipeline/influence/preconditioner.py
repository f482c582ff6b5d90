"""``(C + lambda I)^-1`` for influence (contract 7.2), from the curvature the main passes found.

- ``kfac``/``ekfac``: per factored layer (``layout.LayerBlock``) the eigenbases ``Q_A``, ``Q_S``
  of its factors and the eigenvalues ``E`` ``[d_A, d_S]`` of its block: ``outer(eig A, eig S) / R``
  for K-FAC (``kron(A, S) / R``, contract 6.1, R its positions per example), the EK-FAC
  eigenvalues for EK-FAC; then ``(C_l + lambda_l I)^-1 vec(G) = Q_A [(Q_A^T G Q_S) / (E +
  lambda_l)] Q_S^T``, ``lambda_l = damping * mean(E)``. Every variable of no factored layer
  takes its GGN diagonal ``d``: ``g / (d + lambda_v)``, ``lambda_v = damping * mean(d)`` per
  variable. Cost: ``d_A^2 d_S + d_A d_S^2`` per vector and layer.
- ``ggn``: the dense GGN ``G`` ``[P, P]``: ``(G + lambda I)^-1``, ``lambda = damping * trace(G) / P``,
  by one symmetric eigendecomposition (``P^3``; ``max_dimension`` bounds P).
- ``identity``: ``C = 0``, ``lambda = 1``: the gradient itself.

An eigenvalue at which ``E + lambda`` is 0 (a block whose curvature is all zero) contributes 0
(a pseudo-inverse), never a division by zero. Sources: Koh and Liang (2017), influence
functions; Grosse et al. (2023), EK-FAC influence (kronfluence); George et al. (2018), EK-FAC.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.influence.layout import REST, Layout


def _inverse(values: np.ndarray) -> np.ndarray:
    """``1 / values``, 0 where a value is 0."""
    out = np.zeros_like(values, dtype=np.float64)
    np.divide(1.0, values, out=out, where=values != 0)
    return out


@dataclass
class Preconditioner:
    """``(C + lambda I)^-1`` by blocks of ``layout``. ``layers``: ``{path: (Q_A, Q_S, inverse
    eigenvalues [d_A, d_S])}``; ``rest``: ``("diagonal", inverse [P_rest])``, ``("dense",
    inverse [P_rest, P_rest])`` or ``("identity", None)``; ``lambdas``: the manifest's
    ``lambda`` by block (a layer's path, a variable's path, or ``__all__``)."""

    curvature: str
    damping: float
    layout: Layout
    layers: dict = field(default_factory=dict)
    rest: tuple = ("identity", None)
    lambdas: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def identity(cls, layout: Layout, damping: float) -> "Preconditioner":
        return cls("identity", damping, layout, {}, ("identity", None), {"__all__": 1.0})

    @classmethod
    def dense(cls, layout: Layout, damping: float, ggn: np.ndarray) -> "Preconditioner":
        """From the dense GGN ``[P, P]`` (every variable in ``layout``'s rest)."""
        ggn = (ggn + ggn.T) / 2
        values, vectors = np.linalg.eigh(ggn)
        lam = damping * float(np.trace(ggn)) / len(ggn)
        inverse = (vectors * _inverse(values + lam)) @ vectors.T
        return cls("ggn", damping, layout, {}, ("dense", inverse), {"__all__": lam})

    @classmethod
    def kronecker(cls, curvature: str, layout: Layout, damping: float, factors: dict, diagonal: np.ndarray,
                  eigen: dict | None = None) -> "Preconditioner":
        """From K-FAC's means (``quantities.kfac.factor_means``: ``A``, ``S`` and ``positions``
        by layer path), EK-FAC's eigenvalues ``eigen`` (``{path: [d_A, d_S]}``, with ``curvature``
        ekfac, in the bases ``kfac.eigenbases`` gives) and the GGN diagonal ``[P]`` for the rest."""
        layers, lambdas = {}, {}
        for layer in layout.layers:
            values_a, q_a = np.linalg.eigh(factors["A"][layer.path])
            values_s, q_s = np.linalg.eigh(factors["S"][layer.path])
            if curvature == "ekfac":
                values = np.asarray(eigen[layer.path], np.float64)
            else:
                positions = max(float(factors["positions"][layer.path]), 1.0)
                values = np.outer(np.maximum(values_a, 0.0), np.maximum(values_s, 0.0)) / positions
            lam = damping * float(values.mean())
            layers[layer.path] = (q_a, q_s, _inverse(values + lam))
            lambdas[layer.path] = lam
        inverse = np.zeros(layout.rest_size)
        start = 0
        offsets = layout.offsets
        for k in layout.rest:
            d = np.asarray(diagonal[offsets[k]:offsets[k + 1]], np.float64)
            lam = damping * float(d.mean())
            inverse[start:start + len(d)] = _inverse(d + lam)
            lambdas[layout.names[k]] = lam
            start += len(d)
        return cls(curvature, damping, layout, layers, ("diagonal", inverse), lambdas)

    # ------------------------------------------------------------------ use
    def apply(self, gradients: np.ndarray) -> np.ndarray:
        """``(C + lambda I)^-1 g`` for each row of ``gradients`` ``[Q, P]`` (float64)."""
        gradients = np.asarray(gradients, np.float64)
        out = np.array(gradients, copy=True)
        for layer in self.layout.layers:
            q_a, q_s, inverse = self.layers.get(layer.path, (None, None, None))
            if q_a is None:
                continue
            g = self.layout.matrix(gradients, layer)
            # Matrix products, not a three-operand einsum: NumPy sums those naively (hours for a
            # 4,609 x 128 layer and 64 queries).
            rotated = (q_a.T @ g @ q_s) * inverse
            self.layout.put_matrix(out, layer, q_a @ rotated @ q_s.T)
        kind, inverse = self.rest
        if kind != "identity" and self.layout.rest_size:
            positions = self.layout.rest_positions()
            rest = gradients[:, positions]
            out[:, positions] = rest * inverse if kind == "diagonal" else rest @ inverse
        return out

    def self_influence(self, gradients: np.ndarray) -> np.ndarray:
        """``g_i^T (C + lambda I)^-1 g_i`` for each row of ``gradients`` ``[N, P]`` (the reference
        the engine's per-layer forms are tested against)."""
        return np.einsum("np,np->n", np.asarray(gradients, np.float64), self.apply(gradients))

    def worker_arrays(self) -> dict[str, np.ndarray]:
        """What a worker needs for the self-influence without forming ``g_i``: per layer
        ``PATH/QA``, ``PATH/QS``, ``PATH/M`` (the inverse eigenvalues), and ``__rest__/diagonal``
        or ``__rest__/dense``."""
        out = {}
        for path, (q_a, q_s, inverse) in self.layers.items():
            out[f"{path}/QA"], out[f"{path}/QS"], out[f"{path}/M"] = q_a, q_s, inverse
        kind, inverse = self.rest
        if kind != "identity" and self.layout.rest_size:
            out[f"{REST}/{kind}"] = inverse
        return out
