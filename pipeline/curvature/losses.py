"""Per-example losses ``l_i`` and, for Monte Carlo GGN, the model's predictive distribution.

Keras loss *functions* (``keras.losses.get(name)``) are used rather than ``Loss`` objects:
the objects cast predictions to their own dtype (float32), which silently turns a float64
run into a float32 one (see PITFALLS.md).
"""

from __future__ import annotations

import functools
import inspect
import warnings

import keras

from pipeline.curvature.adapter import KerasLoss
from pipeline.callables import import_callable
from pipeline.errors import InputError, InputWarning

# Losses whose second derivative is zero almost everywhere: the Hessian, GGN and every
# spectral quantity are zero or meaningless for them (the user is warned, not refused).
PIECEWISE_LINEAR = {
    "mae", "mean_absolute_error", "mape", "mean_absolute_percentage_error",
    "hinge", "categorical_hinge",
}

# Families whose predictive distribution we can sample for the Monte Carlo GGN.
FAMILIES = {
    "sparse_categorical_crossentropy": "categorical_sparse",
    "categorical_crossentropy": "categorical_onehot",
    "binary_crossentropy": "bernoulli",
    "mse": "gaussian",
    "mean_squared_error": "gaussian",
}


class PerExampleLoss:
    """The job's loss, resolved: a Keras loss function and its options, or a user function.

    ``fn`` is the Keras loss *function* (its options kept apart in ``options``, so the model
    adapter can wrap it as Keras' compile does), or the user's function with its options
    bound. How it is applied to a model's outputs (label ranks, logits, masks, dtypes) is
    ``pipeline.curvature.adapter.ModelAdapter``'s business; calling this object applies it
    to plain output tensors, without masks.

    Example::

        loss = resolve_loss(LossSpec("sparse_categorical_crossentropy", {"from_logits": True}, None))
        per_example = loss([labels], [logits])        # shape [batch]
    """

    def __init__(self, fn, name: str | None, options: dict, family: str | None, user_function: bool):
        self.fn = fn
        self.name = name
        self.options = dict(options)
        self.family = family
        self.user_function = user_function
        self.from_logits = bool(options.get("from_logits", False))

    def __call__(self, labels: list, outputs: list):
        return KerasLoss(self, outputs[0].dtype).per_example_loss(list(labels), list(outputs),
                                                                  [None] * len(outputs))

    def describe(self) -> dict:
        """What the manifest records about the loss."""
        return {"name": self.name, "options": self.options, "family": self.family}


def resolve_loss(loss_spec) -> PerExampleLoss:
    """Turns the job's ``loss`` (``pipeline.job.LossSpec``) into a ``PerExampleLoss``."""
    if loss_spec.function or (loss_spec.name and ":" in loss_spec.name):
        reference = loss_spec.function or loss_spec.name
        fn = import_callable(reference, "loss function")
        if loss_spec.options:
            fn = functools.partial(fn, **loss_spec.options)
        return PerExampleLoss(fn, reference, loss_spec.options, None, user_function=True)
    name = loss_spec.name
    try:
        fn = keras.losses.get(name)
    except Exception:  # noqa: BLE001
        fn = None
    if fn is None or isinstance(fn, keras.losses.Loss) or not callable(fn):
        raise InputError(
            f"unknown loss {name!r}: use a Keras loss name such as sparse_categorical_crossentropy, "
            "categorical_crossentropy, binary_crossentropy or mse, or 'pkg.module:function'"
        )
    if name in PIECEWISE_LINEAR:
        warnings.warn(
            f"loss {name!r} is piecewise linear: its second derivative is zero almost everywhere, "
            "so Hessian and GGN quantities will be zero or meaningless",
            InputWarning,
            stacklevel=2,
        )
    canonical = fn.__name__
    family = FAMILIES.get(canonical) or FAMILIES.get(name)
    try:  # a wrong option (e.g. a typo) must fail now, not inside a worker
        inspect.signature(fn).bind(None, None, **loss_spec.options)
    except TypeError:
        raise InputError(
            f"loss {name!r} does not take option(s) {sorted(loss_spec.options)}: remove them"
        ) from None
    return PerExampleLoss(fn, name, loss_spec.options, family, user_function=False)
