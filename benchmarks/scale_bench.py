"""Large datasets: the whole ``hessian-pipeline run`` against a hand-written ``tf.data`` loop.

Run from the repository root::

    python benchmarks/scale_bench.py                 # MLP at 10^4, 10^5, 10^6 rows, CNN at 10^4 (about 30 min on 2 CPU cores)
    python benchmarks/scale_bench.py --quick         # 2,000 rows, MLP, gradient and Fisher (about 1 minute)
    python benchmarks/scale_bench.py --rows 100000 --nodes 3 --quantities gradient   # a 3-node local cluster
    python benchmarks/scale_bench.py --gpu           # per-GPU workers, CNN at 10^5 and 10^6 (benchmarks/gpu_check.sh)
    python benchmarks/scale_bench.py --json results/scale_bench.json

For each model, row count, data format and quantity, two processes run one after the other on
the same rows, each timed whole from its start (Python, TensorFlow's import, the model's load,
the reading, the compute, the results written):

- ``pipeline``: ``python -m pipeline run JOB.yaml`` (``workers: auto``, ``shards: auto``): Ray
  started, the plan, the workers, Parquet results and manifest published.
- ``loop``: this script with ``--loop``: the model loaded with ``keras.models.load_model``, the
  rows read by ``tf.data`` (Parquet: ``pyarrow.parquet.ParquetFile.iter_batches`` through
  ``Dataset.from_generator``; TFRecord: ``TFRecordDataset`` and ``parse_example``, parallel
  reads and prefetch), one ``tf.function`` per batch that adds the same sums into float64
  variables, the means saved as ``.npz``. What a competent user writes by hand:

  ========================  ==========================================================================
  quantity                  the loop's step (float32; sums in float64)
  ========================  ==========================================================================
  ``gradient``              loss and ``tape.gradient`` of ``sum_i l_i``
  ``fisher``                ``tape.jacobian`` of the per-example losses (pfor), squared, summed
  ``ggn_mc``                labels drawn from ``softmax(f_i)`` (``stateless_categorical``), the same
  ``hutchinson``            8 fixed Rademacher probes ``v_k``: nested tapes, one forward pass and
                            gradient, 8 backward passes, ``sum_k v_k * H v_k``
  ========================  ==========================================================================

Printed per case: each process's seconds and rows per second, the ratio pipeline/loop (the
issue's targets: <= 1.2 at 10^6 rows, <= 1.5 at 10^5), the peak resident memory of the loop,
of the pipeline's driver and of its largest worker (the manifest's ``memory``), and, per model
and quantity, seconds per 10^5 rows at each size (linear growth: the same figure at every size).
Before any timing is trusted the gradient and the Fisher of the two agree (relative 1e-3 of
the largest entry); a disagreement stops the script with exit 1. The Monte Carlo GGN and
Hutchinson draw different random numbers in the two, so only their cost is compared.

``--nodes 3`` starts a local cluster of three ``ray start`` nodes (one CPU each, a head and two
more, each node with its own ``--temp-dir``), runs the pipeline on it with three workers, runs
it again on one node, checks that the two results agree to float rounding, and prints each
node's rows per second (the manifest's ``per_worker``). Nothing here is asserted in a test:
``tests/system/test_benchmarks.py`` runs ``--quick`` for its checks, never its timings.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The working tree, not an installed copy, is what is being measured.
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import yaml  # noqa: E402

BATCH = {"mlp": 256, "cnn": 128}
CHUNK = {"mlp": 256, "cnn": 16}  # rows per vectorised Jacobian in the loop's Fisher and GGN
QUANTITIES = {
    "gradient": {"gradient": {}},
    "fisher": {"fisher_diagonal": {}},
    "ggn_mc": {"ggn_diagonal": {"method": "mc", "samples": 1}},
    "hutchinson": {"hessian_diagonal": {"method": "hutchinson", "probes": 8}},
}
PIPELINE_NAME = {"gradient": "gradient", "fisher": "fisher_diagonal"}  # the quantities both compute alike
TARGETS = {10**6: 1.2, 10**5: 1.5}
ROWS_PER_FILE = 62_500
ROW_GROUP = 16_384
FEATURES = {"mlp": ("pixels", (8, 8, 1)), "cnn": ("image", (32, 32, 3))}


# ---------------------------------------------------------------------------- data and models
def make_model(kind: str, path: str) -> None:
    import keras

    if kind == "mlp":
        from pipeline.examples.digits import make_model as digits_mlp

        model = digits_mlp()
    else:
        keras.utils.set_random_seed(0)
        # benchmarks/engine_bench.py's CNN (P = 684,490): the issue's ~600k-parameter CNN.
        model = keras.Sequential([
            keras.Input((32, 32, 3), name="image"),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(128, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ], name="cnn")
    model.save(path)


def make_rows(kind: str, rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features [rows, width] float32 and labels [rows] int64."""
    if kind == "mlp":
        from pipeline.examples.digits import make_data

        pixels, labels, _ = make_data(rows, seed)
        return pixels, labels
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, size=(rows, 32 * 32 * 3)).astype(np.float32), rng.integers(0, 10, rows)


