"""How much each curvature quantity of ``CurvatureEngine`` costs, in plain gradients.

Run from the repository root::

    python benchmarks/engine_bench.py            # full run (a few minutes on 2 CPU cores)
    python benchmarks/engine_bench.py --quick    # small widths, few repetitions (< 1 minute)
    python benchmarks/engine_bench.py --json results/engine_bench.json

Every time is reported as a ratio to a plain compiled gradient (``tf.function``, same model,
same batch, same loss). Each repetition times the gradient and the quantity back to back (in
alternating order) and the ratio is the median over repetitions of these paired ratios: a
machine shared with other jobs slows both members of a pair alike, so the ratio stays stable
when absolute times do not. The first call of every compiled function (tracing included) is
timed apart and never enters a median; one untimed warm-up call follows it.

Models: (a) MLP 784-512-512-10 (tanh, logits), batch 256; (b) CNN 32x32x3 -> Conv2D 32 ->
Conv2D 64 -> MaxPool 2 -> Conv2D 128 -> MaxPool 2 (3x3 kernels, relu) -> Flatten -> Dense 128
relu -> Dense 10 (P = 684,490), batch 128; both
float32 with sparse categorical cross-entropy from logits. (c) Exact Hessian diagonal of an
MLP 64-32-10 (tanh, P = 2,410, batch 256) against the naive loop that takes one second-order
gradient per parameter (eager, nested tapes); that loop is timed on a sample of parameters
and extrapolated to all P.

Reference HVP orderings are written here, not imported, so that they check the engine:
forward-over-reverse (``ForwardAccumulator`` over a ``GradientTape``, compiled),
reverse-over-reverse (nested tapes, compiled) and the naive recipe (the same nested tapes,
eager). Before any timing, their HVPs must equal the engine's (float32 tolerance), and the
naive loop's diagonal entries must equal the engine's exact diagonal; otherwise the script
stops with exit status 1.

Thread settings are left as TensorFlow chooses them and printed in the header.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The working tree, not an installed copy, is what is being measured.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import _common  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from pipeline.curvature.engine import CurvatureEngine  # noqa: E402
from pipeline.curvature.losses import resolve_loss  # noqa: E402
from pipeline.curvature.requests import BatchWork  # noqa: E402
from pipeline.probes import rademacher  # noqa: E402

# The targets (ratios to one plain gradient on the same batch); an HVP's depends on the
# model: 2.0 on the MLP, 2.5 on the CNN. The exact GGN's is 1 + C/2 for C outputs.
TARGET_HVP = {"mlp": 2.0, "cnn": 2.5}
TARGET_HUTCHINSON = 0.6  # Hutchinson per probe <= 0.6 of one HVP
TARGET_FISHER = 2.0
TARGET_GGN_MC = 2.5
CLASSES = 10
TARGET_GGN_EXACT = 1 + CLASSES / 2
TARGET_DIAGONAL = 100.0  # exact diagonal >= 100x faster than the per-parameter loop


# ---------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """Sizes and repetitions of one run (full or ``--quick``)."""

    mlp_hidden: int
    mlp_batch: int
    cnn_filters: tuple
    cnn_batch: int
    diag_layers: tuple  # (input, hidden, classes)
    diag_batch: int
    diag_sample: int  # parameters timed in the naive per-parameter loop
    budget_s: float  # seconds of timing aimed at per quantity
    min_reps: int
    max_reps: int
    slow_reps: int  # for a quantity whose one call alone exceeds the budget
    naive_reps: int


FULL = Settings(mlp_hidden=512, mlp_batch=256, cnn_filters=(32, 64, 128, 128), cnn_batch=128,
                diag_layers=(64, 32, 10), diag_batch=256, diag_sample=100,
                budget_s=2.0, min_reps=5, max_reps=25, slow_reps=3, naive_reps=5)
QUICK = Settings(mlp_hidden=64, mlp_batch=64, cnn_filters=(4, 8, 8, 16), cnn_batch=32,
                 diag_layers=(16, 8, 10), diag_batch=64, diag_sample=20,
                 budget_s=0.1, min_reps=3, max_reps=3, slow_reps=3, naive_reps=2)

LOSS_SPEC = SimpleNamespace(name="sparse_categorical_crossentropy", options={"from_logits": True}, function=None)


# ---------------------------------------------------------------------------- models
def mlp(widths, activation="tanh", seed=0, name="mlp"):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((widths[0],))]
    layers += [keras.layers.Dense(w, activation=activation) for w in widths[1:-1]]
    layers.append(keras.layers.Dense(widths[-1]))  # logits
    return keras.Sequential(layers, name=name)


def cnn(filters, seed=0):
    """The issue's CNN: 32x32x3 inputs, three 3x3 convolutions (relu, two max-pools), a hidden
    Dense and 10 logits (filters (32, 64, 128), hidden 128: P = 684,490)."""
    keras.utils.set_random_seed(seed)
    c1, c2, c3, hidden = filters
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(c1, 3, activation="relu"),
        keras.layers.Conv2D(c2, 3, activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(c3, 3, activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(CLASSES),
    ], name="cnn")


def batch(model, n, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *[int(d) for d in model.inputs[0].shape[1:]])).astype(np.float32)
    y = rng.integers(0, int(model.outputs[0].shape[-1]), size=n)
    return x, y


# ---------------------------------------------------------------------------- references
class References:
    """The gradient baseline and the HVP orderings the engine is compared with.

    All use the engine's objective ``sum_i l_i`` (unit weights) and its flat parameter
    layout, so their results compare entry by entry with ``Partial.sums``.
    """

    def __init__(self, model, loss, engine, x, y):
        self.model = model
        self.loss = loss
        self.engine = engine
        # Backend tf.Variables: ForwardAccumulator rejects Keras 3 variables (PITFALLS.md).
        self.variables = [v.value for v in model.trainable_variables]
        self.x = tf.constant(x)
        self.y = tf.constant(y)
        self.s = tf.ones([len(x)], tf.float32)
        self.gradient = tf.function(self._gradient)
        self.forward_over_reverse = tf.function(self._forward_over_reverse)
        self.reverse_over_reverse = tf.function(self._reverse_over_reverse)
        self.naive_hvp = self._reverse_over_reverse  # the same nested tapes, eager

    def objective(self):
        return tf.reduce_sum(self.s * self.loss([self.y], [self.model(self.x, training=False)]))

    def _gradient(self):
        with tf.GradientTape() as tape:
            value = self.objective()
        return value, tape.gradient(value, self.variables)

    def _forward_over_reverse(self, v):
        """H v as the directional derivative (JVP) of the gradient along v."""
        with tf.autodiff.ForwardAccumulator(self.variables, self.engine.unflatten(v)) as acc:
            with tf.GradientTape() as tape:
                value = self.objective()
            grads = tape.gradient(value, self.variables)
        return self.engine.flatten(acc.jvp(grads))

    def _reverse_over_reverse(self, v):
        """H v = d(g . v)/dw: the textbook recipe, the gradient recorded by the outer tape."""
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                value = self.objective()
            grads = inner.gradient(value, self.variables)
            dot = tf.add_n([tf.reduce_sum(g * u) for g, u in zip(grads, self.engine.unflatten(v))])
        return self.engine.flatten(outer.gradient(dot, self.variables))

    def naive_diagonal_entry(self, j):
        """diag(H)[j] the naive way: one full second-order gradient for parameter j (eager)."""
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                value = self.objective()
            g = self.engine.flatten(inner.gradient(value, self.variables))
            gj = g[j]
        row = self.engine.flatten(outer.gradient(gj, self.variables))
        return float(row[j].numpy())


def _done(result):
    """Waits for the result (device runs are asynchronous) by fetching it to the host."""
    for t in tf.nest.flatten(result):
        if isinstance(t, tf.Tensor):
            t.numpy()
    return result


# ---------------------------------------------------------------------------- timing
@dataclass
class Measure:
    name: str
    median_s: float
    ratio: float  # median of paired (quantity / gradient) ratios, per vector when `per` > 1
    first_call_s: float
    reps: int
    per: int = 1
    note: str = ""
    times_s: list = field(default_factory=list)

    def as_json(self):
        return {"median_s": self.median_s, "ratio_to_gradient": self.ratio,
                "first_call_s": self.first_call_s, "reps": self.reps, "per": self.per,
                "note": self.note, "times_s": self.times_s}


def timed(fn):
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = _done(fn())
    return time.perf_counter() - start, result


def measure(name, fn, baseline, settings, per=1, note="", reps=None, first_call_s=None):
    """Times ``fn`` paired with ``baseline`` (the plain gradient); see the module docstring.

    ``first_call_s``: the first call's time when an earlier step (the numerical checks) made
    it; otherwise the first call is made and timed here. Neither enters the median.
    """
    if first_call_s is None:
        first_call_s, _ = timed(fn)
    warm, _ = timed(fn)
    if reps is None:
        if warm > settings.budget_s:
            reps = settings.slow_reps
        else:
            reps = int(min(settings.max_reps, max(settings.min_reps, math.ceil(settings.budget_s / warm))))
    times, ratios = [], []
    for rep in range(reps):
        order = (baseline, fn) if rep % 2 == 0 else (fn, baseline)
        took = {}
        for f in order:
            start = time.perf_counter()
            _done(f())
            took[f] = time.perf_counter() - start
        times.append(took[fn])
        ratios.append(took[fn] / took[baseline])
    return Measure(name, statistics.median(times) / per, statistics.median(ratios) / per, first_call_s, reps,
                   per, note, times)


# ---------------------------------------------------------------------------- checks
def close(name, got, want, checks, rtol=1e-3, atol_scale=1e-4):
    """float32 tolerance: relative 1e-3, absolute 1e-4 of the largest reference entry."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(float(np.abs(want).max()), 1e-30)
    error = float(np.abs(got - want).max()) / scale
    ok = bool(np.allclose(got, want, rtol=rtol, atol=atol_scale * scale))
    checks.append({"check": name, "max_abs_error_over_max_entry": error, "ok": ok})
    return ok


