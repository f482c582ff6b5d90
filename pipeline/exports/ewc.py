"""Elastic weight consolidation for Keras training, from an exported Fisher diagonal.

EWC (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks") keeps a
model near the weights ``w*`` it had after task A while it trains on task B, each weight held in
proportion to its Fisher information:

    penalty = strength * sum_j F_j (w_j - w*_j)^2

``F`` is the run's mean Fisher diagonal (``export --format npz``'s ``QUANTITY/PATH`` arrays);
``strength`` is the paper's ``lambda / 2`` and absorbs ``N`` (use ``strength = lambda N / 2`` to
weigh task A's data as a sum over its ``N`` examples against task B's mean loss). ``EWC`` is a
``keras.regularizers.Regularizer`` (one per variable); ``attach`` sets one on every variable the
export names, through ``Variable.regularizer``, so that ``model.losses`` holds the penalties and
``fit`` adds them to the loss. Cost: one elementwise product per variable per step.

Example::

    >>> import keras, numpy as np                                                   # doctest: +SKIP
    >>> attach(model, np.load("digits-mlp-r1.npz"), strength=100.0)                 # doctest: +SKIP
    >>> model.compile("adam", "sparse_categorical_crossentropy"); model.fit(x_b, y_b)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
import numpy as np

from pipeline.errors import InputError
from pipeline.quantities.registry import FISHER


@keras.saving.register_keras_serializable(package="hessian_pipeline")
class EWC(keras.regularizers.Regularizer):
    """``strength * sum(fisher * (w - anchor)^2)`` for one variable; ``fisher`` and ``anchor``
    are arrays of the variable's shape."""

    def __init__(self, fisher, anchor, strength: float = 1.0):
        self.fisher = np.asarray(fisher, dtype=np.float64)
        self.anchor = np.asarray(anchor, dtype=np.float64)
        if self.fisher.shape != self.anchor.shape:
            raise InputError(f"EWC: the Fisher diagonal has shape {self.fisher.shape} and the anchor "
                             f"{self.anchor.shape}: export the run of this model")
        self.strength = float(strength)

    def __call__(self, x):
        fisher = keras.ops.convert_to_tensor(self.fisher, dtype=x.dtype)
        anchor = keras.ops.convert_to_tensor(self.anchor, dtype=x.dtype)
        penalty = self.strength * keras.ops.sum(fisher * keras.ops.square(x - anchor))
        # In Keras' loss dtype (floatx, as its Loss objects compute): fit adds it to the loss.
        return keras.ops.cast(penalty, keras.backend.floatx())

    def get_config(self):
        return {"fisher": self.fisher.tolist(), "anchor": self.anchor.tolist(), "strength": self.strength}


def attach(model, export: Mapping, strength: float, quantity: str = FISHER,
           anchor: Mapping | None = None) -> list[str]:
    """Sets an ``EWC`` regularizer on each variable of ``model`` that ``export`` (an exported
    ``.npz`` as ``numpy.load`` opens it, or a dict) has ``QUANTITY/PATH`` for; ``anchor`` maps
    paths to ``w*`` (default: the model's weights now, i.e. after task A). Returns the paths.
    ``InputError`` when the export names a variable the model lacks or of another shape."""
    prefix = f"{quantity}/"
    wanted = {key[len(prefix):]: np.asarray(export[key]) for key in export if key.startswith(prefix)}
    if not wanted:
        raise InputError(f"the export has no {quantity}: export a run that computed it")
    variables = {v.path: v for v in model.trainable_variables}
    for path, fisher in wanted.items():
        variable = variables.get(path)
        if variable is None or tuple(variable.shape) != fisher.shape:
            raise InputError(f"the model has no variable {path} of shape {fisher.shape}: attach the export of this "
                             "model's run")
    for path, fisher in wanted.items():
        start = anchor[path] if anchor is not None else variables[path].numpy()
        variables[path].regularizer = EWC(fisher, start, strength)
    return list(wanted)