def write_parquet(folder: str, kind: str, rows: int) -> list[str]:
    """``rows`` rows in files of ``ROWS_PER_FILE`` rows, row groups of ``ROW_GROUP``, written a
    file at a time (a million CNN rows would not fit in memory at once)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(folder, exist_ok=True)
    name = FEATURES[kind][0]
    paths = []
    for index, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        count = min(ROWS_PER_FILE, rows - start)
        x, y = make_rows(kind, count, seed=index)
        table = pa.table({name: pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1]),
                          "label": pa.array(y)})
        paths.append(os.path.join(folder, f"part-{index:04d}.parquet"))
        pq.write_table(table, paths[-1], row_group_size=ROW_GROUP)
    return paths


def write_tfrecord(folder: str, parquet: list[str], kind: str) -> list[str]:
    """The same rows as the Parquet files, one TFRecord file each (serialized by TensorFlow)."""
    import pyarrow.parquet as pq
    import tensorflow as tf

    os.makedirs(folder, exist_ok=True)
    name = FEATURES[kind][0]
    paths = []
    for index, source in enumerate(parquet):
        table = pq.read_table(source)
        x = table.column(name).combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
        y = table.column("label").to_numpy()
        serialized = _serialize(tf, name, x, y)
        paths.append(os.path.join(folder, f"part-{index:04d}.tfrecord"))
        with tf.io.TFRecordWriter(paths[-1]) as writer:
            for record in serialized:
                writer.write(record)
    return paths


def _serialize(tf, name: str, x: np.ndarray, y: np.ndarray) -> list[bytes]:
    out = []
    for row, label in zip(x, y):
        example = tf.train.Example(features=tf.train.Features(feature={
            name: tf.train.Feature(float_list=tf.train.FloatList(value=row)),
            "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))}))
        out.append(example.SerializeToString())
    return out


# ---------------------------------------------------------------------------- the hand-written loop
def hand_loop(spec: dict) -> dict:
    """The loop's process: reads every row once, adds the sums, saves the means. Returns its
    own figures (seconds in the loop, rows, peak memory)."""
    import keras
    import pyarrow.parquet as pq
    import tensorflow as tf

    model = keras.models.load_model(spec["model"], compile=False)
    variables = model.trainable_variables
    name, shape = spec["feature"], tuple(spec["shape"])
    batch, quantity, chunk = spec["batch"], spec["quantity"], spec["chunk"]
    per_example = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    x_spec = tf.TensorSpec([None, *shape], tf.float32)
    y_spec = tf.TensorSpec([None], tf.int64)

    if spec["format"] == "parquet":
        def batches():
            for path in spec["files"]:
                for record in pq.ParquetFile(path).iter_batches(batch_size=batch, columns=[name, "label"]):
                    x = record.column(0).flatten().to_numpy().reshape(-1, *shape)
                    yield x, record.column(1).to_numpy()

        data = tf.data.Dataset.from_generator(batches, output_signature=(x_spec, y_spec))
    else:
        width = int(np.prod(shape))
        features = {name: tf.io.FixedLenFeature([width], tf.float32), "label": tf.io.FixedLenFeature([], tf.int64)}

        def parse(serialized):
            parsed = tf.io.parse_example(serialized, features)
            return tf.reshape(parsed[name], [-1, *shape]), parsed["label"]

        data = tf.data.TFRecordDataset(spec["files"], num_parallel_reads=tf.data.AUTOTUNE)
        data = data.batch(batch).map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    data = data.prefetch(tf.data.AUTOTUNE)

    sums = [tf.Variable(tf.zeros(v.shape, tf.float64)) for v in variables]
    loss_sum = tf.Variable(tf.zeros([], tf.float64))
    rng = np.random.default_rng(spec["seed"])
    probes = [[tf.constant(rng.choice([-1.0, 1.0], size=v.shape).astype(np.float32)) for v in variables]
              for _ in range(spec["probes"])]

    def add(values):
        for total, value in zip(sums, values):
            total.assign_add(tf.cast(value, tf.float64))

    @tf.function(input_signature=[x_spec, y_spec, tf.TensorSpec([], tf.int64)])
    def step(x, y, index):
        if quantity == "hutchinson":
            with tf.GradientTape(persistent=True) as outer:
                with tf.GradientTape() as inner:
                    losses = per_example(y, model(x, training=False))
                    total = tf.reduce_sum(losses)
                gradient = inner.gradient(total, variables)
                dots = [tf.add_n([tf.reduce_sum(g * v) for g, v in zip(gradient, probe)]) for probe in probes]
            for probe, dot in zip(probes, dots):
                add([v * hv for v, hv in zip(probe, outer.gradient(dot, variables))])
        elif quantity == "gradient":
            with tf.GradientTape() as tape:
                losses = per_example(y, model(x, training=False))
                total = tf.reduce_sum(losses)
            add(tape.gradient(total, variables))
        else:
            # Per-example gradients by a vectorised Jacobian, in chunks of rows: over a whole
            # batch of the CNN, pfor's intermediates took 19 GiB.
            for start in tf.range(0, tf.shape(x)[0], chunk):
                rows = slice(start, start + chunk)
                with tf.GradientTape() as tape:
                    logits = model(x[rows], training=False)
                    losses = per_example(y[rows], logits)
                    target = losses
                    if quantity == "ggn_mc":
                        seed = tf.stack([index, tf.cast(start, tf.int64)])
                        drawn = tf.random.stateless_categorical(tf.stop_gradient(logits), 1, seed)[:, 0]
                        target = per_example(drawn, logits)
                add([tf.reduce_sum(tf.square(j), axis=0) for j in tape.jacobian(target, variables)])
                loss_sum.assign_add(tf.cast(tf.reduce_sum(losses), tf.float64))
            return tf.shape(x)[0]
        loss_sum.assign_add(tf.cast(tf.reduce_sum(losses), tf.float64))
        return tf.shape(x)[0]

    started = time.perf_counter()
    rows = 0
    for index, (x, y) in enumerate(data):
        rows += int(step(x, y, tf.constant(index, tf.int64)))
    seconds = time.perf_counter() - started
    scale = 1.0 / rows / (spec["probes"] if quantity == "hutchinson" else 1)
    np.savez(spec["out"], loss=loss_sum.numpy() / rows,
             **{v.path: s.numpy() * scale for v, s in zip(variables, sums)})
    return {"rows": rows, "loop_seconds": seconds,
            "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


# ---------------------------------------------------------------------------- the two processes
def run_loop(folder: str, model: str, kind: str, files: list[str], fmt: str, quantity: str, label: str) -> dict:
    spec = {"model": model, "feature": FEATURES[kind][0], "shape": FEATURES[kind][1], "batch": BATCH[kind],
            "chunk": CHUNK[kind],
            "quantity": quantity, "files": files, "format": fmt, "probes": 8, "seed": 0,
            "out": os.path.join(folder, f"loop-{label}.npz")}
    path = os.path.join(folder, f"loop-{label}.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(spec, handle)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--loop", path], capture_output=True,
                          text=True, timeout=7200)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the loop failed: {done.stderr.strip()[-2000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return {**figures, "seconds": wall, "arrays": dict(np.load(spec["out"]))}


def job_file(folder: str, model: str, kind: str, data: str, fmt: str, quantity: str, label: str,
             workers="auto") -> str:
    name = FEATURES[kind][0]
    data_spec = {"path": data, "features": name, "labels": "label", "batch_size": BATCH[kind]}
    if fmt == "tfrecord":
        width = int(np.prod(FEATURES[kind][1]))
        data_spec.update({"format": "tfrecord", "schema": {name: {"dtype": "float32", "shape": [width]},
                                                           "label": {"dtype": "int64", "shape": []}}})
    job = {"name": label, "model": model, "loss": {"name": "sparse_categorical_crossentropy", "from_logits": True},
           "data": data_spec, "workers": workers, "shards": "auto", "precision": "float32", "seed": 0,
           "quantities": QUANTITIES[quantity], "output": os.path.join(folder, "results")}
    path = os.path.join(folder, f"{label}.yaml")
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(job, handle)
    return path


def run_pipeline(path: str, *extra: str) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", path, *extra], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=7200)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the pipeline failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    run_dir = done.stdout.strip().splitlines()[-1]
    with open(os.path.join(run_dir, "manifest.json"), encoding="utf-8") as handle:
        manifest = json.load(handle)
    return {"seconds": wall, "run_dir": run_dir, "manifest": manifest}


def pipeline_arrays(run_dir: str, quantity: str) -> dict:
    from pipeline.read.run import load

    run = load(run_dir)
    return {**run.arrays(PIPELINE_NAME[quantity]), "loss": np.asarray(run.loss)}


def disagreement(pipeline: dict, loop: dict) -> str | None:
    """The first array (or the loss) on which the two differ by more than 1e-3 of the largest entry."""
    for name, want in loop.items():
        got = pipeline.get(name)
        if got is None:
            return f"{name}: missing from the pipeline's results"
        scale = max(float(np.max(np.abs(want))), 1e-30)
        worst = float(np.max(np.abs(np.asarray(got) - want))) / scale
        if worst > 1e-3:
            return f"{name}: differs by {worst:.1e} of its largest entry"
    return None


# ---------------------------------------------------------------------------- the cases
def cases(args) -> list[tuple[str, int, str, str]]:
    """(model, rows, format, quantity) in the order they run."""
    out = []
    for kind in args.models:
        for rows in (args.cnn_rows if kind == "cnn" else args.rows):
            for quantity in args.quantities:
                out.append((kind, rows, "parquet", quantity))
            if "tfrecord" in args.formats:
                out.append((kind, rows, "tfrecord", args.quantities[0]))
    return out


def _mib(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB"


def measure(args, folder: str) -> tuple[list[dict], bool]:
    results, ok = [], True
    datasets: dict = {}
    print(f"{'model':<5} {'rows':>9} {'format':<8} {'quantity':<11} {'loop s':>8} {'run s':>8} {'ratio':>6} "
          f"{'target':>7} {'loop rows/s':>12} {'run rows/s':>11} {'loop peak':>10} {'driver peak':>12} "
          f"{'worker peak':>12}", flush=True)
    for kind, rows, fmt, quantity in cases(args):
        model = os.path.join(folder, f"{kind}.keras")
        if not os.path.exists(model):
            make_model(kind, model)
        key = (kind, rows)
        if key not in datasets:
            datasets[key] = {"parquet": write_parquet(os.path.join(folder, f"{kind}-{rows}", "parquet"), kind, rows)}
        if fmt not in datasets[key]:
            datasets[key][fmt] = write_tfrecord(os.path.join(folder, f"{kind}-{rows}", fmt), datasets[key]["parquet"],
                                                kind)
        files = datasets[key][fmt]
        label = f"{kind}-{rows}-{fmt}-{quantity}"
        loop = run_loop(folder, model, kind, files, fmt, quantity, label)
        data = os.path.dirname(files[0])
        run = run_pipeline(job_file(folder, model, kind, data, fmt, quantity, label))
        if quantity in PIPELINE_NAME:
            wrong = disagreement(pipeline_arrays(run["run_dir"], quantity), loop["arrays"])
            if wrong:
                print(f"{label}: the pipeline and the loop disagree ({wrong}): no figures", flush=True)
                ok = False
                continue
        memory = run["manifest"]["memory"]
        ratio = run["seconds"] / loop["seconds"]
        target = TARGETS.get(rows)
        row = {"model": kind, "rows": rows, "format": fmt, "quantity": quantity, "loop_seconds": loop["seconds"],
               "loop_compute_seconds": loop["loop_seconds"], "run_seconds": run["seconds"],
               "run_compute_seconds": run["manifest"]["seconds"], "ratio": ratio, "target": target,
               "loop_peak_bytes": loop["peak_bytes"], "driver_peak_bytes": memory["driver_peak_bytes"],
               "worker_peak_bytes": max(memory["worker_peak_bytes"]), "workers": run["manifest"]["workers"],
               "shards": run["manifest"]["shards"], "timings": run["manifest"].get("timings", {}),
               "estimate_seconds": run["manifest"]["estimate"]["seconds"]}
        results.append(row)
        verdict = "" if target is None else ("PASS" if ratio <= target else "MISS")
        print(f"{kind:<5} {rows:>9,} {fmt:<8} {quantity:<11} {loop['seconds']:>8.1f} {run['seconds']:>8.1f} "
              f"{ratio:>6.2f} {'' if target is None else f'<= {target}':>7} {rows / loop['seconds']:>12,.0f} "
              f"{rows / run['seconds']:>11,.0f} {_mib(loop['peak_bytes']):>10} "
              f"{_mib(memory['driver_peak_bytes']):>12} {_mib(max(memory['worker_peak_bytes'])):>12} {verdict}",
              flush=True)
        shutil.rmtree(os.path.join(folder, "results"), ignore_errors=True)
    return results, ok


def phases(results: list[dict]) -> None:
    """Where each process's time went: the loop's start (Python, TensorFlow, the model) and its
    loop; the run's phases (the manifest's ``timings``) and the rest of its process (Python and
    TensorFlow's import before the run, publishing, Ray's shutdown). The throughput of the
    passes alone, rows per second, shows the reading and compute apart from the start-up."""
    print("\nwhere the time went (seconds) and the throughput of the passes alone (rows/s)")
    print(f"{'case':<34} {'loop start':>10} {'loop':>7} {'ray':>6} {'plan':>6} {'workers':>8} {'pass':>7} "
          f"{'other':>6} {'loop rows/s':>12} {'pass rows/s':>12} {'est/run s':>10}")
    for r in results:
        t = r["timings"]
        passes = t.get("main_pass_seconds", 0.0) + t.get("hvp_passes_seconds", 0.0)
        known = sum(t.get(k, 0.0) for k in ("ray_start_seconds", "plan_seconds", "workers_start_seconds")) + passes
        print(f"{r['model'] + ' ' + format(r['rows'], ',') + ' ' + r['format'] + ' ' + r['quantity']:<34} "
              f"{r['loop_seconds'] - r['loop_compute_seconds']:>10.1f} {r['loop_compute_seconds']:>7.1f} "
              f"{t.get('ray_start_seconds', 0.0):>6.1f} {t.get('plan_seconds', 0.0):>6.1f} "
              f"{t.get('workers_start_seconds', 0.0):>8.1f} {passes:>7.1f} {r['run_seconds'] - known:>6.1f} "
              f"{r['rows'] / r['loop_compute_seconds']:>12,.0f} {r['rows'] / max(passes, 1e-9):>12,.0f} "
              f"{r['estimate_seconds'] / r['run_compute_seconds']:>10.2f}")


def growth(results: list[dict]) -> None:
    """Seconds per 10^5 rows at each size: linear growth shows as one figure along a row."""
    series: dict = {}
    for row in results:
        if row["format"] == "parquet":
            series.setdefault((row["model"], row["quantity"]), []).append(row)
    if not any(len(rows) > 1 for rows in series.values()):
        return
    print("\nseconds per 10^5 rows (whole process, then compute only), by size: linear growth keeps them level")
    for (kind, quantity), rows in series.items():
        cells = "  ".join(f"{r['rows']:,}: loop {1e5 * r['loop_seconds'] / r['rows']:.1f} "
                          f"({1e5 * r['loop_compute_seconds'] / r['rows']:.1f}), run "
                          f"{1e5 * r['run_seconds'] / r['rows']:.1f} ({1e5 * r['run_compute_seconds'] / r['rows']:.1f})"
                          for r in rows)
        print(f"  {kind} {quantity:<11} {cells}")


# ---------------------------------------------------------------------------- several nodes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(count: int, folder: str) -> tuple[str, list]:
    """A local Ray cluster of ``count`` nodes of one CPU each (``ray start``, each with its own
    temp dir); returns the head's address and the processes (``stop_nodes`` ends them)."""
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    # Ray 2.60's clusters ask for a token: the nodes, this process and the run's driver share one
    # through the environment (read once per process, before Ray's import).
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    processes: list = []
    try:
        _start(count, folder, ray_bin, port, address, processes)
    except BaseException:
        stop_nodes(processes)
        raise
    return address, processes


