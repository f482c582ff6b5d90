"""The bundled example's whole ``run`` against an in-process loop doing the same work.

Run from the repository root::

    python benchmarks/startup_bench.py              # about 2 minutes on 2 CPU cores
    python benchmarks/startup_bench.py --repeats 3  # the median of 3 of each

Both sides start as a fresh Python process, so both pay Python's and TensorFlow's imports:

- **pipeline**: ``hessian-pipeline run jobs/example.yaml`` end to end (a local Ray, its
  workers, the plan, every quantity of the example, Parquet and manifest written);
- **in-process loop**: one process that imports TensorFlow, makes the same plan, and computes
  the same quantities with the driver's own algorithms (``driver._compute``) over an
  in-process stand-in for the worker pool: one ``CurvatureEngine``, every shard read with
  ``read_shard`` and its batches summed, pass after pass. Nothing is written.

The ratio (pipeline / loop) is the fixed cost of running on Ray for this small job (the
issue's target: at most 1.5). The script also prints the pipeline's progress lines with the
second at which each came, to show where its time goes. Both results must agree (the example's loss, to float32 rounding) or the script
exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(ROOT, "jobs", "example.yaml")

# The in-process side, run as its own fresh process (``python -c``): it prints the loss as JSON.
LOOP = r'''
import json, os, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
start = time.perf_counter()
sys.path.insert(0, {root!r})
import numpy as np
from pipeline import driver
from pipeline.curvature.engine import CurvatureEngine
from pipeline.curvature.losses import resolve_loss
from pipeline.curvature.model import load_model
from pipeline.job import load_job
from pipeline.plan import make_plan
from pipeline.reduce import Reducer
from pipeline.storage.dataset import read_shard

class InProcessPool:
    """The worker pool's two calls, in this process: one engine, shards read one by one."""
    def __init__(self, plan):
        job = plan.job
        self.plan, self.passes = plan, 0
        self.engine = CurvatureEngine(load_model(job.model), resolve_loss(job.loss), precision=job.precision,
                                      selected=job.variables)
    def map_shards(self, method, work, label, stream, store=None, show=True):
        reducer = Reducer()
        job = self.plan.job
        for shard in self.plan.data.shards:
            for batch in read_shard(shard, job.data, self.engine.signature, self.plan.data.uri,
                                    job.data.batch_size, dtype=job.precision):
                reducer.add(self.engine.partial(batch.inputs, batch.labels, batch.weights, batch.rows, work))
        self.passes += 1
        return reducer
    def call_one(self, method, work):
        return self.engine.regularization_partial(work)

job = load_job({job!r}, [])
plan = make_plan(job, workers=1, cluster={{"CPU": 1}})
results, extra = driver._compute(plan, InProcessPool(plan), open(os.devnull, "w"))
print(json.dumps({{"seconds": time.perf_counter() - start, "loss": float(np.asarray(results["loss"]))}}))
'''


def run_pipeline(output: str) -> tuple[float, dict, list[tuple[float, str]]]:
    """(wall seconds, manifest, progress lines with the seconds since start at which each came)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "run", JOB, "--output", output], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stderr:
        lines.append((time.perf_counter() - start, line.rstrip()))
    stdout = process.stdout.read()
    if process.wait() != 0:
        sys.exit("pipeline run failed:\n" + "\n".join(text for _, text in lines[-20:]))
    seconds = time.perf_counter() - start
    run_dir = stdout.strip().splitlines()[-1]
    with open(os.path.join(run_dir, "manifest.json")) as handle:
        return seconds, json.load(handle), lines


def run_loop() -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", LOOP.format(root=ROOT, job=JOB)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit("in-process loop failed:\n" + done.stderr[-3000:])
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["wall"] = time.perf_counter() - start
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side (the median is reported)")
    args = parser.parse_args()
    if not os.path.isdir(os.path.join(ROOT, "jobs", "example", "data")):
        subprocess.run([sys.executable, "-m", "pipeline.examples.digits", os.path.join(ROOT, "jobs", "example")],
                       cwd=ROOT, check=True)
    pipeline_s, loop_s, loop_wall = [], [], []
    with tempfile.TemporaryDirectory() as output:
        for repeat in range(args.repeats):
            seconds, manifest, lines = run_pipeline(os.path.join(output, str(repeat)))
            pipeline_s.append(seconds)
            loop = run_loop()
            loop_s.append(loop["seconds"])
            loop_wall.append(loop["wall"])
            got = float(manifest["loss"])
            print(f"run {repeat + 1}: pipeline {seconds:.1f} s (passes {manifest['passes']}, its manifest's "
                  f"seconds {manifest['seconds']:.1f}), "
                  f"in-process loop {loop['wall']:.1f} s (its own timer {loop['seconds']:.1f} s)")
            print("  pipeline progress (seconds since start):")
            for t, text in lines:
                print(f"    {t:6.1f}  {text[:110]}")
            if abs(got - loop["loss"]) > 1e-5 * max(1.0, abs(loop["loss"])):
                sys.exit(f"the pipeline's loss {got!r} differs from the loop's {loop['loss']!r}")
    p, w = statistics.median(pipeline_s), statistics.median(loop_wall)
    ratio = p / w
    print(f"\nbundled example (jobs/example.yaml), {args.repeats} run(s) each, medians:")
    print(f"  hessian-pipeline run (whole process)        {p:7.1f} s")
    print(f"  in-process loop, same work (whole process)  {w:7.1f} s")
    print(f"  ratio                                       {ratio:7.2f}x   target <= 1.5  "
          f"{'PASS' if ratio <= 1.5 else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
