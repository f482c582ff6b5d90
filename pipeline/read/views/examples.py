"""Per-example outputs and influence (contract 7): the folder ``per_example/`` (one Parquet part
per shard, ``per_example/part-00000.parquet``, ...: one row per training example, ``row``,
``file``, ``file_row``, ``id``, ``weight``, ``loss``, ``gradient_norm``, optional
``self_influence`` and ``projection``), ``influence_topk.parquet`` (per query its ``top_k`` most
helpful and most harmful training rows) and, with ``scores: dense``, ``influence.parquet``
(every score: ``query``, ``row``, ``score``).

The score of training row ``i`` on query ``q`` is ``I(q, i) = g_q^T (C + lambda I)^-1 g_i``:
positive, up-weighting ``i`` lowers the query's loss (helpful); negative, harmful. The
self-influence ``g_i^T (C + lambda I)^-1 g_i`` is large for rows the model finds hard to fit,
often mislabeled ones (Koh and Liang, 2017; Pruthi et al., 2020).

- ``show``: the influence facts and, per query, its top rows of each kind; the per-example
  table's size, the distribution of its numbers and its rows of largest self-influence (or loss).
- ``report``: per query its most helpful and harmful rows with their label and loss (labels read
  from the training data named by the manifest's job, thumbnails when its features look like
  images), and the histogram of self-influence with its top rows, "likely mislabeled".
- ``compare``, ``history`` and ``export``: nothing. The numbers belong to rows of one dataset
  and one model, and a scalar of them (a mean loss) is already in the manifest; pairing two
  runs' rows says nothing about the curvature.
"""

from __future__ import annotations

import io
import math
import posixpath
import re

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.read import pages
from pipeline.read.figures import BINS, RUN_COLOR, default_style, fmt, new_figure
from pipeline.read.text import aligned, number
from pipeline.read.views._base import Figure, Section, Shown, View
from pipeline.storage.publish import read_run_table
from pipeline.storage.uri import GLOB_CHARS, resolve_filesystem

# The run's files (the engine publishes them; the read side names them here, contract 7).
PER_EXAMPLE = "per_example"
PER_EXAMPLE_FOLDER = f"{PER_EXAMPLE}/"
INFLUENCE_TOPK, INFLUENCE_DENSE = "influence_topk", "influence"
# The per-example columns whose distribution show and report give, in this order.
DISTRIBUTED = ("loss", "gradient_norm", "self_influence")
HELPFUL, HARMFUL = "helpful", "harmful"
# show: the top rows of each kind per query, and the queries shown before a line says how many more.
SHOWN_ROWS, SHOWN_QUERIES = 5, 10
# report: the queries with a table (and thumbnails) on the page; the self-influence table's rows.
REPORT_QUERIES, REPORT_TOP = 5, 10
QUANTILES = (0.01, 0.25, 0.5, 0.75, 0.99)


def _part_number(name: str) -> tuple[int, str]:
    """A part's shard index from its name (``part-00012.parquet`` -> 12), the name breaking ties."""
    digits = re.findall(r"\d+", name.rsplit("/", 1)[-1])
    return (int(digits[-1]) if digits else -1, name)


