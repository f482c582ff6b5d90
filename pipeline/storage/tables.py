"""Results <-> Arrow tables, in the layouts of the contract's section 4.

Parameters are flattened variable by variable in the order of ``signature.variables``, each
in C order; ``P`` is the total count. Every builder is vectorised (``np.repeat`` and Arrow
``take``), so a table of millions of parameters costs a few array passes, not a Python loop
per parameter. Storage only: PyArrow and numpy.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.storage.uri import resolve_filesystem

VECTOR_COLUMNS = ("vector", "variable", "index", "value")


def _sizes(variables: Sequence[str], shapes: Sequence[Sequence[int]]) -> np.ndarray:
    if len(variables) != len(shapes):
        raise ValueError(f"{len(variables)} variables but {len(shapes)} shapes")
    return np.array([int(np.prod(s, dtype=np.int64)) for s in shapes], dtype=np.int64)


def _parameter_columns(variables: Sequence[str], sizes: np.ndarray) -> tuple[pa.Array, pa.Array]:
    """``variable`` (string) and ``index`` (int64, C order inside the variable), length P."""
    owner = np.repeat(np.arange(len(variables), dtype=np.int64), sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    index = np.arange(int(sizes.sum()), dtype=np.int64) - np.repeat(starts, sizes)
    names = pc.take(pa.array(list(variables), pa.string()), pa.array(owner))
    return names, pa.array(index, pa.int64())


def diagonals_table(variables: Sequence[str], shapes: Sequence[Sequence[int]],
                    columns: dict[str, np.ndarray]) -> pa.Table:
    """One row per parameter: ``variable``, ``index``, then each column (float64 [P]) in order."""
    sizes = _sizes(variables, shapes)
    total = int(sizes.sum())
    names, index = _parameter_columns(variables, sizes)
    data = {"variable": names, "index": index}
    for name, values in columns.items():
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.shape != (total,):
            raise ValueError(f"column {name!r} has {values.size} values, expected {total}")
        data[name] = pa.array(values, pa.float64())
    return pa.table(data)


SUMMARY_STATS = ("size", "mean", "std", "min", "max", "abs_mean", "sum", "l2_norm")


def _segment_stats(values: np.ndarray, sizes: np.ndarray) -> dict[str, np.ndarray]:
    """Statistics of consecutive segments of ``values`` with the given sizes (all > 0)."""
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    total = np.add.reduceat(values, starts)
    mean = total / sizes
    # Two passes: the naive E[x^2] - E[x]^2 cancels badly for curvature values of one sign.
    centred = values - np.repeat(mean, sizes)
    return {
        "size": sizes.astype(np.int64),
        "mean": mean,
        "std": np.sqrt(np.add.reduceat(centred * centred, starts) / sizes),
        "min": np.minimum.reduceat(values, starts),
        "max": np.maximum.reduceat(values, starts),
        "abs_mean": np.add.reduceat(np.abs(values), starts) / sizes,
        "sum": total,
        "l2_norm": np.sqrt(np.add.reduceat(values * values, starts)),
    }


def summary_table(variables: Sequence[str], shapes: Sequence[Sequence[int]],
                  quantities: dict[str, np.ndarray]) -> pa.Table:
    """Per (quantity, variable) statistics, plus ``variable = "__all__"`` for each quantity.

    Rows are quantity-major: for each quantity in the given order, its variables in
    parameter order, then ``__all__``. ``std`` is the population one (ddof=0). A variable
    with no parameters gets size 0 and NaN statistics.
    """
    sizes = _sizes(variables, shapes)
    total = int(sizes.sum())
    nonempty = sizes > 0
    parts: dict[str, list[np.ndarray]] = {k: [] for k in SUMMARY_STATS}
    variable_column: list[str] = []
    quantity_column: list[str] = []
    for quantity, values in quantities.items():
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.shape != (total,):
            raise ValueError(f"quantity {quantity!r} has {values.size} values, expected {total}")
        per_variable = {k: np.full(len(sizes), np.nan) for k in SUMMARY_STATS}
        per_variable["size"] = sizes.copy()
        if nonempty.any():
            for key, stat in _segment_stats(values, sizes[nonempty]).items():
                per_variable[key][nonempty] = stat
        everything = {k: np.array([np.nan]) for k in SUMMARY_STATS}
        everything["size"] = np.array([total], dtype=np.int64)
        if total:
            everything = _segment_stats(values, np.array([total], dtype=np.int64))
        for key in SUMMARY_STATS:
            parts[key].extend([per_variable[key], everything[key]])
        variable_column.extend(list(variables) + ["__all__"])
        quantity_column.extend([quantity] * (len(variables) + 1))
    data = {
        "variable": pa.array(variable_column, pa.string()),
        "quantity": pa.array(quantity_column, pa.string()),
    }
    for key in SUMMARY_STATS:
        joined = np.concatenate(parts[key]) if parts[key] else np.array([])
        data[key] = pa.array(joined.astype(np.int64 if key == "size" else np.float64),
                             pa.int64() if key == "size" else pa.float64())
    return pa.table(data)


def vectors_table(variables: Sequence[str], shapes: Sequence[Sequence[int]], vectors: np.ndarray) -> pa.Table:
    """``[K, P]`` vectors in the long layout of ``hvp.parquet``: one row per (vector, parameter)."""
    sizes = _sizes(variables, shapes)
    total = int(sizes.sum())
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[1] != total:
        raise ValueError(f"vectors have shape {vectors.shape}, expected (K, {total})")
    count = vectors.shape[0]
    names, index = _parameter_columns(variables, sizes)
    repeat = pa.array(np.tile(np.arange(total, dtype=np.int64), count))
    return pa.table({
        "vector": pa.array(np.repeat(np.arange(count, dtype=np.int32), total), pa.int32()),
        "variable": pc.take(names, repeat),
        "index": pc.take(index, repeat),
        "value": pa.array(vectors.reshape(-1), pa.float64()),
    })


def _describe(position: int, ids: np.ndarray, variables: Sequence[str], starts: np.ndarray,
              total: int) -> str:
    k, flat = divmod(int(position), total)
    v = int(np.searchsorted(starts, flat, side="right")) - 1
    return f"vector {int(ids[k])}, variable '{variables[v]}', index {flat - int(starts[v])}"


def read_vectors(path: str, variables: Sequence[str], shapes: Sequence[Sequence[int]]) -> np.ndarray:
    """Read an HVP vectors file (``vectors_table`` layout) into float64 ``[K, P]``.

    Rows are ordered by vector id (sorted; ids need not be contiguous). Every parameter of
    every vector must appear exactly once: anything else is an input error that names the
    entry, since a silently zero-filled vector would give a wrong HVP.
    """
    fix = "fix the vectors file (quantities.hvp.vectors)"
    sizes = _sizes(variables, shapes)
    total = int(sizes.sum())
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    columns = _vector_columns(path, fix)

    vector = columns["vector"].to_numpy().astype(np.int64)
    index = columns["index"].to_numpy().astype(np.int64)
    value = columns["value"].to_numpy(zero_copy_only=False).astype(np.float64)
    variable = columns["variable"]
    if pa.types.is_dictionary(variable.type):
        variable = variable.cast(pa.string())
    owner = pc.index_in(variable, value_set=pa.array(list(variables), pa.string()))
    if owner.null_count:
        row = int(np.flatnonzero(pc.is_null(owner).to_numpy(zero_copy_only=False))[0])
        shown = ", ".join(list(variables)[:10]) + (", ..." if len(variables) > 10 else "")
        raise InputError(f"vectors file {path}: vector {int(vector[row])} names unknown variable "
                         f"'{variable[row].as_py()}' (model variables: {shown}): {fix}")
    owner = owner.to_numpy().astype(np.int64)

    bad = np.flatnonzero((index < 0) | (index >= sizes[owner]))
    if len(bad):
        row = int(bad[0])
        raise InputError(f"vectors file {path}: vector {int(vector[row])}, variable '{variables[owner[row]]}': "
                         f"index {int(index[row])} out of range (size {int(sizes[owner[row]])}): {fix}")
    bad = np.flatnonzero(~np.isfinite(value))
    if len(bad):
        row = int(bad[0])
        raise InputError(f"vectors file {path}: vector {int(vector[row])}, variable '{variables[owner[row]]}', "
                         f"index {int(index[row])} is {value[row]}: {fix} (values must be finite)")

    ids, k = np.unique(vector, return_inverse=True)
    position = k.reshape(-1) * total + starts[owner] + index
    result = np.zeros(len(ids) * total, dtype=np.float64)
    seen = np.zeros(len(ids) * total, dtype=bool)
    seen[position] = True
    if int(seen.sum()) != len(position):
        ordered = np.sort(position)
        duplicate = int(ordered[np.flatnonzero(ordered[1:] == ordered[:-1])[0]])
        raise InputError(f"vectors file {path}: {_describe(duplicate, ids, variables, starts, total)} "
                         f"appears more than once: {fix}")
    if len(position) != len(seen):
        absent = int(np.flatnonzero(~seen)[0])
        raise InputError(f"vectors file {path}: {_describe(absent, ids, variables, starts, total)} is missing "
                         f"(every parameter of every vector is needed): {fix}")
    result[position] = value
    return result.reshape(len(ids), total)


def _vector_columns(path: str, fix: str) -> dict:
    """The four ``VECTOR_COLUMNS`` of the vectors file at ``path``, each one chunk of a type it
    accepts, without nulls; else an ``InputError`` naming what is wrong and ending in ``fix``."""
    fs, inner = resolve_filesystem(path)
    try:
        schema = pq.read_schema(inner, filesystem=fs)
    except FileNotFoundError as err:
        raise InputError(f"vectors file {path} not found: check quantities.hvp.vectors") from err
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"cannot read vectors file {path} as Parquet ({str(err).splitlines()[0]}): {fix}") from err
    missing = [c for c in VECTOR_COLUMNS if c not in schema.names]
    if missing:
        raise InputError(f"vectors file {path} lacks column(s) {', '.join(missing)} (needs "
                         f"{', '.join(VECTOR_COLUMNS)}): {fix}")
    try:
        table = pq.read_table(inner, filesystem=fs, columns=list(VECTOR_COLUMNS))
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"cannot read vectors file {path} ({str(err).splitlines()[0]}): {fix}") from err
    if table.num_rows == 0:
        raise InputError(f"vectors file {path} has no rows: {fix}")

    expected = {"vector": pa.types.is_integer, "index": pa.types.is_integer,
                "value": lambda t: pa.types.is_floating(t) or pa.types.is_integer(t),
                "variable": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)
                or (pa.types.is_dictionary(t) and pa.types.is_string(t.value_type))}
    columns = {}
    for name, accepts in expected.items():
        column = table.column(name).combine_chunks()
        if not accepts(column.type):
            raise InputError(f"vectors file {path}: column '{name}' has type {column.type}: {fix}")
        if column.null_count:
            row = int(np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))[0])
            raise InputError(f"vectors file {path}: column '{name}' is null at row {row}: {fix}")
        columns[name] = column
    return columns


def eigenvectors_table(blocks: Sequence[tuple[str, Sequence[str], Sequence[Sequence[int]], np.ndarray]]) -> pa.Table:
    """``eigenvectors.parquet``: for each ``(block name, its variables, their shapes, vectors [k, b])``,
    one row per (rank, parameter of the block): ``block``, ``rank`` int32 (1 first), ``variable``,
    ``index``, ``value``."""
    parts = []
    for name, variables, shapes, vectors in blocks:
        long = vectors_table(variables, shapes, vectors)
        parts.append(pa.table({
            "block": pa.array([name] * long.num_rows, pa.string()),
            "rank": pc.add(long.column("vector"), pa.scalar(1, pa.int32())),
            "variable": long.column("variable"),
            "index": long.column("index"),
            "value": long.column("value"),
        }))
    schema = pa.schema([("block", pa.string()), ("rank", pa.int32()), ("variable", pa.string()),
                        ("index", pa.int64()), ("value", pa.float64())])
    return pa.concat_tables(parts) if parts else schema.empty_table()


def hessian_table(blocks: Sequence[tuple[str, Sequence[str], Sequence[Sequence[int]], np.ndarray]]) -> pa.Table:
    """``hessian.parquet``: for each ``(block name, its variables, their shapes, matrix [b, b])``,
    one row per parameter of the block: ``block``, ``variable``, ``index`` (C order inside the
    variable), ``row`` list<float64> = that parameter's row of the block's matrix."""
    parts = []
    for name, variables, shapes, matrix in blocks:
        sizes = _sizes(variables, shapes)
        total = int(sizes.sum())
        matrix = np.asarray(matrix, dtype=np.float64)
        if matrix.shape != (total, total):
            raise ValueError(f"block {name!r} has a {matrix.shape} matrix, expected ({total}, {total})")
        names, index = _parameter_columns(variables, sizes)
        offsets = pa.array(np.arange(0, total * total + 1, max(total, 1), dtype=np.int32)[:total + 1], pa.int32())
        parts.append(pa.table({
            "block": pa.array([name] * total, pa.string()),
            "variable": names,
            "index": index,
            "row": pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1), pa.float64())),
        }))
    schema = pa.schema([("block", pa.string()), ("variable", pa.string()), ("index", pa.int64()),
                        ("row", pa.list_(pa.float64()))])
    return pa.concat_tables(parts) if parts else schema.empty_table()


def eigenvalues_table(blocks: Sequence[tuple[str, Sequence[float], Sequence[float]]]) -> pa.Table:
    """For each ``(block name, eigenvalues, residuals)``: ``block``, ``rank`` (1 first, in the
    order given), ``eigenvalue``, ``residual`` = ||Hv - lambda v||."""
    names, ranks, values, norms = [], [], [], []
    for name, eigenvalues, residuals in blocks:
        eigenvalues = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
        residuals = np.asarray(residuals, dtype=np.float64).reshape(-1)
        if eigenvalues.shape != residuals.shape:
            raise ValueError(f"block {name!r}: {eigenvalues.size} eigenvalues but {residuals.size} residuals")
        names += [name] * eigenvalues.size
        ranks.append(np.arange(1, eigenvalues.size + 1, dtype=np.int32))
        values.append(eigenvalues)
        norms.append(residuals)
    return pa.table({
        "block": pa.array(names, pa.string()),
        "rank": pa.array(_joined(ranks, np.int32), pa.int32()),
        "eigenvalue": pa.array(_joined(values, np.float64), pa.float64()),
        "residual": pa.array(_joined(norms, np.float64), pa.float64()),
    })


def _joined(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)


def trace_table(blocks: Sequence[tuple[str, str, float, float, int]]) -> pa.Table:
    """One row per ``(block name, method, estimate, stderr, matvecs)``: the trace estimate of the
    block, its standard error (0 for exact) and the HVPs it cost."""
    blocks = list(blocks)
    return pa.table({
        "block": pa.array([str(b[0]) for b in blocks], pa.string()),
        "method": pa.array([str(b[1]) for b in blocks], pa.string()),
        "estimate": pa.array([float(b[2]) for b in blocks], pa.float64()),
        "stderr": pa.array([float(b[3]) for b in blocks], pa.float64()),
        "matvecs": pa.array([int(b[4]) for b in blocks], pa.int64()),
    })


def spectrum_table(blocks: Sequence[tuple[str, Sequence[np.ndarray], Sequence[np.ndarray]]]) -> pa.Table:
    """Stochastic Lanczos quadrature, for each ``(block name, nodes per run, weights per run)``:
    one row per node of each run, ``block``, ``run``, ``node``, ``weight`` (a run's weights sum to 1)."""
    names, runs, all_nodes, all_weights = [], [], [], []
    for name, nodes, weights in blocks:
        if len(nodes) != len(weights):
            raise ValueError(f"block {name!r}: {len(nodes)} runs of nodes but {len(weights)} of weights")
        for run, (n, w) in enumerate(zip(nodes, weights)):
            n = np.asarray(n, dtype=np.float64).reshape(-1)
            w = np.asarray(w, dtype=np.float64).reshape(-1)
            if n.shape != w.shape:
                raise ValueError(f"block {name!r}, run {run}: {n.size} nodes but {w.size} weights")
            names += [name] * n.size
            runs.append(np.full(n.size, run, dtype=np.int32))
            all_nodes.append(n)
            all_weights.append(w)
    return pa.table({
        "block": pa.array(names, pa.string()),
        "run": pa.array(_joined(runs, np.int32), pa.int32()),
        "node": pa.array(_joined(all_nodes, np.float64), pa.float64()),
        "weight": pa.array(_joined(all_weights, np.float64), pa.float64()),
    })


def factors_table(blocks: Sequence[tuple[str, str | None, np.ndarray]]) -> pa.Table:
    """``layer_inputs.parquet`` / ``kfac.parquet``: for each ``(layer, factor, matrix [d, d])``, one
    row per row of the matrix: ``block`` (the layer), ``factor`` ("A" | "S" | "S_stderr"; no such column when
    every factor is None, as ``layer_inputs.parquet``), ``index`` (the row), ``row`` list<float64>."""
    named = any(factor is not None for _, factor, _ in blocks)
    fields = [("block", pa.string())] + ([("factor", pa.string())] if named else []) + \
        [("index", pa.int64()), ("row", pa.list_(pa.float64()))]
    parts = []
    for name, factor, matrix in blocks:
        matrix = np.asarray(matrix, dtype=np.float64)
        size = matrix.shape[0]
        if matrix.shape != (size, size):
            raise ValueError(f"layer {name!r}: a {matrix.shape} factor, expected a square matrix")
        offsets = pa.array(np.arange(0, size * size + 1, max(size, 1), dtype=np.int32)[:size + 1], pa.int32())
        columns = {"block": pa.array([name] * size, pa.string())}
        if named:
            columns["factor"] = pa.array([factor] * size, pa.string())
        columns["index"] = pa.array(np.arange(size, dtype=np.int64), pa.int64())
        columns["row"] = pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1), pa.float64()))
        parts.append(pa.table(columns))
    schema = pa.schema(fields)
    return pa.concat_tables(parts).cast(schema) if parts else schema.empty_table()


