"""The blocks of the parameters that per-example outputs and influence treat alike.

A factored layer (``pipeline.curvature.kronecker_factors``: Dense, EinsumDense, Conv1D/2D) whose
kernel is among the selected variables is one block: its kernel ``[d_in, d_out]`` (C order) with
its bias as a last row when the bias is selected, a ``[d_A, d_S]`` matrix (``d_A = d_in + 1`` with
the bias), exactly the order in which K-FAC's ``kron(A, S)`` acts (contract 6.1). Every other
selected variable belongs to the ``rest``, flat. ``structured=False`` (the dense GGN) puts every
variable in the rest.

    >>> lay = Layout.of(["d/kernel", "d/bias", "n/gamma"], [(3, 2), (2,), (2,)], [("d", 3, 2, 1, True)])
    >>> [(b.path, b.d_a, b.d_s) for b in lay.layers], lay.rest_size
    ([('d', 4, 2)], 2)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The rest's name in the manifest's ``lambda`` and in the projection's blocks.
REST = "__rest__"


@dataclass(frozen=True)
class LayerBlock:
    """A factored layer: ``path``, the flat positions of its kernel and (or None) its bias
    variable, and its matrix's shape ``[d_a, d_s]``."""

    path: str
    kernel: int
    bias: int | None
    d_a: int
    d_s: int

    @property
    def size(self) -> int:
        return self.d_a * self.d_s


@dataclass(frozen=True)
class Layout:
    """The blocks of P parameters (``names``/``shapes`` in flat order): ``layers`` and ``rest``
    (indices of the variables in no layer block)."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    layers: tuple[LayerBlock, ...]
    rest: tuple[int, ...]

    @classmethod
    def of(cls, names, shapes, factor_layers, structured: bool = True) -> "Layout":
        """From the selected variables and the plan's factored layers ``(path, d_in, d_out,
        positions, bias)`` (``Workload.factor_layers``)."""
        names = tuple(names)
        sizes = tuple(int(np.prod(s, dtype=np.int64)) for s in shapes)
        layers, taken = [], set()
        for path, d_in, d_out, _, bias in (factor_layers if structured else ()):
            kernel = f"{path}/kernel"
            if kernel not in names or sizes[names.index(kernel)] != d_in * d_out:
                continue
            b = names.index(f"{path}/bias") if bias and f"{path}/bias" in names else None
            if b is not None and sizes[b] != d_out:
                b = None
            layers.append(LayerBlock(path, names.index(kernel), b, d_in + (1 if b is not None else 0), d_out))
            taken.update({names.index(kernel)} | ({b} if b is not None else set()))
        return cls(names, sizes, tuple(layers), tuple(k for k in range(len(names)) if k not in taken))

    @property
    def parameters(self) -> int:
        return int(sum(self.sizes))

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    @property
    def rest_size(self) -> int:
        return int(sum(self.sizes[k] for k in self.rest))

    def rest_positions(self) -> np.ndarray:
        """The flat positions of the rest's entries, in flat order."""
        offsets = self.offsets
        return np.concatenate([np.arange(offsets[k], offsets[k + 1]) for k in self.rest] or [np.zeros(0, np.int64)])

    def matrix(self, flat: np.ndarray, layer: LayerBlock) -> np.ndarray:
        """``[..., d_a, d_s]``: a layer's block of ``flat`` ``[..., P]`` (its kernel, then its bias row)."""
        offsets = self.offsets
        kernel = flat[..., offsets[layer.kernel]:offsets[layer.kernel + 1]]
        kernel = kernel.reshape(flat.shape[:-1] + (layer.d_a - (layer.bias is not None), layer.d_s))
        if layer.bias is None:
            return kernel
        bias = flat[..., offsets[layer.bias]:offsets[layer.bias + 1]].reshape(flat.shape[:-1] + (1, layer.d_s))
        return np.concatenate([kernel, bias], axis=-2)

    def put_matrix(self, flat: np.ndarray, layer: LayerBlock, matrix: np.ndarray) -> None:
        """Writes ``matrix`` ``[..., d_a, d_s]`` back into ``flat`` ``[..., P]`` (``matrix``'s inverse)."""
        offsets = self.offsets
        rows = layer.d_a - (layer.bias is not None)
        flat[..., offsets[layer.kernel]:offsets[layer.kernel + 1]] = matrix[..., :rows, :].reshape(
            matrix.shape[:-2] + (-1,))
        if layer.bias is not None:
            flat[..., offsets[layer.bias]:offsets[layer.bias + 1]] = matrix[..., rows, :]

    def rest_of(self, flat: np.ndarray) -> np.ndarray:
        """``[..., P_rest]``: the rest's entries of ``flat``."""
        return flat[..., self.rest_positions()]