def print_checks(checks):
    print("\nnumerical checks (float32 tolerance: rtol 1e-3, atol 1e-4 x largest entry)")
    for c in checks:
        print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['check']:<68} max err / max entry = "
              f"{c['max_abs_error_over_max_entry']:.1e}")


def stop_if_failed(checks):
    """Timings of code that disagrees with its references mean nothing: stop (exit 1)."""
    if all(c["ok"] for c in checks):
        return
    print_checks(checks)
    print("\nnumerical checks failed: no timings reported", file=sys.stderr)
    sys.exit(1)


def check_hvps(label, engine, refs, inputs, labels, checks):
    """The engine's HVP and Hutchinson products against the three reference orderings.

    Returns the times of these first calls (they include tracing), for the report.
    """
    v = np.random.default_rng(7).normal(size=(1, engine.parameters))
    rows = np.arange(len(inputs[0]))
    first = {}
    first["engine"], part = timed(lambda: engine.partial(inputs, labels, None, rows, BatchWork(hvp_vectors=v)))
    hv = part.sums["hvp"][0]
    v32 = tf.constant(v[0], tf.float32)
    for key, name, fn in [("forward", "forward-over-reverse", refs.forward_over_reverse),
                          ("reverse", "reverse-over-reverse", refs.reverse_over_reverse),
                          ("naive", "naive eager nested tapes", refs.naive_hvp)]:
        first[key], got = timed(lambda: fn(v32))
        close(f"{label}: engine HVP == {name}", hv, got.numpy(), checks)
    _, grads = refs.gradient()
    close(f"{label}: engine gradient == plain gradient", part.sums["gradient"],
          engine.flatten(grads).numpy(), checks)
    z = rademacher(0, range(2), engine.parameters)
    probes = engine.partial(inputs, labels, None, rows, BatchWork(probes=z))
    hz = refs.reverse_over_reverse(tf.constant(z[1], tf.float32)).numpy()
    close(f"{label}: engine Hutchinson z*(Hz) == reverse-over-reverse", probes.sums["hessian_probes"][1],
          z[1] * hz, checks)
    return first


