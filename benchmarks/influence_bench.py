"""Per-example outputs and influence (contract 7): what the rows pass costs against a plain
gradient pass over the same rows, and its worker memory as the rows grow.

Run from the repository root::

    python benchmarks/influence_bench.py             # 10^4, 10^5, 10^6 rows (about 10 minutes on 2 CPU cores)
    python benchmarks/influence_bench.py --quick     # 1,000 and 4,000 rows, ekfac scoring only (under a minute)
    python benchmarks/influence_bench.py --rows 10000,100000 --influence-rows 100000 --json results/influence.json

The model and data are ``scale_bench.py``'s MLP (the bundled 64-32-10 digits MLP, P = 2,410,
untrained) and its Parquet files (62,500 rows a file, row groups of 16,384), float32, batch 256,
``workers: auto``, ``shards: auto``, on one local Ray (2 CPUs) that every run of this process
shares; each run starts its own workers. Every figure comes from the runs' manifests:

- (a) and (c): one run per row count asking ``gradient`` and ``per_example: {projection: 1024}``.
  Its main pass is a plain gradient pass over the rows (the baseline), its rows pass the store
  pass: ratio ``timings.rows_pass_seconds / timings.main_pass_seconds`` (target <= 1.3), and
  ``max(memory.worker_peak_bytes)`` per row count (flat: the largest over the smallest).
- (b) one run asking ``gradient`` and ``influence: {curvature: identity | ekfac, queries: 64 rows,
  self: false}``: the scoring pass is the rows pass less the query gradients and their
  preconditioning (the run's line ``influence: 64 query gradients, preconditioned ... in X s``),
  over the same run's main pass (identity: a plain gradient pass; ekfac: the gradient and K-FAC's
  factors, so its baseline is the main pass of (a)'s run over the same rows, a plain gradient
  pass; its ratio over its own main pass is printed too). ``--quick`` runs ekfac alone.
- (d) the kernels alone, in this process without Ray or reading: ``CurvatureEngine.rows`` with
  the same requests over ``CurvatureEngine.partial(BatchWork(gradient=True))`` on one batch of
  256, median of paired ratios (alternating order).

Each pass's time includes what the worker pays per batch (reading, checks, the first batch's
tracing: about a second per worker, which dominates at small row counts). Nothing here is
asserted: ``tests/system/test_benchmarks.py`` runs ``--quick`` to check that it runs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# The working tree, not an installed copy, is what is being measured.
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

import _common  # noqa: E402

PROJECTION = 1024
QUERIES = 64
BATCH = 256
TARGETS = {"store": 1.3, "scoring": 2.0}
QUERY_LINE = re.compile(r"query gradients, preconditioned \((\w+)\) in ([0-9.]+) s")


def _mib(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB"


def _counts(text: str) -> list[int]:
    return [int(float(part)) for part in text.split(",") if part]


# ---------------------------------------------------------------------------- the runs
class Bench:
    def __init__(self, folder: str, kind: str = "mlp"):
        import scale_bench

        self.folder = folder
        self.kind = kind
        self.feature = scale_bench.FEATURES[kind][0]
        self.batch = scale_bench.BATCH[kind]
        self.scale = scale_bench
        self.model = os.path.join(folder, f"{kind}.keras")
        scale_bench.make_model(kind, self.model)
        self.queries = os.path.join(folder, "queries")
        self._write_queries()
        self.data: dict[int, str] = {}

    def _write_queries(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        x, y = self.scale.make_rows(self.kind, QUERIES, seed=1000)  # rows no training file holds
        os.makedirs(self.queries, exist_ok=True)
        pq.write_table(pa.table({self.feature: pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1]),
                                 "label": pa.array(y)}), os.path.join(self.queries, "queries.parquet"))

    def rows(self, count: int) -> str:
        if count not in self.data:
            self.data[count] = os.path.dirname(
                self.scale.write_parquet(os.path.join(self.folder, f"data-{count}"), self.kind, count)[0])
        return self.data[count]

    def drop(self, count: int) -> None:
        shutil.rmtree(self.data.pop(count), ignore_errors=True)

    def run(self, label: str, rows: int, quantities: dict) -> dict:
        import pipeline
        from pipeline.job import load_job

        output = os.path.join(self.folder, "results")
        job = {"name": label, "model": self.model,
               "loss": {"name": "sparse_categorical_crossentropy", "from_logits": True},
               "data": {"path": self.rows(rows), "features": self.feature, "labels": "label",
                        "batch_size": self.batch},
               "workers": "auto", "shards": "auto", "precision": "float32", "seed": 0,
               "quantities": {"gradient": {}, **quantities}, "output": output}
        stream = io.StringIO()
        started = time.perf_counter()
        published = pipeline.run(load_job(job), run_id=f"{label}-{rows}", stream=stream)
        wall = time.perf_counter() - started
        manifest = published.manifest
        said = QUERY_LINE.search(stream.getvalue())
        shutil.rmtree(output, ignore_errors=True)  # per_example/ at 10^6 rows is 4 GB
        t = manifest["timings"]
        return {"label": label, "rows": rows, "wall_seconds": wall, "shards": manifest["shards"],
                "workers": len(manifest["memory"]["worker_peak_bytes"]), "timings": t,
                "query_seconds": float(said.group(2)) if said else 0.0,
                "worker_peak_bytes": manifest["memory"]["worker_peak_bytes"],
                "driver_peak_bytes": manifest["memory"]["driver_peak_bytes"]}


def influence_spec(bench: Bench, curvature: str) -> dict:
    return {"influence": {"curvature": curvature, "self": False, "top_k": 10,
                          "queries": {"path": bench.queries, "features": bench.feature, "labels": "label"}}}


# ---------------------------------------------------------------------------- (d) the kernels
def kernel_ratios(quick: bool) -> list[dict]:
    from pipeline.curvature.engine import CurvatureEngine
    from pipeline.curvature.losses import resolve_loss
    from pipeline.curvature.requests import BatchWork, RowsRequest
    from pipeline.examples.digits import make_data, make_model
    from types import SimpleNamespace

    loss = resolve_loss(SimpleNamespace(name="sparse_categorical_crossentropy", options={"from_logits": True},
                                        function=None))
    engine = CurvatureEngine(make_model(), loss, precision="float32")
    pixels, labels, _ = make_data(BATCH)
    x, y, rows = [pixels.reshape(-1, 8, 8, 1)], [labels], np.arange(BATCH)
    vectors = np.random.default_rng(0).normal(size=(QUERIES, engine.parameters))

    def gradient():
        return engine.partial(x, y, None, rows, BatchWork(gradient=True))

    cases = [("loss and gradient norm only", RowsRequest()),
             (f"projection {PROJECTION}", RowsRequest(projection=PROJECTION)),
             (f"{QUERIES} query vectors (scores)", RowsRequest(vectors=vectors, top_k=10, write=False))]
    reps = 10 if quick else 40
    out = []
    gradient()
    for name, request in cases:
        def fn(request=request):
            return engine.rows(x, y, request)

        fn()
        fn()
        ratios, times = [], []
        for rep in range(reps):
            took = {}
            for f in ((gradient, fn) if rep % 2 == 0 else (fn, gradient)):
                began = time.perf_counter()
                f()
                took[f] = time.perf_counter() - began
            ratios.append(took[fn] / took[gradient])
            times.append((took[gradient], took[fn]))
        out.append({"case": name, "ratio": statistics.median(ratios),
                    "gradient_ms": 1e3 * statistics.median(t[0] for t in times),
                    "rows_ms": 1e3 * statistics.median(t[1] for t in times), "reps": reps})
    return out


# ---------------------------------------------------------------------------- printing
def print_store(results: list[dict]) -> None:
    print(f"\n(a) store pass (per_example: {{projection: {PROJECTION}}}) over the same run's main pass "
          "(baseline: a plain gradient pass over the same rows, same workers)")
    print(f"  {'rows':>10} {'shards':>6} {'main pass s':>11} {'rows pass s':>11} {'store / gradient':>16} "
          f"{'target':>7} {'':4}  {'worker peak':>12} {'driver peak':>12}")
    for r in results:
        t = r["timings"]
        ratio = t["rows_pass_seconds"] / t["main_pass_seconds"]
        r["store_ratio"] = ratio
        print(f"  {r['rows']:>10,} {r['shards']:>6} {t['main_pass_seconds']:>11.1f} {t['rows_pass_seconds']:>11.1f} "
              f"{ratio:>16.2f} {'<= 1.3':>7} {_common.verdict(ratio <= TARGETS['store']):4}  "
              f"{_mib(max(r['worker_peak_bytes'])):>12} {_mib(r['driver_peak_bytes']):>12}", flush=True)


def print_scoring(runs: dict, store: list[dict]) -> None:
    same = [r for r in store if r["rows"] == next(iter(runs.values()))["rows"]]
    plain = (same[0] if same else runs.get("identity", next(iter(runs.values()))))["timings"]["main_pass_seconds"]
    print(f"\n(b) scoring pass, {QUERIES} queries (influence, self: false, top_k 10): the rows pass less the query "
          "gradients and their preconditioning, over a plain gradient pass over the same rows")
    print(f"  ekfac's baseline: the plain gradient main pass of the store run over the same rows ({plain:.1f} s)")
    print(f"  {'curvature':<9} {'rows':>9} {'main pass s':>11} {'queries s':>9} {'scoring s':>9} "
          f"{'scoring / gradient':>18} {'target':>7}")
    for curvature, r in runs.items():
        t = r["timings"]
        scoring = t["rows_pass_seconds"] - r["query_seconds"]
        # identity: the run's own main pass is a plain gradient pass; ekfac's also sums K-FAC's
        # factors, so its baseline is the store run's main pass over the same rows (same process).
        baseline = t["main_pass_seconds"] if curvature == "identity" else plain
        r["scoring_ratio"] = scoring / baseline
        print(f"  {curvature:<9} {r['rows']:>9,} {t['main_pass_seconds']:>11.1f} {r['query_seconds']:>9.1f} "
              f"{scoring:>9.1f} {r['scoring_ratio']:>18.2f} {'<= 2':>7} "
              f"{_common.verdict(r['scoring_ratio'] <= TARGETS['scoring'])}", flush=True)
        if curvature != "identity":
            print(f"  {'':<9} (over its own main pass, gradient and K-FAC factors, {t['main_pass_seconds']:.1f} s: "
                  f"{scoring / t['main_pass_seconds']:.2f}; EK-FAC eigenvalue pass {t['hvp_passes_seconds']:.1f} s)")


def print_memory(results: list[dict]) -> float:
    print(f"\n(c) worker peak memory (manifest memory.worker_peak_bytes, the largest worker) against rows, "
          f"per_example projection {PROJECTION}")
    print(f"  {'rows':>10} {'shards':>6} {'worker peak':>12} {'rows pass s':>11} {'rows/s':>10}")
    for r in results:
        t = r["timings"]
        print(f"  {r['rows']:>10,} {r['shards']:>6} {_mib(max(r['worker_peak_bytes'])):>12} "
              f"{t['rows_pass_seconds']:>11.1f} {r['rows'] / t['rows_pass_seconds']:>10,.0f}")
    peaks = [max(r["worker_peak_bytes"]) for r in results]
    growth = max(peaks) / min(peaks)
    print(f"  largest worker peak, most rows / fewest rows: {peaks[-1] / peaks[0]:.2f} "
          f"(largest / smallest over all sizes {growth:.2f})")
    return peaks[-1] / peaks[0]


def print_kernels(results: list[dict]) -> None:
    print(f"\n(d) the kernels alone, one batch of {BATCH} in this process: CurvatureEngine.rows over "
          "CurvatureEngine.partial(BatchWork(gradient=True)), median of paired ratios")
    for r in results:
        print(f"  rows, {r['case']:<32} {r['rows_ms']:>7.2f} ms  gradient {r['gradient_ms']:>5.2f} ms  "
              f"ratio {r['ratio']:>5.2f}")


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 and 4,000 rows, ekfac scoring only, under a minute")
    parser.add_argument("--rows", default="10000,100000,1000000",
                        help="row counts of the store-pass runs (a) and the memory series (c)")
    parser.add_argument("--influence-rows", type=int, default=100000, help="rows of the scoring runs (b)")
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp",
                        help="scale_bench.py's MLP (P = 2,410, batch 256) or CNN (P = 684,490, batch 128) for "
                             "(a)-(c); (d) is always the MLP")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.influence_rows = "1000,4000", 4000
    counts = sorted(_counts(args.rows))
    from pipeline import quiet

    quiet.import_tensorflow()
    import ray

    env = _common.environment(args.quick)
    _common.print_header("influence", env, " (small row counts: the passes are mostly start-up and tracing; "
                                           "quote full runs only)")
    title = ("MLP 64-32-10 (P = 2,410), batch 256" if args.model == "mlp"
             else "CNN 32x32x3 of engine_bench.py (P = 684,490), batch 128")
    print(f"  model: scale_bench.py's {title}, float32; one local Ray (2 CPUs), workers auto, shards auto",
          flush=True)
    began = time.perf_counter()
    figures: dict = {"environment": env}
    with tempfile.TemporaryDirectory(prefix="influence-bench-") as folder:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3"}})
        try:
            bench = Bench(folder, args.model)
            store = []
            for count in counts:
                store.append(bench.run("store", count, {"per_example": {"projection": PROJECTION}}))
                if count != args.influence_rows:
                    bench.drop(count)
            print_store(store)
            # --quick: EK-FAC alone (its baseline is the store run's main pass over the same rows).
            scoring = {c: bench.run(f"scoring-{c}", args.influence_rows, influence_spec(bench, c))
                       for c in (("ekfac",) if args.quick else ("identity", "ekfac"))}
            print_scoring(scoring, store)
        finally:
            ray.shutdown()
        memory_growth = print_memory(store)
        kernel = kernel_ratios(args.quick)
        print_kernels(kernel)
    figures.update({"store": store, "scoring": scoring, "kernels": kernel, "memory_growth": memory_growth})
    last = store[-1]
    print("\nsummary (baseline: the plain gradient pass over the same rows, from the same run's manifest)")
    print(f"  store pass / gradient pass at {last['rows']:,} rows: {last['store_ratio']:.2f} (target <= 1.3, "
          f"{_common.verdict(last['store_ratio'] <= TARGETS['store'])})")
    for c, r in scoring.items():
        print(f"  scoring pass ({QUERIES} queries, {c}) / gradient pass at {r['rows']:,} rows: "
              f"{r['scoring_ratio']:.2f} (target <= 2, {_common.verdict(r['scoring_ratio'] <= TARGETS['scoring'])})")
    print(f"  worker peak at {counts[-1]:,} rows / at {counts[0]:,} rows: {memory_growth:.2f}")
    print(f"  kernels alone, per batch: projection {kernel[1]['ratio']:.2f}, {QUERIES} scores "
          f"{kernel[2]['ratio']:.2f} gradients")
    print(f"total wall time {time.perf_counter() - began:.0f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(figures, handle, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