class ExamplesAccess:
    """``Run``'s per-example outputs and influence scores (contract 7)."""

    def per_example_parts(self) -> list[str]:
        """The files of ``per_example/`` (``per_example/part-00000.parquet``, ...), in shard order."""
        return sorted((f for f in self.files if f.startswith(PER_EXAMPLE_FOLDER) and f.endswith(".parquet")),
                      key=_part_number)

    def per_example(self, columns: list[str] | None = None) -> pa.Table:
        """The per-example table: every part of ``per_example/`` concatenated, sorted by ``row``,
        one row per example of the dataset (``N = manifest["per_example"]["rows"]``):

        ``row`` int64 (global row), ``file`` string (relative to ``data.path``), ``file_row``
        int64, ``id`` (with ``data.id``), ``weight``, ``loss``, ``gradient_norm`` float64, and
        with ``influence: {self: true}`` ``self_influence`` float64, with ``per_example:
        {projection: k}`` ``projection`` fixed_size_list<float32 or float16>[k] (``Phi g_i``).

        ``columns`` reads only those (``row`` is read to sort by and dropped unless asked).
        A ``pyarrow.Table`` (``.to_pandas()``, ``.column("projection").flatten()`` reshaped to
        ``[N, k]``); ``InputError`` when the run has none. Memory: the columns read, in full."""
        parts = self.per_example_parts()
        if not parts and PER_EXAMPLE not in self.manifest:
            raise InputError(f"run {self.run_id} has no {PER_EXAMPLE_FOLDER} (it has: {', '.join(self.tables()) or 'nothing'}): "
                             "add per_example (or influence with self: true) to the job and run it again")
        wanted = list(columns) if columns else None
        read = wanted if wanted is None or "row" in wanted else wanted + ["row"]
        key = (PER_EXAMPLE, tuple(read) if read else None)
        if key not in self._tables:
            pieces = [read_run_table(self.run_dir, part, read) for part in parts]
            table = pa.concat_tables(pieces, promote_options="default") if pieces else pa.table({})
            self._tables[key] = table.sort_by("row") if "row" in table.column_names else table
        table = self._tables[key]
        return table.select(wanted) if wanted is not None and wanted != read else table

    def influence(self, query: int | None = None):
        """The top-k influence table (``influence_topk.parquet``) as a pandas DataFrame: per
        query ``2 * top_k`` rows, sorted by ``query``, ``kind`` (``helpful`` first), ``rank``:

        ``query`` int64 (its row in the query data), ``query_id`` (with the queries' ``id``),
        ``kind`` ("helpful": the largest scores, "harmful": the smallest), ``rank`` int32 (1
        first), ``row``, ``file``, ``file_row``, ``id`` (the training row), ``score`` float64
        ``= g_q^T (C + lambda I)^-1 g_i``; ``manifest["influence"]`` records ``C``, ``damping``
        and ``lambda``. ``query`` keeps one query's rows (``InputError`` when it has none).
        Every score of a ``scores: dense`` run: ``run.table("influence")``."""
        frame = self.table(INFLUENCE_TOPK)
        if query is None:
            return frame
        part = frame[frame["query"] == query].reset_index(drop=True)
        if part.empty:
            raise InputError(f"run {self.run_id} has no query {query} in {INFLUENCE_TOPK}.parquet (queries "
                             f"{_span(frame['query'])})")
        return part


def _span(values) -> str:
    values = sorted(set(int(v) for v in values))
    return f"{values[0]} to {values[-1]}, {len(values)} in all" if values else "none"


def _has_per_example(run) -> bool:
    return bool(run.per_example_parts()) or PER_EXAMPLE in run.manifest


class ExamplesView(View):
    # ``per_example/`` claims every file under that folder (``views.claims``).
    files = (PER_EXAMPLE_FOLDER, f"{INFLUENCE_TOPK}.parquet", f"{INFLUENCE_DENSE}.parquet")
    access = ExamplesAccess
    page = 85

    def present(self, run) -> bool:
        return _has_per_example(run) or run.has(INFLUENCE_TOPK) or run.has(INFLUENCE_DENSE)

    # ------------------------------------------------------------------ show
    def show(self, run) -> Shown:
        shown = Shown()
        if run.has(INFLUENCE_TOPK):
            _show_influence(run, shown)
        if _has_per_example(run):
            _show_per_example(run, shown)
        return shown

    # ------------------------------------------------------------------ report
    def figures(self, run, baseline, context):
        facts = context.setdefault(PER_EXAMPLE, report_facts(run))
        for position, query in enumerate(facts["queries"], start=1):
            images = facts["images"].get(query)
            if images:
                yield Figure(f"influence-{position:02d}-query-{query}.png",
                             f"query {query}: its most helpful (top) and most harmful (bottom) training rows",
                             plot_influence_rows(query, images))
        if facts["distribution"] is not None:
            column, values = facts["distribution"]
            yield Figure(f"{column.replace('_', '-')}.png", f"{column} of every training row",
                         plot_distribution(column, values))

    def sections(self, run, baseline, drawn, context):
        facts = context.get(PER_EXAMPLE) or report_facts(run)
        if not facts["queries"] and facts["distribution"] is None:
            return []  # a run without these outputs: the page does not list every family it lacks
        named = {f.name: f for f in drawn}
        return [Section(85, _influence_html(run, facts, named)), Section(86, _self_html(run, facts, named))]


