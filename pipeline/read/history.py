"""``history ROOT``: every published run of one job as a series over time (nightly tracking).

``ROOT`` is a job's folder, ``OUTPUT/NAME`` (contract 6.2), holding ``date=YYYY-MM-DD/run=ID``
partitions. One row per complete run, in date order (then start time, then run id), with:

- ``date``, ``run``, ``model_sha256`` (the first 12 hex digits in the text table), ``examples``;
- ``loss``: the weighted mean loss over the data; then each view's series
  (``pipeline.read.views``, ``View.series``):
- ``trace`` (``trace[BLOCK]`` per block of H with ``blocks: variable | layer``);
- ``eigenvalue_K`` for each rank ``K`` (``eigenvalue_K[BLOCK]`` per block);
- ``sharpness`` (``sharpness[BLOCK]``): ``lambda_max * eta / 2`` when the job gave
  ``quantities.eigenvalues.learning_rate: eta`` (Cohen et al. 2021: >= 1 is the edge of
  stability of gradient descent with step ``eta``);
- ``QUANTITY.l2_norm`` for every diagonal quantity (``summary.parquet``'s ``__all__`` row).

A run that lacks a series (it did not compute the quantity) has NaN there. ``changes()`` gives the
night-to-night relative change ``(b - a) / |a|`` of every series between consecutive runs, with
``compare``'s rules (an eigenvalue's change within the two residuals is no change); ``above(R)``
those whose magnitude exceeds ``R``: ``history --fail-above R`` exits 1 on any.

Cost: the manifest and the small tables (trace, eigenvalues, summary) of each run: no
TensorFlow, no Ray. Runs may be local or URIs (``s3://``, ``gs://``); a folder with no complete
manifest (a run being published, a crashed one) is skipped.

Example::

    >>> series = pipeline.history("results/digits-mlp")                           # doctest: +SKIP
    >>> series.frame()[["date", "run", "loss", "eigenvalue_1"]]                   # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import posixpath
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs

from pipeline.blocks import ALL
from pipeline.errors import InputError
from pipeline.read.changes import Change
from pipeline.read.run import Run
from pipeline.read.text import aligned
from pipeline.read.views import on_page
from pipeline.storage.layout import DATE_PART, MANIFEST, date_of, run_id_of
from pipeline.storage.uri import absolute, first_line, is_uri, resolve_filesystem

FACTS = ("date", "run", "model_sha256", "examples")


@dataclass
class History:
    """The runs under one job's folder and their numbers, oldest first.

    ``rows``: one dict per run (``FACTS`` then the series, float values); ``series``: the series'
    names in column order; ``runs``: the loaded runs; ``floors``: per (run index, series) the
    absolute change below which a change is no change (eigenvalue residuals); ``skipped``:
    folders that held no complete run.
    """

    root: str
    runs: list[Run]
    rows: list[dict]
    series: list[str]
    floors: dict = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def frame(self):
        """The rows as a pandas DataFrame (``date``, ``run``, ..., one column per series)."""
        import pandas  # lazy: only a notebook's call needs pandas

        return pandas.DataFrame(self.rows, columns=[*FACTS, *self.series])

    def changes(self) -> list[tuple[str, str, Change]]:
        """``(date, run, change)`` for each series between each run and the one before it."""
        out = []
        for k in range(1, len(self.rows)):
            before, now = self.rows[k - 1], self.rows[k]
            for name in self.series:
                floor = self.floors.get((k - 1, name), 0.0) + self.floors.get((k, name), 0.0)
                out.append((now["date"], now["run"], Change(ALL, name, "value", before[name], now[name], floor)))
        return out

    def above(self, threshold: float) -> list[tuple[str, str, Change]]:
        """The night-to-night changes with ``|relative change| > threshold`` (NaN never is)."""
        return [item for item in self.changes() if abs(item[2].relative_change) > threshold]

    def _repr_html_(self) -> str:
        return self.frame()._repr_html_()


# ------------------------------------------------------------------------------ listing
def run_dirs(root: str) -> tuple[list[str], list[str]]:
    """``(run directories with a manifest, folders without one)`` under a job's folder, unordered."""
    fs, path = resolve_filesystem(root)
    path = path.rstrip("/") or path
    try:
        info = fs.get_file_info(path)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read {root}: {first_line(err)}: check the path and credentials") from None
    if info.type != pafs.FileType.Directory:
        raise InputError(f"{root} is not a folder: give a job's results folder, OUTPUT/NAME (it holds "
                         f"{DATE_PART}YYYY-MM-DD folders)")
    found, skipped = [], []
    for date in _children(fs, path):
        if date_of(date) is None:
            continue
        for run in _children(fs, date):
            if run_id_of(run) is None:
                continue
            if fs.get_file_info(posixpath.join(run, MANIFEST)).type == pafs.FileType.File:
                found.append(run)
            else:
                skipped.append(run)
    prefix = root.rstrip("/")
    shown = [prefix + run[len(path):] for run in found]
    if not shown and not skipped:
        if fs.get_file_info(posixpath.join(path, MANIFEST)).type == pafs.FileType.File:
            raise InputError(f"{root} is one run, not a job's folder: give its parent's parent, "
                             f"{posixpath.dirname(posixpath.dirname(prefix))}")
        names = [posixpath.basename(c) for c in _children(fs, path)
                 if any(date_of(d) is not None for d in _children(fs, c))]
        hint = f" (it holds the jobs {', '.join(sorted(names))}: give one, e.g. {prefix}/{sorted(names)[0]})" \
            if names else ""
        raise InputError(f"no published runs under {root}{hint}: give a job's results folder, OUTPUT/NAME")
    return shown, [prefix + run[len(path):] for run in skipped]


