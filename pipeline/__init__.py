"""hessian-pipeline: curvature statistics of Keras models over whole datasets, on Ray."""

__version__ = "0.1.0"


# The Python API. Small wrappers whose imports are deliberately lazy, so that ``import pipeline``
# stays cheap: ``run`` imports TensorFlow and Ray, ``load`` PyArrow and pandas, on first use.
def run(job, *, overrides=(), output=None, run_id=None, address=None, workers=None, dry_run=False, stream=None,
        quiet=True):
    """Runs ``job`` (a YAML path, a mapping or a ``JobSpec``) on Ray; returns the published run
    (a ``Run``), or with ``dry_run`` the plan. See ``pipeline.api.run`` for every option."""
    if quiet:
        from pipeline import quiet as quietly  # lazy: keeps `import pipeline` cheap

        quietly.import_tensorflow()
        quietly.silence_tensorflow_logger()
    from pipeline.api import run as run_job  # lazy: TensorFlow and Ray

    return run_job(job, overrides=overrides, output=output, run_id=run_id, address=address, workers=workers,
                   dry_run=dry_run, stream=stream, quiet=quiet)


def load(run_dir):
    """The published run at ``run_dir``: tables as pandas DataFrames, arrays per variable."""
    from pipeline.read.run import load as load_run  # lazy: PyArrow

    return load_run(run_dir)


def latest(root):
    """The directory of the newest complete run under a job's folder (``OUTPUT/NAME``)."""
    from pipeline.read.history import latest_run  # lazy: PyArrow

    return latest_run(root)


def history(root):
    """Every complete run under a job's folder (``OUTPUT/NAME``) as a series over time
    (``pipeline.read.history.History``: ``.frame()``, ``.above(R)``)."""
    from pipeline.read.history import history as read_history  # lazy: PyArrow

    return read_history(root)


def export(run_dir, format="npz", out=None, *, laplace=False, prior_precision="auto", quantity=None,
           sigma_noise=1.0, model=None):
    """Writes a run's diagonals for EWC, merging and Laplace; returns the file's path (see
    ``pipeline.exports.commands.export``)."""
    from pipeline.exports.commands import export as write_export  # lazy: PyArrow (Keras for Laplace)

    return write_export(run_dir, format, out, laplace=laplace, prior_precision=prior_precision, quantity=quantity,
                        sigma_noise=sigma_noise, model=model)


def merge(models_and_runs, out, quantity=None):
    """Fisher-weighted average of ``[(model.keras, run_dir), ...]`` written to ``out`` (.keras)."""
    from pipeline.exports.commands import merge as write_merge  # lazy: Keras and TensorFlow

    return write_merge(models_and_runs, out, quantity)
