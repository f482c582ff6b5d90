"""The Python API for notebooks and scripts: ``pipeline.run`` (this module) and
``pipeline.load`` (``pipeline.read.run``), re-exported by ``pipeline/__init__.py``. The command
line is a thin layer over the same functions.

    >>> import pipeline                                                   # doctest: +SKIP
    >>> result = pipeline.run("jobs/example.yaml", overrides=["data.limit=512"])  # doctest: +SKIP
    >>> result.summary.query("variable == '__all__'")                      # doctest: +SKIP
"""

from __future__ import annotations

import os

from pipeline import driver
from pipeline.job import JobSpec, load_job
from pipeline.plan import Plan
from pipeline.read.run import Run, load


def run(job, *, overrides: list[str] | tuple = (), output: str | None = None, run_id: str | None = None,
        address: str | None = None, workers: int | None = None, dry_run: bool = False,
        stream=None, quiet: bool = True) -> Run | Plan | list:
    """Runs ``job`` on Ray and returns the published run, loaded (a ``Run``); for a job whose
    ``model`` is a list or glob of checkpoints, the list of runs, one per checkpoint in order.

    ``job`` is a YAML file path, a mapping in the job file's layout, or a ``JobSpec``;
    ``overrides`` are ``--set`` strings (``["data.batch_size=64"]``). The other options are those
    of ``hessian-pipeline run``. Progress goes to ``stream`` (default: stderr). With ``dry_run``
    the plan is returned (``print(plan.describe())``) and nothing is computed. Raises
    ``InputError`` (bad input, exit status 2 on the command line) or ``ComputeError`` (a failure
    that survived its retries, exit status 1). ``quiet`` (default): Ray logs errors only and
    TensorFlow's C++ log lines are off (``TF_CPP_MIN_LOG_LEVEL=3`` unless already set), as on the
    command line; ``quiet=False`` shows them.
    """
    if quiet:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if isinstance(job, JobSpec):
        spec = load_job(job.to_dict(), overrides) if overrides else job
    else:
        spec = load_job(job, overrides)
    if spec.checkpoints:
        results = driver.run_checkpoints(spec, output=output, run_id=run_id, address=address, workers=workers,
                                         dry_run=dry_run, stream=stream, quiet=quiet)
        return [r if isinstance(r, Plan) else load(r.run_dir) for r in results]
    result = driver.run(spec, output=output, run_id=run_id, address=address, workers=workers, dry_run=dry_run,
                        stream=stream, quiet=quiet)
    if isinstance(result, Plan):
        return result
    return load(result.run_dir)