# ---------------------------------------------------------------------------- benches
def gradient_baseline(refs, settings):
    """The plain compiled gradient, traced once and timed alone (its ratio is 1 by definition)."""
    start = time.perf_counter()
    _done(refs.gradient())
    first = time.perf_counter() - start
    _done(refs.gradient())  # warm-up
    times = []
    for _ in range(max(settings.min_reps, 5)):
        start = time.perf_counter()
        _done(refs.gradient())
        times.append(time.perf_counter() - start)
    return Measure("plain gradient (tf.function)", statistics.median(times), 1.0, first, len(times),
                   note="the unit of every ratio", times_s=times)


def bench_model(key, title, model, n, settings, checks):
    """Every quantity of one model, as ratios to the plain compiled gradient."""
    loss = resolve_loss(LOSS_SPEC)
    engine = CurvatureEngine(model, loss, precision="float32")
    P = engine.parameters
    x, y = batch(model, n)
    inputs, labels, rows = [x], [y], np.arange(n)
    refs = References(model, loss, engine, x, y)
    first = check_hvps(key, engine, refs, inputs, labels, checks)
    stop_if_failed(checks)

    v1 = rademacher(0, range(1), P, stream=1)
    v8 = rademacher(0, range(8), P, stream=1)
    z16 = rademacher(0, range(16), P)

    def partial(work):
        return lambda: engine.partial(inputs, labels, None, rows, work)

    baseline = refs.gradient
    results = [gradient_baseline(refs, settings)]

    def add(name, fn, **options):
        results.append(measure(name, fn, baseline, settings, **options))

    add("engine gradient (partial)", partial(BatchWork()), note="loss + gradient as float64 sums")
    add("engine HVP, K=1 (partial)", partial(BatchWork(hvp_vectors=v1)), first_call_s=first["engine"],
        note="includes loss and gradient")
    # The compiled functions the engine traced (K=1 above, K=16 below), called directly on
    # tensors: no NumPy conversions, the same work as the reference orderings.
    x_t, y_t, s_t = engine.cast_batch(inputs, labels, None)
    specs = engine.core.specs(inputs, labels)
    hvp1 = engine.hvp_function(specs, 1, with_gradient=True)
    v1_t = tf.constant(v1, tf.float32)
    add("engine HVP, K=1 (compiled fn)", lambda: hvp1(x_t, y_t, s_t, v1_t), note="traced by the row above")
    hvp1_bare = engine.hvp_function(specs, 1, with_gradient=False)
    add("engine HVP, K=1, no gradient (compiled)", lambda: hvp1_bare(x_t, y_t, s_t, v1_t),
        note="the form of every spectral pass")
    add("engine HVP block K=8 (partial)", partial(BatchWork(hvp_vectors=v8)), per=8)
    add("Hutchinson K=16 (partial)", partial(BatchWork(probes=z16)), per=16,
        note="one compiled call of 16 probes")
    hvp16 = engine.hvp_function(specs, 16, probe_products=True)
    z16_t = tf.constant(z16, tf.float32)
    add("Hutchinson K=16 (compiled fn)", lambda: hvp16(x_t, y_t, s_t, z16_t), per=16,
        note="traced by the row above")
    v_flat = tf.constant(v1[0], tf.float32)
    add("forward-over-reverse HVP (compiled)", lambda: refs.forward_over_reverse(v_flat),
        first_call_s=first["forward"])
    add("reverse-over-reverse HVP (compiled)", lambda: refs.reverse_over_reverse(v_flat),
        first_call_s=first["reverse"], note="textbook d(g.v)/dw")
    add("naive nested tapes HVP (eager)", lambda: refs.naive_hvp(v_flat), reps=settings.naive_reps,
        first_call_s=first["naive"], note="the same tapes, no tf.function")
    add("Fisher diagonal (partial)", partial(BatchWork(sum_grad_squared=True)), note="includes loss and gradient")
    add("GGN diagonal exact (partial)", partial(BatchWork(ggn_diagonal="exact")), note="includes loss and gradient")
    add("GGN diagonal MC, 1 sample (partial)", partial(BatchWork(ggn_diagonal="mc", ggn_samples=1)),
        note="includes loss and gradient")

    # XLA: the engine's own try (xla="on" forces it on a CPU too), on this batch, K=1 and K=8.
    xla_engine = CurvatureEngine(model, loss, precision="float32", xla="on")
    for vectors in (v1, v8):
        xla_engine.partial(inputs, labels, None, rows, BatchWork(hvp_vectors=vectors))
    xla = [{"vectors": key[2], "with_gradient": key[3], **report} for key, report in xla_engine.xla_trials.items()]

    by = {m.name: m for m in results}
    hvp, hvp_fn = by["engine HVP, K=1 (partial)"], by["engine HVP, K=1 (compiled fn)"]
    hvp_bare = by["engine HVP, K=1, no gradient (compiled)"]
    hutch, hutch_fn = by["Hutchinson K=16 (partial)"], by["Hutchinson K=16 (compiled fn)"]
    naive = by["naive nested tapes HVP (eager)"]

    def item(value, bound=None, at_most=True):
        ok = None if bound is None else (value <= bound if at_most else value >= bound)
        return {"value": value, "target": None if bound is None else f"{'<=' if at_most else '>='} {bound}",
                "ok": ok}

    derived = {
        "hvp_over_gradient": item(hvp.ratio, TARGET_HVP[key]),
        "hvp_compiled_fn_over_gradient": item(hvp_fn.ratio, TARGET_HVP[key]),
        "hvp_without_gradient_over_gradient": item(hvp_bare.ratio, TARGET_HVP[key]),
        "hutchinson_per_probe_over_one_hvp": item(hutch.ratio / hvp.ratio, TARGET_HUTCHINSON),
        "hutchinson_per_probe_over_one_hvp_compiled_fn": item(hutch_fn.ratio / hvp_fn.ratio, TARGET_HUTCHINSON),
        "hvp_speedup_over_naive_eager": item(naive.ratio / hvp.ratio),
        "fisher_over_gradient": item(by["Fisher diagonal (partial)"].ratio, TARGET_FISHER),
        "ggn_exact_over_gradient": item(by["GGN diagonal exact (partial)"].ratio, TARGET_GGN_EXACT),
        "ggn_mc_over_gradient": item(by["GGN diagonal MC, 1 sample (partial)"].ratio, TARGET_GGN_MC),
    }
    return {"title": title, "parameters": P, "batch": n, "results": results, "derived": derived, "xla": xla}


