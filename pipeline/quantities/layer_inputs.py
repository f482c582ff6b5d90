"""``layer_inputs``: per layer, the second moment of its inputs (contract 6.1), the matrix GPTQ,
SparseGPT, OBC and RegMean call "the Hessian" of a layer.

    A_l = sum_i s_i sum_p x_ip x_ip^T / sum_i s_i      [d_in (+1), d_in (+1)]

``x_ip`` is layer l's input at position p of example i (a sequence's step, a convolution's
unfolded patch, ``tf.image.extract_patches`` order = the kernel's C order), with a trailing 1 when
``bias: true``. Layers: every Dense, EinsumDense, Conv1D and Conv2D layer owning a selected
variable (``variables:``). Keras' GPTQ (``keras/src/quantizers/gptq.py``) takes
``H = 2 X^T X / n`` over the ``n`` rows of every position: ``H = 2 A / R`` for R positions per
example (docs/quantities/kronecker.md, "Feeding GPTQ"). Cost: one tapped forward pass per batch (about a third of a
gradient) and ``d x d`` float64 sums per layer. Published as ``layer_inputs.parquet`` (``block``
= layer, ``index``, ``row``); the manifest records each layer's positions per example.
API: ``pipeline.load(run).layer_inputs(layer)``.

Source: Frantar et al. (2023), "GPTQ: accurate post-training quantization for generative
pre-trained transformers"; Keras' own GPTQ.
"""

from __future__ import annotations

from pipeline.curvature.requests import KroneckerRequest
from pipeline.options import Option, boolean
from pipeline.quantities._base import Quantity
from pipeline.quantities.kfac import (FORWARD_GRADIENTS, MAX_DIMENSION, check_widths, factor_cost, factor_means,
                                     layer_lines)
from pipeline.storage import tables

KIND = "layer_inputs"


class LayerInputs(Quantity):
    name = "layer_inputs"
    help = "per layer, its inputs' second moment sum_p x x^T (what GPTQ calls the Hessian)"
    options = {
        "bias": Option(boolean, False, "append a 1 to each input (the bias's row and column)"),
        "max_dimension": MAX_DIMENSION,
    }
    files = ("layer_inputs.parquet",)

    def per_layer(self, options):
        return True

    def notes(self, options, facts):
        return layer_lines(self.name, facts.factor_layers, lambda layer: options["bias"], "A")

    def cost(self, options, w, m, asked, prepared=None):
        check_widths(self.name, w.factor_layers, lambda layer: options["bias"], options["max_dimension"])
        return factor_cost(self.name, w, m, FORWARD_GRADIENTS, 1, lambda layer: options["bias"])

    def request(self, options, context):
        return {"kronecker": (KroneckerRequest(KIND, bias=options["bias"]),)}

    def finalize(self, options, sums):
        means = factor_means(sums, KIND, ("A",))
        return {} if means is None else {self.name: means}

    def manifest(self, options, result):
        return {"layer_positions": result["positions"]}

    def tables(self, options, result, context):
        return {"layer_inputs.parquet": tables.factors_table([(path, None, a) for path, a in result["A"].items()])}


UNIT = LayerInputs()
