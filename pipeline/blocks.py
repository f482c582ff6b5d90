"""Diagonal blocks of H: ``blocks: full | variable | layer`` (contract 5.2, 5.3).

A block is a set of the selected variables; its parameters are theirs, in model order, each
variable in C order (the block's *flat order*). ``full``: one block of every parameter, named
``"__all__"``; ``variable``: one per variable, named by its path (``H_vv``); ``layer``: one per
Keras layer, its selected variables together, named by the layer's path (the variable path
without its last part). ``quantities.hessian`` publishes the dense blocks; ``eigenvalues``,
``trace`` and ``spectrum`` run their algorithm on each block ``H_bb`` side by side
(``pipeline.spectrum.side_by_side``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipeline.options import Option, choice

ALL = "__all__"
KINDS = ("full", "variable", "layer")

#: The ``blocks`` job option, the same for every quantity that takes it.
OPTION = Option(choice(*KINDS), "full", "full (all of H), variable (one block per variable) or layer "
                                        "(one per Keras layer)")


@dataclass(frozen=True)
class Block:
    """One diagonal block: its name, its variables (positions in the signature, paths, shapes)."""

    name: str
    members: tuple[int, ...]
    variables: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def size(self) -> int:
        return int(sum(int(np.prod(shape, dtype=np.int64)) for shape in self.shapes))


def layer_of(path: str) -> str:
    """The Keras layer a variable path belongs to: the path without its last part."""
    return path.rsplit("/", 1)[0] if "/" in path else path


def of(kind: str, variables: Sequence[str], shapes: Sequence[Sequence[int]]) -> list[Block]:
    """The blocks of ``blocks: kind`` over the variables ``variables`` (paths, in model order)
    of shapes ``shapes``, in model order."""
    if kind not in KINDS:
        raise ValueError(f"blocks must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "full":
        groups = {ALL: list(range(len(variables)))}
    elif kind == "variable":
        groups = {name: [i] for i, name in enumerate(variables)}
    else:
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(variables):
            groups.setdefault(layer_of(name), []).append(i)
    return [Block(name, tuple(members), tuple(variables[i] for i in members),
                  tuple(tuple(int(d) for d in shapes[i]) for i in members))
            for name, members in groups.items()]


def positions(block: Block, shapes: Sequence[Sequence[int]]) -> np.ndarray:
    """Indices of ``block``'s parameters in the flat parameter vector of all ``shapes``
    (int64 ``[block.size]``, in the block's flat order)."""
    sizes = np.array([int(np.prod(shape, dtype=np.int64)) for shape in shapes], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return np.concatenate([np.arange(starts[i], starts[i + 1]) for i in block.members] or
                          [np.zeros(0, dtype=np.int64)]).astype(np.int64)
