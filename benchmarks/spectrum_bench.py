"""What the spectral quantities cost on the bundled example: passes over the data and time.

Run from the repository root::

    python benchmarks/spectrum_bench.py            # full run (under a minute on 2 CPU cores)
    python benchmarks/spectrum_bench.py --quick    # first 1,000 rows, 3 repetitions
    python benchmarks/spectrum_bench.py --json results/spectrum_bench.json

The job is ``jobs/example.yaml`` (the 64-32-10 digits MLP, P = 2,410, 4,000 rows in 4 Parquet
files, float32, batch 256, shards and workers auto) with its ``eigenvalues`` settings alone
(top 5 largest, at most 30 iterations, tol 1e-5). Figures, all from one run of this script:

(a) Top 5 eigenvalues through ``pipeline.driver.run``: passes over the data (the manifest's
    ``passes``: 1 for the per-example sums, the rest block Lanczos, one block of
    ``default_block(5) = 5`` vectors per pass, plus one pass for the true residuals) and wall
    time, end to end and in the Lanczos passes. ``WorkerPool`` is replaced, for this process
    only, by a subclass that times each pass.
(b) One pass with a block of b = 8 vectors against one pass with 1 vector, through the real
    pass: ``HessianOperator`` on a ``WorkerPool`` of the same plan (workers keep their shards
    in memory between passes, as in a spectral run). Repetitions alternate the two and the
    figure is the median of the paired ratios; the first pass of each size (it reads the data
    and traces the HVP function in every worker) is timed apart. Target: a block of 8 costs at
    most 3 passes of one vector, i.e. it saves at least 8/3 of the time of 8 one-vector passes.
(c) The same ratio for one batch of 256 in this process (``CurvatureEngine.partial`` with
    ``hvp_vectors`` of 1 and 8 rows): the kernels alone, without Ray and the data.

Nothing is asserted: figures beside their targets are marked PASS or MISS. The exit status is
1 only if the block pass and the one-vector pass disagree numerically (then no figures).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The working tree, not an installed copy, is what is being measured.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import _common  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

TARGET_BLOCK = 3.0  # one pass of 8 vectors <= 3 x one pass of 1 vector
BLOCK = 8


@dataclass(frozen=True)
class Settings:
    limit: int | None  # data.limit (None: all 4,000 rows)
    reps: int  # paired repetitions of (1 vector, 8 vectors), through the pipeline
    batch_reps: int  # paired repetitions in process


FULL = Settings(limit=None, reps=15, batch_reps=25)
QUICK = Settings(limit=1000, reps=3, batch_reps=5)


def example_job(output: str, settings: Settings):
    """``jobs/example.yaml`` with its eigenvalues settings alone, published under ``output``."""
    from pipeline.job import load_job

    example = load_job(os.path.join(ROOT, "jobs", "example.yaml"))
    raw = example.to_dict()
    raw["quantities"] = {"eigenvalues": example.quantities["eigenvalues"]}
    raw["output"] = output
    if settings.limit is not None:
        raw["data"]["limit"] = settings.limit
    return load_job(raw)


class PassTimes:
    """Installs a ``WorkerPool`` that times each pass, for this process only."""

    def __init__(self):
        from pipeline import driver as runner

        self.runner = runner
        self.original = runner.WorkerPool
        self.passes_s: list[float] = []
        times = self.passes_s

        class TimedPool(runner.WorkerPool):
            def map_shards(self, *args, **kwargs):
                start = time.perf_counter()
                reducer = super().map_shards(*args, **kwargs)
                times.append(time.perf_counter() - start)
                return reducer

        self.pool_class = TimedPool

    def __enter__(self):
        self.runner.WorkerPool = self.pool_class
        return self

    def __exit__(self, *exc):
        self.runner.WorkerPool = self.original


def eigenvalue_run(spec) -> dict:
    from pipeline import driver as runner

    with PassTimes() as times:
        start = time.perf_counter()
        result = runner.run(spec, run_id="eigenvalues", stream=io.StringIO())
        wall = time.perf_counter() - start
    e = spec.quantities["eigenvalues"]
    ((_, values),) = result.results["eigenvalues"]  # one block: the whole model
    lanczos = times.passes_s[1:]
    return {"settings": e, "passes": result.manifest["passes"], "lanczos_passes": len(lanczos),
            "matvecs": int(values.matvecs), "converged": bool(values.converged),
            "eigenvalues": values.eigenvalues.tolist(), "residuals": values.residuals.tolist(),
            "end_to_end_s": wall, "main_pass_s": times.passes_s[0], "lanczos_s": float(np.sum(lanczos)),
            "lanczos_pass_median_s": float(np.median(lanczos)) if lanczos else float("nan"),
            "passes_s": times.passes_s,
            "manifest_seconds": result.manifest["seconds"], "rows": result.manifest["examples"],
            "workers": result.manifest["workers"], "shards": result.manifest["shards"]}


def block_passes(spec, settings: Settings) -> dict:
    """One pass of 1 vector against one pass of ``BLOCK`` vectors, through ``HessianOperator``."""
    import ray

    from pipeline.probes import rademacher
    from pipeline.cluster.pool import WorkerPool
    from pipeline.driver import HessianOperator
    from pipeline.plan import make_plan

    plan = make_plan(spec, cluster=ray.cluster_resources())
    pool = WorkerPool(plan, io.StringIO())
    try:
        operator = HessianOperator(pool, False, io.StringIO())
        vectors = rademacher(spec.seed, range(BLOCK), plan.parameters, stream=1)
        one, block = vectors[:1], vectors

        def timed(v):
            start = time.perf_counter()
            products = operator(v)
            return time.perf_counter() - start, products

        first_one, _ = timed(one)  # reads the data into the workers' memory, traces K = 1
        first_block, _ = timed(block)  # traces K = 8
        times = {"one": [], "block": []}
        ratios = []
        products = {}
        for rep in range(settings.reps):
            order = (("one", one), ("block", block)) if rep % 2 == 0 else (("block", block), ("one", one))
            took = {}
            for key, v in order:
                took[key], products[key] = timed(v)
                times[key].append(took[key])
            ratios.append(took["block"] / took["one"])
        scale = float(np.abs(products["block"][0]).max())
        error = float(np.abs(products["block"][0] - products["one"][0]).max()) / scale
    finally:
        pool.close()
    return {"workers": plan.workers, "shards": len(plan.data.shards), "rows": plan.data.rows,
            "parameters": plan.parameters, "first_pass_one_s": first_one, "first_pass_block_s": first_block,
            "median_one_s": statistics.median(times["one"]), "median_block_s": statistics.median(times["block"]),
            "ratio": statistics.median(ratios), "reps": settings.reps, "times_s": times,
            "check_error": error, "check_ok": bool(error <= 1e-4)}


def block_batch(spec, settings: Settings) -> dict:
    """The same comparison for one batch in this process: the kernels alone."""
    from pipeline.curvature.engine import CurvatureEngine
    from pipeline.curvature.losses import resolve_loss
    from pipeline.curvature.model import load_model
    from pipeline.curvature.requests import BatchWork
    from pipeline.storage.dataset import read_shard
    from pipeline.job import load_job
    from pipeline.probes import rademacher
    from pipeline.plan import make_plan

    spec = load_job({**spec.to_dict(), "shards": 1})  # one shard: its first batch is a full one
    plan = make_plan(spec, workers=1, cluster={"CPU": 1})
    engine = CurvatureEngine(load_model(spec.model), resolve_loss(spec.loss), precision=spec.precision)
    batch = next(read_shard(plan.data.shards[0], spec.data, engine.signature, plan.data.uri,
                            spec.data.batch_size, dtype=spec.precision))
    vectors = rademacher(spec.seed, range(BLOCK), engine.parameters, stream=1)
    works = {"one": BatchWork(gradient=False, hvp_vectors=vectors[:1]),
             "block": BatchWork(gradient=False, hvp_vectors=vectors)}

    def timed(key):
        start = time.perf_counter()
        engine.partial(batch.inputs, batch.labels, batch.weights, batch.rows, works[key])
        return time.perf_counter() - start

    for key in works:  # trace, then one untimed warm-up
        timed(key)
        timed(key)
    times = {"one": [], "block": []}
    ratios = []
    for rep in range(settings.batch_reps):
        took = {}
        for key in (("one", "block") if rep % 2 == 0 else ("block", "one")):
            took[key] = timed(key)
            times[key].append(took[key])
        ratios.append(took["block"] / took["one"])
    return {"batch": len(batch), "median_one_s": statistics.median(times["one"]),
            "median_block_s": statistics.median(times["block"]), "ratio": statistics.median(ratios),
            "reps": settings.batch_reps, "times_s": times}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Passes and time of the spectral quantities on the example.")
    parser.add_argument("--quick", action="store_true", help="first 1,000 rows, 3 repetitions")
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON to OUT")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    began = time.perf_counter()
    env = _common.environment(args.quick)
    _common.print_header("spectrum", env, " (1,000 rows, 3 repetitions: NOT the reference figures)")

    import ray

    with tempfile.TemporaryDirectory(prefix="spectrum-bench-") as output:
        spec = example_job(output, settings)
        e = spec.quantities["eigenvalues"]
        print(f"  job: jobs/example.yaml (digits MLP 64-32-10, P = 2,410, float32, batch {spec.data.batch_size}"
              f"{f', data.limit {settings.limit}' if settings.limit else ''}), quantities: eigenvalues "
              f"top {e['top']} {e['which']}, iterations {e['iterations']}, tol {e['tol']:g}")
        # address="local": always a fresh Ray of our own, never another cluster on this machine.
        ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3"}})
        try:
            eigen = eigenvalue_run(spec)
            passes = block_passes(spec, settings)
        finally:
            ray.shutdown()
        batch = block_batch(spec, settings)

    print(f"\nnumerical check: row 1 of the {BLOCK}-vector pass == the 1-vector pass, max err / max entry = "
          f"{passes['check_error']:.1e} (float32 tolerance 1e-4)   {'ok' if passes['check_ok'] else 'FAIL'}")
    if not passes["check_ok"]:
        print("the block and one-vector passes disagree: no figures reported", file=sys.stderr)
        return 1

    print(f"\n(a) top {e['top']} eigenvalues ({e['which']}) over {eigen['rows']:,} rows, {eigen['workers']} workers, "
          f"{eigen['shards']} shards")
    print(f"  eigenvalues  {np.array2string(np.array(eigen['eigenvalues']), precision=5)}")
    print(f"  residuals    {np.array2string(np.array(eigen['residuals']), precision=2)}  (converged to tol x "
          f"|lambda_1|: {eigen['converged']})")
    print(f"  passes over the data: {eigen['passes']} = 1 (per-example sums) + {eigen['lanczos_passes']} block "
          f"Lanczos ({eigen['matvecs']} Hessian-vector products, incl. the residual pass)")
    print(f"  wall time: {eigen['end_to_end_s']:.1f} s end to end (start-up included); first pass "
          f"{eigen['main_pass_s']:.2f} s (reads the data); Lanczos passes {eigen['lanczos_s']:.1f} s in all, "
          f"median {eigen['lanczos_pass_median_s'] * 1e3:.0f} ms per pass")

    print(f"\n(b) one pass over the data through HessianOperator ({passes['workers']} workers, {passes['shards']} "
          f"shards, {passes['rows']:,} rows, data in the workers' memory)")
    header = f"  {'':<36}{'median ms':>11}{'first pass ms':>15}"
    print(header)
    print("  " + "-" * (len(header) - 2))
    print(f"  {'1 vector':<36}{passes['median_one_s'] * 1e3:>11.1f}{passes['first_pass_one_s'] * 1e3:>15.0f}")
    print(f"  {f'block of {BLOCK} vectors':<36}{passes['median_block_s'] * 1e3:>11.1f}"
          f"{passes['first_pass_block_s'] * 1e3:>15.0f}")
    print(f"  block of {BLOCK} / 1 vector (median of {passes['reps']} paired ratios): {passes['ratio']:.2f}   "
          f"target <= {TARGET_BLOCK:g}   {_common.verdict(passes['ratio'] <= TARGET_BLOCK)}")
    print(f"  {BLOCK} passes of 1 vector / 1 pass of {BLOCK}: {BLOCK / passes['ratio']:.1f}x the time")

    print(f"\n(c) one batch of {batch['batch']} in this process (CurvatureEngine.partial, HVPs only)")
    print(f"  1 vector {batch['median_one_s'] * 1e3:.2f} ms, block of {BLOCK} {batch['median_block_s'] * 1e3:.2f} ms: "
          f"ratio {batch['ratio']:.2f} (median of {batch['reps']} paired ratios), "
          f"{batch['ratio'] / BLOCK:.2f} of one HVP per vector")
    print(f"\ntotal wall time {time.perf_counter() - began:.0f} s; load average at the end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    if args.json:
        out = {"environment": env, "settings": asdict(settings), "block": BLOCK, "eigenvalues": eigen,
               "pipeline_pass": passes, "in_process_batch": batch,
               "derived": {"block_over_one_pass": {"value": passes["ratio"], "target": f"<= {TARGET_BLOCK:g}",
                                                   "ok": passes["ratio"] <= TARGET_BLOCK},
                           "block_over_one_batch": {"value": batch["ratio"]}}}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
