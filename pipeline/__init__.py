"""hessian-pipeline: curvature statistics of Keras models over whole datasets, on Ray."""

__version__ = "0.1.0"


# The Python API (pipeline/api.py). Small wrappers, so that ``import pipeline`` stays cheap:
# TensorFlow and Ray are imported by ``run`` only, pandas by the first ``load``.
def run(job, **options):
    """Runs ``job`` (a YAML path, a mapping or a ``JobSpec``) on Ray; returns the published run.

    The options are ``pipeline.api.run``'s: ``overrides``, ``output``, ``run_id``, ``address``,
    ``workers``, ``dry_run``, ``stream``.
    """
    from pipeline.api import run as run_job

    return run_job(job, **options)


def load(run_dir):
    """The published run at ``run_dir``: tables as pandas DataFrames, arrays per variable."""
    from pipeline.api import load as load_run

    return load_run(run_dir)