def bench_diagonal(settings, checks):
    """Exact Hessian diagonal: the engine against one second-order gradient per parameter."""
    model = mlp(settings.diag_layers, name="diag_mlp")
    loss = resolve_loss(LOSS_SPEC)
    engine = CurvatureEngine(model, loss, precision="float32")
    P = engine.parameters
    n = settings.diag_batch
    x, y = batch(model, n)
    refs = References(model, loss, engine, x, y)
    work = BatchWork(gradient=False, hessian_diagonal="exact")

    def run():
        return engine.partial([x], [y], None, np.arange(n), work)

    first, part = timed(run)  # traces one compiled function per variable
    diagonal = part.sums["hessian_diagonal"]
    baseline = gradient_baseline(refs, settings)
    engine_m = measure("engine exact diagonal (partial)", run, refs.gradient, settings, first_call_s=first)

    sample = np.sort(np.random.default_rng(0).choice(P, size=min(settings.diag_sample, P), replace=False))
    for j in sample[:3]:  # warm-up (eager kernels, allocator), not timed
        refs.naive_diagonal_entry(int(j))
    entries, took = [], []
    for j in sample:
        start = time.perf_counter()
        entries.append(refs.naive_diagonal_entry(int(j)))
        took.append(time.perf_counter() - start)
    close("diag: engine exact diagonal == naive per-parameter loop (sample)", diagonal[sample], entries, checks)
    stop_if_failed(checks)
    per_parameter = float(np.mean(took))
    naive_total = per_parameter * P
    speedup = naive_total / engine_m.median_s
    layers = "-".join(map(str, settings.diag_layers))
    return {
        "title": f"(c) exact Hessian diagonal, MLP {layers} tanh, float32: P = {P:,}, batch {n}",
        "parameters": P, "batch": n,
        "gradient": baseline,
        "engine": engine_m,
        "naive_sampled_parameters": int(len(sample)),
        "naive_per_parameter_mean_s": per_parameter,
        "naive_per_parameter_median_s": float(np.median(took)),
        "naive_extrapolated_total_s": naive_total,
        "naive_extrapolated": True,
        "speedup": {"value": speedup, "target": f">= {TARGET_DIAGONAL:g}", "ok": speedup >= TARGET_DIAGONAL},
    }


