"""``export`` and ``merge``: what the command line and ``pipeline.export`` / ``pipeline.merge`` call.

The Keras parts are imported only when a step needs a model (deliberately lazy): ``export
--format npz`` without ``--laplace`` reads Parquet only and starts in a fraction of a second.
"""

from __future__ import annotations

import math
import os

from pipeline.errors import InputError
from pipeline.exports import laplace as laplace_math
from pipeline.exports import npz
from pipeline.quantities.registry import FISHER
from pipeline.read.run import Run, load

FORMATS = ("npz", "weights")


def export(run, format: str = "npz", out: str | None = None, *, laplace: bool = False,
           prior_precision: float | str = "auto", quantity: str | None = None, sigma_noise: float = 1.0,
           model: str | None = None) -> str:
    """Writes a run's curvature for the tools that consume it; returns the file's path.

    ``format="npz"``: ``QUANTITY/VARIABLE_PATH`` arrays, ``examples``, ``weight_sum``
    (``pipeline.exports.npz``); with ``laplace``, the diagonal Laplace approximation
    (``pipeline.exports.laplace``) with ``prior_precision`` (a number or ``"auto"``), the
    curvature ``quantity`` (default: ggn, then fisher, then hessian diagonal) and, for a mean
    squared error, the noise scale ``sigma_noise``; it loads ``model`` (default: the run's).
    ``format="weights"``: ``quantity`` (default the Fisher diagonal) laid out as the model's
    weights, a Keras ``.weights.h5`` that ``model.load_weights`` reads (variables the run did not
    measure are 0). ``out`` defaults to ``./NAME-RUN_ID.npz`` (``.weights.h5``).
    Raises ``InputError`` for a run without the quantity, a model that is not the run's, a loss
    that is no likelihood (Laplace) or an ``out`` inside a published run.
    """
    run = run if isinstance(run, Run) else load(run)
    if format not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if laplace and format != "npz":
        raise InputError("--laplace writes into an npz: use --format npz")
    if laplace and prior_precision != "auto":
        try:
            prior_precision = float(prior_precision)
        except (TypeError, ValueError):
            raise InputError(f"--prior-precision must be a positive number or auto, got {prior_precision!r}") from None
    if not (math.isfinite(sigma_noise) and sigma_noise > 0):
        raise InputError(f"--sigma-noise must be a positive number, got {sigma_noise}: e.g. --sigma-noise 1")
    if format == "npz" and not laplace:
        given = [flag for flag, value, default in (("--prior-precision", prior_precision, "auto"),
                                                   ("--sigma-noise", sigma_noise, 1.0), ("--quantity", quantity, None),
                                                   ("--model", model, None)) if value != default]
        if given:
            raise InputError(f"{', '.join(given)} apply only with --laplace or --format weights: add --laplace, or "
                             "leave them out")
    suffix = ".npz" if format == "npz" else ".weights.h5"
    target = npz.writable_out(out or npz.default_out(run, suffix), suffix)
    if format == "weights":
        return _weights(run, target, quantity or FISHER, model)
    values = npz.arrays(run)
    if laplace:
        from pipeline.exports import models  # lazy: Keras and TensorFlow, only for w*

        keras_model = models.run_model(run, model)
        like = laplace_math.likelihood(models.loss_family(run), models.output_size(keras_model), sigma_noise)
        values.update(npz.laplace_arrays(run, models.weights_by_path(keras_model, trainable_only=True), like,
                                         prior_precision, quantity))
    return npz.write_npz(values, target)


def _weights(run: Run, out: str, quantity: str, model: str | None) -> str:
    from pipeline.exports import models  # lazy: Keras and TensorFlow

    values = npz.arrays(run, [quantity])
    keras_model = models.run_model(run, model)
    prefix = f"{quantity}/"
    laid_out = {path: 0.0 * weights for path, weights in models.weights_by_path(keras_model).items()}
    laid_out.update({key[len(prefix):]: value for key, value in values.items() if key.startswith(prefix)})
    models.assign(keras_model, laid_out)
    return models.save_model(keras_model, out, weights_only=True)


def merge(models_and_runs: list[tuple[str, str]], out: str, quantity: str | None = None) -> str:
    """Fisher-weighted average (``pipeline.exports.merge``) of the models, each with its run;
    writes ``out`` (``.keras``) and returns its path. ``InputError`` for fewer than two models,
    models of different architectures, a model that is not its run's, or a run without
    ``quantity``."""
    from pipeline.exports import models  # lazy: Keras and TensorFlow
    from pipeline.exports.merge import fisher_weighted

    quantity = quantity or FISHER
    if len(models_and_runs) < 2:
        raise InputError("merge needs at least two --model/--run pairs")
    runs = [load(run_dir) for _, run_dir in models_and_runs]
    target = npz.writable_out(out, ".keras", inputs=tuple(path for path, _ in models_and_runs))
    loaded = [models.run_model(run, path) for (path, _), run in zip(models_and_runs, runs)]
    weights = [models.weights_by_path(m) for m in loaded]
    layout = {path: array.shape for path, array in weights[0].items()}
    for (path, _), w in zip(models_and_runs[1:], weights[1:]):
        if {p: a.shape for p, a in w.items()} != layout:
            raise InputError(f"model {path} does not have the architecture of {models_and_runs[0][0]} (variables or "
                             "shapes differ): merge models of one architecture")
    fishers = []
    for run in runs:
        values = npz.arrays(run, [quantity])
        fishers.append({key.split("/", 1)[1]: value for key, value in values.items() if key.startswith(f"{quantity}/")})
    models.assign(loaded[0], fisher_weighted(weights, fishers))
    return models.save_model(loaded[0], os.path.abspath(target))
