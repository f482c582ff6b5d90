"""The empirical Fisher and GGN diagonals of one batch: the cotangents of each Fisher type
(``cotangents``) squared through the model, by the layer rules where a variable has one
(``LayerProducts``) and by per-example products of the whole model elsewhere
(``ExampleProducts``).

``sum_grad_squared = sum_i s_i (J_i^T dl_i/df_i)**2``; ``ggn_diagonal`` exact ``= sum_i s_i
diag(J_i^T Lambda_i J_i)``, Monte Carlo the same at sampled labels, with the sums of ``W**2 q``
and ``W**2 q**2`` its standard error needs (``ggn_mc_w2q``, ``ggn_mc_w2q2``, ``ggn_mc_w2``).
Cost: ~0.8 gradients per cotangent column by a layer rule, ~4 per chunk of rows per example.
"""

from __future__ import annotations

import numpy as np

from pipeline.curvature.core import Core
from pipeline.curvature.cotangents import cotangents
from pipeline.curvature.example_products import ExampleProducts
from pipeline.curvature.layer_products import LayerProducts
from pipeline.curvature.passes import Pass
from pipeline.curvature.requests import BatchWork
from pipeline.partial import Partial


class OuterProducts:
    """The Fisher and GGN diagonals over the layer family and the per-example family."""

    def __init__(self, core: Core, examples: ExampleProducts, layers: LayerProducts):
        self.core, self.examples, self.layers = core, examples, layers

    def answer(self, part: Partial, batch: Pass, work: BatchWork) -> None:
        """``sum_grad_squared`` and ``ggn_diagonal`` (exact or "mc") as ``work`` asks, into
        ``part.sums``; the caller has decided the per-example route."""
        self.examples.check(batch)
        if work.ggn_diagonal == "mc" and self.layers.take_monte_carlo(batch.inputs):
            self.layers.monte_carlo(part, batch, work, with_loss=False)
            if not work.sum_grad_squared:
                return
        derivatives = self.examples.batch_derivatives(batch, work.ggn_diagonal == "exact")
        if work.sum_grad_squared:
            (columns, row_weights), = self._cotangents(batch, "empirical", derivatives)
            part.sums["sum_grad_squared"] = self.squares(batch.inputs, columns, row_weights, moments=False)[0]
        if work.ggn_diagonal == "exact":
            (columns, row_weights), = self._cotangents(batch, "exact", derivatives)
            part.sums["ggn_diagonal"] = self.squares(batch.inputs, columns, row_weights, moments=False)[0]
        elif work.ggn_diagonal == "mc" and "ggn_mc" not in part.sums:
            sums = None
            for columns, row_weights in self._cotangents(batch, "mc", derivatives, work.ggn_samples, work.seed):
                got = self.squares(batch.inputs, columns, row_weights, moments=True)
                sums = got if sums is None else [a + b for a, b in zip(sums, got)]
            weights = batch.weight_values
            part.sums["ggn_mc"], part.sums["ggn_mc_w2q"], part.sums["ggn_mc_w2q2"] = sums
            part.sums["ggn_mc_w2"] = np.asarray(work.ggn_samples * np.sum((weights / work.ggn_samples) ** 2))

    def _cotangents(self, batch: Pass, fisher_type: str, derivatives, samples: int = 1, seed: int = 0) -> list:
        return cotangents(batch, fisher_type, derivatives, self.examples, self.core.dtype, samples, seed)

    def squares(self, raw_inputs, columns, row_weights, moments):
        """``sum_{i,m} W[i,m] (J_i^T U[i,m])**2`` ([P]; with ``moments`` also the sums with
        ``W**2`` of q and q**2, else the first sum three times) for cotangents U [B, M, C] and
        row weights W [B, M]: the variables with a layer rule by it (``LayerProducts``), the
        others by per-example products of their rows (``W != 0``, ``ExampleProducts``)."""
        routes = self.layers.routes(raw_inputs)
        count = 3 if moments else 1
        totals = [np.zeros(self.core.parameters) for _ in range(count)]
        offsets = self.core.offsets
        # Several columns (the exact GGN) need a static output size: with an open axis (a
        # sequence length) their count changes per batch, and each count would be traced anew.
        rules = self.layers.rules if columns.shape[1] == 1 or self.core.static_outputs else []
        if not rules:
            routes = {name: "per-example" for name in self.core.names}
        if rules:
            self.layers.squares(raw_inputs, columns, row_weights, moments, totals)
        rest = [k for k, name in enumerate(self.core.names) if routes[name] != "layer rule"]
        if rest:
            example, column = np.nonzero(row_weights)
            got = self.examples.squares(raw_inputs, example, columns[example, column], row_weights[example, column],
                                        moments, rest)
            where = np.concatenate([np.arange(offsets[k], offsets[k + 1]) for k in rest])
            for total, value in zip(totals, got):
                total[where] += value
        return totals if moments else totals * 3
