"""What running on Ray costs: the pipeline's examples/s against a plain in-process loop.

Run from the repository root::

    python benchmarks/pipeline_bench.py            # full run (4 to 6 minutes on 2 CPU cores)
    python benchmarks/pipeline_bench.py --quick    # small data, few probes (about 1 minute)
    python benchmarks/pipeline_bench.py --json results/pipeline_bench.json

The data and the model are made here, deterministically, in a temporary folder: the bundled
example's synthetic 8x8 digits (``pipeline.examples.digits.make_data``, scaled up in rows,
written by ``write_dataset``) and its 64-32-10 MLP (``make_model``, P = 2,410, untrained: the
cost of a curvature quantity does not depend on the weights). The job asks for
``gradient``, ``fisher_diagonal`` and ``hessian_diagonal: {method: hutchinson, probes: 100}``
in float32, batch 256: about a minute on 2 cores for 480,000 rows.

Figures, all from one run of this script:

(i)   Efficiency. The compute phase of a pipeline run (``WorkerPool.map_shards``: from the
      first shard submitted to the last partial reduced) against a plain loop in this
      process over the same data with the same kernels (``CurvatureEngine.partial`` over
      ``pipeline.storage.dataset.read_shard`` of one shard covering every row, the same ``BatchWork``),
      timed before and after the pipeline runs and averaged (other jobs on a shared machine
      come and go; the table shows both and the load average at the end of each measure).
      The start-up that every run pays once (planning, worker actors started, TensorFlow
      imported and the model loaded in each, first tracing, publishing) is measured apart,
      end to end, on a run over ``data.limit`` rows, and Ray's own start before it.
(ii)  Speed-up from 1 worker (2 TensorFlow threads) to 2 workers (1 thread each).
(iii) Peak resident memory (``ru_maxrss``) of each worker after start-up and after the pass,
      for 1x and 4x the data (the 4x dataset is the 1x files linked four times). A lighter
      job (4 Hutchinson probes instead of 100) keeps the 4x run short: memory follows the
      data, not the probes.

The pipeline's own code is timed through ``pipeline.driver.run``: ``WorkerPool`` is replaced,
for this process only, by a subclass that times each pass and asks each worker for its
``probe_memory()`` before the pool is closed. Nothing is asserted: figures beside their
targets are marked PASS or MISS, and the exit status is 0 unless the numbers of the pipeline
and the in-process loop disagree (then 1, no figures).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The working tree, not an installed copy, is what is being measured.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import _common  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

TARGET_EFFICIENCY = 0.9  # pipeline compute phase >= 0.9 x the in-process loop
TARGET_MEMORY_GROWTH = 1.1  # worker peak memory at 4x the data <= 1.1 x at 1x


@dataclass(frozen=True)
class Settings:
    rows: int  # the 1x dataset
    probes: int  # Hutchinson probes of the timed job
    memory_probes: int  # Hutchinson probes of the memory job (1x and 4x)
    startup_rows: int  # data.limit of the start-up run
    batch_size: int = 256


FULL = Settings(rows=480_000, probes=100, memory_probes=4, startup_rows=512)
QUICK = Settings(rows=16_000, probes=10, memory_probes=4, startup_rows=512)


# ---------------------------------------------------------------------------- data and job
def build(folder: str, rows: int) -> dict:
    """The model and the 1x and 4x datasets under ``folder``; returns their paths."""
    from pipeline.examples.digits import make_data, make_model, write_dataset

    os.makedirs(folder, exist_ok=True)
    model_path = os.path.join(folder, "model.keras")
    make_model(seed=0).save(model_path)
    pixels, labels, weights = make_data(rows=rows, seed=0)
    one = os.path.join(folder, "data-1x")
    write_dataset(one, pixels, labels, weights)
    four = os.path.join(folder, "data-4x")
    os.makedirs(four)
    for copy in range(4):
        for name in sorted(os.listdir(one)):
            source, target = os.path.join(one, name), os.path.join(four, f"copy{copy}-{name}")
            try:
                os.link(source, target)
            except OSError:
                import shutil

                shutil.copyfile(source, target)
    size = sum(os.path.getsize(os.path.join(one, n)) for n in os.listdir(one))
    return {"model": model_path, "data_1x": one, "data_4x": four, "bytes_1x": size}


def job(paths: dict, data_path: str, probes: int, output: str, settings: Settings, data=None, **extra):
    """The benchmark's job over ``data_path``; ``data`` updates the data section, ``extra`` the top."""
    from pipeline.job import load_job

    data_spec = {"path": data_path, "features": "pixels", "labels": "label", "batch_size": settings.batch_size,
                 **(data or {})}
    return load_job({
        "name": "pipeline-bench",
        "model": paths["model"],
        "loss": {"name": "sparse_categorical_crossentropy", "from_logits": True},
        "data": data_spec,
        "precision": "float32",
        "seed": 0,
        "quantities": {"gradient": {}, "fisher_diagonal": {},
                       "hessian_diagonal": {"method": "hutchinson", "probes": probes}},
        "output": output,
        **extra,
    })


