"""The command line: a thin layer over the driver (``pipeline.driver``), the plan and the read side.

Errors are turned into exit codes here and only here: ``InputError`` -> one ``error:`` line
on stderr and exit 2, ``ComputeError`` -> exit 1; a traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import signal
import sys
import traceback
import warnings

from pipeline import __version__, interrupts, quiet
from pipeline.errors import ComputeError, InputError, InputWarning, PipelineError

EXAMPLES = {
    "run": """examples:
  hessian-pipeline run jobs/example.yaml
  hessian-pipeline run job.yaml --output /tmp/results --run-id nightly-1 --workers 2
  hessian-pipeline run job.yaml --set data.batch_size=64 --set quantities.trace.probes=30
  hessian-pipeline run job.yaml --dry-run
  hessian-pipeline run job.yaml --address ray://head:10001""",
    "validate": """examples:
  hessian-pipeline validate jobs/example.yaml""",
    "show": """examples:
  hessian-pipeline show results/digits-mlp/date=2026-11-26/run=20261126T070000Z-ab12
  hessian-pipeline show --latest results/digits-mlp        # the newest complete run of the job""",
    "history": """examples:
  hessian-pipeline history results/digits-mlp
  hessian-pipeline history results/digits-mlp --format csv > series.csv
  hessian-pipeline history results/digits-mlp --fail-above 0.2 --plots /tmp/history
exit status: 0, 1 with --fail-above exceeded between two consecutive runs, 2 input problem""",
    "export": """examples:
  hessian-pipeline export RUN_DIR                                   # -> ./NAME-RUN_ID.npz
  hessian-pipeline export RUN_DIR --out fisher.npz --laplace --prior-precision auto
  hessian-pipeline export RUN_DIR --format weights --quantity ggn_diagonal --out ggn.weights.h5
keys: QUANTITY/VARIABLE_PATH (float64, the variable's shape), examples, weight_sum; with --laplace also
posterior_variance/VARIABLE_PATH and laplace/... (README "Exports")""",
    "merge": """examples:
  hessian-pipeline merge --model a.keras --run RUN_A --model b.keras --run RUN_B --out merged.keras
merged weight = sum_m F_m w_m / sum_m F_m per entry (the plain average where every F is 0)""",
    "submit": """examples:
  hessian-pipeline submit jobs/nightly.yaml --address http://127.0.0.1:8265
  hessian-pipeline submit job.yaml --address http://head:8265 --output s3://bucket/results --gpus 4
  hessian-pipeline submit job.yaml --address http://head:8265 --no-wait --submission-id try-2
auth: the token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token
exit status: 0 the job succeeded, or was stopped after its run was published (the run directory is the last
line), 1 it failed, 2 input problem""",
    "compare": """examples:
  hessian-pipeline compare results/x/date=2026-11-25/run=a results/x/date=2026-11-26/run=b
  hessian-pipeline compare RUN_A RUN_B --format csv > drift.csv
  hessian-pipeline compare RUN_A RUN_B --fail-above 0.05     # exit 1 if any |relative change| > 5%
exit status: 0, 1 with --fail-above exceeded, 2 input problem (e.g. not a complete run)""",
    "report": """examples:
  hessian-pipeline report results/digits-mlp/date=2026-11-26/run=r1                # -> ./report-digits-mlp-r1/
  hessian-pipeline report RUN_DIR --out /tmp/report && xdg-open /tmp/report/index.html
  hessian-pipeline report RUN_DIR --baseline results/digits-mlp/date=2026-11-25/run=r0   # overlay two runs
  hessian-pipeline report s3://bucket/results/digits-mlp/date=2026-11-26/run=r1 --sigma 0.01
writes PNG plots (800x450) and index.html, which shows them by file name; prints its path last""",
}


