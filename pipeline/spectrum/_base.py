"""What every spectral estimator shares: the counted operator and orthogonalisation.

The Hessian is never formed. The only access is a *block* matrix-vector product
``matvec(V) -> H V`` on the rows of ``V`` (shape ``[K, P]``), and each call is one distributed
pass over the whole dataset. ``CountingOperator`` counts both costs: ``passes`` (calls) and
``matvecs`` (vectors, i.e. Hessian-vector products).

Every algorithm is also written step by step, as a generator (a ``Steps``): it yields the
vectors ``V`` it needs multiplied, receives ``H V``, and returns its result. ``drive`` runs one
against a matvec; ``side_by_side`` runs several on diagonal blocks ``H_bb`` of one ``H`` at once,
so that B blocks' algorithms share each pass over the data instead of taking B times the passes.
"""

from __future__ import annotations

from typing import Callable, Generator, Iterable, Sequence, TypeVar

import numpy as np

Matvec = Callable[[np.ndarray], np.ndarray]
Result = TypeVar("Result")
#: An algorithm step by step: yields ``V`` ``[K, size]``, is sent ``H V``, returns its result.
Steps = Generator[np.ndarray, np.ndarray, Result]


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

    def __init__(self, matvec: Matvec | None, size: int | None = None) -> None:
        self.matvec = matvec
        self.size = None if size is None else int(size)
        self.passes = 0
        self.matvecs = 0

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        vectors = self._vectors(vectors)
        return self._counted(vectors, self.matvec(vectors))

    def ask(self, vectors: np.ndarray) -> Generator[np.ndarray, np.ndarray, np.ndarray]:
        """The same product inside a ``Steps`` generator: ``products = yield from operator.ask(V)``
        yields ``V`` to whoever drives the algorithm and counts the products it is sent."""
        vectors = self._vectors(vectors)
        return self._counted(vectors, (yield vectors))

    def ask_in_chunks(self, vectors: np.ndarray, max_block: int) -> Generator[np.ndarray, np.ndarray, np.ndarray]:
        """``ask`` on the rows of ``vectors`` at most ``max_block`` rows per pass, split as
        ``apply_in_chunks`` splits them."""
        parts = []
        for part in _chunks(vectors, max_block):
            parts.append((yield from self.ask(part)))
        return np.concatenate(parts)

    def _vectors(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float64)
        if vectors.ndim != 2 or (self.size is not None and vectors.shape[1] != self.size):
            raise ValueError(f"expected vectors of shape [K, {self.size}], got {vectors.shape}")
        if vectors.shape[0] == 0:
            raise ValueError("a pass with no vectors: nothing to compute")
        return vectors

    def _counted(self, vectors: np.ndarray, products) -> np.ndarray:
        products = np.asarray(products, dtype=np.float64)
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
    return np.concatenate([operator(part) for part in _chunks(vectors, max_block)])


def _chunks(vectors: np.ndarray, max_block: int) -> list[np.ndarray]:
    if max_block < 1:
        raise ValueError(f"max_block must be at least 1, got {max_block}")
    return np.array_split(vectors, -(-vectors.shape[0] // max_block))


def drive(steps: Steps, matvec: Matvec) -> Result:
    """Runs an algorithm written step by step against ``matvec``: every ``V`` it yields is
    answered with ``matvec(V)``; returns what it returns."""
    try:
        vectors = next(steps)
        while True:
            vectors = steps.send(matvec(vectors))
    except StopIteration as stop:
        return stop.value


def side_by_side(steps: Sequence[Steps], positions: Sequence[np.ndarray], matvec: Matvec,
                 size: int) -> list:
    """Runs each algorithm ``steps[b]`` on the diagonal block ``H_bb = H[p, p]``,
    ``p = positions[b]`` (parameter indices of block b, disjoint), all of them in the same passes.

    A pass sends the vectors every unfinished algorithm asks for, each embedded in ``size``
    with zeros outside its block (``v = E_b u``), as ONE call of ``matvec`` on ``[sum K_b, size]``;
    each gets back its products restricted to its block, ``E_b^T H E_b u = H_bb u``: the
    off-block part ``H_cb u`` is dropped. So B blocks cost ``max_b passes_b`` passes, not their
    sum, and each pass ``sum_b K_b`` Hessian-vector products (a product on a masked vector costs
    as much as on a full one: the saving is in passes, i.e. forward passes and gradients shared).

    Each algorithm's result is what it would be on the dense ``H_bb`` alone (an algorithm that
    finishes early just stops asking). Returns the results in the order of ``steps``.

    >>> import numpy as np
    >>> H = np.array([[2.0, 1.0, 0.0], [1.0, 3.0, 5.0], [0.0, 5.0, 4.0]])
    >>> def one_product(size):
    ...     products = yield np.ones((1, size))
    ...     return products[0].tolist()
    >>> side_by_side([one_product(1), one_product(2)], [np.array([0]), np.array([1, 2])],
    ...              lambda V: V @ H, 3)
    [[2.0], [8.0, 9.0]]
    """
    if len(steps) != len(positions):
        raise ValueError(f"{len(steps)} algorithms but {len(positions)} blocks of positions")
    positions = [np.asarray(p, dtype=np.int64).reshape(-1) for p in positions]
    if len(steps) == 1 and np.array_equal(positions[0], np.arange(size)):
        return [drive(steps[0], matvec)]  # all of H: nothing to embed or restrict
    results: list = [None] * len(steps)
    asked: dict[int, np.ndarray] = {}
    for b, algorithm in enumerate(steps):
        try:
            asked[b] = np.asarray(next(algorithm), dtype=np.float64)
        except StopIteration as stop:
            results[b] = stop.value
    while asked:
        rows = np.cumsum([0] + [asked[b].shape[0] for b in asked])
        embedded = np.zeros((rows[-1], size))
        for (b, vectors), start, stop in zip(asked.items(), rows, rows[1:]):
            embedded[start:stop, positions[b]] = vectors
        products = np.asarray(matvec(embedded), dtype=np.float64)
        answered, asked = asked, {}
        for b, start, stop in zip(answered, rows, rows[1:]):
            try:
                asked[b] = np.asarray(steps[b].send(products[start:stop, positions[b]]), dtype=np.float64)
            except StopIteration as stop_iteration:
                results[b] = stop_iteration.value
    return results


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
