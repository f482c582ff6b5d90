"""The command line: a thin layer over ``pipeline.runner`` and friends.

Errors are turned into exit codes here and only here: ``InputError`` -> one ``error:`` line
on stderr and exit 2, ``ComputeError`` -> exit 1; a traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings

from pipeline import __version__
from pipeline.errors import ComputeError, InputError, PipelineError

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
  hessian-pipeline show results/digits-mlp/date=2026-11-26/run=20261126T070000Z-ab12""",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hessian-pipeline",
        description="Curvature statistics of trained Keras models over whole Parquet datasets, on Ray.")
    parser.add_argument("--version", action="version", version=f"hessian-pipeline {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name, help_text):
        sub = commands.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES.get(name),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("--debug", action="store_true", help="show tracebacks")
        return sub

    run = command("run", "run a job on Ray and publish its results; prints the run directory last")
    run.add_argument("job", metavar="JOB.yaml")
    run.add_argument("--output", metavar="DIR", help="root directory or URI for results (default: the job's output)")
    run.add_argument("--run-id", metavar="ID", help="name of the run (default: UTC time and a random suffix)")
    run.add_argument("--address", metavar="ADDR", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    run.add_argument("--workers", type=int, metavar="N", help="number of worker actors (default: the job's workers)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a job key, e.g. data.batch_size=64 (repeatable)")
    run.add_argument("--dry-run", action="store_true", help="print the plan and compute nothing")

    validate = command("validate", "check the job, the model file and the data schema without computing")
    validate.add_argument("job", metavar="JOB.yaml")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    show = command("show", "print a run's manifest and summary as readable tables")
    show.add_argument("run_dir", metavar="RUN_DIR")
    return parser


def _run(args, out, err) -> int:
    from pipeline.job import load_job
    from pipeline.runner import Plan, run

    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be a positive integer, got {args.workers}: e.g. --workers 2")
    job = load_job(args.job, args.overrides)
    result = run(job, output=args.output, run_id=args.run_id, address=args.address, workers=args.workers,
                 dry_run=args.dry_run, stream=err)
    if isinstance(result, Plan):
        out.write(result.describe() + "\n")
        return 0
    out.write(f"loss {result.manifest['loss']:.6g} over {result.manifest['examples']:,} examples, "
              f"{result.manifest['seconds']:.1f}s\n")
    out.write(result.run_dir + "\n")
    return 0


def _validate(args, out, err) -> int:
    from pipeline.job import load_job
    from pipeline.runner import make_plan

    job = load_job(args.job, args.overrides)
    plan = make_plan(job, cluster={"CPU": os.cpu_count() or 1})
    out.write(f"ok: {job.name}: model {plan.parameters:,} parameters, data {plan.data.rows:,} rows in "
              f"{len(plan.data.files)} files, quantities {', '.join(job.quantities)}\n")
    return 0


def _show(args, out, err) -> int:
    from pipeline.show import show_run

    out.write(show_run(args.run_dir))
    return 0


HANDLERS = {"run": _run, "validate": _validate, "show": _show}


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
    try:
        return HANDLERS[args.command](args, out, err)
    except PipelineError as exc:
        if args.debug:
            traceback.print_exc(file=err)
        message = " ".join(str(exc).split())
        err.write(f"error: {message}\n")
        return exc.exit_status
    except KeyboardInterrupt:
        err.write("error: interrupted; run the same command with the same --run-id to resume\n")
        return 1
