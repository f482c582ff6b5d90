"""The reducer: adds partials as they arrive and divides once by the global count.

NumPy only. ``Reducer.add`` keeps one running ``Partial`` (never a list of them), so memory
does not grow with the number of shards. ``Sums`` is the reduced result that the quantity
units (``pipeline.quantities``) turn into the contract's quantities (``../shared/CONTRACT.md``
section 1): means are ``sum_i s_i x_i / sum_i s_i`` (``s_i = 1`` without weights), and
regularization terms (computed once, not per example) are added after the division.
"""

from __future__ import annotations

import numpy as np

from pipeline.partial import Partial


class Sums:
    """Summed partials of the whole dataset, and the regularization terms computed once."""

    def __init__(self, total: Partial, regularization: Partial | None = None):
        if not total.weight_sum > 0:
            raise ValueError("the sum of example weights is not positive: nothing to average")
        self.total = total
        self.regularization = regularization.sums if regularization is not None else {}

    @property
    def weight_sum(self) -> float:
        return self.total.weight_sum

    def __contains__(self, key: str) -> bool:
        return key in self.total.sums

    def raw(self, key: str) -> np.ndarray:
        """The sum itself, ``sum_i s_i x_i``."""
        return self.total.sums[key]

    def mean(self, key: str) -> np.ndarray:
        """``sum_i s_i x_i / sum_i s_i``, plus the regularization term of ``key`` if any."""
        value = self.total.sums[key] / self.total.weight_sum
        if key in self.regularization:
            value = value + self.regularization[key]
        return value


class Reducer:
    """Running sum of partials; ``sums()`` is what the quantity units divide once."""

    def __init__(self) -> None:
        self.total = Partial()
        self.regularization: Partial | None = None
        self.shards = 0

    def add(self, partial: Partial) -> None:
        self.total.add(partial)
        self.shards += 1

    def add_regularization(self, partial: Partial) -> None:
        self.regularization = Partial().add(partial)

    def sums(self) -> Sums:
        return Sums(self.total, self.regularization)