# ---------------------------------------------------------------------------- report
def environment(quick):
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "mode": "quick" if quick else "full",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "os_cpu_count": os.cpu_count(),
        "intra_op_parallelism_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_parallelism_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "devices": [d.name for d in tf.config.list_physical_devices()],
    }


def print_model(section):
    print(f"\n{section['title']}: P = {section['parameters']:,}, batch {section['batch']}")
    header = f"  {'quantity':<40}{'median ms':>11}{'x gradient':>12}{'1st call s':>12}{'reps':>6}  note"
    print(header)
    print("  " + "-" * (len(header) + 30))
    for m in section["results"]:
        note = "; ".join(filter(None, [f"per vector, of {m.per}" if m.per > 1 else "", m.note]))
        print(f"  {m.name:<40}{m.median_s * 1e3:>11.2f}{m.ratio:>12.2f}{m.first_call_s:>12.2f}{m.reps:>6}  {note}"
              .rstrip())
    d = section["derived"]
    print("  derived:")
    lines = [
        ("one HVP / gradient (partial)", d["hvp_over_gradient"], "x"),
        ("one HVP / gradient (compiled fn)", d["hvp_compiled_fn_over_gradient"], "x"),
        ("one HVP without the gradient / gradient", d["hvp_without_gradient_over_gradient"], "x"),
        ("Hutchinson per probe / one HVP (partial)", d["hutchinson_per_probe_over_one_hvp"], ""),
        ("Hutchinson per probe / one HVP (compiled fn)", d["hutchinson_per_probe_over_one_hvp_compiled_fn"], ""),
        ("speed-up of engine HVP (partial) over naive eager", d["hvp_speedup_over_naive_eager"], "x"),
        ("Fisher diagonal / gradient", d["fisher_over_gradient"], "x"),
        ("exact GGN diagonal / gradient (1 + C/2)", d["ggn_exact_over_gradient"], "x"),
        ("MC GGN diagonal, 1 sample / gradient", d["ggn_mc_over_gradient"], "x"),
    ]
    for label, it, unit in lines:
        target = f"target {it['target']}" if it["target"] else ""
        print(f"    {label:<52}{it['value']:>7.2f}{unit:<2} {target:<14} {_common.verdict(it['ok'])}".rstrip())
    print("  XLA (jit_compile) tried by the engine on this batch (kept only if it agrees and is faster):")
    for trial in section["xla"]:
        if "failed" in trial:
            print(f"    HVP K={trial['vectors']}: XLA failed ({trial['failed']}): plain kept")
            continue
        print(f"    HVP K={trial['vectors']}: plain {trial['plain_s'] * 1e3:.1f} ms, XLA {trial['xla_s'] * 1e3:.1f} ms "
              f"({trial['xla_s'] / trial['plain_s']:.2f}x), max error / max entry {trial['error']:.1e} "
              f"({'agrees' if trial['agrees'] else 'DISAGREES'}): {trial['chosen']} kept")


