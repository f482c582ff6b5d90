"""What the engine computes for each batch: the request every quantity unit adds to.

TensorFlow-free, so the driver, the quantity units and the worker pool can build and pass it
without importing TensorFlow. The engine fuses every field of one request into one forward
pass and one gradient per batch (``pipeline.curvature.engine``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np


@dataclass(frozen=True)
class BatchWork:
    """The building blocks to sum over each batch. Vectors are arrays of shape [K, P]: float64,
    or int8 for Rademacher probes (converted to the compute dtype in the worker).

    - ``gradient``: ``sum_i s_i g_i`` (the loss sum ``sum_i s_i l_i`` is always computed);
    - ``hessian_diagonal="exact"``: ``sum_i s_i diag(H_i)`` by P basis-vector HVPs;
    - ``probes``: ``sum_i s_i z_k * (H_i z_k)`` for each row ``z_k`` (Hutchinson; both may be
      asked at once: an exact trace beside a Hutchinson diagonal);
    - ``hvp_vectors``: ``sum_i s_i H_i v_k``;
    - ``ggn_diagonal``: ``"exact"`` (``diag(J^T Lambda J)``) or ``"mc"`` (``ggn_samples``
      labels per example drawn from ``(seed, sample, row)``);
    - ``sum_grad_squared``: ``sum_i s_i g_i**2`` (BackPACK's ``SumGradSquared``);
    - ``hessian_blocks``: ``sum_i s_i (H_i)_bb`` for each block ``b``, given as the positions of
      its variables among the engine's (their entries in flat order), as ``hessian_block_<k>``;
    - ``kronecker``: per-layer Kronecker factors and layer-input moments, one
      ``KroneckerRequest`` per quantity that asks (requests of several quantities add up);
    - ``ggn_matrix``: the dense GGN ``sum_i s_i J_i^T Lambda_i J_i`` ``[P, P]`` (``dense_ggn``).
    """

    gradient: bool = True
    hessian_diagonal: str | None = None  # "exact"
    probes: np.ndarray | None = None  # Hutchinson probes z_k
    hvp_vectors: np.ndarray | None = None
    ggn_diagonal: str | None = None  # "exact" | "mc"
    ggn_samples: int = 1
    sum_grad_squared: bool = False
    hessian_blocks: tuple[tuple[int, ...], ...] = ()  # variable positions of each dense block
    kronecker: tuple = ()  # KroneckerRequest, one per asking quantity
    ggn_matrix: bool = False  # the dense GGN, sum_i s_i J_i^T Lambda_i J_i [P, P] (influence: ggn)
    seed: int = 0

    def merged(self, **asked) -> "BatchWork":
        """This request with ``asked`` added. A field left at its default takes the asked value;
        a field two quantities set to different values is an error of the units that asked
        (never silently one of them)."""
        changes = {}
        for name, value in asked.items():
            current, default = getattr(self, name), _DEFAULTS[name]
            if name == "kronecker":  # each quantity's own request: they add up
                changes[name] = tuple(dict.fromkeys(current + tuple(value)))
                continue
            if _same(value, default) or _same(current, value):
                continue
            if not _same(current, default):
                raise ValueError(f"two quantities ask the engine for different {name}: {current!r} and {value!r}")
            changes[name] = value
        return replace(self, **changes)


@dataclass(frozen=True)
class KroneckerRequest:
    """What the Kronecker family (``pipeline.curvature.kronecker_factors``) sums for one
    quantity, per layer ``l`` of the selected Dense/EinsumDense/Conv1D/Conv2D layers, over the
    positions ``p`` of each example (a sequence's steps, a convolution's output pixels):

    - ``kind="layer_inputs"``: ``A_l = sum_i s_i sum_p x_ip x_ip^T`` (``x_ip`` the layer's
      input at p, a convolution's unfolded patch; with ``bias`` a trailing 1);
    - ``kind="kfac"``: ``A_l`` (a trailing 1 where the layer has a bias) and ``S_l = sum_i s_i
      sum_p g_ip g_ip^T``, ``g_ip`` the gradient of the per-example loss with respect to the
      layer's pre-activation output at p, for labels per ``fisher_type`` ("empirical": the
      data's; "mc": ``samples`` draws from the model's predictive distribution, each weighted
      ``1/samples``; "exact": each column of a square root of the loss's output Hessian);
      ``reduction="reduce"`` takes ``x_i = mean_p x_ip`` and ``g_i = sum_p g_ip`` instead;
    - ``kind="kfac_eigen"``: ``sum_i s_i (Q_A^T G_i Q_S)**2``, ``G_i = sum_p x_ip g_ip^T`` the
      per-example gradient of the layer's weights (bias as the last row), for the eigenbases
      ``bases`` = ``{layer: (Q_A, Q_S)}`` of a finished ``kfac``.

    Also summed: ``sum_i s_i`` (the factors' divisor) and ``sum_i s_i R_i`` (positions R_i).
    """

    kind: str  # "layer_inputs" | "kfac" | "kfac_eigen"
    bias: bool = False  # layer_inputs: append a 1 to every layer's input
    fisher_type: str = "empirical"
    samples: int = 1
    reduction: str = "expand"
    # kfac_eigen: {layer: (Q_A [d_in, d_in], Q_S [d_out, d_out])}; not compared (arrays).
    bases: dict = field(default_factory=dict, compare=False, hash=False)

    def key(self, layer: str, factor: str) -> str:
        """Its sum's key in ``Partial.sums``: ``"<kind>/<layer>/<factor>"``."""
        return f"{self.kind}/{layer}/{factor}"

    @property
    def weight_key(self) -> str:
        return f"{self.kind}/weight"


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return a is b
    return a == b


_DEFAULTS = {f.name: f.default for f in fields(BatchWork)}



@dataclass(frozen=True)
class RowsRequest:
    """What the rows pass computes for each example i (contract 7; ``pipeline.curvature.
    example_rows``), never summed over examples:

    - always ``loss`` (``l_i``, unweighted, a masked sequence's masked sum) and ``gradient_norm``
      (``|g_i|`` over the selected variables);
    - ``projection`` > 0: ``Phi g_i`` (``pipeline.influence.projection``, drawn from ``seed``);
    - ``arrays`` with ``PATH/QA``, ``PATH/QS``, ``PATH/M`` per factored layer and
      ``__rest__/diagonal`` or ``__rest__/dense`` (``Preconditioner.worker_arrays``), and
      ``self_influence``: ``g_i^T (C + lambda I)^-1 g_i``;
    - ``vectors`` ``[Q, P]`` (the preconditioned query gradients ``v_q``): the scores ``g_i . v_q``,
      kept per shard as the ``top_k`` best per query and kind, and all of them with ``dense_scores``;
    - ``gradients``: ``g_i`` itself ``[B, P]`` (the query set's gradients; no layer route).

    ``structured``: whether factored layers take the layer route (``g_i`` never formed; False for
    the dense GGN, whose preconditioner acts on whole gradients).
    """

    projection: int = 0
    projection_dtype: str = "float32"
    seed: int = 0
    self_influence: bool = False
    structured: bool = True
    gradients: bool = False
    top_k: int = 0
    dense_scores: bool = False
    # Written to ``per_example/`` (the rows pass of the training data; False for the query set).
    write: bool = True
    # Data files as the ``file`` column names them (relative to ``data.path``), in plan order.
    files: tuple = field(default=(), compare=False, hash=False)
    arrays: dict = field(default_factory=dict, compare=False, hash=False)
    vectors: np.ndarray | None = field(default=None, compare=False, hash=False)
