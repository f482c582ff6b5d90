"""One error hierarchy for the whole product.

``InputError`` is a problem with what the user handed us (job file, model, data, vectors,
arguments, an existing run): the command line prints one ``error:`` line and exits 2.
``ComputeError`` is a failure while computing that survived its retries: exit 1.
Both are raised where the problem is found; only ``pipeline.cli`` turns them into exit codes.
"""


class PipelineError(Exception):
    """Base of every error the product raises on purpose."""

    exit_status = 1


class InputError(PipelineError):
    """Bad input. The message names the problem and the way out, on one line."""

    exit_status = 2


class ComputeError(PipelineError):
    """A failure while computing (names the shard and how to resume)."""

    exit_status = 1


class InputWarning(UserWarning):
    """Input that works but may not mean what the user wants (a piecewise-linear loss): the
    command line prints it as one ``warning:`` line; other libraries' warnings it leaves out."""