def _start(count: int, folder: str, ray_bin: str, port: int, address: str, processes: list) -> None:
    for index in range(count):
        temp = os.path.join(folder, f"ray-node-{index}")
        os.makedirs(temp, exist_ok=True)
        common = ["--block", "--num-cpus", "1", "--disable-usage-stats", "--temp-dir", temp,
                  "--dashboard-agent-listen-port", str(_free_port()), "--metrics-export-port", str(_free_port())]
        if index == 0:
            command = [ray_bin, "start", "--head", "--port", str(port), "--include-dashboard=false",
                       "--ray-client-server-port", str(_free_port()), *common]
        else:
            command = [ray_bin, "start", "--address", address, *common]
        log = open(os.path.join(folder, f"ray-node-{index}.log"), "w")
        processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        if index == 0:
            _wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True, 120,
                      "the Ray head did not start", processes[0])
    import ray

    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        _wait_for(lambda: len([n for n in ray.nodes() if n["Alive"]]) >= count, 120,
                  f"{count} Ray nodes did not join", processes[-1])
    finally:
        ray.shutdown()


def _wait_for(check, seconds: float, message: str, process) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(message)
        time.sleep(0.5)


def stop_nodes(processes: list) -> None:
    for process in reversed(processes):
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def several_nodes(args, folder: str) -> bool:
    """The ``--nodes`` mode: one case on a local cluster of several nodes and on one node."""
    kind, rows, quantity = args.models[0], args.rows[0], args.quantities[0]
    model = os.path.join(folder, f"{kind}.keras")
    make_model(kind, model)
    data = os.path.dirname(write_parquet(os.path.join(folder, "data"), kind, rows)[0])
    one = run_pipeline(job_file(folder, model, kind, data, "parquet", quantity, "one-node", workers=1))
    address, processes = start_nodes(args.nodes, folder)
    try:
        many = run_pipeline(job_file(folder, model, kind, data, "parquet", quantity, "nodes", workers=args.nodes),
                            "--address", address)
    finally:
        stop_nodes(processes)
    from pipeline.read.run import load

    name = QUANTITIES[quantity].popitem()[0]
    a, b = load(one["run_dir"]).arrays(name), load(many["run_dir"]).arrays(name)
    worst = max(float(np.max(np.abs(a[k] - b[k])) / max(np.max(np.abs(a[k])), 1e-30)) for k in a)
    print(f"{kind} {rows:,} rows, {quantity}: one node {one['seconds']:.1f} s, {args.nodes} nodes "
          f"{many['seconds']:.1f} s; largest difference {worst:.1e} of the largest entry "
          f"({'same to rounding' if worst < 1e-5 else 'DIFFERENT'})")
    nodes = {}
    for entry in many["manifest"]["per_worker"]:
        total = nodes.setdefault(entry["node"], {"rows": 0, "seconds": 0.0, "shards": 0})
        for field in ("rows", "seconds", "shards"):
            total[field] += entry[field]
    for node, total in sorted(nodes.items()):
        print(f"  node {node[:12]}: {total['shards']} shards, {total['rows']:,} rows in {total['seconds']:.1f} s "
              f"computing: {total['rows'] / max(total['seconds'], 1e-9):,.0f} rows/s")
    return worst < 1e-5 and len(nodes) == args.nodes


