"""What every spectral estimator shares: the counted operator and orthogonalisation.

The Hessian is never formed. The only access is a *block* matrix-vector product
``matvec(V) -> H V`` on the rows of ``V`` (shape ``[K, P]``), and each call is one distributed
pass over the whole dataset. ``CountingOperator`` counts both costs: ``passes`` (calls) and
``matvecs`` (vectors, i.e. Hessian-vector products).
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

Matvec = Callable[[np.ndarray], np.ndarray]


class CountingOperator:
    """A block matrix-vector product that counts its passes and its vectors.

    ``operator(V)`` returns ``matvec(V)`` as float64 ``[K, P]`` after checking the shapes;
    ``passes`` is the number of calls, ``matvecs`` the total number of vectors (rows) sent.
    Every estimator of this package wraps the callable it is given in one, and reports these
    two numbers as its cost.

    >>> import numpy as np
    >>> operator = CountingOperator(lambda V: V @ np.diag([1.0, 2.0, 3.0]), size=3)
    >>> operator(np.eye(3)[:2]).tolist(), operator.passes, operator.matvecs
    ([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], 1, 2)
    """

    def __init__(self, matvec: Matvec, size: int | None = None) -> None:
        self.matvec = matvec
        self.size = None if size is None else int(size)
        self.passes = 0
        self.matvecs = 0

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float64)
        if vectors.ndim != 2 or (self.size is not None and vectors.shape[1] != self.size):
            raise ValueError(f"expected vectors of shape [K, {self.size}], got {vectors.shape}")
        if vectors.shape[0] == 0:
            raise ValueError("a pass with no vectors: nothing to compute")
        products = np.asarray(self.matvec(vectors), dtype=np.float64)
        if products.shape != vectors.shape:
            raise ValueError(f"matvec returned shape {products.shape} for vectors of shape "
                             f"{vectors.shape}: it must return H v for every row v")
        self.passes += 1
        self.matvecs += vectors.shape[0]
        return products

    def __repr__(self) -> str:
        return f"CountingOperator(size={self.size}, passes={self.passes}, matvecs={self.matvecs})"


def apply_in_chunks(operator: Matvec, vectors: np.ndarray, max_block: int) -> np.ndarray:
    """``operator`` on the rows of ``vectors``, at most ``max_block`` rows per call.

    ``ceil(K / max_block)`` passes of nearly equal size (67 rows with ``max_block=64``: 34 + 33,
    not 64 + 3), so no pass is much bigger than it must be.
    """
    count = vectors.shape[0]
    if max_block < 1:
        raise ValueError(f"max_block must be at least 1, got {max_block}")
    chunks = -(-count // max_block)
    return np.concatenate([operator(part) for part in np.array_split(vectors, chunks)])


def orthogonalise(vectors: np.ndarray, bases: Iterable[np.ndarray]) -> np.ndarray:
    """Remove from the rows of ``vectors`` their components in the row spaces of ``bases``.

    Every basis has orthonormal rows. Classical Gram-Schmidt applied twice ("twice is
    enough", Giraud, Langou, Rozloznik 2005): orthogonal to working precision. Returns a new array.
    """
    bases = list(bases)
    vectors = np.array(vectors, dtype=np.float64)
    for _ in range(2):
        for basis in bases:
            if basis.shape[0]:
                vectors -= (vectors @ basis.T) @ basis
    return vectors


def orthonormal_rows(vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Rank-revealing orthonormalisation of the rows of ``vectors`` ``[k, P]``.

    Returns ``Q`` ``[r, P]`` with orthonormal rows and ``C`` ``[r, k]`` with ``vectors ~= C.T @ Q``,
    keeping only the ``r`` singular directions with singular value above ``threshold``: the
    directions dropped are below it (rank deficiency, an invariant subspace found).
    Cost ``O(k^2 P)`` (a thin SVD).
    """
    if vectors.shape[0] == 0:
        return np.zeros((0, vectors.shape[1])), np.zeros((0, 0))
    left, singular, right = np.linalg.svd(vectors, full_matrices=False)
    keep = singular > threshold
    return right[keep], singular[keep, None] * left[:, keep].T
