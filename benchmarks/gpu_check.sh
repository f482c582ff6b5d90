#!/usr/bin/env bash
# GPU check, one script: on a machine with an NVIDIA GPU, install the GPU extra, run the
# engine benchmark, a short end-to-end run with one GPU worker and the scale benchmark's GPU
# mode (the ~600k-parameter CNN at 10^5 and 10^6 rows, one worker per GPU reading on its CPUs,
# against a hand-written tf.data loop on the same GPU), print the figures.
#   bash benchmarks/gpu_check.sh            (from the repository root; OUT=dir keeps the JSON)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$(mktemp -d)}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -m venv /tmp/hp-gpu-venv
. /tmp/hp-gpu-venv/bin/activate
python -m pip install --quiet --upgrade pip
pip install --quiet -e ".[test,gpu]"
python - <<'PY'
import tensorflow as tf
gpus = tf.config.list_physical_devices("GPU")
print("tensorflow", tf.__version__, "GPUs:", gpus)
assert gpus, "TensorFlow sees no GPU: check the driver and the [gpu] extra"
PY
echo "== engine benchmark (GPU)"
python benchmarks/engine_bench.py --json "$out/engine_gpu.json"
echo "== end to end, one GPU worker"
start=$(date +%s.%N)
hessian-pipeline run jobs/example.yaml --output "$out/results" --workers 1 --run-id gpu-check \
  --set data.batch_size=512 | tail -n 2
end=$(date +%s.%N)
run_dir=$(ls -d "$out"/results/digits-mlp/date=*/run=gpu-check)
python - "$run_dir" <<'PY'
import json, sys
m = json.load(open(sys.argv[1] + "/manifest.json"))
print(f"examples {m['examples']}, passes {m['passes']}, seconds {m['seconds']}, workers {m['worker_names']}")
assert any(name.endswith(":gpu") for name in m["worker_names"]), "the worker did not run on a GPU"
PY
echo "wall seconds (incl. Ray start): $(echo "$end - $start" | bc)"
echo "== scale benchmark (GPU mode): the whole run against a hand-written tf.data loop"
python benchmarks/scale_bench.py --gpu --models cnn --quantities gradient,fisher --formats parquet \
  --json "$out/scale_gpu.json"
echo "figures in $out"
