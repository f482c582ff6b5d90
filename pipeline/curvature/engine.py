"""One batch in, additive float64 partial sums out: the heart of hessian-pipeline.

Notation (``../shared/CONTRACT.md`` section 1): ``l_i`` the per-example loss, ``s_i`` its
weight (1 without a weights column), ``w`` the trainable variables flattened into P entries,
``H_i`` the Hessian of ``l_i``, ``g_i`` its gradient, ``f_i`` the model output handed to the
loss, ``J_i = df_i/dw``, ``Lambda_i = d2 l_i / d f_i2``.

Every method returns *sums over the batch* (``sum_i s_i * ...``); the reducer divides once by
``sum_i s_i`` over the whole dataset. The engine reads a ``BatchWork`` and hands each of its
fields to the family of products that owns it, each in its own module over a shared ``Core``
(the model, the loss, the parameters, the compiled functions) and a per-batch ``Pass`` (the
loss, the gradient and the output-space derivatives, computed once); no family imports
another (``outer_products`` combines two of them; ``cotangents`` serves both that and the
Kronecker family). Cost for a batch of B examples (one "gradient" = one forward and one
backward pass):

========================  ==================================  =====================================
``BatchWork`` field       family (module)                     cost
========================  ==================================  =====================================
``gradient``, the loss    the HVP pass when vectors are        1 gradient (none beside the HVPs)
                          asked, else ``Core``
``hvp_vectors``,          ``HvpProducts`` (``hvp_products``)   about 1 + 0.9 K gradients, K vectors
``probes``
``hessian_diagonal``,     ``ExactBlocks`` (``exact_blocks``)   P (or b) Hessian-vector products
``hessian_blocks``
``sum_grad_squared``,     ``LayerProducts`` for the variables  ~0.8 gradients per cotangent column
``ggn_diagonal``          with a layer rule, ``ExamplePro-     (1, or C for the exact GGN); ~4 per
                          ducts`` for the others               chunk of rows per example
``kronecker``             ``KroneckerFactors``                 ~1/3 gradient (a tapped forward pass)
                          (``kronecker_factors``)              + ~0.8 gradients per column for S
========================  ==================================  =====================================

How the exact and per-example products are formed, vectorised or in a loop, is decided once per
model and checked on its first rows (``routes.RouteChooser``). Two requests are fused into a
single pass (``_fused``): the empirical Fisher alone, and the
Monte Carlo GGN alone, when every variable has a layer rule: the layer family then gives the
loss and the gradient from the pass that taps the layers.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from pipeline.curvature.adapter import model_signature
from pipeline.curvature.core import Core
from pipeline.curvature import dense_ggn
from pipeline.curvature.cotangents import cotangents, joined
from pipeline.curvature.example_rows import ExampleRows
from pipeline.curvature.example_products import ExampleProducts
from pipeline.curvature.exact_blocks import ExactBlocks
from pipeline.curvature.hvp_products import HvpProducts, XlaTrial
from pipeline.curvature.kronecker_factors import KroneckerFactors
from pipeline.curvature.layer_products import LayerProducts
from pipeline.curvature.model import copy_mismatch, each_example_alone, to_precision, warn_float32_inside
from pipeline.curvature.outer_products import OuterProducts
from pipeline.curvature.passes import Pass
from pipeline.curvature.requests import BatchWork
from pipeline.curvature.routes import ROUTES, RouteChooser
from pipeline.curvature.tensors import batch_tensor, input_dtype, set_threads
from pipeline.errors import InputError
from pipeline.partial import Partial

# Re-exported: the worker sizes TensorFlow's pools, the probe casts batches, tests try XLA.
__all__ = ["CurvatureEngine", "XlaTrial", "batch_tensor", "set_threads"]

# The families that answer a batch after the fused passes (``_fused``), in order: whether
# ``work`` asks for it, and the method that hands it the batch. A new family is one module,
# its construction in ``CurvatureEngine.__init__`` and one line here.
FAMILIES = (
    (lambda work: True, "_curvature"),  # the loss, the gradient, HVPs, exact diagonal and blocks
    (lambda work: bool(work.sum_grad_squared or work.ggn_diagonal), "_outer_products"),
    (lambda work: bool(work.kronecker), "_kronecker"),
    (lambda work: work.ggn_matrix, "_dense_ggn"),
)


class CurvatureEngine:
    """Partial sums of curvature quantities of ``loss(y, model(x))`` for one batch at a time.

    Example::

        engine = CurvatureEngine(model, resolve_loss(spec), precision="float64")
        part = engine.partial(inputs=[x], labels=[y], weights=None, rows=np.arange(len(x)),
                              work=BatchWork(hessian_diagonal="exact"))
        diag_h = part.sums["hessian_diagonal"] / part.weight_sum

    Parameters:
        model: a Keras 3 model (called with ``training=False``).
        loss: a ``PerExampleLoss``.
        precision: "float32" or "float64" (a float64 copy of the model is made).
        hvp_block: vectors per compiled HVP call (they share one forward pass and gradient).
        diagonal_block: gradient entries per vectorised Jacobian block (exact diagonal).
        vjp_budget: floats held at once by per-example products (rows x P).
        selected: glob patterns over variable paths (``ModelSignature.select``): the variables
            every quantity is taken with respect to; None or "all" for every trainable variable.
        layer_rule: Fisher and GGN products by per-layer rules where a layer has one
            (``layer_rules``); False for per-example products of the whole model everywhere.
        xla: whether HVP functions may run compiled by XLA (``jit_compile``): "auto" tries it
            where a GPU is visible, "on" everywhere, "off" never. A try (``XlaTrial``) keeps
            XLA for a function only if, on its first batch, it agrees with the plain graph
            and is faster; ``xla_trials`` holds what each try measured.
    """

    def __init__(self, model, loss, precision: str = "float32", hvp_block: int = 16,
                 diagonal_block: int = 512, vjp_budget: int = 1 << 24, threads: int | None = None,
                 builder=None, route: str | None = None, selected=None, layer_rule: bool = True,
                 xla: str = "auto"):
        set_threads(threads)
        if xla not in ("auto", "on", "off"):
            raise ValueError(f"xla must be auto, on or off, not {xla!r}")
        self.precision = precision
        self.dtype = tf.float64 if precision == "float64" else tf.float32
        # The model as loaded, kept to check the copy against it (``check_copy``).
        self.original = each_example_alone(model)
        self.model = each_example_alone(to_precision(model, precision, builder))
        warn_float32_inside(self.model, precision)
        self.loss = loss
        self.core = Core(self.model, loss, self.dtype, selected, hvp_block, diagonal_block, vjp_budget, route)
        core = self.core
        self.adapter, self.signature, self.variables = core.adapter, core.signature, core.variables
        self.names, self.shapes, self.sizes, self.parameters = core.names, core.shapes, core.sizes, core.parameters
        self.hvp_block, self.diagonal_block, self.vjp_budget = core.hvp_block, core.diagonal_block, core.vjp_budget
        # On CPU, XLA measured slower for HVPs through convolutions (4.2x against 2.7x a
        # gradient) and no faster on an MLP (benchmarks/engine_bench.py): "auto" skips it there.
        self.hvps = HvpProducts(core, xla == "on" or (xla == "auto" and bool(tf.config.list_logical_devices("GPU"))))
        self.exact = ExactBlocks(core)
        self.examples = ExampleProducts(core)
        # The layers whose Fisher and GGN products take a per-layer rule are decided on the
        # first batch (``layer_routes``).
        self.layers = LayerProducts(core, enabled=layer_rule)
        self.kronecker = KroneckerFactors(core)
        self.outer = OuterProducts(core, self.examples, self.layers)
        self.example_rows = ExampleRows(core, self.kronecker)
        self.routes = RouteChooser(core, self.exact.hessian_rows, self.examples.sum_sq_vjp)
        # Why each route was kept or dropped after its check on the first rows.
        self.route_checks = self.routes.checks
        self.xla_trials = self.hvps.xla_trials

    @property
    def route(self) -> str | None:
        """"vectorised" or "loop": how the exact diagonal and Hessian blocks are formed."""
        return self.core.routes.route

    @property
    def per_example_route(self) -> str | None:
        """"vectorised" or "loop": how the per-example products of the Fisher and GGN are formed."""
        return self.core.routes.per_example

    def check_copy(self, inputs) -> None:
        """Raises ``InputError`` when the copy computing in ``precision`` (``to_precision``) does
        not compute what the loaded model computes on ``inputs`` (batch arrays), naming the
        first layer that differs (``model.copy_mismatch``). Nothing to check when no copy was
        made. Cost: two forward passes over ``inputs``."""
        if self.model is self.original:
            return
        pack = self.core.adapter._pack
        original = [batch_tensor(a, tf.as_dtype(input_dtype(spec.dtype))) for a, spec in
                    zip(inputs, model_signature(self.original).inputs)]
        different = copy_mismatch(self.original, self.model, pack(original), pack(
            [batch_tensor(a, self.dtype) for a in inputs]))
        if different:
            raise InputError(
                f"the {self.precision} copy of the model differs from it on the first {len(inputs[0])} rows: "
                f"{different}: its state is not all in its weights (set_weights): use precision: "
                f"{self.original_precision()}, or give a builder model (model: {{builder: ...}}) that rebuilds it")

    def check_regularization(self) -> None:
        """Raises ``InputError`` when ``include_regularization: true`` cannot be honoured: an
        ``activity_regularizer``'s term depends on each example's activations, while
        ``regularization_partial`` adds ``model.losses`` once, as weight regularizers need."""
        for layer in self.model._flatten_layers(include_self=True):
            if getattr(layer, "activity_regularizer", None) is not None:
                raise InputError(
                    f"layer {layer.name!r} has an activity_regularizer: its term depends on each example's "
                    "activations, and include_regularization: true adds model.losses once: remove the activity "
                    "regularizer, or set include_regularization: false (activity terms are then left out)")

    def original_precision(self) -> str:
        """The precision the loaded model computes in (its variables' dtype for mixed policies)."""
        return "float64" if str(self.original.dtype_policy.variable_dtype) == "float64" else "float32"

    # ------------------------------------------------------------------ the parameters
    def flatten(self, tensors):
        """Concatenates per-variable tensors (leading dims kept) into [..., P], C order."""
        return self.core.flatten(tensors)

    def unflatten(self, flat):
        """Splits [..., P] into per-variable tensors of the variables' shapes."""
        return self.core.unflatten(flat)

    def cast_batch(self, inputs, labels, weights):
        """Batch arrays as tensors of the compute dtype, and the weights ``s`` (ones when None)."""
        return self.core.cast_batch(inputs, labels, weights)

    def hvp_function(self, specs, count: int, with_gradient: bool = False, probe_products: bool = False,
                     objective=None, tag: str = "data"):
        """The compiled ``(inputs, labels, weights, V[count, P]) -> (loss, gradient, HV)``
        (``HvpProducts.function``)."""
        return self.hvps.function(specs, count, with_gradient, probe_products, objective, tag)

    def layer_routes(self, raw_inputs) -> dict[str, str]:
        """Per variable name, how its Fisher and GGN products are formed: "layer rule"
        (``layer_rules``) or "per-example" (vectorised products of the whole model). Decided
        once per model, on the first rows that reach it."""
        return self.layers.routes(raw_inputs)

    def rule_rows(self, batch: int) -> int:
        """Rows per call of the layer rules (``LayerProducts.rule_rows``)."""
        return self.layers.rule_rows(batch)

    def check_output_derivatives(self, inputs, labels, weights) -> None:
        """``ExampleProducts.check`` on a batch of arrays (once per engine): raises
        ``InputError`` unless the output-space derivatives reproduce the loss's gradient."""
        self.examples.check(self._pass(inputs, labels, weights, np.arange(len(inputs[0])), self.core.objective, "data"))

    # ------------------------------------------------------------------ per batch
    def partial(self, inputs, labels, weights, rows, work: BatchWork) -> Partial:
        """Float64 partial sums of every quantity ``work`` asks for, over one batch.

        ``inputs``/``labels``: lists of arrays in ``model.inputs``/``model.outputs`` order;
        ``weights``: [B] or None; ``rows``: the examples' global row indices (they key the
        Monte Carlo label draws, so the result does not depend on the sharding).
        """
        batch = self._pass(inputs, labels, weights, rows, self.core.objective, "data")
        part = Partial(examples=len(rows), weight_sum=self._weight_sum(batch), batches=1)
        if self._fused(part, batch, work):
            return part
        for asks, answer in FAMILIES:
            if asks(work):
                getattr(self, answer)(part, batch, work)
        return part

    def _pass(self, inputs, labels, weights, rows, objective, tag: str) -> Pass:
        x, y, s = self.core.cast_batch(inputs, labels, weights)
        return Pass(list(inputs), list(labels), weights, np.asarray(rows), x, y, s, self.core.specs(inputs, labels),
                    objective, tag)

    def _fused(self, part: Partial, batch: Pass, work: BatchWork) -> bool:
        """The fusing decisions, in one table: a request that one family answers whole, the
        loss and the gradient included, in one pass per chunk of rows. Each row: what is asked
        beside the loss and the gradient (alone), when the fused pass applies, what answers.
        The condition runs only for its request (it may decide the layer rules, once)."""
        table = (
            ({"fisher"}, lambda: self._fisher_in_gradient_pass(batch),
             lambda: self.layers.loss_gradient_fisher(part, batch, work.gradient)),
            ({"ggn_mc"}, lambda: self.layers.take_monte_carlo(batch.inputs),
             lambda: self.layers.monte_carlo(part, batch, work, with_loss=True)),
        )
        asked = _curvature_asked(work)
        for request, applies, answer in table:
            if asked == request and applies():
                answer()
                return True
        return False

    def _fisher_in_gradient_pass(self, batch: Pass) -> bool:
        """Whether the Fisher comes with the loss and gradient in one pass: every variable has
        a layer rule, and the weights ``s_i`` are such that ``(s_i dz_i)**2 / s_i`` stays in the
        compute dtype's range."""
        if batch.weights is not None:
            sizes = np.abs(np.asarray(batch.weights, dtype=np.float64))
            sizes = sizes[sizes > 0]
            limit = 1e100 if self.dtype == tf.float64 else 1e6
            if sizes.size and (sizes.max() > limit or sizes.min() < 1.0 / limit):
                return False
        return self.layers.cover_every_variable(batch.inputs)

    def _weight_sum(self, batch: Pass) -> float:
        """The batch's share of the objective's divisor: ``sum_i s_i``, or with a sequence mask
        ``sum_i s_i n_i`` (``ModelAdapter.position_counts``: the token-weighted objective).
        Cost for a masked model: one forward pass of the batch (none otherwise, once known)."""
        weights = batch.weight_values
        if self.adapter.masked is False:
            return float(np.sum(weights, dtype=np.float64))

        def counts(a, b):
            outputs, masks = self.adapter.forward(list(a))
            n = self.adapter.position_counts(list(b), outputs, masks)
            return tf.ones(tf.shape(outputs[0])[:1], self.dtype) if n is None else tf.cast(n, self.dtype)

        n = self.core.compiled(("counts",), counts, batch.specs[:2])(batch.x, batch.y).numpy().astype(np.float64)
        return float(np.sum(weights * n, dtype=np.float64))

    def regularization_partial(self, work: BatchWork) -> Partial:
        """The regularization terms (``model.losses``), computed once for the whole dataset.

        Not divided by the example count: the reducer adds them after dividing (the contract
        adds regularization once to L). Fisher and GGN are defined over the data loss only.
        """
        inputs = [np.zeros((1, *[d or 1 for d in spec.shape]), dtype=np.float32) for spec in self.signature.inputs]
        x = [tf.constant(a, dtype=self.dtype) for a in inputs]
        y = [tf.constant(np.zeros((1,), dtype=np.float32), dtype=self.dtype)]
        s = tf.constant(np.ones(1), dtype=self.dtype)
        specs = ([tf.TensorSpec([None, *a.shape[1:]], self.dtype) for a in inputs],
                 [tf.TensorSpec([None], self.dtype)], tf.TensorSpec([None], self.dtype))
        part = Partial()
        batch = Pass(inputs, [], None, np.zeros(1, np.int64), x, y, s, specs, self.core.regularization, "reg")
        self._curvature(part, batch, work)
        return part

    def _curvature(self, part: Partial, batch: Pass, work: BatchWork) -> None:
        """Loss, gradient, HVPs and exact second derivatives of ``batch.objective``: the HVP
        family first (the loss and the gradient come with its products), a plain gradient
        where it gave none, then the exact family on the route decided for the model."""
        core = self.core
        self.hvps.answer(part, batch, work)
        if batch.loss is None or (work.gradient and batch.gradient is None):
            objective = batch.objective
            fn = core.compiled((batch.tag, "gradient"), lambda a, b, c: core.loss_and_gradient(objective, a, b, c),
                               batch.specs)
            batch.loss, batch.gradient = fn(*batch.batch)
        part.sums["loss"] = np.asarray(batch.loss.numpy(), dtype=np.float64)
        if work.gradient:
            part.sums["gradient"] = batch.gradient.numpy().astype(np.float64)
        if work.hessian_diagonal == "exact" or work.hessian_blocks:
            self.route_for(batch.objective, batch.specs, batch.batch, needs=("route",))
            self.exact.answer(part, batch, work)

    def _outer_products(self, part: Partial, batch: Pass, work: BatchWork) -> None:
        """The empirical Fisher and the GGN diagonals (``OuterProducts``) on the per-example
        route decided for the model."""
        self.route_for(self.core.objective, batch.specs, batch.batch, needs=("per_example_route",))
        self.outer.answer(part, batch, work)

    def _kronecker(self, part: Partial, batch: Pass, work: BatchWork) -> None:
        """Each ``KroneckerRequest`` of ``work`` by the Kronecker family, handed the cotangents
        of its ``fisher_type`` when it needs an ``S`` (``kfac``, ``kfac_eigen``)."""
        for request in work.kronecker:
            columns = ()
            if request.kind != "layer_inputs":
                self.examples.check(batch)
                derivatives = self.examples.batch_derivatives(batch, request.fisher_type == "exact")
                columns = cotangents(batch, request.fisher_type, derivatives, self.examples, self.dtype,
                                     request.samples, work.seed)
                if request.fisher_type == "mc" and request.kind == "kfac":
                    columns = joined(columns)  # S's standard error needs each example's S_i whole
            self.kronecker.answer(part, batch, request, columns)

    def _dense_ggn(self, part: Partial, batch: Pass, work: BatchWork) -> None:
        """The dense GGN (``dense_ggn``) on the per-example route decided for the model."""
        self.route_for(self.core.objective, batch.specs, batch.batch, needs=("per_example_route",))
        dense_ggn.answer(self.core, self.examples, part, batch)

    def rows(self, inputs, labels, request) -> dict[str, np.ndarray]:
        """Per-example arrays of one batch (``ExampleRows.rows``, contract 7): ``loss``,
        ``gradient_norm`` and what ``request`` (a ``RowsRequest``) asks, each ``[B, ...]``
        float64; on the per-example route decided for the model."""
        x, y, s = self.core.cast_batch(inputs, labels, None)
        self.route_for(self.core.objective, self.core.specs(inputs, labels), (x, y, s), needs=("per_example_route",))
        return self.example_rows.rows(inputs, labels, request, (x, y))

    def route_for(self, objective, specs, batch=None, needs=ROUTES) -> str:
        """``RouteChooser.choose``: the exact family's route, "vectorised" or "loop" (and the
        per-example family's), decided once per model; those in ``needs`` checked on ``batch``."""
        return self.routes.choose(objective, specs, batch, needs)

    def vectorisation_routes(self, inputs, labels, needs=ROUTES) -> tuple[str, str]:
        """``(route, per_example_route)`` for batches like this one (for the plan), each
        vectorised route in ``needs`` checked against its loop on these rows (``route_checks``)."""
        x, y, s = self.core.cast_batch(inputs, labels, None)
        self.route_for(self.core.objective, self.core.specs(inputs, labels), (x, y, s), needs)
        return self.core.routes.route, self.core.routes.per_example


def _curvature_asked(work: BatchWork) -> set[str]:
    """The curvature quantities ``work`` asks for beside the loss and gradient."""
    asked = {"fisher": work.sum_grad_squared, "hessian_diagonal": bool(work.hessian_diagonal),
             "hessian_blocks": bool(work.hessian_blocks), f"ggn_{work.ggn_diagonal}": bool(work.ggn_diagonal),
             "hvp": work.hvp_vectors is not None and len(work.hvp_vectors) > 0,
             "probes": work.probes is not None and len(work.probes) > 0, "kronecker": bool(work.kronecker),
             "ggn_matrix": work.ggn_matrix}
    return {name for name, wanted in asked.items() if wanted}
