"""The random projection ``Phi`` of per-example gradients (contract 7.1): ``Phi g_i``, k numbers
per example, with ``E[Phi^T Phi] = I`` so that ``<Phi g, Phi h>`` is an unbiased estimate of
``<g, h>``.

The k outputs are shared among the blocks of ``layout.Layout`` in proportion to their sizes (at
least one each, the largest remainders first). A factored layer's block takes a Kronecker-structured
``Phi_b = Phi_in^T (x) Phi_out^T`` (LoGra, Choe et al. 2024): its per-example gradient
``G_i = sum_p x_ip g_ip^T`` ``[d_A, d_S]`` projects to ``Phi_in^T G_i Phi_out = sum_p (Phi_in^T
x_ip)(Phi_out^T g_ip)^T`` ``[k_in, k_out]``, never forming ``G_i``; ``k_in x k_out = k_b`` with
``k_in`` the divisor of ``k_b`` nearest ``sqrt(k_b d_A / d_S)``. The rest takes a dense Gaussian
``[P_rest, k_rest]``. Entries are independent normals of variance ``1/k_in``, ``1/k_out`` and
``1/k_rest``, drawn with NumPy from ``(seed, block)`` alone: every worker draws the same ``Phi``.

The Kronecker blocks trade accuracy for memory: for a rank-one gradient (a Dense layer on a flat
input) ``|Phi_b g|^2 / |g|^2`` has a relative spread of ``sqrt(2/k_in + 2/k_out)``, against
``sqrt(2/k_b)`` for a dense block of the same k_b (Johnson-Lindenstrauss). Memory: ``d_A k_in +
d_S k_out`` numbers per layer, ``P_rest k_rest`` for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import InputError
from pipeline.influence.layout import REST, Layout


@dataclass(frozen=True)
class BlockProjection:
    """One block's share: ``name`` (a layer's path, or ``__rest__``), ``k_in`` x ``k_out``
    outputs (the rest: ``k_in`` = its k, ``k_out`` = 1)."""

    name: str
    k_in: int
    k_out: int

    @property
    def k(self) -> int:
        return self.k_in * self.k_out


def shares(layout: Layout, k: int) -> list[BlockProjection]:
    """Each block's share of ``k`` outputs (layers in order, then the rest). Raises
    ``InputError`` when k is smaller than the number of blocks."""
    blocks = [(layer.path, layer.size, layer.d_a, layer.d_s) for layer in layout.layers]
    if layout.rest_size:
        blocks.append((REST, layout.rest_size, None, None))
    if k < len(blocks):
        raise InputError(f"quantities.per_example.projection: {k} is smaller than the {len(blocks)} blocks of the "
                         f"parameters (each factored layer and the rest take at least one): use projection: "
                         f"{max(len(blocks), 64)} or more")
    total = sum(size for _, size, _, _ in blocks)
    exact = [k * size / total for _, size, _, _ in blocks]
    given = [max(1, int(e)) for e in exact]
    order = sorted(range(len(blocks)), key=lambda b: (given[b] - exact[b], -blocks[b][1]))
    step = 0
    while sum(given) != k:  # the largest remainders gain (or the largest shares give) one
        b = order[step % len(order)] if sum(given) < k else max(range(len(blocks)), key=lambda j: given[j])
        given[b] += 1 if sum(given) < k else -1
        step += 1
    out = []
    for (name, _, d_a, d_s), kb in zip(blocks, given):
        if d_a is None:
            out.append(BlockProjection(name, kb, 1))
            continue
        target = np.sqrt(kb * d_a / d_s)
        k_in = min((d for d in range(1, kb + 1) if kb % d == 0), key=lambda d: (abs(np.log(d / target)), d))
        out.append(BlockProjection(name, k_in, kb // k_in))
    return out


def matrices(layout: Layout, k: int, seed: int) -> dict[str, np.ndarray]:
    """``{name/in: [d_A, k_in], name/out: [d_S, k_out]}`` per layer and ``{__rest__: [P_rest,
    k_rest]}``, float64, from ``(seed, block index)`` alone."""
    out = {}
    sizes = {layer.path: (layer.d_a, layer.d_s) for layer in layout.layers}
    for index, share in enumerate(shares(layout, k)):
        rng = np.random.default_rng([int(seed), 7, index])
        if share.name == REST:
            out[REST] = rng.standard_normal((layout.rest_size, share.k_in)) / np.sqrt(share.k_in)
            continue
        d_a, d_s = sizes[share.name]
        out[f"{share.name}/in"] = rng.standard_normal((d_a, share.k_in)) / np.sqrt(share.k_in)
        out[f"{share.name}/out"] = rng.standard_normal((d_s, share.k_out)) / np.sqrt(share.k_out)
    return out


def project(layout: Layout, k: int, seed: int, gradients: np.ndarray) -> np.ndarray:
    """``Phi g`` [N, k] of flat gradients ``[N, P]``, as the engine forms it from the layers'
    inputs and output gradients: the reference for tests and for small query sets."""
    phi = matrices(layout, k, seed)
    parts = []
    for layer in layout.layers:
        g = layout.matrix(gradients, layer)
        parts.append(np.einsum("nac,ak,cl->nkl", g, phi[f"{layer.path}/in"], phi[f"{layer.path}/out"])
                     .reshape(len(gradients), -1))
    if layout.rest_size:
        parts.append(layout.rest_of(gradients) @ phi[REST])
    return np.concatenate(parts, axis=1)


def bytes_held(layout: Layout, k: int) -> float:
    """Float64 bytes of the projection's matrices in each worker."""
    sizes = {layer.path: (layer.d_a, layer.d_s) for layer in layout.layers}
    total = 0.0
    for share in shares(layout, k):
        if share.name == REST:
            total += layout.rest_size * share.k_in
        else:
            total += sizes[share.name][0] * share.k_in + sizes[share.name][1] * share.k_out
    return 8.0 * total
