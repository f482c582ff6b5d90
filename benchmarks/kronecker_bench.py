"""What layer-input moments and Kronecker factors cost, in plain gradients, on the MLP and the
CNN of ``engine_bench.py`` (same models, batches, loss and pairing of each timing with an
adjacent plain compiled gradient: the ratio is the median of the paired ratios).

Run from the repository root::

    python benchmarks/kronecker_bench.py           # reference sizes (a few minutes on 2 cores)
    python benchmarks/kronecker_bench.py --quick   # small widths, few repetitions

Rows: the engine's own loss-and-gradient (``BatchWork()``, what every main pass computes), then
``layer_inputs`` (A of every Dense/Conv layer), ``kfac`` with each ``fisher_type`` (A and S:
one backward pass to the layers' outputs per label column, 10 for ``exact`` on 10 logits) and
the EK-FAC pass (``kfac_eigen``, in the bases of the factors just computed). "beyond" is the
row's ratio minus the engine gradient's: what the factors add to a main pass.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import _common  # noqa: E402
import engine_bench  # noqa: E402  (the models, the pairing, the gradient reference)
from pipeline.curvature.engine import CurvatureEngine  # noqa: E402
from pipeline.curvature.losses import resolve_loss  # noqa: E402
from pipeline.curvature.requests import BatchWork, KroneckerRequest  # noqa: E402


def bench(title, model, n, settings):
    loss = resolve_loss(engine_bench.LOSS_SPEC)
    engine = CurvatureEngine(model, loss, precision="float32")
    x, y = engine_bench.batch(model, n)
    refs = engine_bench.References(model, loss, engine, x, y)
    rows = np.arange(n)

    def partial(*requests):
        return lambda: engine.partial([x], [y], None, rows, BatchWork(kronecker=tuple(requests)))

    factors = engine.partial([x], [y], None, rows, BatchWork(kronecker=(KroneckerRequest("kfac"),))).sums
    bases = {}
    for info, _ in engine.kronecker.layers():
        bases[info.path] = (np.linalg.eigh(factors[f"kfac/{info.path}/A"])[1],
                            np.linalg.eigh(factors[f"kfac/{info.path}/S"])[1])
    results = [engine_bench.gradient_baseline(refs, settings)]
    cases = [("engine loss and gradient", partial()),
             ("layer_inputs", partial(KroneckerRequest("layer_inputs"))),
             ("kfac empirical", partial(KroneckerRequest("kfac"))),
             ("kfac mc (1 sample)", partial(KroneckerRequest("kfac", fisher_type="mc"))),
             ("kfac exact (10 columns)", partial(KroneckerRequest("kfac", fisher_type="exact"))),
             ("EK-FAC pass (empirical)", partial(KroneckerRequest("kfac_eigen", bases=bases)))]
    for name, fn in cases:
        results.append(engine_bench.measure(name, fn, refs.gradient, settings))
    layers = ", ".join(f"{info.path} A {info.inputs + info.bias}, S {info.outputs}"
                       for info, _ in engine.kronecker.layers())
    print(f"\n{title}, batch {n}, P = {engine.parameters:,}\n  factored layers: {layers}")
    base = results[1].ratio
    print(f"  {'':28s} {'ms':>9s} {'x gradient':>11s} {'beyond':>8s}")
    for r in results:
        beyond = "" if r is results[0] or r is results[1] else f"{r.ratio - base:+8.2f}"
        print(f"  {r.name:28s} {r.median_s * 1e3:9.1f} {r.ratio:11.2f} {beyond:>8s}")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description="Costs of layer_inputs and kfac, in plain gradients.")
    parser.add_argument("--quick", action="store_true", help="smaller widths, few repetitions")
    args = parser.parse_args(argv)
    settings = engine_bench.QUICK if args.quick else engine_bench.FULL
    started = time.perf_counter()
    env = _common.environment(args.quick)
    _common.print_header("kronecker", env, " (smaller widths and batches: NOT the reference sizes)")
    h = settings.mlp_hidden
    bench(f"(a) MLP 784-{h}-{h}-10 tanh, logits, float32", engine_bench.mlp((784, h, h, 10)), settings.mlp_batch,
          settings)
    f1, f2, f3, hidden = settings.cnn_filters
    bench(f"(b) CNN 32x32x3, conv{f1} conv{f2} pool2 conv{f3} pool2, dense{hidden}, dense10, float32",
          engine_bench.cnn(settings.cnn_filters), settings.cnn_batch, settings)
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
