"""hessian-pipeline: curvature statistics of Keras models over whole datasets, on Ray."""

__version__ = "0.1.0"


# The Python API. Small wrappers whose imports are deliberately lazy, so that ``import pipeline``
# stays cheap: ``run`` imports TensorFlow and Ray, ``load`` PyArrow and pandas, on first use.
def run(job, **options):
    """Runs ``job`` (a YAML path, a mapping or a ``JobSpec``) on Ray; returns the published run.

    The options are ``pipeline.api.run``'s: ``overrides``, ``output``, ``run_id``, ``address``,
    ``workers``, ``dry_run``, ``stream``.
    """
    from pipeline.api import run as run_job  # lazy: TensorFlow and Ray

    return run_job(job, **options)


def load(run_dir):
    """The published run at ``run_dir``: tables as pandas DataFrames, arrays per variable."""
    from pipeline.read.run import load as load_run  # lazy: PyArrow

    return load_run(run_dir)