def eigen_table(blocks: Sequence[tuple[str, np.ndarray]]) -> pa.Table:
    """``kfac_eigen.parquet``: for each ``(layer, values [d_A, d_S])``, one row per entry in C
    order: ``block``, ``index``, ``value``."""
    names, indices, values = [], [], []
    for name, matrix in blocks:
        flat = np.asarray(matrix, dtype=np.float64).reshape(-1)
        names += [name] * flat.size
        indices.append(np.arange(flat.size, dtype=np.int64))
        values.append(flat)
    return pa.table({"block": pa.array(names, pa.string()),
                     "index": pa.array(_joined(indices, np.int64), pa.int64()),
                     "value": pa.array(_joined(values, np.float64), pa.float64())})


def per_example_table(columns: dict[str, np.ndarray]) -> pa.Table:
    """A ``per_example/`` part (contract 7.1) from its columns in order: ``row``, ``file``,
    ``file_row``, ``id`` (any type), ``weight``, ``loss``, ``gradient_norm``, ``self_influence``
    (float64 [N]) and ``projection`` ([N, k] float32 or float16: a fixed-size list)."""
    data = {}
    for name, values in columns.items():
        if name == "projection":
            values = np.ascontiguousarray(values)
            kind = pa.float16() if values.dtype == np.float16 else pa.float32()
            data[name] = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel(), kind), values.shape[1])
        elif name in ("row", "file_row"):
            data[name] = pa.array(np.asarray(values, np.int64), pa.int64())
        elif name == "file":
            data[name] = pa.array(list(values), pa.string())
        elif name == "id":
            data[name] = pa.array(values.tolist() if np.asarray(values).dtype.kind in "OSU" else values)
        else:
            data[name] = pa.array(np.asarray(values, np.float64), pa.float64())
    return pa.table(data)


