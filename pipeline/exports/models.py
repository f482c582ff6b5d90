"""The Keras side of the exports: a run's model loaded and proved to be the run's, its weights by
variable path, and a model written whole or not at all.

A run's curvature belongs to the exact weights it was computed at: a model file whose sha256
differs from the one in the run's manifest is refused (the Laplace variances, an EWC anchor or a
merge would silently mix two models).
"""

from __future__ import annotations

import numpy as np

from pipeline.curvature.losses import FAMILIES
from pipeline.curvature.model import load_model
from pipeline.errors import InputError
from pipeline.exports.files import written_whole
from pipeline.job import ModelSpec
from pipeline.read.run import Run
from pipeline.storage.uri import local_copy, sha256


def run_model(run: Run, path: str | None = None):
    """The Keras model of ``run``: ``path`` (a ``.keras`` file), else the one the manifest names.
    ``InputError`` when it is missing or is not the model the run measured (sha256)."""
    model = run.manifest.get("model") or {}
    if path is not None and not str(path).endswith(".keras"):
        raise InputError(f"--model {path} is not a .keras file: give the .keras file run {run.run_id} measured")
    path = path or model.get("path")
    if not path or not str(path).endswith(".keras"):
        raise InputError(f"run {run.run_id} was made from {path or 'an unknown model'}, not a .keras file: give the "
                         "model file with --model")
    try:
        digest = sha256(path)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read model {path} ({' '.join(str(err).split())[:200]}): give the run's model "
                         "with --model") from None
    if model.get("sha256") and digest != model["sha256"]:
        raise InputError(f"model {path} is not the one run {run.run_id} measured (sha256 {digest[:12]}, the run's "
                         f"{str(model['sha256'])[:12]}): give the run's own model file with --model")
    return load_model(ModelSpec(path=path, builder=None, weights=None), fetch=local_copy)


def weights_by_path(model, trainable_only: bool = False) -> dict[str, np.ndarray]:
    """``{variable.path: float64 array}`` of the model's variables (or its trainable ones)."""
    variables = model.trainable_variables if trainable_only else model.variables
    return {v.path: np.asarray(v.numpy(), dtype=np.float64) for v in variables}


def output_size(model) -> int:
    """The last dimension ``K`` of the model's one output (Keras losses average over it)."""
    if len(model.outputs) != 1:
        raise InputError(f"the model has {len(model.outputs)} outputs: the Laplace approximation here takes a "
                         "model with one output")
    return int(model.outputs[0].shape[-1] or 1)


def loss_family(run: Run) -> str:
    """The run's loss as a likelihood family (``FAMILIES``), or ``""`` for any other loss."""
    loss = (run.manifest.get("job") or {}).get("loss") or {}
    return FAMILIES.get(str(loss.get("name")), "")


def assign(model, values: dict[str, np.ndarray]) -> None:
    """Sets each variable named in ``values`` (by path), in the variable's own dtype."""
    for variable in model.variables:
        if variable.path in values:
            variable.assign(np.asarray(values[variable.path]).astype(variable.dtype))


def save_model(model, out: str, weights_only: bool = False) -> str:
    """Saves ``model`` (``.keras``, or its weights: ``.weights.h5``) to ``out``, written under a
    temporary name in the same folder and renamed, so that ``out`` is whole or absent."""
    with written_whole(out, ".weights.h5" if weights_only else ".keras") as temporary:
        if weights_only:
            model.save_weights(temporary, overwrite=True)
        else:
            model.save(temporary, overwrite=True)
    return out
