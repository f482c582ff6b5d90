"""The plan's estimates against what runs measured: time and peak memory, in one run.

Run from the repository root::

    python benchmarks/estimate_bench.py          # about eight minutes on 2 CPU cores
    python benchmarks/estimate_bench.py --cases example   # the bundled example's cases only (three minutes)

The first cases run the bundled example (`jobs/example.yaml`, a 2,410-parameter MLP) through
the command line with a different set of quantities; the others make their data and model in
a temporary folder: a tabular job (12 scalar columns, a 12-64-64-1 MLP, binary cross-entropy,
50,000 rows, six quantities), the 10^6-row case of `scale_bench.py` (the bundled MLP, the
gradient) and its CNN (684,490 parameters, 2,560 rows; the gradient, the Fisher and a
Hutchinson diagonal). Each prints, from the run's `manifest.json`, the plan's estimate
(`estimate`) over what the run measured (`seconds`; `memory`: the peak resident memory of
each worker and of the driver), and the estimated start-up beside the measured phases before
the passes (`timings`). A ratio above 1 means the plan over-estimated. The targets: time
within 1.5x both ways (a ratio from 0.67 to 1.5), and no process above 1.5x its estimated
memory (a ratio above 0.67).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import yaml

import scale_bench  # benchmarks/ is on sys.path when a script runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "jobs", "example.yaml")
CASES = {
    "example (every quantity)": [],
    "gradient only": ["--set", "quantities={gradient: {}}"],
    "exact diagonal + Fisher + GGN": ["--set", "quantities={hessian_diagonal: {}, fisher_diagonal: {}, "
                                      "ggn_diagonal: {}}"],
    "Hutchinson, 3,000 probes, 512 rows": ["--set", "quantities={hessian_diagonal: {method: hutchinson, "
                                           "probes: 3000}}", "--set", "data.limit=512", "--set", "shards=2"],
    "HVP, 1,000 random vectors, 512 rows": ["--set", "quantities={hvp: {random: 1000}}", "--set", "data.limit=512",
                                            "--set", "shards=2"],
}


TABULAR = {"gradient": {}, "fisher_diagonal": {}, "ggn_diagonal": {"method": "exact"},
           "hessian_diagonal": {"method": "hutchinson", "probes": 8}, "trace": {"method": "hutch++", "probes": 12},
           "eigenvalues": {"top": 2, "iterations": 10}}


def tabular(folder: str) -> str:
    """A tabular job: 12 scalar float columns and a 0/1 label, a 12-64-64-1 MLP."""
    import keras
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    rows = 50_000
    x = rng.normal(size=(rows, 12)).astype(np.float32)
    y = (x[:, :3].sum(axis=1) + rng.normal(size=rows) > 0).astype(np.float32)
    os.makedirs(os.path.join(folder, "tabular"), exist_ok=True)
    columns = {f"x{i}": x[:, i] for i in range(12)}
    for part in range(4):
        rows_of = slice(part * rows // 4, (part + 1) * rows // 4)
        pq.write_table(pa.table({**{k: v[rows_of] for k, v in columns.items()}, "label": y[rows_of]}),
                       os.path.join(folder, "tabular", f"part-{part}.parquet"), row_group_size=4096)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12,), name="x"), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)])
    model.save(os.path.join(folder, "tabular.keras"))
    job = {"name": "tabular", "model": "tabular.keras", "loss": {"name": "binary_crossentropy", "from_logits": True},
           "data": {"path": "tabular", "features": list(columns), "labels": "label", "batch_size": 512},
           "quantities": TABULAR, "output": "results"}
    path = os.path.join(folder, "tabular.yaml")
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(job, handle)
    return path


def scale_cases(folder: str) -> dict:
    """The 10^6-row MLP case and the CNN cases of ``scale_bench.py``: name -> job file."""
    out = {}
    for kind, rows, quantities in (("mlp", 10**6, ["gradient"]), ("cnn", 2560, ["gradient", "fisher", "hutchinson"])):
        model = os.path.join(folder, f"{kind}.keras")
        scale_bench.make_model(kind, model)
        data = os.path.dirname(scale_bench.write_parquet(os.path.join(folder, f"{kind}-data"), kind, rows)[0])
        for quantity in quantities:
            out[f"{kind.upper()}, {rows:,} rows, {quantity}"] = scale_bench.job_file(
                folder, model, kind, data, "parquet", quantity, f"{kind}-{quantity}")
    return out


def run_case(name: str, job: str, extra: list, out: str, env: dict) -> None:
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", job, "--output", os.path.join(out, "results"),
                           *extra], capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    if done.returncode != 0:
        print(f"{name:<38} failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
        return
    manifest = json.load(open(glob.glob(os.path.join(done.stdout.strip().splitlines()[-1], "manifest.json"))[0]))
    estimate, memory, timings = manifest["estimate"], manifest["memory"], manifest.get("timings", {})
    worker = estimate["worker_bytes"] / max(memory["worker_peak_bytes"])
    driver = estimate["driver_bytes"] / memory["driver_peak_bytes"]
    ratio = estimate["seconds"] / manifest["seconds"]
    before = sum(timings.get(k, 0.0) for k in ("ray_start_seconds", "plan_seconds", "workers_start_seconds"))
    ok = 1 / 1.5 <= ratio <= 1.5 and worker >= 1 / 1.5 and driver >= 1 / 1.5
    print(f"{name:<38} {estimate['seconds']:>7.1f} {manifest['seconds']:>7.1f} {ratio:>6.2f} "
          f"{estimate.get('startup_seconds', 0.0):>8.1f} {before:>8.1f} {worker:>9.2f} {driver:>9.2f}  "
          f"{'PASS' if ok else 'MISS'}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="example,tabular,scale", help="which groups of cases to run")
    groups = parser.parse_args(argv).cases.split(",")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    print(f"{'case':<38} {'est s':>7} {'run s':>7} {'ratio':>6} {'est up':>8} {'run up':>8} {'worker':>9} "
          f"{'driver':>9}   (time: estimate/run, start-up: estimated/measured before the passes; memory: "
          "estimate/peak)", flush=True)
    with tempfile.TemporaryDirectory() as out:
        if "example" in groups:
            for name, extra in CASES.items():
                run_case(name, EXAMPLE, extra, os.path.join(out, name.split()[0]), env)
        if "tabular" in groups:
            run_case("tabular: 12 columns, 50,000 rows, 6 q.", tabular(out), [], out, env)
        if "scale" in groups:
            for name, job in scale_cases(out).items():
                run_case(name, job, [], out, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