def influence_topk_table(topk: dict) -> pa.Table:
    """``influence_topk.parquet`` (contract 7.2) from the rows pass's merged selection:
    ``topk`` holds ``tops`` (kind -> ``Top``: rows and scores [Q, k], best first), ``names``
    and ``file_rows`` (each row's file and row in it, by row), ``query_ids`` [Q] or None; rows
    of -1 (fewer training rows than k) are left out."""
    parts = []
    for kind in ("helpful", "harmful"):
        top = topk["tops"][kind]
        queries, k = top.rows.shape
        query = np.repeat(np.arange(queries, dtype=np.int64), k)
        rank = np.tile(np.arange(1, k + 1, dtype=np.int32), queries)
        keep = top.rows.ravel() >= 0
        parts.append({"query": query[keep], "rank": rank[keep], "row": top.rows.ravel()[keep],
                      "score": top.scores.ravel()[keep], "kind": np.full(int(keep.sum()), kind, object),
                      "id": None if top.ids is None else top.ids.ravel()[keep]})
    query = np.concatenate([p["query"] for p in parts])
    rows = np.concatenate([p["row"] for p in parts])
    file_of, file_row = topk["origins"](rows)
    data = {"query": pa.array(query, pa.int64())}
    if topk.get("query_ids") is not None:
        ids = np.asarray(topk["query_ids"])[query]
        data["query_id"] = pa.array(ids.tolist() if ids.dtype.kind in "OSU" else ids)
    data["kind"] = pa.array(np.concatenate([p["kind"] for p in parts]).tolist(), pa.string())
    data["rank"] = pa.array(np.concatenate([p["rank"] for p in parts]), pa.int32())
    data["row"] = pa.array(rows, pa.int64())
    data["file"] = pa.array(list(file_of), pa.string())
    data["file_row"] = pa.array(file_row, pa.int64())
    if parts[0]["id"] is not None:
        ids = np.concatenate([p["id"] for p in parts])
        data["id"] = pa.array(ids.tolist() if ids.dtype.kind in "OSU" else ids)
    data["score"] = pa.array(np.concatenate([p["score"] for p in parts]), pa.float64())
    table = pa.table(data)
    order = pc.sort_indices(table, [("query", "ascending"), ("kind", "descending"), ("rank", "ascending")])
    return table.take(order)


def dense_scores_table(columns: dict[str, np.ndarray]) -> pa.Table:
    """A part of ``influence.parquet``: ``query`` int64, ``row`` int64, ``score`` float64."""
    return pa.table({"query": pa.array(columns["query"], pa.int64()), "row": pa.array(columns["row"], pa.int64()),
                     "score": pa.array(columns["score"], pa.float64())})
