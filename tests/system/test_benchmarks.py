"""The benchmarks still run: each script's quickest mode, in a fresh process, exits 0 and prints
its figures.

They call the product's own internals (``HessianOperator``, ``WorkerPool``, the engine's traced
functions, ``driver._compute``), which change under them: two of them crashed unnoticed for
several sessions. Nothing about their timings is asserted (those are for people to read);
their numerical checks against the reference HVPs and losses are, through the exit status.
``estimate_bench.py`` is left out: its quickest mode takes 3 minutes and uses only the command
line and the manifest, which ``test_cli`` and ``test_run`` cover.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import paths

ROOT = paths.REPO

# (script and arguments, a line its output must hold)
CASES = [
    (["engine_bench.py", "--quick"], "speed-up of the engine over the naive loop"),
    (["diagonal_bench.py", "--quick"], "route loop; loop / one gradient"),
    (["spectrum_bench.py", "--quick"], "block of 8 / 1 vector"),
    (["pipeline_bench.py", "--quick"], "largest worker peak, 4x / 1x"),
    (["blocks_bench.py", "--quick"], "ratio = seconds one block at a time / seconds side by side"),
    (["startup_bench.py"], "in-process loop, same work (whole process)"),
    (["probes_bench.py", "--probes", "2,3", "--rows", "16"], "largest worker peak / smallest"),
    (["large_bench.py", "--only", "gradient", "--rows", "8", "--batch", "8"], "gradient "),
    (["series_bench.py", "--quick"], "passes after the first checkpoint, warm / cold"),
    (["scale_bench.py", "--quick"], "where the time went"),
    (["influence_bench.py", "--quick"], "store pass / gradient pass at 4,000 rows"),
]


@pytest.mark.slow
@pytest.mark.parametrize("command, expected", CASES, ids=[case[0][0] for case in CASES])
def test_the_benchmark_runs_and_prints_its_figures(command, expected):
    # Each script writes under its own temporary directory and removes it.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", command[0]), *command[1:]], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert expected in done.stdout
