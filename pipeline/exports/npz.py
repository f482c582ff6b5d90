"""``export RUN --format npz``: a run's per-parameter quantities as one ``.npz`` (contract 6.3).

Keys: ``QUANTITY/VARIABLE_PATH`` (``ggn_diagonal/dense/kernel``), each a float64 array of the
variable's shape, for every diagonal quantity the run computed (``hessian_diagonal``,
``ggn_diagonal``, the Fisher diagonal, ``gradient``); ``examples`` (int64 scalar, N) and
``weight_sum`` (float64 scalar, ``sum_i s_i``: N for unweighted data). The values are means over
the data (the run's own normalisation): ``N * F`` is the sum that EWC and Laplace use.

With ``laplace`` (``pipeline.exports.laplace``), also ``posterior_variance/VARIABLE_PATH`` and
the scalars ``laplace/prior_precision``, ``laplace/log_marginal_likelihood``, ``laplace/quantity``
(the curvature used) and the curve ``laplace/grid/prior_precision``,
``laplace/grid/log_marginal_likelihood``.

``numpy.load(FILE)`` reads it; the file is written to a temporary name beside ``FILE`` and
renamed, so that it is whole or absent. Cost: reading ``diagonals.parquet``; no TensorFlow
unless ``laplace`` (which loads the run's model for ``w*``).
"""

from __future__ import annotations

import os

import numpy as np

from pipeline.errors import InputError
from pipeline.exports import laplace as laplace_math
from pipeline.exports.files import written_whole
from pipeline.quantities.registry import DIAGONAL_COLUMNS, FISHER, LAPLACE_CURVATURE
from pipeline.read.run import Run
from pipeline.read.views import VIEWS
from pipeline.storage.publish import published_run_around


def per_variable(run: Run) -> list[str]:
    """The run's quantities that are shaped like the variables (its diagonals and gradient)."""
    return [q for q in run.quantities() if q in DIAGONAL_COLUMNS]


def arrays(run: Run, quantities: list[str] | None = None) -> dict[str, np.ndarray]:
    """``{"QUANTITY/VARIABLE_PATH": array of the variable's shape, "examples": N, "weight_sum": W}``:
    what each view of the read side exports (``View.export``), or only ``quantities``."""
    present = per_variable(run)
    missing = [q for q in quantities or [] if q not in present]
    out: dict[str, np.ndarray] = {}
    if not missing:
        for view in VIEWS:
            out.update((key, array) for key, array in view.export(run).items()
                       if quantities is None or key.split("/", 1)[0] in quantities)
    if missing or not out:
        raise InputError(f"run {run.run_id} has no {', '.join(missing) or 'per-parameter quantity'} (it has: "
                         f"{', '.join(present) or 'none'}): add e.g. {FISHER} to the job and run it again")
    out["examples"] = np.asarray(int(run.manifest.get("examples", 0)), dtype=np.int64)
    out["weight_sum"] = np.asarray(weight_sum(run), dtype=np.float64)
    return out


def weight_sum(run: Run) -> float:
    """``sum_i s_i`` (runs published before the manifest kept it: the example count)."""
    return float(run.manifest.get("weight_sum", run.manifest.get("examples", 0)))


def laplace_quantity(run: Run, quantity: str | None) -> str:
    """The curvature a Laplace approximation of ``run`` uses: ``quantity``, else the first of
    ``LAPLACE_CURVATURE`` the run has."""
    present = per_variable(run)
    if quantity is not None:
        if quantity not in LAPLACE_CURVATURE:
            raise InputError(f"--quantity must be one of {', '.join(LAPLACE_CURVATURE)}, got {quantity!r}")
        if quantity not in present:
            raise InputError(f"run {run.run_id} has no {quantity} (it has: {', '.join(present) or 'none'}): add it to "
                             "the job and run it again")
        return quantity
    for candidate in LAPLACE_CURVATURE:
        if candidate in present:
            return candidate
    raise InputError(f"run {run.run_id} has no curvature diagonal for a Laplace approximation (it has: "
                     f"{', '.join(present) or 'none'}): add {' or '.join(LAPLACE_CURVATURE[:2])} to the job")


def laplace_arrays(run: Run, weights: dict[str, np.ndarray], like: laplace_math.Likelihood,
                   prior_precision: float | str = "auto", quantity: str | None = None) -> dict[str, np.ndarray]:
    """The Laplace entries of the export: ``weights`` maps each of the run's variables to ``w*``."""
    quantity = laplace_quantity(run, quantity)
    curvature = run.arrays(quantity)
    missing = [name for name in curvature if name not in weights]
    if missing:
        raise InputError(f"the model has no variable {missing[0]!r} of run {run.run_id}: give the run's own model")
    flat_w = np.concatenate([np.asarray(weights[name], np.float64).reshape(-1) for name in curvature])
    flat_f = np.concatenate([curvature[name].reshape(-1) for name in curvature])
    fitted = laplace_math.fit(flat_f, flat_w, run.loss, weight_sum(run), like, prior_precision)
    out: dict[str, np.ndarray] = {}
    start = 0
    for name, array in curvature.items():
        out[f"posterior_variance/{name}"] = fitted.posterior_variance[start:start + array.size].reshape(array.shape)
        start += array.size
    out["laplace/prior_precision"] = np.asarray(fitted.prior_precision)
    out["laplace/log_marginal_likelihood"] = np.asarray(fitted.log_marginal_likelihood)
    out["laplace/quantity"] = np.asarray(quantity)
    out["laplace/grid/prior_precision"] = fitted.grid_prior_precision
    out["laplace/grid/log_marginal_likelihood"] = fitted.grid_log_marginal_likelihood
    return out


def default_out(run: Run, suffix: str = ".npz") -> str:
    """``./NAME-RUN_ID.npz`` in the working directory: a published run is never written to."""
    return os.path.abspath(f"{run.name}-{run.run_id}{suffix}")


def writable_out(out: str, suffix: str, inputs: tuple[str, ...] = ()) -> str:
    """``out`` made absolute; ``InputError`` when it is a folder, lacks ``suffix``, is one of the
    command's ``inputs`` (a model being merged), is inside a published run, or its folder is missing."""
    given = out
    out = os.path.abspath(os.path.expanduser(out))
    if given.endswith(("/", os.sep)) or os.path.isdir(out):
        raise InputError(f"--out {given} is a folder: give a file name, e.g. --out {os.path.join(given, 'x' + suffix)}")
    if not out.endswith(suffix):
        raise InputError(f"--out {given} must end with {suffix} (what it holds): e.g. --out "
                         f"{os.path.splitext(given)[0]}{suffix}")
    if os.path.exists(out) and any(os.path.exists(path) and os.path.samefile(path, out) for path in inputs):
        raise InputError(f"--out {given} is one of the inputs: it would be overwritten; choose another --out")
    inside = published_run_around(os.path.dirname(out))
    if inside is not None:
        raise InputError(f"{out} is inside the published run {inside}, which is never written to: choose another "
                         "--out")
    if not os.path.isdir(os.path.dirname(out)):
        raise InputError(f"folder {os.path.dirname(out)} does not exist: create it or choose another --out")
    return out


def write_npz(values: dict[str, np.ndarray], out: str) -> str:
    """Writes ``values`` to ``out`` (uncompressed ``.npz``) whole or not at all."""
    with written_whole(out, ".npz") as temporary, open(temporary, "wb") as stream:
        np.savez(stream, **values)
    return out