# ------------------------------------------------------------------------------ show
def _influence_facts(run) -> str:
    facts = run.manifest.get("influence") or {}
    text = (f"{facts.get('queries', '?')} queries, top {facts.get('top_k', '?')} of each kind, "
            f"C {facts.get('curvature', '?')}, damping {number(facts.get('damping'))}")
    if run.has(INFLUENCE_DENSE):
        text += f", every score in {INFLUENCE_DENSE}.parquet"
    return text + " (run.influence(query))"


def _show_influence(run, shown: Shown) -> None:
    frame = run.influence()
    queries = list(dict.fromkeys(frame["query"]))
    shown.lines.append((INFLUENCE_TOPK, _influence_facts(run)))
    has_id = "id" in frame.columns
    header = ["kind", "file"] + (["id"] if has_id else []) + ["rank", "row", "file_row", "score"]
    for query in queries[:SHOWN_QUERIES]:
        part = frame[frame["query"] == query]
        rows = []
        for kind in (HELPFUL, HARMFUL):
            top = part[(part["kind"] == kind) & (part["rank"] <= SHOWN_ROWS)].sort_values("rank")
            rows += [[kind, r["file"]] + ([r["id"]] if has_id else []) +
                     [int(r["rank"]), int(r["row"]), int(r["file_row"]), number(r["score"])]
                     for _, r in top.iterrows()]
        title = f"influence, query {query}"
        if "query_id" in part.columns:
            title += f" (id {part['query_id'].iloc[0]})"
        shown.tables.append((title, aligned(rows, header, text_columns=3 if has_id else 2)))
    if len(queries) > SHOWN_QUERIES:
        shown.lines.append((INFLUENCE_TOPK, f"{len(queries) - SHOWN_QUERIES} more queries not shown "
                                            f"(queries {_span(queries)})"))


def _scalar_columns(run) -> list[str]:
    """The per-example columns worth reading for a summary: all but ``projection``."""
    parts = run.per_example_parts()
    if not parts:
        return []
    names = read_run_table(run.run_dir, parts[0], schema_only=True).names
    return [name for name in names if name != "projection"]


