"""``Pass``: one batch and what its forward pass and gradient yield, computed once and read by
every family of products that answers part of the batch's ``BatchWork``.

A family that computes the loss and the gradient as a by-product (the HVP family shares them
with its products; the layer rules take them from the pass that taps the layers) records them
here, so no other pass recomputes them; the output-space derivatives (``dl_i/df_i``,
``Lambda_i``) that the Fisher and both GGN routes read are kept here once computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class Pass:
    """One batch of ``B`` examples.

    ``inputs``/``labels``: the batch arrays (``model.inputs``/``model.outputs`` order);
    ``weights``: the arrays' ``s_i`` [B] or None; ``rows``: the examples' global row indices
    (they key the Monte Carlo draws); ``x``, ``y``, ``s``: the same as tensors of the compute
    dtype (``Core.cast_batch``); ``specs``: the compiled functions' signatures
    (``Core.specs``); ``objective``: ``(x, y, s) -> scalar``, the data's ``sum_i s_i l_i`` or
    the regularization term; ``tag``: "data" or "reg" (keys the compiled functions).
    """

    inputs: list
    labels: list
    weights: np.ndarray | None
    rows: np.ndarray
    x: list
    y: list
    s: object
    specs: tuple
    objective: Callable
    tag: str = "data"
    # Recorded by the family that computed them (tensors of the compute dtype): the objective's
    # value and its gradient [P], or None while no family has.
    loss: object = None
    gradient: object = None
    # Output-space derivatives by whether Lambda was asked: (f [B, C], dl [B, C], Lambda [B, C, C]
    # or empty, valid [B, outputs]) (``ExampleProducts.output_derivatives``).
    derivatives: dict = field(default_factory=dict)

    @property
    def batch(self) -> tuple:
        return self.x, self.y, self.s

    @property
    def size(self) -> int:
        return int(self.s.shape[0])

    @property
    def weight_values(self) -> np.ndarray:
        """``s_i`` as float64 [B] (ones where the batch has no weights)."""
        return self.s.numpy().astype(np.float64)
