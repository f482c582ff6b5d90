"""A nightly series: Lanczos warm-started from the previous checkpoint against a random start.

The bundled series (``jobs/series.yaml``: five checkpoints of the example model, each trained
20 more SGD steps) is run once as a series, where each checkpoint's Lanczos starts from the
previous checkpoint's Ritz vectors, and once checkpoint by checkpoint from a random start
(``--quick``: two checkpoints on 1,000 rows). Per checkpoint it prints the passes over the data
of each (the trace's passes are the same in both), the eigenvalues' largest difference and the
residual bound it must stay within, all measured in one process on one Ray.

    python benchmarks/series_bench.py            # about 2 minutes on 2 CPU cores
    python benchmarks/series_bench.py --quick
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile

import numpy as np
import ray
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import pipeline  # noqa: E402 - after the path above: the working tree's package

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two checkpoints on 1,000 rows")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="series-bench-")
    try:
        shutil.copytree(os.path.join(REPO, "jobs", "example"), os.path.join(folder, "example"))
        spec = yaml.safe_load(open(os.path.join(REPO, "jobs", "series.yaml")))
        spec["output"] = os.path.join(folder, "results")
        spec["data"]["path"] = os.path.join(folder, "example", "data")
        checkpoints = sorted(os.path.join(folder, "example", "checkpoints", name)
                             for name in os.listdir(os.path.join(folder, "example", "checkpoints")))
        if args.quick:
            checkpoints = checkpoints[:2]
            spec["data"]["limit"] = 1000
        spec["model"] = checkpoints
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            warm = pipeline.run(spec, run_id="warm", stream=io.StringIO())
            cold = [pipeline.run({**spec, "model": path, "name": "cold"}, run_id=f"cold-{k + 1:02d}",
                                 stream=io.StringIO()) for k, path in enumerate(checkpoints)]
        finally:
            ray.shutdown()
        print(f"{'checkpoint':<12} {'passes warm':>11} {'passes cold':>11} {'max |diff|':>11} {'residual bound':>15}")
        for path, w, c in zip(checkpoints, warm, cold):
            diff = np.abs(w.eigenvalues.eigenvalue.to_numpy() - c.eigenvalues.eigenvalue.to_numpy()).max()
            bound = (w.eigenvalues.residual.to_numpy() + c.eigenvalues.residual.to_numpy()).max()
            print(f"{os.path.basename(path):<12} {w.manifest['passes']:>11} {c.manifest['passes']:>11} "
                  f"{diff:>11.2e} {bound:>15.2e}")
        total_w = sum(r.manifest["passes"] for r in warm[1:])
        total_c = sum(r.manifest["passes"] for r in cold[1:])
        print(f"passes after the first checkpoint, warm / cold: {total_w} / {total_c} = {total_w / total_c:.2f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
