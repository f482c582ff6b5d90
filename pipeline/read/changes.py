"""One compared number (``Change``) and the rules ``compare`` and ``history`` share for pairing
two runs' numbers: by (variable, quantity, statistic), by block of H of equal size."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.blocks import ALL
from pipeline.errors import InputError


@dataclass(frozen=True)
class Change:
    """One compared number: ``b - a`` and ``(b - a) / |a|``."""

    variable: str
    quantity: str
    statistic: str
    a: float
    b: float
    # A change this small is no change: the numbers' own error (an eigenvalue's residual bound).
    floor: float = 0.0

    @property
    def change(self) -> float:
        return self.b - self.a

    @property
    def relative_change(self) -> float:
        if math.isnan(self.a) or math.isnan(self.b):
            return math.nan
        if self.a == self.b or abs(self.b - self.a) <= self.floor:
            return 0.0
        if self.a == 0:
            return math.copysign(math.inf, self.b)
        return (self.b - self.a) / abs(self.a)

    def as_dict(self) -> dict:
        return {"variable": self.variable, "quantity": self.quantity, "statistic": self.statistic, "a": self.a,
                "b": self.b, "change": self.change, "relative_change": self.relative_change}


def series_name(name: str, block: str) -> str:
    """A ``history`` series of one block of H: ``name`` for all of it, ``name[BLOCK]`` otherwise."""
    return name if block == ALL else f"{name}[{block}]"


def as_float(value) -> float:
    """A table's number as a float; a missing one (``None``) as NaN."""
    return math.nan if value is None else float(value)


def shared_blocks(warnings: list[str], what: str, run_a, run_b) -> list[str]:
    """The blocks of table ``what`` both runs hold with the same number of parameters, in A's
    order; ``warnings`` gains a line naming the others (a block is paired by name, and two runs
    with different ``variables:`` can give one name to different parameters)."""
    blocks_a, blocks_b = run_a.blocks(what), run_b.blocks(what)
    only = [b for b in blocks_a if b not in blocks_b] + [b for b in blocks_b if b not in blocks_a]
    if only:
        warnings.append(f"{what} of blocks {', '.join(only)} are in only one run: not compared")
    shared = []
    for block in (b for b in blocks_a if b in blocks_b):
        size_a, size_b = _block_size(run_a, block), _block_size(run_b, block)
        if size_a != size_b:
            warnings.append(f"{what} of block {block} covers {size_a} parameters in A and {size_b} in B: "
                            "not compared")
        else:
            shared.append(block)
    return shared


def _block_size(run, block: str) -> int | None:
    try:
        return run.block_size(block)
    except InputError:  # a run whose manifest does not list the block's variables
        return None
