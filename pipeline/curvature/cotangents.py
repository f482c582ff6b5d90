"""Cotangents: a Fisher type turned into the output-space vectors whose squared backward
passes make its curvature, shared by the families that square them (``outer_products`` for
the diagonals, ``kronecker_factors`` for the ``S`` factors).

Each is a list, one entry per Monte Carlo sample, of ``(U [B, M, C], W [B, M])``: M vectors
``u_im`` in the output space of each example i, and their row weights, such that the curvature
is ``sum_{i,m} W[i,m] J_i^T u_im u_im^T J_i``:

- "empirical" (the Fisher): ``u_i = dl_i/df_i`` at the data's labels, ``w_i = s_i``;
- "exact" (the GGN): ``u_ic = q_c sqrt|e_c|`` for the eigenpairs of ``Lambda_i``, ``w_ic =
  s_i sign(e_c)`` (``Lambda_i = sum_c sign_c u_c u_c^T``; eigenvalues under 1e-12 of the
  largest dropped);
- "mc": ``u_i = dl_i(y'_i)/df_i`` scaled (``sampling.draw_labels``) at labels drawn from
  ``(seed, sample, row)``, ``w_i = s_i / samples``.

Cost: the empirical and exact types reuse the pass's output-space derivatives (an eigen-
decomposition of B C x C matrices for "exact"); "mc" costs one output-space gradient per sample.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from pipeline.curvature.passes import Pass

# Eigenvalues of ``Lambda_i`` this small against the batch's largest are left out (zero weight).
RELATIVE_CUTOFF = 1e-12


def cotangents(batch: Pass, fisher_type: str, derivatives, examples, dtype,
               samples: int = 1, seed: int = 0) -> list:
    """``[(U [B, M, C], W [B, M])]`` of ``fisher_type`` ("empirical", "exact" or "mc") for
    ``batch``; ``derivatives``: the pass's ``(f, dl, Lambda, valid)``
    (``ExampleProducts.batch_derivatives``); ``examples`` draws the Monte Carlo labels and
    their gradients in compute dtype ``dtype``."""
    flat, dl, lam, valid = derivatives
    weights = batch.weight_values
    if fisher_type == "empirical":
        return [empirical(dl.numpy(), weights)]
    if fisher_type == "exact":
        return [square_root(lam.numpy(), weights)]
    return monte_carlo(batch, flat, valid, examples, dtype, samples, seed)


def empirical(dl: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(U [B, 1, C], W [B, 1])``: each example's output gradient ``dl [B, C]``, weight ``s_i``."""
    return dl[:, None, :], weights[:, None]


def square_root(lam: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(U [B, C, C], W [B, C])`` with ``Lambda_i = sum_c sign(e_c) u_ic u_ic^T`` for ``lam``
    [B, C, C] (symmetric), each row weighted by ``s_i sign(e_c)``, tiny eigenvalues at weight 0.

    >>> u, w = square_root(np.array([[[2.0, 0.0], [0.0, -3.0]]]), np.ones(1))
    >>> np.allclose(np.einsum("bc,bci,bcj->bij", w, u, u), [[[2.0, 0.0], [0.0, -3.0]]])
    True
    """
    values, vectors = np.linalg.eigh(lam.astype(np.float64))  # [B, C], [B, C, C]
    scale = np.abs(values).max(initial=0.0)
    keep = np.abs(values) > RELATIVE_CUTOFF * max(scale, 1e-300)
    # u = q_c sqrt|e_c| and sign(e_c): Lambda = sum_c sign_c u_c u_c^T
    roots = np.transpose(vectors, (0, 2, 1)) * np.sqrt(np.abs(values))[:, :, None]  # [B, C, C]
    return roots, np.where(keep, weights[:, None] * np.sign(values), 0.0)


def monte_carlo(batch: Pass, flat, valid, examples, dtype, samples: int, seed: int) -> list:
    """One ``(U [B, 1, C], W [B, 1])`` per sample: the output gradient at labels drawn from the
    model's predictive distribution (keyed by ``(seed, sample, row)``), weight ``s_i / samples``."""
    weights = batch.weight_values
    flat_np = flat.numpy().astype(np.float64)
    out = []
    for sample in range(samples):
        sampled, scale = examples.sample_labels(flat_np, valid.numpy().astype(np.float64), batch.rows, seed, sample)
        sampled = [tf.constant(l, dtype=dtype if l.dtype.kind == "f" else l.dtype) for l in sampled]
        dl_sampled = examples.sampled_gradient(batch, sampled)
        out.append(((dl_sampled.numpy() * scale)[:, None, :], (weights / samples)[:, None]))
    return out


def joined(columns: list) -> list:
    """The samples of ``columns`` as one entry, side by side along M: ``[(U [B, sum M, C], W)]``
    (a Kronecker ``S``'s standard error needs each example's ``S_i`` whole)."""
    return [(np.concatenate([u for u, _ in columns], axis=1), np.concatenate([w for _, w in columns], axis=1))]
