"""The plan's estimates against what runs measured: time and peak memory, in one run.

Run from the repository root::

    python benchmarks/estimate_bench.py          # about three minutes on 2 CPU cores

Each case runs the bundled example (`jobs/example.yaml`, a 2,410-parameter MLP) through the
command line with a different set of quantities, then prints, from the run's `manifest.json`,
the plan's estimate (`estimate`) over what the run measured (`seconds`; `memory`: the peak
resident memory of each worker and of the driver). A ratio above 1 means the plan
over-estimated. The reliability issue's bound: no process above 1.5x its estimate (a ratio
below 0.67); the scale issue's target: time within 2x.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def main() -> int:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    print(f"{'case':<38} {'time est/run':>14} {'worker est/peak':>16} {'driver est/peak':>16}")
    with tempfile.TemporaryDirectory() as out:
        for name, extra in CASES.items():
            done = subprocess.run([sys.executable, "-m", "pipeline", "run", os.path.join(ROOT, "jobs", "example.yaml"),
                                   "--output", os.path.join(out, name.split()[0]), *extra],
                                  capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
            if done.returncode != 0:
                print(f"{name:<38} failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            manifest = json.load(open(glob.glob(os.path.join(done.stdout.strip().splitlines()[-1],
                                                             "manifest.json"))[0]))
            estimate, memory = manifest["estimate"], manifest["memory"]
            worker = estimate["worker_bytes"] / max(memory["worker_peak_bytes"])
            driver = estimate["driver_bytes"] / memory["driver_peak_bytes"]
            print(f"{name:<38} {estimate['seconds'] / manifest['seconds']:>14.2f} {worker:>16.2f} {driver:>16.2f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