# ---------------------------------------------------------------------------- instrumentation
POOLS: list = []


def timed_pool_class():
    """``WorkerPool`` that records its start-up, each pass's time and its workers' memory."""
    import ray

    from pipeline import driver as runner

    class TimedPool(runner.WorkerPool):
        def __init__(self, plan, log, **options):  # raylets, started: as the driver passes them
            start = time.perf_counter()
            super().__init__(plan, log, **options)
            self.record = {"workers": plan.workers, "shards": len(plan.data.shards), "rows": plan.data.rows,
                           "startup_s": time.perf_counter() - start, "passes_s": [],
                           "memory_after_start": self._memory(), "memory_after_passes": None}
            POOLS.append(self.record)

        def _memory(self):
            return ray.get([actor.probe_memory.remote() for actor in self.actors])

        def map_shards(self, *args, **kwargs):
            start = time.perf_counter()
            reducer = super().map_shards(*args, **kwargs)
            self.record["passes_s"].append(time.perf_counter() - start)
            return reducer

        def close(self):
            self.record["memory_after_passes"] = self._memory()
            super().close()

    return TimedPool


def pipeline_run(spec, workers: int, run_id: str) -> dict:
    """``pipeline.driver.run`` end to end, with the pool's own record."""
    from pipeline import driver as runner

    original = runner.WorkerPool
    runner.WorkerPool = timed_pool_class()
    try:
        start = time.perf_counter()
        result = runner.run(spec, run_id=run_id, workers=workers, stream=io.StringIO())
        wall = time.perf_counter() - start
    finally:
        runner.WorkerPool = original
    record = POOLS[-1]
    rows = result.manifest["examples"]
    compute = record["passes_s"][0]
    return {**record, "run_id": run_id, "end_to_end_s": wall, "load_average": os.getloadavg()[0], "compute_s": compute,
            "compute_examples_per_s": rows / compute, "end_to_end_examples_per_s": rows / wall,
            "results": result.results, "passes": result.manifest["passes"]}


def in_process(spec) -> dict:
    """The same kernels in a plain loop: one shard covering every row, this process."""
    from pipeline.curvature.engine import CurvatureEngine
    from pipeline.curvature.losses import resolve_loss
    from pipeline.curvature.model import load_model
    from pipeline.partial import Partial
    from pipeline.plan import make_plan
    from pipeline.quantities.registry import finalize, main_request
    from pipeline.storage.dataset import read_shard

    plan = make_plan(spec, workers=1, cluster={"CPU": 1})
    (shard,) = plan.data.shards
    work = main_request(spec.quantities, plan.context())
    start = time.perf_counter()
    engine = CurvatureEngine(load_model(spec.model), resolve_loss(spec.loss), precision=spec.precision)
    ready = time.perf_counter()
    total = Partial()
    for batch in read_shard(shard, spec.data, engine.signature, plan.data.uri, spec.data.batch_size,
                            dtype=spec.precision):
        total.add(engine.partial(batch.inputs, batch.labels, batch.weights, batch.rows, work))
    done = time.perf_counter()
    return {"rows": total.examples, "model_load_s": ready - start, "compute_s": done - ready,
            "load_average": os.getloadavg()[0],
            "compute_examples_per_s": total.examples / (done - ready), "results": finalize(total)}


