"""``compare RUN_A RUN_B``: what changed between two published runs (nightly drift).

For every (variable, quantity) row the two runs' ``summary.parquet`` share, the change of
``mean``, ``l2_norm`` and ``sum``; the change of the loss, of the trace estimate and of each
top eigenvalue (by rank, when both runs asked for the same ``which``), per block of H when the
runs computed them per block (``blocks: variable | layer``: the per-layer sharpness drift;
the ``variable`` column then names the block). Each change is given
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
from pipeline.errors import InputError
from pipeline.read.run import Run

STATISTICS = ("mean", "l2_norm", "sum")
COLUMNS = ("variable", "quantity", "statistic", "a", "b", "change", "relative_change")


@dataclass(frozen=True)
class Change:
    """One compared number: ``b - a`` and ``(b - a) / |a|``."""

    variable: str
    quantity: str
    statistic: str
    a: float
    b: float
    # A change this small is no change: the numbers' own error (an eigenvalue's residual bound).
    floor: float = 0.0

    @property
    def change(self) -> float:
        return self.b - self.a

    @property
    def relative_change(self) -> float:
        if math.isnan(self.a) or math.isnan(self.b):
            return math.nan
        if self.a == self.b or abs(self.b - self.a) <= self.floor:
            return 0.0
        if self.a == 0:
            return math.copysign(math.inf, self.b)
        return (self.b - self.a) / abs(self.a)

    def as_dict(self) -> dict:
        return {"variable": self.variable, "quantity": self.quantity, "statistic": self.statistic, "a": self.a,
                "b": self.b, "change": self.change, "relative_change": self.relative_change}


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


# ------------------------------------------------------------------------------------ reading
def _files(manifest: dict) -> set[str]:
    return set(manifest.get("files") or [])


def _float(value) -> float:
    return math.nan if value is None else float(value)


def _short(text) -> str:
    return str(text)[:12] if text else "?"


# ---------------------------------------------------------------------------------- comparing
def compare_runs(run_a: str, run_b: str) -> Comparison:
    """Compares two complete runs (local directories or URIs); ``InputError`` if one is not a run."""
    loaded_a, loaded_b = Run(run_a), Run(run_b)
    manifest_a, manifest_b = loaded_a.manifest, loaded_b.manifest
    result = Comparison(run_a, run_b, manifest_a, manifest_b)
    _provenance_warnings(result)

    result.changes.append(Change("__all__", "loss", "value", _float(manifest_a.get("loss")),
                                 _float(manifest_b.get("loss"))))
    files_a, files_b = _files(manifest_a), _files(manifest_b)
    if "summary.parquet" in files_a and "summary.parquet" in files_b:
        result.changes += _summary_changes(result, loaded_a.rows("summary.parquet"),
                                           loaded_b.rows("summary.parquet"))
    if "trace.parquet" in files_a and "trace.parquet" in files_b:
        result.changes += _trace_changes(result, loaded_a, loaded_b)
    if "eigenvalues.parquet" in files_a and "eigenvalues.parquet" in files_b:
        result.changes += _eigenvalue_changes(result, loaded_a, loaded_b)
    only = sorted((files_a ^ files_b) & {"summary.parquet", "trace.parquet", "eigenvalues.parquet"})
    if only:
        result.warnings.append(f"only one run has {', '.join(only)}: not compared")
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


def _summary_changes(result: Comparison, rows_a: list[dict], rows_b: list[dict]) -> list[Change]:
    by_key_b = {(r["variable"], r["quantity"]): r for r in rows_b}
    keys_a = {(r["variable"], r["quantity"]) for r in rows_a}
    changes = []
    for row in rows_a:  # in A's order: quantity-major, variables in parameter order
        other = by_key_b.get((row["variable"], row["quantity"]))
        if other is None:
            continue
        if row.get("size") != other.get("size"):
            result.warnings.append(f"{row['variable']} ({row['quantity']}) has {row.get('size')} parameters in A "
                                   f"and {other.get('size')} in B")
        for statistic in STATISTICS:
            changes.append(Change(row["variable"], row["quantity"], statistic, _float(row[statistic]),
                                  _float(other[statistic])))
    unmatched = len(keys_a ^ set(by_key_b))
    if unmatched:
        result.warnings.append(f"{unmatched} (variable, quantity) summary rows are in only one run: not compared")
    return changes


def _shared_blocks(result: Comparison, what: str, run_a: Run, run_b: Run) -> list[str]:
    """The blocks of ``what`` (``"trace"``, ``"eigenvalues"``) both runs hold with the same number
    of parameters, in A's order; warnings name the others (a block is paired by name, and two
    runs with different ``variables:`` can give one name to different parameters)."""
    blocks_a, blocks_b = run_a.blocks(what), run_b.blocks(what)
    only = [b for b in blocks_a if b not in blocks_b] + [b for b in blocks_b if b not in blocks_a]
    if only:
        result.warnings.append(f"{what} of blocks {', '.join(only)} are in only one run: not compared")
    shared = []
    for block in (b for b in blocks_a if b in blocks_b):
        size_a, size_b = _block_size(run_a, block), _block_size(run_b, block)
        if size_a != size_b:
            result.warnings.append(f"{what} of block {block} covers {size_a} parameters in A and {size_b} in B: "
                                   "not compared")
        else:
            shared.append(block)
    return shared


def _block_size(run: Run, block: str) -> int | None:
    try:
        return run.block_size(block)
    except InputError:  # a run whose manifest does not list the block's variables
        return None


def _trace_changes(result: Comparison, run_a: Run, run_b: Run) -> list[Change]:
    """The trace of each block both runs hold (``variable`` = the block: ``__all__``, a variable
    path or a layer name)."""
    rows_a = {r["block"]: r for r in run_a.trace.to_dict("records")}
    rows_b = {r["block"]: r for r in run_b.trace.to_dict("records")}
    changes = []
    for block in _shared_blocks(result, "trace", run_a, run_b):
        a, b = rows_a[block], rows_b[block]
        if a["method"] != b["method"]:
            where = "" if block == ALL else f" of block {block}"
            result.warnings.append(f"the trace{where} was estimated by {a['method']} in A and by {b['method']} in B")
        changes.append(Change(block, "trace", "estimate", _float(a["estimate"]), _float(b["estimate"])))
    return changes


def _eigenvalue_changes(result: Comparison, run_a: Run, run_b: Run) -> list[Change]:
    """Each eigenvalue by (block, rank), when both runs asked for the same ``which``.

    A change within the two residuals (``|lambda - theta| <= residual``: neither run knows its
    eigenvalue better), or within 1e-12 of the block's largest eigenvalue, is reported as no
    relative change: per-block spectra often hold exact zeros (a rank-deficient kernel, the
    shift invariance of a softmax bias) whose computed values are rounding noise of either sign.
    """
    def which(manifest):
        return ((manifest.get("job") or {}).get("quantities") or {}).get("eigenvalues", {}).get("which", "largest")

    which_a, which_b = which(result.manifest_a), which(result.manifest_b)
    if which_a != which_b:
        result.warnings.append(f"eigenvalues are the {which_a} in A and the {which_b} in B: not compared")
        return []
    frame_a, frame_b = run_a.eigenvalues, run_b.eigenvalues
    by_key_b = {(r["block"], int(r["rank"])): r for r in frame_b.to_dict("records")}
    rows_a = frame_a.to_dict("records")
    changes = []
    for block in _shared_blocks(result, "eigenvalues", run_a, run_b):
        mine = sorted((r for r in rows_a if r["block"] == block), key=lambda r: int(r["rank"]))
        theirs = [by_key_b[(block, int(r["rank"]))] for r in mine if (block, int(r["rank"])) in by_key_b]
        scale = max([abs(_float(r["eigenvalue"])) for r in mine + theirs] + [0.0])
        for row in mine:
            other = by_key_b.get((block, int(row["rank"])))
            if other is not None:
                floor = _float(row["residual"]) + _float(other["residual"]) + 1e-12 * scale
                changes.append(Change(block, "eigenvalues", f"rank_{int(row['rank'])}", _float(row["eigenvalue"]),
                                      _float(other["eigenvalue"]), floor if math.isfinite(floor) else 0.0))
    return changes


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
