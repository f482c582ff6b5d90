"""``compare RUN_A RUN_B``: what changed between two published runs (nightly drift).

The change of the loss, then what each view compares (``pipeline.read.views``): for every
(variable, quantity) row the two runs' ``summary.parquet`` share, the change of ``mean``,
``l2_norm`` and ``sum``; the change of the trace estimate and of each top eigenvalue (by rank,
when both runs asked for the same ``which``), per block of H when the runs computed them per
block (``blocks: variable | layer``: the per-layer sharpness drift; the ``variable`` column
then names the block). Each change is given
absolute, ``b - a``, and relative, ``(b - a) / |a|`` (``inf`` when ``a`` is 0 and ``b`` is not,
0 when both are 0, NaN when either is NaN: an empty variable).

Runs of different models (sha256) or data (fingerprint) are still compared: the differences
then mix the model or data change with everything else, so ``Comparison.warnings`` says so.
Storage only: PyArrow and numpy, runs local or URIs.

Example::

    >>> comparison = compare_runs("results/x/date=2026-11-25/run=a", "results/x/date=2026-11-26/run=b")  # doctest: +SKIP
    >>> comparison.above(0.05)  # rows whose |relative change| exceeds 5%                                 # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field

from pipeline.blocks import ALL
from pipeline.read.changes import Change, as_float
from pipeline.read.run import Run
from pipeline.read.views import VIEWS

COLUMNS = ("variable", "quantity", "statistic", "a", "b", "change", "relative_change")
LOSS = "loss"  # a fact of every manifest, compared first


@dataclass
class Comparison:
    """Two runs' shared numbers side by side, and what makes the comparison less than like for like."""

    run_a: str
    run_b: str
    manifest_a: dict
    manifest_b: dict
    changes: list[Change] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def above(self, threshold: float) -> list[Change]:
        """Changes with ``|relative change| > threshold`` (NaN never is)."""
        return [c for c in self.changes if abs(c.relative_change) > threshold]

    def largest(self) -> Change | None:
        finite = [c for c in self.changes if not math.isnan(c.relative_change)]
        return max(finite, key=lambda c: abs(c.relative_change), default=None)


def _short(text) -> str:
    return str(text)[:12] if text else "?"


# ---------------------------------------------------------------------------------- comparing
def compare_runs(run_a: str, run_b: str) -> Comparison:
    """Compares two complete runs (local directories or URIs); ``InputError`` if one is not a run.

    The loss first, then each registered view's numbers (``View.changes``) when both runs hold
    the tables it compares; a table only one run holds is named in a warning.
    """
    loaded_a, loaded_b = Run(run_a), Run(run_b)
    result = Comparison(run_a, run_b, loaded_a.manifest, loaded_b.manifest)
    _provenance_warnings(result)
    result.changes.append(Change(ALL, LOSS, "value", as_float(result.manifest_a.get(LOSS)),
                                 as_float(result.manifest_b.get(LOSS))))
    files_a, files_b = set(loaded_a.files), set(loaded_b.files)
    only: list[str] = []
    for view in VIEWS:
        compared = set(view.compared)
        if compared and compared <= files_a and compared <= files_b:
            result.changes += view.changes(result, loaded_a, loaded_b)
        only += (files_a ^ files_b) & compared
    if only:
        result.warnings.append(f"only one run has {', '.join(sorted(only))}: not compared")
    return result


def _provenance_warnings(result: Comparison) -> None:
    a, b = result.manifest_a, result.manifest_b
    sha_a, sha_b = (a.get("model") or {}).get("sha256"), (b.get("model") or {}).get("sha256")
    if sha_a != sha_b:
        result.warnings.append(f"different models (sha256 {_short(sha_a)} vs {_short(sha_b)}): the changes include "
                               "the change of the model")
    data_a, data_b = (a.get("data") or {}).get("fingerprint"), (b.get("data") or {}).get("fingerprint")
    if data_a != data_b:
        result.warnings.append(f"different data (fingerprint {_short(data_a)} vs {_short(data_b)}): the changes "
                               "include the change of the data")


# ---------------------------------------------------------------------------------- rendering
def _number(value: float) -> str:
    return f"{value:.6g}"


def _percent(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "+inf" if value > 0 else "-inf"
    return f"{100 * value:+.3g}%"


def _describe(label: str, run: str, manifest: dict) -> str:
    return f"{label}: {run} (run {manifest.get('run_id')}, {manifest.get('date')}, {manifest.get('examples')} examples)"


def render_table(result: Comparison) -> str:
    """Aligned text: one line per compared number; relative changes in percent."""
    header = ["variable", "quantity", "statistic", "a", "b", "change", "relative"]
    rows = [[c.variable, c.quantity, c.statistic, _number(c.a), _number(c.b), _number(c.change),
             _percent(c.relative_change)] for c in result.changes]
    widths = [max(len(x) for x in column) for column in zip(header, *rows)]
    lines = [_describe("A", result.run_a, result.manifest_a), _describe("B", result.run_b, result.manifest_b), ""]
    lines.append("  ".join(h.ljust(w) if i < 3 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
    largest = result.largest()
    if largest is not None:
        lines += ["", f"largest relative change: {_percent(largest.relative_change)} ({largest.quantity} "
                      f"{largest.statistic} of {largest.variable}), {len(result.changes)} numbers compared"]
    return "\n".join(lines) + "\n"


def _finite_or_none(value: float):
    return value if math.isfinite(value) else None


def render_json(result: Comparison) -> str:
    """JSON (strict: non-finite numbers, an empty variable's NaN or an infinite relative change, are null)."""
    def run(label_run, manifest):
        return {"run_dir": label_run, "run_id": manifest.get("run_id"), "date": manifest.get("date"),
                "model_sha256": (manifest.get("model") or {}).get("sha256"),
                "data_fingerprint": (manifest.get("data") or {}).get("fingerprint")}

    changes = [{k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in c.as_dict().items()}
               for c in result.changes]
    document = {"a": run(result.run_a, result.manifest_a), "b": run(result.run_b, result.manifest_b),
                "warnings": result.warnings, "changes": changes}
    return json.dumps(document, indent=2, allow_nan=False) + "\n"


def render_csv(result: Comparison) -> str:
    """CSV with a header; ``inf``/``-inf`` as written, NaN as an empty field."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for c in result.changes:
        writer.writerow([("" if math.isnan(v) else repr(v)) if isinstance(v, float) else v
                         for v in (c.as_dict()[k] for k in COLUMNS)])
    return buffer.getvalue()


RENDERERS = {"table": render_table, "json": render_json, "csv": render_csv}