def _counts(text: str) -> list[int]:
    return [int(float(part)) for part in text.split(",") if part]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 rows, MLP, gradient and Fisher")
    parser.add_argument("--rows", default="10000,100000,1000000", help="row counts of the MLP cases")
    parser.add_argument("--cnn-rows", default="10000", help="row counts of the CNN cases")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--quantities", default=",".join(QUANTITIES))
    parser.add_argument("--formats", default="parquet,tfrecord", help="TFRecord: the first quantity only")
    parser.add_argument("--nodes", type=int, default=0, help="run one case on a local cluster of this many nodes")
    parser.add_argument("--gpu", action="store_true", help="the CNN at 10^5 and 10^6 rows (workers take the GPUs "
                        "they find: one per GPU)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--loop", help=argparse.SUPPRESS)  # the hand-written loop's own process
    args = parser.parse_args(argv)
    from pipeline import quiet

    quiet.import_tensorflow()  # TensorFlow's start-up lines are not figures
    if args.loop:
        with open(args.loop, encoding="utf-8") as handle:
            print(json.dumps(hand_loop(json.load(handle))))
        return 0
    if args.quick:
        args.rows, args.cnn_rows, args.models, args.quantities = "2000", "", "mlp", "gradient,fisher"
    if args.gpu:
        args.cnn_rows = "100000,1000000"
    args.rows, args.cnn_rows = _counts(args.rows), _counts(args.cnn_rows)
    args.models = args.models.split(",")
    args.quantities = args.quantities.split(",")
    args.formats = args.formats.split(",")
    print(f"scale benchmark: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as folder:
        if args.nodes:
            return 0 if several_nodes(args, folder) else 1
        results, ok = measure(args, folder)
        if results:
            phases(results)
        growth(results)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