def print_diagonal(section):
    m, g = section["engine"], section["gradient"]
    print(f"\n{section['title']}")
    print(f"  plain gradient (tf.function): median {g.median_s * 1e3:.2f} ms")
    print(f"  engine exact diagonal (partial): median {m.median_s * 1e3:.1f} ms over {m.reps} reps "
          f"= {m.ratio:.1f} gradients; first call {m.first_call_s:.2f} s (tracing, not in the median)")
    print(f"  naive loop (eager nested tapes, one second-order gradient per parameter): "
          f"{section['naive_per_parameter_mean_s'] * 1e3:.2f} ms per parameter")
    print(f"    timed on a random sample of {section['naive_sampled_parameters']} of {section['parameters']:,} "
          f"parameters, EXTRAPOLATED to all: {section['naive_extrapolated_total_s']:.1f} s")
    s = section["speedup"]
    print(f"  speed-up of the engine over the naive loop: {s['value']:.0f}x   target {s['target']}x   "
          f"{_common.verdict(s['ok'])}")


def to_json(env, settings, checks, models, diagonal):
    out = {"environment": env, "settings": dataclasses.asdict(settings), "checks": checks, "models": {}}
    for key, section in models.items():
        out["models"][key] = {
            "title": section["title"], "parameters": section["parameters"], "batch": section["batch"],
            "quantities": {m.name: m.as_json() for m in section["results"]},
            "derived": section["derived"], "xla": section["xla"],
        }
    out["exact_diagonal"] = {k: (v.as_json() if isinstance(v, Measure) else v) for k, v in diagonal.items()}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description="Costs of CurvatureEngine quantities, in plain gradients.")
    parser.add_argument("--quick", action="store_true", help="smaller widths, few repetitions (< 1 minute)")
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON to OUT")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    started = time.perf_counter()

    env = environment(args.quick)
    print(f"hessian-pipeline engine benchmark: {env['mode']} run"
          f"{' (smaller widths and batches: NOT the reference sizes)' if args.quick else ''}")
    print(f"  {env['date']}  python {env['python']}  tensorflow {env['tensorflow']}  keras {env['keras']}"
          f"  numpy {env['numpy']}")
    print(f"  os.cpu_count() = {env['os_cpu_count']}; tf.config.threading: intra_op = "
          f"{env['intra_op_parallelism_threads']}, inter_op = {env['inter_op_parallelism_threads']} "
          f"(0 = TensorFlow's default); OMP_NUM_THREADS = {env['OMP_NUM_THREADS']}")
    print(f"  devices: {', '.join(env['devices'])}")
    print("  x gradient = median over repetitions of (time / time of an adjacent plain compiled gradient);"
          " first calls (tracing) are reported apart")

    checks = []
    models = {}
    h = settings.mlp_hidden
    models["mlp"] = bench_model("mlp", f"(a) MLP 784-{h}-{h}-10 tanh, logits, float32",
                                mlp((784, h, h, 10)), settings.mlp_batch, settings, checks)
    f1, f2, f3, hidden = settings.cnn_filters
    models["cnn"] = bench_model("cnn", f"(b) CNN 32x32x3, conv{f1} conv{f2} pool2 conv{f3} pool2 (3x3, relu), "
                                f"dense{hidden} relu, dense10, float32",
                                cnn(settings.cnn_filters), settings.cnn_batch, settings, checks)
    diagonal = bench_diagonal(settings, checks)

    print_checks(checks)
    for section in models.values():
        print_model(section)
    print_diagonal(diagonal)
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(to_json(env, settings, checks, models, diagonal), handle, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