def distribution(values: np.ndarray) -> list:
    """``mean`` and the ``QUANTILES`` between ``min`` and ``max`` of the finite values."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return [math.nan] * (len(QUANTILES) + 3)
    return [finite.mean(), finite.min(), *np.quantile(finite, QUANTILES), finite.max()]


def _show_per_example(run, shown: Shown) -> None:
    entry = run.manifest.get(PER_EXAMPLE) or {}
    columns = _scalar_columns(run)
    table = run.per_example(columns).to_pandas() if columns else None
    rows = len(table) if table is not None else entry.get("rows", 0)
    listed = ", ".join(entry.get("columns") or columns)
    projection = f"; projection [{entry['projection']}] {entry.get('projection_dtype', 'float32')}" \
        if entry.get("projection") else ""
    shown.lines.append((PER_EXAMPLE, f"{rows:,} rows in {len(run.per_example_parts())} parts of "
                                     f"{PER_EXAMPLE_FOLDER} ({listed}{projection}) (run.per_example())"))
    if table is None or table.empty:
        return
    header = ["column", "mean", "min", *[f"{100 * q:g}%" for q in QUANTILES], "max"]
    stats = [[c, *[number(v) for v in distribution(table[c].to_numpy(np.float64))]]
             for c in DISTRIBUTED if c in table.columns]
    shown.tables.append((f"{PER_EXAMPLE}: distribution over {rows:,} rows", aligned(stats, header, text_columns=1)))
    by = "self_influence" if "self_influence" in table.columns else "loss"
    top = table.sort_values([by, "row"], ascending=[False, True], kind="stable").head(SHOWN_ROWS)
    has_id = "id" in table.columns
    header = ["file"] + (["id"] if has_id else []) + ["row", "file_row"] + [c for c in DISTRIBUTED if c in table]
    largest = [[r["file"]] + ([r["id"]] if has_id else []) + [int(r["row"]), int(r["file_row"])] +
             [number(r[c]) for c in DISTRIBUTED if c in table] for _, r in top.iterrows()]
    shown.tables.append((f"{PER_EXAMPLE}: largest {by}", aligned(largest, header, text_columns=2 if has_id else 1)))


# ------------------------------------------------------------------------------ the training data
def data_root(path: str) -> str:
    """The folder the per-example ``file`` column is relative to: ``data.path`` itself for a
    folder, its folder for a file, the part before the first wildcard for a glob (as the data
    listing, ``pipeline.storage.dataset``, takes it)."""
    stripped = path.rstrip("/") or path
    if any(c in stripped for c in GLOB_CHARS):
        parts = stripped.split("/")
        first = next(i for i, p in enumerate(parts) if any(c in p for c in GLOB_CHARS))
        return "/".join(parts[:first]) or "/"
    fs, inner = resolve_filesystem(stripped)
    if fs.get_file_info(inner).type == pafs.FileType.File:
        return posixpath.dirname(stripped)
    return stripped


def _label_columns(labels) -> list[str]:
    if isinstance(labels, str):
        return [labels]
    if isinstance(labels, dict):
        return [str(v) for v in labels.values()]
    return [str(v) for v in labels or ()]


def read_rows(data: dict, picks: list[tuple[str, int]]) -> dict[tuple[str, int], dict]:
    """``{(file, file_row): {"label": value, "features": value}}`` for some rows of a Parquet
    dataset (``data``: the job's ``data`` mapping, ``path``, ``labels``, ``features``), reading
    each file's needed columns once. ``{}`` when the data cannot be read here (moved, another
    format, no credentials): the report then goes without labels and thumbnails. Cost: the
    label and features columns of each file holding a pick, read whole (the report picks at
    most ``2 * SHOWN_ROWS * REPORT_QUERIES + REPORT_TOP`` rows)."""
    if not picks or data.get("format", "parquet") != "parquet" or not isinstance(data.get("path"), str):
        return {}
    labels = _label_columns(data.get("labels"))
    features = data.get("features") if isinstance(data.get("features"), str) else None
    wanted = list(dict.fromkeys(labels + ([features] if features else [])))
    out: dict = {}
    try:
        root = data_root(data["path"])
        fs, inner = resolve_filesystem(root)
        for file in sorted({f for f, _ in picks}):
            rows = sorted({r for f, r in picks if f == file})
            with fs.open_input_file(posixpath.join(inner, file) if file else inner) as handle:
                parquet = pq.ParquetFile(handle)
                present = [c for c in wanted if c in parquet.schema_arrow.names]
                table = parquet.read(columns=present).take(pa.array(rows, pa.int64()))
            for k, row in enumerate(rows):
                values = {c: table.column(c)[k].as_py() for c in present}
                label = [values[c] for c in labels if c in values]
                out[(file, row)] = {"label": label[0] if len(label) == 1 else tuple(label) if label else None,
                                    "features": values.get(features)}
    except (OSError, pa.ArrowException, InputError, IndexError, KeyError, ValueError, TypeError):
        return {}  # optional: the page says labels were not read
    return out


def as_image(value) -> np.ndarray | None:
    """A features value drawn as an image, or ``None``: PNG or JPEG bytes (decoded by
    matplotlib/Pillow), or numbers whose count is a square (``64 -> 8 x 8`` grey) or three
    times one (RGB); scaled to ``[0, 1]``."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        import matplotlib.image  # lazy: only a report with image data draws one

        try:
            return np.asarray(matplotlib.image.imread(io.BytesIO(value)), dtype=np.float64)
        except (OSError, ValueError, SyntaxError):
            return None
    try:
        flat = np.asarray(value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        return None
    for channels in (1, 3):
        side = math.isqrt(flat.size // channels) if flat.size % channels == 0 else 0
        if side > 1 and side * side * channels == flat.size and np.isfinite(flat).all():
            low, high = flat.min(), flat.max()
            scaled = (flat - low) / (high - low) if high > low else np.zeros_like(flat)
            return scaled.reshape((side, side) if channels == 1 else (side, side, 3))
    return None


# ------------------------------------------------------------------------------ report
def report_facts(run) -> dict:
    """What the report's plots and sections share, read once: the queries on the page, their
    top rows (``tops``: query -> DataFrame with ``label`` and ``loss`` joined), their thumbnails
    (``images``: query -> ``[(kind, rank, row, label, score, image)]``), the per-example scalar
    table (``examples``), the distribution drawn (``(column, values)``), its top rows and
    whether labels could be read."""
    facts: dict = {"queries": [], "tops": {}, "images": {}, "examples": None, "distribution": None, "top": None,
                   "labels": False}
    if _has_per_example(run):
        columns = _scalar_columns(run)
        facts["examples"] = run.per_example(columns).to_pandas() if columns else None
    if run.has(INFLUENCE_TOPK):
        frame = run.influence()
        facts["queries"] = list(dict.fromkeys(int(q) for q in frame["query"]))[:REPORT_QUERIES]
        facts["tops"] = {q: frame[(frame["query"] == q) & (frame["rank"] <= SHOWN_ROWS)] for q in facts["queries"]}
    examples = facts["examples"]
    if examples is not None and not examples.empty:
        column = "self_influence" if "self_influence" in examples.columns else "loss"
        facts["distribution"] = (column, examples[column].to_numpy(np.float64))
        facts["top"] = examples.sort_values([column, "row"], ascending=[False, True], kind="stable").head(REPORT_TOP)
    picks = {(str(f), int(r)) for top in list(facts["tops"].values()) + [facts["top"]] if top is not None
             for f, r in zip(top["file"], top["file_row"])}
    lookup = read_rows((run.manifest.get("job") or {}).get("data") or {}, sorted(picks))
    facts["labels"] = bool(lookup)
    losses = dict(zip(examples["row"], examples["loss"])) if examples is not None and "loss" in examples else {}
    for query, top in facts["tops"].items():
        top = top.assign(label=[(lookup.get((str(f), int(r))) or {}).get("label")
                                for f, r in zip(top["file"], top["file_row"])],
                         loss=[losses.get(r, math.nan) for r in top["row"]])
        facts["tops"][query] = top
        images = [(k, int(rank), int(row), label, score, as_image((lookup.get((str(f), int(fr))) or {}).get("features")))
                  for k, rank, row, f, fr, label, score in
                  zip(top["kind"], top["rank"], top["row"], top["file"], top["file_row"], top["label"], top["score"])]
        if images and all(image is not None for *_, image in images):
            facts["images"][query] = images
    if facts["top"] is not None:
        facts["top"] = facts["top"].assign(label=[(lookup.get((str(f), int(r))) or {}).get("label")
                                                  for f, r in zip(facts["top"]["file"], facts["top"]["file_row"])])
    return facts


def _training_rows_html(frame, columns: list[str]) -> str:
    shown = [c for c in columns if c in frame.columns]
    rows = [[fmt(v) if c in ("score", "loss", "gradient_norm", "self_influence") else
             (v if c in ("file", "kind", "id", "label") else fmt(int(v))) for c, v in zip(shown, values)]
            for values in frame[shown].itertuples(index=False)]
    numeric = {i for i, c in enumerate(shown) if c not in ("file", "kind", "id", "label")}
    return pages.table(shown, rows, numeric=numeric)


def _influence_html(run, facts: dict, named: dict) -> str:
    parts = ["<h2>Influence</h2>\n"]
    if not facts["queries"]:
        return parts[0] + "<p>Not computed (influence).</p>\n"
    entry = run.manifest.get("influence") or {}
    parts.append(f"<p>Score of training row i on query q: <code>g_q^T (C + lambda I)^-1 g_i</code>, C "
                 f"<b>{pages.escape(entry.get('curvature', '?'))}</b>, damping {pages.escape(fmt(entry.get('damping')))}"
                 f"; positive: up-weighting the row lowers the query's loss (helpful), negative: harmful. "
                 f"{pages.escape(fmt(entry.get('queries')))} queries, the first {len(facts['queries'])} shown "
                 f"(all in {INFLUENCE_TOPK}.parquet, <code>run.influence(query)</code>).")
    if not facts["labels"]:
        parts.append(" Labels were not read: the training data named by the job could not be read here.")
    parts.append("</p>\n")
    for position, query in enumerate(facts["queries"], start=1):
        top = facts["tops"][query]
        name = f" (id {pages.escape(top['query_id'].iloc[0])})" if "query_id" in top.columns else ""
        parts.append(f"<h3>Query {query}{name}</h3>\n")
        parts.append(_training_rows_html(top, ["kind", "rank", "row", "file", "file_row", "id", "label", "loss",
                                               "score"]))
        figure = named.get(f"influence-{position:02d}-query-{query}.png")
        if figure is not None:
            parts.append(pages.figures([(figure.name, figure.caption)]))
    return "".join(parts)


def _self_html(run, facts: dict, named: dict) -> str:
    if facts["distribution"] is None:
        return ""
    column, values = facts["distribution"]
    title = "Self-influence" if column == "self_influence" else "Per-example loss"
    parts = [f"<h2>{title}</h2>\n<p>{pages.escape(fmt(values.size))} training rows in {PER_EXAMPLE_FOLDER} "
             "(<code>run.per_example()</code>). "]
    if column == "self_influence":
        parts.append("<code>g_i^T (C + lambda I)^-1 g_i</code>: the rows with the largest are those the model "
                     "fits least easily, likely mislabeled.</p>\n")
    else:
        parts.append("No self-influence (<code>influence: {self: true}</code>): the rows of largest loss.</p>\n")
    stats = [[c, *[fmt(v) for v in distribution(facts["examples"][c].to_numpy(np.float64))]]
             for c in DISTRIBUTED if c in facts["examples"].columns]
    parts.append(pages.table(["column", "mean", "min", *[f"{100 * q:g}%" for q in QUANTILES], "max"], stats,
                             numeric=set(range(1, len(QUANTILES) + 4))))
    parts.append(f"<h3>Likely mislabeled: the {len(facts['top'])} rows of largest {column}</h3>\n")
    parts.append(_training_rows_html(facts["top"], ["row", "file", "file_row", "id", "label", "loss",
                                                    "gradient_norm", "self_influence"]))
    figure = named.get(f"{column.replace('_', '-')}.png")
    if figure is not None:
        parts.append(pages.figures([(figure.name, figure.caption)]))
    return "".join(parts)


@default_style
def plot_influence_rows(query: int, images: list):
    """One query's top training rows as thumbnails: the most helpful in the top row, the most
    harmful in the bottom one, each titled with its row, label and score."""
    figure = new_figure()
    columns = max(sum(1 for kind, *_ in images if kind == HELPFUL), sum(1 for kind, *_ in images if kind == HARMFUL), 1)
    axes = figure.subplots(2, columns, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for line, kind in enumerate((HELPFUL, HARMFUL)):
        for k, (_, rank, row, label, score, image) in enumerate(i for i in images if i[0] == kind):
            ax = axes[line, k]
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
            ax.set_title(f"{kind} {rank}: row {row}\nlabel {label}, {score:.3g}", fontsize=7)
    figure.suptitle(f"query {query}: most helpful (top), most harmful (bottom)", fontsize=9)
    return figure


@default_style
def plot_distribution(column: str, values: np.ndarray):
    """The histogram of a per-example column over every training row (log10 of the values when
    they are all positive and span more than two decades, as self-influence usually does)."""
    figure = new_figure()
    ax = figure.add_subplot()
    finite = values[np.isfinite(values)]
    logged = finite.size and finite.min() > 0 and finite.max() > 100 * finite.min()
    shown = np.log10(finite) if logged else finite
    ax.hist(shown, bins=BINS, color=RUN_COLOR)
    ax.set_yscale("log")
    ax.set_xlabel(f"log10 {column}" if logged else column)
    ax.set_ylabel("training rows")
    ax.set_title(f"{column} of {finite.size:,} training rows", fontsize=9)
    return figure
