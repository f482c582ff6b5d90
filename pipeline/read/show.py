"""``show RUN_DIR``: the manifest and the summary of a run as aligned text tables."""

from __future__ import annotations

from pipeline.blocks import ALL
from pipeline.read.run import Run

# A table without a layout of its own here is shown in full up to this many rows.
OTHER_ROWS = 20


def _table(rows: list[list[str]], header: list[str], text_columns: int = 2) -> str:
    """Aligned columns: the first ``text_columns`` to the left, numbers (and their headers)
    to the right, so that each header sits over its digits."""
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]

    def line(values) -> str:
        return "  ".join(str(v).ljust(w) if i < text_columns else str(v).rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    lines = [line(header), "  ".join("-" * w for w in widths)]
    lines += [line(row) for row in rows]
    return "\n".join(lines) + "\n"


def _number(value) -> str:
    try:
        return f"{float(value):.6g}"
    except (TypeError, ValueError):
        return str(value)


def _per_block(rows: list[dict]) -> int:
    """1 when the rows hold blocks other than all of H (then a ``block`` column is shown), else 0."""
    return int(any(r["block"] != ALL for r in rows))


def show_run(run_dir: str) -> str:
    """The run as text: manifest facts, then one table per result file present."""
    run = Run(run_dir)
    manifest = run.manifest
    variables = ", ".join(f"{v['name']} {tuple(v['shape'])}" for v in manifest.get("variables", []))
    facts = [
        ("run", manifest.get("run_id")), ("directory", run.run_dir), ("date", manifest.get("date")),
        ("status", manifest.get("status")),
        ("job", manifest.get("job", {}).get("name")), ("model", manifest.get("model", {}).get("path")),
        ("model sha256", manifest.get("model", {}).get("sha256")),
        ("data", f"{manifest.get('data', {}).get('rows')} rows, fingerprint "
                 f"{str(manifest.get('data', {}).get('fingerprint'))[:16]}"),
        ("examples", manifest.get("examples")), ("loss", _number(manifest.get("loss"))),
        ("parameters", manifest.get("parameters")), ("variables", variables or "-"),
        ("shards", manifest.get("shards")),
        ("workers", manifest.get("workers")), ("passes", manifest.get("passes")),
        ("seconds", manifest.get("seconds")), ("files", ", ".join(manifest.get("files", []))),
    ]
    width = max(len(k) for k, _ in facts)
    text = "\n".join(f"{k.ljust(width)}  {v}" for k, v in facts) + "\n"
    read = run.rows
    files = set(manifest.get("files", []))
    if "summary.parquet" in files:
        rows = read("summary.parquet")
        columns = ["mean", "std", "min", "max", "abs_mean", "sum", "l2_norm"]
        text += "\nsummary\n" + _table(
            [[r["variable"], r["quantity"], r["size"], *[_number(r[c]) for c in columns]] for r in rows],
            ["variable", "quantity", "size", *columns])
    if "trace.parquet" in files:
        rows = run.trace.to_dict("records")
        blocked = _per_block(rows)
        text += "\ntrace\n" + _table(
            [[r["block"]] * blocked + [r["method"], _number(r["estimate"]), _number(r["stderr"]), r["matvecs"]]
             for r in rows], ["block"] * blocked + ["method", "estimate", "stderr", "matvecs"],
            text_columns=1 + blocked)
    if "eigenvalues.parquet" in files:
        rows = run.eigenvalues.to_dict("records")
        blocked = _per_block(rows)
        text += "\neigenvalues\n" + _table(
            [[r["block"]] * blocked + [r["rank"], _number(r["eigenvalue"]), _number(r["residual"])] for r in rows],
            ["block"] * blocked + ["rank", "eigenvalue", "residual"], text_columns=blocked)
        sharpness = run.sharpness()
        if sharpness:
            text += (f"\nsharpness lambda_max * lr / 2 (lr {run.learning_rate:g}; >= 1: the edge of stability)\n"
                     + _table([[b] * blocked + [_number(v)] for b, v in sharpness.items()],
                              ["block"] * blocked + ["sharpness"], text_columns=blocked))
    present = []
    if "hvp.parquet" in files:
        vectors = len({r["vector"] for r in read("hvp.parquet", ["vector"])})  # K x P rows: one column read
        source = "random, saved in hvp_vectors.parquet" if "hvp_vectors.parquet" in files else "given vectors"
        present.append(("hvp", f"{vectors} Hessian-vector products ({source}) in hvp.parquet"))
    if "eigenvectors.parquet" in files:
        rows = read("eigenvectors.parquet", ["block", "rank"])
        pairs = {(r["block"], r["rank"]) for r in rows}
        blocks = {block for block, _ in pairs}
        present.append(("eigenvectors", f"{len(pairs)} unit eigenvectors"
                                        + (f" of {len(blocks)} blocks" if _per_block(rows) else "")
                                        + " in eigenvectors.parquet"))
    if "spectrum.parquet" in files:
        rows = run.spectrum.to_dict("records")
        for block in dict.fromkeys(r["block"] for r in rows):
            part = [r for r in rows if r["block"] == block]
            nodes = [r["node"] for r in part]
            label = "spectrum" if block == ALL else f"spectrum {block}"
            present.append((label, f"{len({r['run'] for r in part})} SLQ runs, {len(nodes)} nodes from "
                                   f"{_number(min(nodes))} to {_number(max(nodes))} in spectrum.parquet "
                                   "(plots: hessian-pipeline report)"))
    for name in ("layer_inputs", "kfac"):
        if f"{name}.parquet" in files:
            rows = read(f"{name}.parquet", ["block", "factor"] if name == "kfac" else ["block"])
            sizes: dict = {}
            for r in rows:
                key = (r["block"], r.get("factor", "A"))
                sizes[key] = sizes.get(key, 0) + 1
            layers = dict.fromkeys(block for block, _ in sizes)
            described = "; ".join(f"{layer} " + ", ".join(f"{factor} {n:,} x {n:,}" for (b, factor), n in sizes.items()
                                                          if b == layer) for layer in layers)
            extra = ", EK-FAC eigenvalues in kfac_eigen.parquet" if name == "kfac" and "kfac_eigen.parquet" in files \
                else ""
            present.append((name, f"{len(layers)} layers ({described}) in {name}.parquet{extra} (run.{name}(layer))"))
    # Any other table (a quantity this module has no layout for): small ones in full, large
    # ones by size, so that a new quantity shows without changes here.
    shown = {"diagonals.parquet", "summary.parquet", "trace.parquet", "eigenvalues.parquet", "hvp.parquet",
             "hvp_vectors.parquet", "spectrum.parquet", "eigenvectors.parquet", "layer_inputs.parquet", "kfac.parquet",
             "kfac_eigen.parquet"}
    for name in sorted(f for f in files - shown if f.endswith(".parquet")):
        rows = read(name)
        if rows and len(rows) <= OTHER_ROWS:
            header = list(rows[0])
            text += f"\n{name.removesuffix('.parquet')}\n" + _table(
                [[_number(r[c]) if isinstance(r[c], float) else r[c] for c in header] for r in rows], header,
                text_columns=0)
        else:
            present.append((name.removesuffix(".parquet"), f"{len(rows)} rows in {name}"))
    if present:
        width = max(len(k) for k, _ in present)
        text += "\n" + "\n".join(f"{k.ljust(width)}  {v}" for k, v in present) + "\n"
    return text