def _parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per entry of ``COMMANDS``, each with ``--debug``."""
    parser = _Parser(
        prog="hessian-pipeline",
        description="Curvature statistics of trained Keras models over whole Parquet datasets, on Ray.")
    parser.add_argument("--version", action="version", version=f"hessian-pipeline {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, options in COMMANDS:
        sub = commands.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES.get(name),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("--debug", action="store_true", help="show tracebacks")
        options(sub)
    return parser


def _run_options(run: argparse.ArgumentParser) -> None:
    run.add_argument("job", metavar="JOB.yaml")
    run.add_argument("--output", metavar="DIR", help="root directory or URI for results (default: the job's output)")
    run.add_argument("--run-id", metavar="ID", help="name of the run (default: UTC time and a random suffix)")
    run.add_argument("--address", metavar="ADDR", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    run.add_argument("--workers", type=int, metavar="N", help="number of worker actors (default: the job's workers)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a job key, e.g. data.batch_size=64 (repeatable)")
    run.add_argument("--dry-run", action="store_true", help="print the plan and compute nothing")


def _validate_options(validate: argparse.ArgumentParser) -> None:
    validate.add_argument("job", metavar="JOB.yaml")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _show_options(show: argparse.ArgumentParser) -> None:
    show.add_argument("run_dir", metavar="RUN_DIR", help="a run's folder; with --latest, a job's folder OUTPUT/NAME")
    show.add_argument("--latest", action="store_true", help="show the newest complete run under the job's folder")


def _history_options(history: argparse.ArgumentParser) -> None:
    history.add_argument("root", metavar="ROOT", help="a job's results folder, OUTPUT/NAME")
    history.add_argument("--format", choices=["table", "json", "csv"], default="table",
                         help="table (aligned text, default), json or csv")
    history.add_argument("--fail-above", type=float, metavar="RELATIVE_CHANGE",
                         help="exit 1 when a run-to-run |relative change| of any series exceeds it (0.05 = 5%%)")
    history.add_argument("--plots", metavar="DIR", help="also write one PNG per series and index.html into DIR")


def _export_options(export: argparse.ArgumentParser) -> None:
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--format", choices=["npz", "weights"], default="npz",
                        help="npz (default): QUANTITY/VARIABLE_PATH arrays; weights: one quantity as a Keras "
                             ".weights.h5")
    export.add_argument("--out", metavar="FILE", help="default: ./NAME-RUN_ID.npz (or .weights.h5)")
    export.add_argument("--laplace", action="store_true", help="add the diagonal Laplace approximation "
                        "(posterior variances, log marginal likelihood)")
    export.add_argument("--prior-precision", default="auto", metavar="auto|VALUE",
                        help="the prior precision delta, or auto to maximise the marginal likelihood (default)")
    export.add_argument("--quantity", metavar="NAME", help="the diagonal used (--laplace: the GGN, Fisher or Hessian "
                        "diagonal, by default the first the run has in that order; weights: any, by default the "
                        "Fisher diagonal)")
    export.add_argument("--sigma-noise", type=float, default=1.0, metavar="SIGMA",
                        help="noise scale of a mean-squared-error likelihood (--laplace; default 1)")
    export.add_argument("--model", metavar="FILE.keras", help="the run's model file, when it has moved since")


def _merge_options(merge: argparse.ArgumentParser) -> None:
    merge.add_argument("--model", dest="models", action="append", default=[], metavar="FILE.keras", required=True,
                       help="a model to merge (repeat: one per model, each followed by its --run)")
    merge.add_argument("--run", dest="runs", action="append", default=[], metavar="RUN_DIR", required=True,
                       help="the run of the --model before it, which holds its Fisher diagonal (repeat)")
    merge.add_argument("--out", metavar="FILE.keras", required=True)
    merge.add_argument("--quantity", metavar="NAME", help="the curvature diagonal that weighs the models (default: "
                       "the Fisher diagonal)")


def _submit_options(submit: argparse.ArgumentParser) -> None:
    submit.add_argument("job", metavar="JOB.yaml")
    submit.add_argument("--address", metavar="URL", help="the head's dashboard, e.g. http://HEAD:8265 "
                        "(default: RAY_API_SERVER_ADDRESS, or RAY_ADDRESS if it is http)")
    submit.add_argument("--no-wait", action="store_true", help="print the submission id and return")
    submit.add_argument("--submission-id", metavar="ID", help="default: hessian-NAME-YYYY-MM-DD (UTC); "
                        "one job per id")
    submit.add_argument("--working-dir", metavar="DIR", help="folder uploaded with the job; local inputs must be "
                        "inside it (default: the job file's folder)")
    submit.add_argument("--gpus", type=int, metavar="N", help="ask the autoscaler for N GPUs and wait for them "
                        "before the run starts (GPU nodes that scale from zero)")
    submit.add_argument("--gpu-timeout", type=float, default=1800, metavar="SECONDS",
                        help="how long to wait for --gpus (default 1800)")
    submit.add_argument("--python", metavar="PATH", help="the interpreter on the head that runs the job (default: "
                        "the first that imports ray of $HESSIAN_PIPELINE_PYTHON there, the ray command's, python3, "
                        "python)")
    submit.add_argument("--output", metavar="DIR", help="as for run: a URI, or a path on the head node")
    submit.add_argument("--run-id", metavar="ID", help="as for run (default: the submission id)")
    submit.add_argument("--workers", type=int, metavar="N", help="as for run")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="as for run (repeatable)")
    submit.add_argument("--dry-run", action="store_true", help="as for run: the job prints the plan on the cluster")


def _compare_options(compare: argparse.ArgumentParser) -> None:
    compare.add_argument("run_a", metavar="RUN_A")
    compare.add_argument("run_b", metavar="RUN_B")
    compare.add_argument("--format", choices=["table", "json", "csv"], default="table",
                         help="table (aligned text, default), json or csv")
    compare.add_argument("--fail-above", type=float, metavar="RELATIVE_CHANGE",
                         help="exit 1 when any |relative change| exceeds it (0.05 = 5%%)")


def _report_options(report: argparse.ArgumentParser) -> None:
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.add_argument("--out", metavar="DIR", help="folder for the plots and index.html (default: "
                        "./report-NAME-RUN_ID; a published run is never written to)")
    report.add_argument("--baseline", metavar="RUN_DIR", help="a second run overlaid on every plot (dashed)")
    report.add_argument("--sigma", type=float, metavar="WIDTH", help="Gaussian width of the spectral density "
                        "(default: 1/400 of the spectrum's range)")


# Each command, in the order ``--help`` lists them: its name, what it does, its options.
COMMANDS = (
    ("run", "run a job on Ray and publish its results; prints the run directory last", _run_options),
    ("validate", "check the job, the model file and the data schema without computing", _validate_options),
    ("show", "print a run's manifest and summary as readable tables", _show_options),
    ("history", "every run of a job over time: loss, trace, eigenvalues, sharpness, diagonal norms", _history_options),
    ("export", "write a run's diagonals for EWC, merging and Laplace (npz, or Keras weights)", _export_options),
    ("merge", "Fisher-weighted average of same-architecture models, each with its run", _merge_options),
    ("submit", "submit the run as a Ray Job to a cluster; streams its logs and exits with its status", _submit_options),
    ("compare", "per-variable change of every quantity two runs share (nightly drift)", _compare_options),
    ("report", "write PNG plots and an HTML page of a run (diagonals, eigenvalues, spectrum, trace)", _report_options),
)


# Each command imports its own layers when it runs (deliberately lazy): `show`, `compare` and
# `report` never import TensorFlow or Ray, and `--help` or a bad argument costs no import at all.
def _run(args, out, err) -> int:
    from pipeline.driver import run  # lazy: TensorFlow and Ray
    from pipeline.plan import Plan, new_run_id  # lazy: TensorFlow

    # Chosen here, so that an interrupted run's message can name it (the driver would choose the same).
    run_id = args.run_id or new_run_id(datetime.datetime.now(datetime.timezone.utc))
    try:
        if args.workers is not None and args.workers < 1:
            raise InputError(f"--workers must be a positive integer, got {args.workers}: e.g. --workers 2")
        job = args.spec
        if job.checkpoints:
            return _run_series(job, args, run_id, out, err)
        result = run(job, output=args.output, run_id=run_id, address=args.address, workers=args.workers,
                     dry_run=args.dry_run, stream=err, quiet=not args.debug, prestarted=getattr(args, "started", None))
    except KeyboardInterrupt:
        if args.dry_run:
            raise
        raise ComputeError(f"interrupted; run the same command with --run-id {run_id} to resume (finished "
                           "shards are kept)") from None
    finally:
        interrupts.release()  # held by main() while the libraries started; a Ctrl-C held comes now
    if isinstance(result, Plan):
        out.write(result.describe() + "\n")
        return 0
    out.write(f"loss {result.manifest['loss']:.6g} over {result.manifest['examples']:,} examples, "
              f"{result.manifest['seconds']:.1f}s\n")
    out.write(result.run_dir + "\n")
    return 0


def _prestarts(args) -> bool:
    """Whether ``run`` starts its local Ray and workers before TensorFlow's import: a new run of
    one model on a Ray of its own (not a dry run, no cluster address, no --run-id to resume,
    valid --workers, an output the driver accepts, no Ray in this process yet). Otherwise Ray
    starts in the driver, after the checks that need no Ray. With the early start, only the
    output's location is checked before Ray starts; the other input errors come after it (and
    Ray and the workers are ended)."""
    if (args.dry_run or args.address or os.environ.get("RAY_ADDRESS") or args.spec.checkpoints or args.run_id
            or (args.workers is not None and args.workers < 1)):
        return False
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return False  # a Ray this process already has (main() called in-process): the driver uses it
    from pipeline.storage.publish import check_output_location  # lazy: PyArrow, for `run` only

    try:
        check_output_location(args.output or args.spec.output, args.spec.name, args.spec.data.path)
    except InputError:
        return False  # the driver reports it, before any Ray
    return True


def _end_prestarted(args) -> None:
    """Ends the workers and the Ray that ``run`` started early if the run stopped before taking
    them (an input error found before Ray was joined); nothing once the driver took them."""
    started = getattr(args, "started", None)
    if started is not None:
        from pipeline.cluster import connect  # lazy: Ray; imported already when started is set

        connect.release_early(started.close)


def _run_series(job, args, run_id, out, err) -> int:
    """``run`` of a job with several checkpoints: one run each; every run directory is printed,
    the last one last."""
    from pipeline.driver import run_checkpoints  # lazy: TensorFlow and Ray
    from pipeline.plan import Plan  # lazy: TensorFlow

    results = run_checkpoints(job, output=args.output, run_id=run_id, address=args.address, workers=args.workers,
                              dry_run=args.dry_run, stream=err, quiet=not args.debug)
    for result in results:
        if isinstance(result, Plan):
            out.write(result.describe() + "\n")
        else:
            out.write(f"loss {result.manifest['loss']:.6g} over {result.manifest['examples']:,} examples\n")
            out.write(result.run_dir + "\n")
    return 0


def _validate(args, out, err) -> int:
    from pipeline.plan import make_plan  # lazy: TensorFlow

    job = args.spec
    # A series: every checkpoint is planned (each model loads and must fit the data and quantities).
    plans = [make_plan(job.checkpoint(k), cluster={"CPU": os.cpu_count() or 1}) for k in range(len(job.checkpoints))]
    plan = plans[0] if plans else make_plan(job, cluster={"CPU": os.cpu_count() or 1})
    series = f", {len(plans)} checkpoints (one run each)" if plans else ""
    out.write(f"ok: {job.name}: model {plan.parameters:,} parameters{series}, data {plan.data.rows:,} rows in "
              f"{len(plan.data.files)} files, quantities {', '.join(job.quantities)}\n")
    for line in plan.cost.describe(plan.workload):
        out.write(f"cost: {line}\n")
    for note in plan.notes:
        out.write(f"note: {note}\n")
    return 0


def _show(args, out, err) -> int:
    from pipeline.read.show import show_run  # lazy: PyArrow

    if args.latest:
        from pipeline.read.history import ordered_runs, skipped_warning  # lazy: PyArrow

        runs, skipped = ordered_runs(args.run_dir)
        if skipped:
            err.write(skipped_warning(skipped) + "\n")
        out.write(show_run(runs[-1].run_dir))
        return 0
    out.write(show_run(args.run_dir))
    return 0


def _history(args, out, err) -> int:
    from pipeline.read.history import RENDERERS, history, skipped_warning  # lazy: PyArrow
    from pipeline.read.history_report import write_history_report  # lazy: matplotlib

    if args.fail_above is not None and not args.fail_above >= 0:
        raise InputError(f"--fail-above must be a relative change >= 0, got {args.fail_above}: e.g. 0.05 for 5%")
    result = history(args.root)
    if result.skipped:
        err.write(skipped_warning(result.skipped) + "\n")
    # The plots first: a bad --plots is an input error with nothing on stdout.
    report = write_history_report(result, args.plots, args.fail_above) if args.plots else None
    out.write(RENDERERS[args.format](result))
    if report is not None:
        err.write(f"{len(report.plots)} plots in {report.out_dir}: {report.html}\n")
    if args.fail_above is not None:
        above = result.above(args.fail_above)
        if above:
            date, run, worst = max(above, key=lambda item: abs(item[2].relative_change))
            err.write(f"drift: {len(above)} run-to-run relative changes above {args.fail_above:g}, the largest "
                      f"{worst.relative_change:+.3g} ({worst.quantity} at {date} run {run})\n")
            return 1
    return 0


def _export(args, out, err) -> int:
    from pipeline.exports.commands import export  # lazy: PyArrow (and Keras with --laplace or weights)

    path = export(args.run_dir, args.format, args.out, laplace=args.laplace, prior_precision=args.prior_precision,
                  quantity=args.quantity, sigma_noise=args.sigma_noise, model=args.model)
    out.write(path + "\n")
    return 0


def _merge(args, out, err) -> int:
    from pipeline.exports.commands import merge  # lazy: Keras and TensorFlow

    if len(args.models) != len(args.runs):
        raise InputError(f"merge takes one --run per --model: got {len(args.models)} models and {len(args.runs)} "
                         "runs")
    out.write(merge(list(zip(args.models, args.runs)), os.path.abspath(args.out), args.quantity) + "\n")
    return 0


def _submit(args, out, err) -> int:
    from pipeline.cluster.submit import submit  # lazy: Ray

    for flag, value in (("--workers", args.workers), ("--gpus", args.gpus)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be a positive integer, got {value}: e.g. {flag} 2")
    if not args.gpu_timeout > 0:
        raise InputError(f"--gpu-timeout must be a positive number of seconds, got {args.gpu_timeout}: e.g. 1800")
    return submit(args.job, args.address, wait=not args.no_wait, out=out, err=err, overrides=args.overrides,
                  output=args.output, run_id=args.run_id, workers=args.workers, dry_run=args.dry_run,
                  debug=args.debug, submission_id=args.submission_id, working_dir=args.working_dir,
                  gpus=args.gpus, gpu_timeout=args.gpu_timeout, python=args.python)


def _compare(args, out, err) -> int:
    from pipeline.read.compare import RENDERERS, compare_runs  # lazy: PyArrow

    if args.fail_above is not None and not args.fail_above >= 0:
        raise InputError(f"--fail-above must be a relative change >= 0, got {args.fail_above}: e.g. 0.05 for 5%")
    result = compare_runs(args.run_a, args.run_b)
    for warning in result.warnings:
        err.write(f"warning: {warning}\n")
    out.write(RENDERERS[args.format](result))
    if args.fail_above is not None:
        above = result.above(args.fail_above)
        if above:
            worst = max(above, key=lambda c: abs(c.relative_change))
            err.write(f"drift: {len(above)} relative changes above {args.fail_above:g}, the largest "
                      f"{worst.relative_change:+.3g} ({worst.quantity} {worst.statistic} of {worst.variable})\n")
            return 1
    return 0


def _report(args, out, err) -> int:
    from pipeline.read.report import write_report  # lazy: PyArrow and matplotlib

    if args.sigma is not None and not args.sigma > 0:
        raise InputError(f"--sigma must be a positive width, got {args.sigma}: e.g. --sigma 0.01")
    report = write_report(args.run_dir, out=args.out, baseline=args.baseline, sigma=args.sigma)
    out.write(f"{len(report.plots)} plots in {report.out_dir}\n")
    out.write(report.html + "\n")
    return 0


HANDLERS = {"run": _run, "validate": _validate, "show": _show, "submit": _submit, "compare": _compare,
            "report": _report, "history": _history, "export": _export, "merge": _merge}


def _imports_tensorflow(args) -> bool:
    """Whether the command loads a Keras model (then TensorFlow is imported first, quietly)."""
    if args.command == "export":
        return args.laplace or args.format == "weights"
    return args.command in ("run", "validate", "merge")


@contextlib.contextmanager
def _own_streams(out, err):
    """Gives the product's ``out`` and ``err`` (when they are the process's stdout and stderr)
    private copies of file descriptors 1 and 2, and points the descriptors at /dev/null while the
    command runs: what Ray and TensorFlow print from their own threads and C++ code (``(raylet)
    ...`` lines when a node dies, ``task_manager.cc`` errors, absl's signal reports) then never
    mixes with the product's lines, and the run directory stays the last line of stdout.
    Restored afterwards; ``--debug`` does not use it."""
    streams = []
    for stream, fd in ((out, 1), (err, 2)):
        if stream is not (sys.stdout if fd == 1 else sys.stderr):
            streams.append((stream, None))
            continue
        stream.flush()
        private = os.fdopen(os.dup(fd), "w", buffering=1)
        saved = os.dup(fd)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
        streams.append((private, saved))
    try:
        yield streams[0][0], streams[1][0]
    finally:
        for fd, (stream, saved) in zip((1, 2), streams):
            stream.flush()
            if saved is not None:
                (sys.stdout if fd == 1 else sys.stderr).flush()
                os.dup2(saved, fd)
                os.close(saved)
                stream.close()


def _exit_on_sigterm() -> None:
    """SIGTERM (``kill``, a scheduler stopping the job) ends a run as Ray's driver does once it
    has started, with ``SystemExit(15)``, so that the run aborts cleanly and says how to resume.
    Set after TensorFlow's import, whose signal handler would print a report instead."""
    try:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    except ValueError:
        pass  # not the main thread (the CLI called from a thread in tests): keep the default


class _WarningsFirst:
    """``err`` that writes the held ``warning:`` lines before the command's next line of its own
    (``run``'s plan, say); an error clears them first, so that it is the only line."""

    def __init__(self, stream, held: list):
        self.stream = stream
        self.held = held

    def write(self, text):
        while self.held:
            self.stream.write(self.held.pop(0))
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def _product_warnings(held: list):
    """Default mode: a warning this program raises (``loss 'mae' is piecewise linear``) becomes
    one ``warning:`` line in ``held`` (see ``_WarningsFirst``); a library's warnings (Keras'
    UserWarnings on weights that do not fit, say) are left out, so that an input error is the
    only line on stderr. ``--debug`` shows them all, as Python prints them."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, InputWarning):
            held.append(f"warning: {' '.join(str(message).split())}\n")

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one ``error:`` line (exit 2), like every other input error."""

    def error(self, message):
        sys.stderr.write(f"error: {self.prog}: {message}: see {self.prog} --help\n")
        sys.exit(2)


def main(argv: list[str] | None = None, out=None, err=None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: bad arguments are input errors (2), --help is 0
        return int(exc.code or 0)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # Commands that load TensorFlow, whose threads print past any setting: their lines go to /dev/null.
    silenced = (args.command == "run" or _imports_tensorflow(args)) and not args.debug
    held: list[str] = []
    if args.command == "run":
        # Before TensorFlow, pyarrow and Ray create their threads, which inherit this mask and so
        # never take Ctrl-C; the driver releases it once Ray has started (pipeline.interrupts).
        interrupts.hold()
    with _own_streams(out, err) if silenced else contextlib.nullcontext((out, err)) as (out, err), \
            (contextlib.nullcontext() if args.debug else _product_warnings(held)):
        err = _WarningsFirst(err, held)
        try:
            if args.command == "run":
                _exit_on_sigterm()
            if args.command in ("run", "validate"):
                # The job file first: a YAML or key error is reported in 0.2 s, before TensorFlow's
                # 3 s import. Lazy: the other commands never read a job file.
                from pipeline.job import load_job  # lazy: see above

                args.spec = load_job(args.job, args.overrides)
            if args.command == "run" and _prestarts(args):
                # A local Ray and the workers start before this process imports TensorFlow, so
                # that their start overlaps its import and plan. (The import in a thread beside
                # Ray's start measured no faster on 2 CPUs: the start-up is CPU-bound there.)
                from pipeline.cluster.pool import prestart  # lazy: Ray, no TensorFlow

                args.started = prestart(args.spec, args.workers, quiet=not args.debug)
            if _imports_tensorflow(args) and not args.debug:
                quiet.import_tensorflow()
            if args.command == "run":
                _exit_on_sigterm()  # again: TensorFlow's import installs its own handler
            status = HANDLERS[args.command](args, out, err)
            err.write("")  # the warnings still held
            return status
        except PipelineError as exc:
            held.clear()
            if args.debug:
                traceback.print_exc(file=err)
            # One line, and no control characters: a damaged file's bytes can reach the message.
            message = "".join(c if c.isprintable() else repr(c)[1:-1] for c in " ".join(str(exc).split()))
            err.write(f"error: {message}\n")
            return exc.exit_status
        except KeyboardInterrupt:
            # Only run and submit stage work that the same --run-id resumes.
            resumable = args.command in ("run", "submit")
            advice = ("; run the same command with the same --run-id to resume" if resumable
                      else f" before {args.command} finished; run it again to finish it")
            err.write(f"error: interrupted{advice}\n")
            return 1
        except SystemExit as exc:
            if exc.code != signal.SIGTERM:
                raise
            # Ray's driver turns SIGTERM into SystemExit(15); the run was stopped like Ctrl-C.
            err.write("error: terminated (SIGTERM); run the same command with the same --run-id to resume\n")
            return 1
        finally:
            _end_prestarted(args)
            if args.command == "run":
                # A run that ended before its driver released them (a bad job file): a process
                # that calls main (a notebook, a test) and the processes it starts afterwards
                # would otherwise never take Ctrl-C.
                interrupts.release_dropping()