def agree(pipeline: dict, local: dict) -> list:
    """The pipeline's numbers against the loop's (float32 kernels, batches cut differently)."""
    checks = []
    for key in ("gradient", "fisher_diagonal", "hessian_diagonal", "loss"):
        got, want = np.asarray(pipeline[key], np.float64), np.asarray(local[key], np.float64)
        scale = max(float(np.abs(want).max()), 1e-30)
        error = float(np.abs(got - want).max()) / scale
        checks.append({"check": f"pipeline {key} == in-process {key}", "max_err_over_max_entry": error,
                       "ok": bool(np.allclose(got, want, rtol=1e-4, atol=1e-5 * scale))})
    return checks


# ---------------------------------------------------------------------------- report
def environment(quick: bool) -> dict:
    import tensorflow as tf

    return {**_common.environment(quick),
            "in_process_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads()}


def _mib(values) -> str:
    return "/".join(f"{v / 2**20:,.0f}" for v in values)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Pipeline throughput, scaling and worker memory on Ray.")
    parser.add_argument("--quick", action="store_true", help="small data and few probes (about 1 minute)")
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON to OUT")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    began = time.perf_counter()
    env = environment(args.quick)
    _common.print_header("pipeline", env, " (small data: NOT the reference size)")

    import ray

    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as folder:
        start = time.perf_counter()
        paths = build(folder, settings.rows)
        print(f"  data: {settings.rows:,} rows of 64 float32 pixels in 4 Parquet files "
              f"({paths['bytes_1x'] / 2**20:,.0f} MiB), built in {time.perf_counter() - start:.0f} s; "
              f"4x = the same files linked 4 times")
        output = os.path.join(folder, "results")
        timed_job = job(paths, paths["data_1x"], settings.probes, output, settings)
        one_shard = job(paths, paths["data_1x"], settings.probes, output, settings, shards=1)
        print(f"  job: gradient + fisher_diagonal + hessian_diagonal hutchinson ({settings.probes} probes), "
              f"float32, batch {settings.batch_size}, digits MLP 64-32-10 (P = 2,410); shards auto")

        start = time.perf_counter()
        # address="local": always a fresh Ray of our own, never another cluster on this machine.
        ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3"}})
        ray_start = time.perf_counter() - start
        try:
            # Start-up first (it also warms the file cache for everything after it).
            startup = pipeline_run(job(paths, paths["data_1x"], settings.probes, output, settings,
                                       data={"limit": settings.startup_rows}), 2, "startup")
            # The loop brackets the two pipeline runs: on a shared machine the load drifts over
            # minutes, and the mean of a measure before and after cancels a steady drift.
            # TensorFlow's one-time start in this process (thread pools, kernels) is not the
            # loop's: warm it on a few rows so that before and after pay the same (tracing).
            in_process(job(paths, paths["data_1x"], settings.probes, output, settings, shards=1,
                           data={"limit": settings.startup_rows}))
            before = in_process(one_shard)
            two = pipeline_run(timed_job, 2, "workers-2")
            one = pipeline_run(timed_job, 1, "workers-1")
            after = in_process(one_shard)
            memory_1x = pipeline_run(job(paths, paths["data_1x"], settings.memory_probes, output, settings),
                                     2, "memory-1x")
            memory_4x = pipeline_run(job(paths, paths["data_4x"], settings.memory_probes, output, settings),
                                     2, "memory-4x")
        finally:
            ray.shutdown()

    local = {**before, "compute_s": (before["compute_s"] + after["compute_s"]) / 2,
             "compute_examples_per_s": (before["compute_examples_per_s"] + after["compute_examples_per_s"]) / 2}
    checks = agree(two["results"], local["results"]) + agree(one["results"], local["results"])
    print("\nnumerical checks (float32 kernels; rtol 1e-4, atol 1e-5 x largest entry)")
    for c in checks:
        print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['check']:<52} max err / max entry = "
              f"{c['max_err_over_max_entry']:.1e}")
    if not all(c["ok"] for c in checks):
        print("\nthe pipeline and the in-process loop disagree: no figures reported", file=sys.stderr)
        return 1

    efficiency_2 = two["compute_examples_per_s"] / local["compute_examples_per_s"]
    efficiency_1 = one["compute_examples_per_s"] / local["compute_examples_per_s"]
    speedup = two["compute_examples_per_s"] / one["compute_examples_per_s"]
    peak_1x = max(memory_1x["memory_after_passes"])
    peak_4x = max(memory_4x["memory_after_passes"])
    growth = peak_4x / peak_1x

    print(f"\n(i) throughput over {settings.rows:,} rows (examples/s; compute = one pass, first shard "
          "submitted to last partial reduced)")
    header = (f"  {'':<44}{'shards':>7}{'compute s':>11}{'ex/s':>10}{'end-to-end s':>14}{'ex/s':>10}"
              f"{'load':>7}")
    print(header)
    print("  " + "-" * (len(header) - 2))
    rows_in_order = (("in-process loop, before (1 shard)", before), ("pipeline, 2 workers x 1 thread", two),
                     ("pipeline, 1 worker x 2 threads", one), ("in-process loop, after (1 shard)", after))
    for label, r in rows_in_order:
        end = (f"{r['end_to_end_s']:>14.1f}{r['end_to_end_examples_per_s']:>10,.0f}" if "end_to_end_s" in r
               else f"{'':>24}")
        print(f"  {label:<44}{r.get('shards', 1):>7}{r['compute_s']:>11.1f}{r['compute_examples_per_s']:>10,.0f}"
              f"{end}{r['load_average']:>7.2f}")
    print(f"  {'in-process loop, mean of before and after':<44}{'':>7}{local['compute_s']:>11.1f}"
          f"{local['compute_examples_per_s']:>10,.0f}")
    print(f"  start-up, paid once per run: Ray start {ray_start:.1f} s (run by this script); a run over "
          f"{settings.startup_rows} rows takes {startup['end_to_end_s']:.1f} s end to end, of which "
          f"{startup['startup_s']:.1f} s start 2 workers and load the model")
    print("  load = 1-minute load average when the measure ended (other jobs on the machine); the in-process "
          f"loop's model load ({local['model_load_s']:.1f} s) is not in its compute time")
    print(f"  efficiency, pipeline (2 workers) / in-process loop: {efficiency_2:.2f}   target "
          f">= {TARGET_EFFICIENCY}   {_common.verdict(efficiency_2 >= TARGET_EFFICIENCY)}")
    print(f"  efficiency, pipeline (1 worker, same threads as the loop) / in-process loop: {efficiency_1:.2f}")

    print("\n(ii) scaling")
    print(f"  speed-up from 1 to 2 workers (compute phase): {speedup:.2f}x on {os.cpu_count()} CPU cores")

    print(f"\n(iii) peak resident memory of each worker (ru_maxrss, MiB; job with {settings.memory_probes} "
          "probes, 2 workers)")
    header = f"  {'data':<8}{'rows':>12}{'shards':>8}{'after start-up':>18}{'after the pass':>18}"
    print(header)
    print("  " + "-" * (len(header) - 2))
    for label, r in (("1x", memory_1x), ("4x", memory_4x)):
        print(f"  {label:<8}{r['rows']:>12,}{r['shards']:>8}{_mib(r['memory_after_start']):>18}"
              f"{_mib(r['memory_after_passes']):>18}")
    print(f"  largest worker peak, 4x / 1x: {growth:.2f}   target <= {TARGET_MEMORY_GROWTH} (flat)   "
          f"{_common.verdict(growth <= TARGET_MEMORY_GROWTH)}")
    print(f"  (timed job, 1x: after the pass {_mib(two['memory_after_passes'])} MiB with 2 workers, "
          f"{_mib(one['memory_after_passes'])} MiB with 1)")
    print(f"\ntotal wall time {time.perf_counter() - began:.0f} s; load average at the end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    if args.json:
        def strip(record):
            return {k: v for k, v in record.items() if k != "results"}

        out = {"environment": env, "settings": asdict(settings), "checks": checks,
               "ray_start_s": ray_start, "startup_run": strip(startup), "in_process_before": strip(before),
               "in_process_after": strip(after), "in_process_mean": strip(local),
               "pipeline_2_workers": strip(two), "pipeline_1_worker": strip(one),
               "memory_1x": strip(memory_1x), "memory_4x": strip(memory_4x),
               "derived": {
                   "efficiency_2_workers": {"value": efficiency_2, "target": f">= {TARGET_EFFICIENCY}",
                                            "ok": efficiency_2 >= TARGET_EFFICIENCY},
                   "efficiency_1_worker": {"value": efficiency_1},
                   "speedup_1_to_2_workers": {"value": speedup},
                   "memory_growth_4x_over_1x": {"value": growth, "target": f"<= {TARGET_MEMORY_GROWTH}",
                                                "ok": growth <= TARGET_MEMORY_GROWTH}}}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
