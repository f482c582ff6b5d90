"""Two real published runs, made once per test session and shared by test_api and test_report.

Both go through the Python API (``pipeline.run``) on a local Ray started here and stopped
before returning: the run of every quantity with small settings, and a baseline of the same
job on fewer rows with another seed (so that every number differs).
"""

from __future__ import annotations

import io

import jobs

# Every quantity, with the smallest settings that still exercise each algorithm.
QUANTITIES = {
    "hessian_diagonal": {"method": "exact"},
    "ggn_diagonal": {"method": "exact"},
    "fisher_diagonal": {},
    "gradient": {},
    "hvp": {"random": 2},
    "trace": {"method": "hutch++", "probes": 6},
    "eigenvalues": {"top": 3, "iterations": 8, "tol": 1e-4},
    "spectrum": {"runs": 2, "steps": 8},
}
_made: dict = {}


def two_runs(tmp_path_factory) -> dict:
    """``{"root", "job", "main", "base"}``: the folder, the job mapping, and the two loaded runs."""
    if not _made:
        import ray

        import pipeline
        from pipeline.job import load_job

        root = tmp_path_factory.mktemp("published")
        jobs.write_data(root / "data", rows=160, files=2)
        jobs.write_model(str(root / "model.keras"))
        job = jobs.job(root, QUANTITIES, shards=2, workers=1)
        # address="local": a Ray of our own even while a `ray start` cluster runs on this machine.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3"}})
        try:
            main = pipeline.run(job, run_id="main", stream=io.StringIO())
            base = pipeline.run(load_job(job), overrides=["seed=1", "data.limit=100"], run_id="base",
                                stream=io.StringIO())
        finally:
            ray.shutdown()
        _made.update(root=root, job=job, main=main, base=base)
    return _made