def _children(fs, path: str) -> list[str]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (OSError, ValueError):
        return []
    return [info.path for info in infos if info.type == pafs.FileType.Directory]


def ordered_runs(root: str) -> tuple[list[Run], list[str]]:
    """The complete runs under ``root`` in date order (then start time, then run id), and the
    folders skipped (no manifest, or one that is not complete)."""
    root = root if is_uri(root) else absolute(os.fspath(root))
    found, skipped = run_dirs(root)
    runs = []
    for run_dir in found:
        try:
            runs.append(Run(run_dir))
        except InputError:
            skipped.append(run_dir)  # a damaged or incomplete manifest: not part of the series
    if not runs:
        raise InputError(f"no complete run under {root} ({len(skipped)} folders without a complete manifest): "
                         "run the job first")
    runs.sort(key=lambda r: (str(r.manifest.get("date", "")), str(r.manifest.get("started_at", "")), r.run_id))
    return runs, sorted(skipped)


def skipped_warning(skipped: list[str], shown: int = 3) -> str:
    """One ``warning:`` line naming the folders that hold no complete run (the first few)."""
    names = ", ".join(skipped[:shown]) + (f" and {len(skipped) - shown} more" if len(skipped) > shown else "")
    noun = "folder holds" if len(skipped) == 1 else "folders hold"
    return (f"warning: {len(skipped)} {noun} no complete run (no manifest.json, or a damaged or incomplete one), "
            f"skipped: {names}")


def latest_run(root: str) -> str:
    """The newest complete run under a job's folder (``show --latest ROOT``)."""
    runs, _ = ordered_runs(root)
    return runs[-1].run_dir


# ------------------------------------------------------------------------------ the series
def _numbers(run: Run) -> tuple[dict, dict]:
    """One run's series ``{name: value}`` and floors ``{name: absolute change that is no change}``:
    the loss, then each view's (``View.series``) in page order."""
    values: dict[str, float] = {"loss": run.loss}
    floors: dict[str, float] = {}
    for view in on_page():
        more, more_floors = view.series(run)
        values.update(more)
        floors.update(more_floors)
    return values, floors


def history(root: str) -> History:
    """The series of every complete run under ``root`` (a job's folder); ``InputError`` when it
    holds none."""
    runs, skipped = ordered_runs(root)
    rows, series, floors = [], {}, {}
    for k, run in enumerate(runs):
        values, run_floors = _numbers(run)
        series.update(dict.fromkeys(values))
        floors.update({(k, name): floor for name, floor in run_floors.items()})
        rows.append({"date": str(run.manifest.get("date", "")), "run": run.run_id,
                     "model_sha256": str((run.manifest.get("model") or {}).get("sha256") or ""),
                     "examples": int(run.manifest.get("examples", 0)), **values})
    names = list(series)
    for row in rows:
        for name in names:
            row.setdefault(name, math.nan)
    return History(root=root, runs=runs, rows=rows, series=names, floors=floors, skipped=skipped)


# ------------------------------------------------------------------------------ rendering
def _number(value) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6g}"


def as_table(result: History) -> str:
    """Aligned text: one line per run, ``model_sha256`` shortened to 12 hex digits."""
    rows = [[r["date"], r["run"], r["model_sha256"][:12], str(r["examples"]),
             *[_number(r[name]) for name in result.series]] for r in result.rows]
    return aligned(rows, [*FACTS, *result.series], text_columns=3)


def as_json(result: History) -> str:
    """A JSON list of rows; NaN (a series a run lacks) is ``null``."""
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
             for row in result.rows]
    return json.dumps(clean, indent=1) + "\n"


def as_csv(result: History) -> str:
    """CSV with a header line; a series a run lacks is an empty field."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*FACTS, *result.series], lineterminator="\n")
    writer.writeheader()
    for row in result.rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return buffer.getvalue()


RENDERERS = {"table": as_table, "json": as_json, "csv": as_csv}


def values(result: History, name: str) -> np.ndarray:
    """One series as a float64 array, oldest run first."""
    return np.array([row[name] for row in result.rows], dtype=np.float64)
