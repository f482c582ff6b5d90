"""The job file: YAML in, a validated and resolved ``JobSpec`` out.

Everything a user can get wrong in a job file is found here, before Ray starts or TensorFlow
is imported, so that a typo costs a second and one ``error:`` line instead of a traceback from
a worker. Every problem raises ``InputError`` with one line that names the dotted key
(``data.batch_size``) and the way out.

The spec that comes out is *resolved*: every default is filled in and every local path is
absolute (relative paths are relative to the job file's folder, not to wherever the command
was started), so workers, the manifest and a later ``load_job(spec.to_dict())`` all see the
same job. URIs (anything containing ``://``) are kept exactly as written.

This module imports only PyYAML: it is used by ``validate`` and ``--dry-run``, which must stay
fast, and by tests that must not need TensorFlow or Ray.

Example::

    >>> spec = load_job({"name": "demo", "model": "/m/mlp.keras", "loss": "mse",
    ...                  "data": {"path": "s3://b/train/", "features": "x", "labels": "y"},
    ...                  "quantities": {"trace": None}}, overrides=["data.batch_size=64"])
    >>> spec.data.batch_size, spec.quantities["trace"]
    (64, {'method': 'hutch++', 'probes': 100, 'blocks': 'full'})

Extensions to the contract (section 3), documented in docs/job-file.md:

- ``quantities.hessian_diagonal.force`` (bool, default false): the exact Hessian diagonal costs
  one HVP per parameter, so the engine refuses it for large models unless ``force: true``.
- ``quantities.hvp``: a ``null`` ``vectors`` or ``random`` counts as absent, so
  ``--set quantities.hvp.vectors=null --set quantities.hvp.random=4`` switches a job to
  random vectors.
- ``loss`` as a mapping: every key but ``name`` is a keyword argument of the loss; ``reduction``
  is refused because the pipeline needs per-example losses (reduction "none").
- ``seed`` is at most 2**31 - 1 so that ``(seed, k)`` fits every RNG the engine may use.
- YAML is read with ``1e-6`` as a float (YAML 1.2 style; PyYAML alone reads it as a string) and
  without timestamp conversion, so ``name: 2024-01-01`` stays a string.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from pipeline.quantities import registry
from pipeline.errors import InputError
from pipeline.storage.layout import MAX_NAME_LENGTH
from pipeline.options import (MISSING, Check, auto_or_positive_int, boolean, check_keys, choice, column_name, fail, is_int, one_line,
                              positive_float, positive_int, resolved_path, show)

__all__ = [
    "DEFAULTS",
    "KEYS",
    "DataSpec",
    "JobSpec",
    "Key",
    "LimitsSpec",
    "LossSpec",
    "ModelSpec",
    "job_keys",
    "load_job",
    "parse_job",
]


# --------------------------------------------------------------------------------------------
# The resolved spec


@dataclass(frozen=True)
class ModelSpec:
    """Where the model comes from: a ``.keras`` file, or a builder plus optional weights."""

    path: str | None  # absolute local path or URI of a .keras file; None for a builder
    builder: str | None  # "pkg.module:function"
    weights: str | None  # absolute path/URI of weights file (with builder)


@dataclass(frozen=True)
class LossSpec:
    """The per-example loss: a Keras loss (``name`` + ``options``) or a user ``function``."""

    name: str | None  # Keras loss name like "sparse_categorical_crossentropy"; None for a function
    options: dict  # extra keyword arguments, e.g. {"from_logits": True}
    function: str | None  # "pkg.module:function" returning per-example losses


@dataclass(frozen=True)
class DataSpec:
    """The dataset (Parquet or TFRecord), its transform, and which columns feed the model, the loss
    and the weights."""

    path: str  # Parquet file, dir or glob; absolute local path or URI as given
    features: str | tuple[str, ...] | dict[str, str]
    labels: str | tuple[str, ...] | dict[str, str]  # a mapping is {output_name: column}
    weights: str | None = None
    batch_size: int = 256
    limit: int | None = None
    pad_value: int | float | str = 0  # fills variable-length list columns up to a batch's longest row
    format: str = "parquet"  # parquet | tfrecord (contract 5.4)
    schema: dict | None = None  # tfrecord: feature -> {dtype, shape, default}, as tf.io.parse_example reads it
    transform: str | None = None  # "pkg.module:function" applied to each batch's columns in the workers
    id: str | None = None  # a column naming each row (contract 7.1): carried to the per-example outputs


@dataclass(frozen=True)
class LimitsSpec:
    """What a plan may cost before it is refused (extension, docs/cost.md)."""

    hours: float = 24.0  # estimated wall time of the run
    memory_gib: float | str = "auto"  # per process (a worker, the driver); auto = what the machine has free
    force: bool = False  # run even when an estimate is over a limit


@dataclass(frozen=True)
class JobSpec:
    """A whole job, validated, with every default filled in and every path resolved."""

    name: str
    model: ModelSpec
    loss: LossSpec
    data: DataSpec
    quantities: dict[str, dict]  # name -> options with defaults; order = order in the file
    shards: int | str = "auto"
    workers: int | str = "auto"
    include_regularization: bool = False
    precision: str = "float32"
    seed: int = 0
    variables: str | tuple[str, ...] = "all"  # glob patterns over variable paths (extension 5.1)
    output: str = "results"  # absolute local path or URI
    limits: LimitsSpec = LimitsSpec()
    job_path: str | None = None  # absolute path of the job file, None when built from a dict
    # A series (contract 6.2, ``model:`` a list or a glob): every checkpoint's path, in order;
    # ``model`` is then the first. Empty for a job of one model.
    checkpoints: tuple[str, ...] = ()

    def checkpoint(self, index: int) -> "JobSpec":
        """The job of one checkpoint of a series: its model, and no series."""
        return dataclasses.replace(self, model=ModelSpec(path=self.checkpoints[index], builder=None, weights=None),
                                   checkpoints=())

    def to_dict(self) -> dict:
        """The resolved job with the job file's key names, for ``manifest.json``.

        It is JSON-serialisable (tuples become lists) and a valid job itself: dumped to YAML
        and loaded again it gives an equal spec (``job_path`` aside, which is not a job key).
        """
        if self.checkpoints:
            model: Any = list(self.checkpoints)
        elif self.model.path is not None:
            model = self.model.path
        else:
            model = {"builder": self.model.builder, "weights": self.model.weights}
        loss = {"name": self.loss.function or self.loss.name, **copy.deepcopy(self.loss.options)}
        return {
            "name": self.name,
            "model": model,
            "loss": loss,
            "data": {
                "path": self.data.path,
                "features": _plain(self.data.features),
                "labels": _plain(self.data.labels),
                "weights": self.data.weights,
                "batch_size": self.data.batch_size,
                "limit": self.data.limit,
                "pad_value": self.data.pad_value,
                "format": self.data.format,
                "schema": copy.deepcopy(self.data.schema),
                "transform": self.data.transform,
                "id": self.data.id,
            },
            "shards": self.shards,
            "workers": self.workers,
            "include_regularization": self.include_regularization,
            "precision": self.precision,
            "seed": self.seed,
            "variables": _plain(self.variables),
            "quantities": {name: _plain(opts) for name, opts in self.quantities.items()},
            "output": self.output,
            "limits": {"hours": self.limits.hours, "memory_gib": self.limits.memory_gib,
                       "force": self.limits.force},
        }


def _plain(value: Any) -> Any:
    """A deep copy with tuples as lists, so ``json.dumps`` and ``yaml.safe_dump`` accept it."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------
# Small checks shared by every key. Each takes the value and its dotted key, returns the
# (possibly converted) value, or raises InputError with one line.


def _seed(value: Any, key: str) -> int:
    if not is_int(value) or not 0 <= value <= 2**31 - 1:
        fail(key, "an integer from 0 to 2147483647", value, "set it to e.g. 0")
    return value


# Used with fullmatch only: `$` also matches before a final newline ("x\n" would pass).
_CALLABLE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_KERAS_NAME = re.compile(r"[A-Za-z_]\w*")
_JOB_NAME = re.compile(r"[A-Za-z0-9._-]+")


def _callable(value: Any, key: str) -> str:
    if not isinstance(value, str) or not _CALLABLE.fullmatch(value):
        fail(key, 'a "pkg.module:function" reference', value,
              'write it as "pkg.module:function" with the module importable on the workers')
    return value


def _mapping(value: Any, key: str, example: str) -> dict:
    if not isinstance(value, dict):
        fail(key, "a mapping", value, f"write it as e.g. {key}: {example}")
    return value


def _required(mapping: dict, key: str, where: str, fix: str) -> Any:
    dotted = f"{where}.{key}" if where else key
    if mapping.get(key) is None:
        raise InputError(f"{dotted} is required: {fix}")
    return mapping[key]


# --------------------------------------------------------------------------------------------
# The keys of a job file, as one table: used to fill defaults, to check quantity options and to
# let a test check that docs/job-file.md documents every key.

@dataclass(frozen=True)
class Key:
    """One dotted key of a job file: its default (if any) and a one-line description."""

    help: str
    default: Any = MISSING
    required: bool = False


_TOP_KEYS = ("name", "model", "loss", "data", "shards", "workers", "include_regularization",
             "precision", "seed", "variables", "quantities", "output", "limits")
_MODEL_KEYS = ("builder", "weights")
_DATA_KEYS = ("path", "features", "labels", "weights", "batch_size", "limit", "pad_value", "format", "schema",
              "transform", "id")
DATA_FORMATS = ("parquet", "tfrecord")
SCHEMA_DTYPES = ("float32", "int64", "string")  # the value kinds a tf.train.Example feature can hold
_LIMITS_KEYS = ("hours", "memory_gib", "force")


def _keys_table() -> dict[str, Key]:
    keys = {
        "name": Key("run name: letters, digits, . _ -", required=True),
        "model": Key("a .keras file (path or URI), a list or glob of them (one run each), or a mapping with builder "
                     "and weights",
                     required=True),
        "model.builder": Key('"pkg.module:function" returning a Keras model'),
        "model.weights": Key("weights file loaded into the built model", None),
        "loss": Key('a Keras loss name, "pkg.module:function", or a mapping with name',
                    required=True),
        "loss.name": Key("Keras loss name or function; other keys are keyword arguments"),
        "data": Key("the dataset", required=True),
        "data.path": Key("Parquet (or TFRecord) file, directory or glob; local path or URI", required=True),
        "data.features": Key("a column, a list of columns, or {input_name: column}",
                             required=True),
        "data.labels": Key("a column, a list of columns (one per output, in model.output_names order), "
                           "or {output_name: column}", required=True),
        "data.weights": Key("column of per-example weights", None),
        "data.batch_size": Key("examples per batch", 256),
        "data.limit": Key("use only the first N rows", None),
        "data.pad_value": Key("value that pads variable-length list columns to a batch's longest row", 0),
        "data.format": Key("parquet, or tfrecord (files of serialized tf.train.Example; GZIP when the name ends "
                           "in .gz)", "parquet"),
        "data.schema": Key("tfrecord only: feature -> {dtype: float32|int64|string, shape: [...]}; shape [null] "
                           "is a variable-length feature", None),
        "data.transform": Key('"pkg.module:function" called on each batch\'s columns (dict of numpy arrays -> dict) '
                              "before features and labels are taken", None),
        "data.id": Key("a column that names each row (any type): carried into per_example/ and the influence "
                       "tables, to join them with the training data", None),
        "shards": Key("number of shards, or auto", "auto"),
        "workers": Key("worker actors; auto = one per GPU, else one per CPU slot", "auto"),
        "include_regularization": Key("add model.losses to the objective", False),
        "precision": Key("float32 or float64", "float32"),
        "seed": Key("seed of every stochastic estimator", 0),
        "variables": Key("the parameters w every quantity is taken with respect to: all, or a list of glob patterns "
                         "over variable paths (\"dense_2/*\"); the others are constants", "all"),
        "quantities": Key("what to compute: any subset, each at most once", required=True),
    }
    for quantity, unit in registry.UNITS.items():
        keys[f"quantities.{quantity}"] = Key(unit.help)
        for option, spec in unit.options.items():
            keys[f"quantities.{quantity}.{option}"] = Key(spec.help, spec.default)
    keys["output"] = Key("root directory or URI of the published runs", "results")
    keys["limits"] = Key("extension: what a plan may cost before it is refused")
    keys["limits.hours"] = Key("refuse a run estimated to take longer (CPU workers)", 24.0)
    keys["limits.memory_gib"] = Key("memory per process (worker, driver) in GiB; auto = the machine's free memory",
                                    "auto")
    keys["limits.force"] = Key("run even when an estimate is over a limit", False)
    return keys


KEYS: dict[str, Key] = _keys_table()
"""Every dotted key a job file may contain, with its default and a one-line description."""

DEFAULTS: dict[str, Any] = {k: v.default for k, v in KEYS.items() if v.default is not MISSING}
"""The value each optional key takes when the job file leaves it out."""


def job_keys() -> list[str]:
    """Every dotted key a job file may contain, e.g. ``data.batch_size``, in file order."""
    return list(KEYS)


# --------------------------------------------------------------------------------------------
# Reading YAML


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    pass


# YAML 1.1 (PyYAML) reads `1e-6` as a string; YAML 1.2 and every user read it as a number.
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _JobLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, reads ``1e-6`` as a float, keeps dates as text.

    PyYAML keeps the last of two equal keys without a word: a job with ``trace`` twice would
    silently compute one of them.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:
                    continue  # unhashable key: SafeConstructor reports it below
                if duplicate:
                    raise _DuplicateKeyError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r}", key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


_JobLoader.yaml_implicit_resolvers = {
    first: [
        (tag, _FLOAT if tag == "tag:yaml.org,2002:float" else regexp)
        for tag, regexp in resolvers
        if tag != "tag:yaml.org,2002:timestamp"
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


# A job file is a few hundred nodes; aliases may repeat a node, but a document that expands to
# more than this many nodes is refused before anything walks it (a "billion laughs" bomb of a
# few hundred bytes expands to millions of nodes, and every later check would walk them all).
MAX_YAML_NODES = 100_000


class _AliasBombError(yaml.YAMLError):
    pass


# Counting stops here: a chain of a few thousand aliases expands to a number with thousands
# of digits, which Python refuses to print (and no message needs).
_COUNT_CAP = 10**18


def _expanded_size(root) -> int:
    """Nodes under ``root`` with every alias expanded (at most ``_COUNT_CAP``), each distinct
    node counted once and memoised; iterative, so a long chain of aliases cannot exhaust the
    stack."""
    sizes: dict[int, int] = {}
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        if children_done:
            sizes[id(node)] = min(_COUNT_CAP, 1 + sum(sizes[id(child)] for child in children))
        elif id(node) not in sizes:
            sizes[id(node)] = 1  # a node that contains itself counts once (PyYAML refuses recursion later)
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
    return sizes[id(root)]


class _TooDeepError(yaml.YAMLError):
    pass


def _load_yaml(text: str):
    """YAML text to Python values with ``_JobLoader``, refusing documents whose aliases expand
    beyond ``MAX_YAML_NODES`` nodes (found on the node graph, before any value is built) and
    documents nested so deeply that PyYAML's recursive reader runs out of stack."""
    loader = _JobLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node)
        if size > MAX_YAML_NODES:
            count = f"more than {_COUNT_CAP:,}" if size >= _COUNT_CAP else f"{size:,}"
            raise _AliasBombError(f"its aliases expand to {count} values (more than {MAX_YAML_NODES:,})")
        return loader.construct_document(node)
    except RecursionError:
        raise _TooDeepError("its values are nested hundreds of levels deep (a job file needs a few)") from None
    finally:
        loader.dispose()


def _yaml_problem(error: yaml.YAMLError) -> tuple[str, int | None]:
    """The problem of a PyYAML error and its 1-based line, for a one-line message.

    An unclosed bracket is reported where the file ends, so the line where the construct
    started (PyYAML's context) is named too: that is where the fix usually goes.
    """
    if not isinstance(error, yaml.MarkedYAMLError):
        return one_line(str(error)), None
    problem = error.problem or error.context or "invalid YAML"
    mark = error.problem_mark or error.context_mark
    line = mark.line + 1 if mark is not None else None
    if error.problem and error.context and error.context_mark is not None:
        started = error.context_mark.line + 1
        if started != line:
            problem += f" ({error.context} from line {started})"
    return one_line(problem), line


# A job file is a few hundred bytes (vectors, data and models are files of their own); a larger one
# is refused before it is parsed: YAML took minutes over a 100 MB string.
JOB_FILE_LIMIT = 1 << 20


def _read_job_file(job_path: str, shown: str) -> dict:
    try:
        with open(job_path, "rb") as stream:
            data = stream.read(JOB_FILE_LIMIT + 1)
        if len(data) > JOB_FILE_LIMIT:
            raise InputError(f"job file {shown} is over {JOB_FILE_LIMIT >> 20} MiB, the most a job file may be: keep "
                             "data, vectors and models in files of their own and name their paths")
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"job file {shown} not found: check the path") from None
    except IsADirectoryError:
        raise InputError(
            f"job file {shown} is a directory: pass the YAML file inside it"
        ) from None
    except UnicodeDecodeError:
        raise InputError(f"job file {shown} is not UTF-8 text: save it as UTF-8") from None
    except OSError as error:
        raise InputError(
            f"job file {shown} cannot be read ({error.strerror or error}): check its permissions"
        ) from None
    try:
        raw = _load_yaml(text)
    except _AliasBombError as error:
        raise InputError(f"job file {shown} is refused: {error}: write the values out without nested "
                         "aliases") from None
    except _TooDeepError as error:
        raise InputError(f"job file {shown} is refused: {error}: write the values out with less nesting") from None
    except _DuplicateKeyError as error:
        problem, line = _yaml_problem(error)
        raise InputError(
            f"job file {shown} line {line}: {problem}: keep only one of them"
        ) from None
    except yaml.YAMLError as error:
        problem, line = _yaml_problem(error)
        where = f" line {line}" if line is not None else ""
        raise InputError(
            f"job file {shown}{where}: YAML syntax error: {problem}: fix the syntax there "
            "(quote values that contain ': ' or ' #')"
        ) from None
    if raw is None:
        raise InputError(
            f"job file {shown} is empty: write a mapping with name, model, loss, data, quantities"
        )
    if not isinstance(raw, dict):
        raise InputError(
            f"job file {shown} must hold a mapping of keys (name, model, ...), got "
            f"{show(raw)}: write one key: value per line at the top level"
        )
    return raw


# --------------------------------------------------------------------------------------------
# Overrides (--set KEY=VALUE)

_OVERRIDE_SEGMENT = re.compile(r"[^\s=.]+")


def _parse_override(text: Any) -> tuple[list[str], Any]:
    if not isinstance(text, str) or "=" not in text:
        raise InputError(
            f"--set {show(text)} is not KEY=VALUE: write it as e.g. --set data.batch_size=64"
        )
    key, value_text = text.split("=", 1)
    key = key.strip()
    segments = key.split(".")
    if not all(_OVERRIDE_SEGMENT.fullmatch(s) for s in segments):
        raise InputError(
            f"--set {text!r} has no valid dotted KEY before '=': "
            "write it as e.g. --set quantities.trace.probes=10"
        )
    try:
        value = _load_yaml(value_text)
    except (_AliasBombError, _TooDeepError) as error:
        raise InputError(f"--set {key}=...: the value is refused: {error}") from None
    except _DuplicateKeyError as error:
        problem, _ = _yaml_problem(error)
        raise InputError(f"--set {text!r}: {problem}: keep only one of them") from None
    except yaml.YAMLError as error:
        problem, _ = _yaml_problem(error)
        raise InputError(
            f"--set {text!r}: the value is not valid YAML ({problem}): quote it, "
            f"e.g. --set '{key}=\"...\"'"
        ) from None
    return segments, value


def _apply_override(raw: dict, text: Any) -> None:
    """Set one dotted key in the raw mapping, making the mappings on the way if needed.

    A quantity written as ``trace:`` (null) and a loss written as a name are widened to
    mappings, so ``quantities.trace.probes=10`` and ``loss.from_logits=true`` just work.
    """
    segments, value = _parse_override(text)
    node = raw
    for depth, segment in enumerate(segments[:-1]):
        dotted = ".".join(segments[: depth + 1])
        child = node.get(segment)
        if child is None:
            child = node[segment] = {}
        elif dotted == "loss" and isinstance(child, str):
            child = node[segment] = {"name": child}
        elif not isinstance(child, dict):
            raise InputError(
                f"--set {text!r}: {dotted} is {show(child)}, not a mapping: "
                f"set {dotted} as a whole instead, e.g. --set '{dotted}={{...}}'"
            )
        node = child
    node[segments[-1]] = value


# --------------------------------------------------------------------------------------------
# Validation


def load_job(source: Any, overrides: list[str] | tuple = ()) -> JobSpec:
    """Read a job (a YAML file path, or a mapping), apply ``--set`` overrides, validate it.

    A mapping's relative paths are relative to the current directory; it is not modified.
    Overrides are applied to the raw mapping before validation, so an override is checked
    exactly like the key it replaces.
    """
    if isinstance(source, Mapping):
        raw = copy.deepcopy(dict(source))
        base_dir, job_path = os.getcwd(), None
    elif isinstance(source, (str, os.PathLike)):
        shown = os.fspath(source)
        job_path = os.path.abspath(os.path.expanduser(shown))
        raw = _read_job_file(job_path, shown)
        base_dir = os.path.dirname(job_path)
    else:
        raise InputError(
            f"a job must be a YAML file path or a mapping, got {show(source)}: pass the path"
        )
    if isinstance(overrides, str):
        overrides = [overrides]
    for text in overrides:
        _apply_override(raw, text)
    return parse_job(raw, base_dir, job_path)


def parse_job(raw: dict, base_dir: str, job_path: str | None = None) -> JobSpec:
    """Validate a raw job mapping and resolve it: defaults filled, paths made absolute.

    ``base_dir`` is the folder relative paths are relative to (the job file's folder).
    """
    if not isinstance(raw, dict):
        raise InputError(
            f"a job must be a mapping of keys (name, model, ...), got {show(raw)}: "
            "write one key: value per line at the top level"
        )
    base_dir = os.path.abspath(os.path.expanduser(base_dir))
    check_keys(raw, _TOP_KEYS, "")

    name = _required(raw, "name", "", "add e.g. name: digits-mlp")
    if isinstance(name, str) and len(name) > MAX_NAME_LENGTH:
        raise InputError(f"name is {len(name)} characters long, more than the {MAX_NAME_LENGTH} allowed (it becomes "
                         "a folder name): shorten the name in the job file")
    if not isinstance(name, str) or not _JOB_NAME.fullmatch(name) or set(name) == {"."}:
        # The name becomes a folder of the output, hence no spaces, slashes or "..".
        fail("name", "a string of letters, digits, '.', '_' and '-' (not only dots)", name,
              "set it to e.g. digits-mlp (quote it if YAML reads it as a number)")

    def optional(key: str, check: Check) -> Any:
        value = raw.get(key, DEFAULTS[key])
        return check(value, key)

    checkpoints = _checkpoints(raw, base_dir)
    return JobSpec(
        name=name,
        model=ModelSpec(path=checkpoints[0], builder=None, weights=None) if checkpoints else _parse_model(raw, base_dir),
        checkpoints=checkpoints,
        loss=_parse_loss(raw),
        data=_parse_data(raw, base_dir),
        quantities=registry.parse(_required(raw, "quantities", "", "add e.g. quantities: {hessian_diagonal: "
                                                                     "{method: exact}}"), base_dir),
        shards=optional("shards", auto_or_positive_int(8)),
        workers=optional("workers", auto_or_positive_int(8)),
        include_regularization=optional("include_regularization", boolean),
        precision=optional("precision", choice("float32", "float64")),
        seed=optional("seed", _seed),
        variables=optional("variables", _variables),
        output=optional("output", resolved_path(base_dir, "a results directory")),
        limits=_parse_limits(raw),
        job_path=job_path,
    )


def _variables(value: Any, key: str) -> str | tuple[str, ...]:
    if value == "all":
        return value
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        fail(key, "all or a non-empty list of glob patterns over variable paths", value,
             'write e.g. variables: ["dense_2/*"] (validate lists the model\'s variable paths)')
    return tuple(dict.fromkeys(value))


_GLOB = re.compile(r"[*?\[]")


def _checkpoints(raw: dict, base_dir: str) -> tuple[str, ...]:
    """``model:`` as a list of ``.keras`` files or a glob of local ones (contract 6.2): every
    path, resolved, in the list's order (a glob's: sorted by name); ``()`` for one model."""
    model = raw.get("model")
    resolve = resolved_path(base_dir, "a .keras file")
    if isinstance(model, str) and model.endswith(".keras") and _GLOB.search(model) and "://" not in model:
        pattern = resolve(model, "model")
        paths = sorted(glob.glob(pattern))
        if not paths:
            fail("model", "a glob that matches .keras files", model, f"no file matches {pattern}: check the pattern")
        return tuple(paths)
    if not isinstance(model, list):
        return ()
    if not model or not all(isinstance(m, str) and m.endswith(".keras") for m in model):
        fail("model", "a non-empty list of .keras files", model, "write e.g. model: [night-1.keras, night-2.keras]")
    paths = tuple(resolve(m, "model") for m in model)
    if len(set(paths)) != len(paths):
        fail("model", "a list of distinct .keras files", model, "list each checkpoint once")
    return paths


def _parse_model(raw: dict, base_dir: str) -> ModelSpec:
    model = _required(raw, "model", "",
                      'set it to a .keras file or {builder: "pkg.module:function"}')
    if isinstance(model, str):
        if model.endswith(".keras"):
            return ModelSpec(path=resolved_path(base_dir, "a .keras file")(model, "model"),
                             builder=None, weights=None)
        if _CALLABLE.fullmatch(model):
            fix = f'write model: {{builder: "{model}"}}'
        else:
            fix = ('save the model with model.save("model.keras") '
                   'or use {builder: "pkg.module:function"}')
        fail("model", "a .keras file or a mapping with builder", model, fix)
    if not isinstance(model, dict):
        fail("model", "a .keras file or a mapping with builder", model,
              'set it to e.g. models/mlp.keras or {builder: "pkg.module:function"}')
    check_keys(model, _MODEL_KEYS, "model")
    builder = _callable(
        _required(model, "builder", "model", 'add builder: "pkg.module:function"'),
        "model.builder",
    )
    weights = model.get("weights")
    if weights is not None:
        weights = resolved_path(base_dir, "a weights file")(weights, "model.weights")
    return ModelSpec(path=None, builder=builder, weights=weights)


def _check_plain_data(value: Any, key: str) -> None:
    """Loss options go to the manifest (JSON) and to the loss as keyword arguments."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_plain_data(item, key)
        return
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        for item in value.values():
            _check_plain_data(item, key)
        return
    fail(key, "plain YAML data (numbers, strings, booleans, lists, mappings)", value,
          "write it as a plain YAML value")


def _parse_loss(raw: dict) -> LossSpec:
    loss = _required(raw, "loss", "",
                     "set it to a Keras loss name like sparse_categorical_crossentropy")
    if isinstance(loss, str):
        name, options = loss, {}
    elif isinstance(loss, dict):
        name = _required(loss, "name", "loss",
                         "add name: a Keras loss name or \"pkg.module:function\"")
        options = {k: v for k, v in loss.items() if k != "name"}
        for option, value in options.items():
            if not isinstance(option, str) or not option.isidentifier():
                raise InputError(
                    f"unknown key loss.{option}: the keys allowed in loss are name and "
                    "keyword arguments of the loss (identifiers such as from_logits)"
                )
            if option == "reduction":
                raise InputError(
                    "loss.reduction cannot be set: the pipeline needs per-example losses "
                    "(reduction none); remove it"
                )
            _check_plain_data(value, f"loss.{option}")
        options = copy.deepcopy(options)
    else:
        fail("loss", "a loss name or a mapping with name", loss,
              "set it to e.g. sparse_categorical_crossentropy or {name: ..., from_logits: true}")
    key = "loss.name" if isinstance(loss, dict) else "loss"
    if isinstance(name, str) and ":" in name:
        return LossSpec(name=None, options=options, function=_callable(name, key))
    if not isinstance(name, str) or not _KERAS_NAME.fullmatch(name):
        fail(key, 'a Keras loss name or "pkg.module:function"', name,
              "set it to e.g. sparse_categorical_crossentropy or mse")
    return LossSpec(name=name, options=options, function=None)


def _parse_columns(value: Any, key: str, allow_mapping: bool, what: str = "input") -> str | tuple | dict:
    """A column, a non-empty list of distinct columns, or {input_name or output_name: column}."""
    if isinstance(value, str):
        return column_name(value, key)
    if isinstance(value, (list, tuple)) and value:
        columns = tuple(column_name(column, key) for column in value)
        if len(set(columns)) != len(columns):
            fail(key, "a list of distinct columns", value, "list each column once")
        return columns
    if allow_mapping and isinstance(value, dict) and value:
        for input_name, column in value.items():
            if not isinstance(input_name, str) or not input_name.strip():
                fail(key, f"a mapping of model {what} names to columns", value,
                      f"use the model's {what} names as keys")
            column_name(column, f"{key}.{input_name}")
        return dict(value)
    expected = f"a column, a non-empty list of columns or a mapping {{{what}_name: column}}"
    if not allow_mapping:
        expected = "a column or a non-empty list of columns"
    fail(key, expected, value, "name the Parquet column(s) to use")


def _parse_data(raw: dict, base_dir: str) -> DataSpec:
    data = _required(raw, "data", "", "add data: {path: ..., features: ..., labels: ...}")
    return parse_data_spec(data, "data", base_dir)


def parse_data_spec(data: Any, where: str, base_dir: str) -> DataSpec:
    """A dataset mapping with the keys of ``data`` (``where``: its key in the job file, ``data``
    or ``quantities.influence.queries``), checked and resolved against ``base_dir``."""
    data = _mapping(data, where, "{path: data/train/, features: x, labels: y}")
    check_keys(data, _DATA_KEYS, where)
    path = _required(data, "path", where, "set it to a Parquet file, directory or glob")
    features = _required(data, "features", where, "name the column(s) that feed the model")
    labels = _required(data, "labels", where, "name the column(s) of the labels")
    weights = data.get("weights", DEFAULTS["data.weights"])
    limit = data.get("limit", DEFAULTS["data.limit"])
    identity = data.get("id", DEFAULTS["data.id"])
    data_format = choice(*DATA_FORMATS)(data.get("format", DEFAULTS["data.format"]), f"{where}.format")
    schema = data.get("schema", DEFAULTS["data.schema"])
    if data_format == "tfrecord":
        schema = _schema(_required(data, "schema", where, "give each feature's dtype and shape, e.g. "
                                   "schema: {x: {dtype: float32, shape: [64]}, y: {dtype: int64, shape: []}}"),
                         f"{where}.schema")
    elif schema is not None:
        raise InputError(f"{where}.schema describes TFRecord features, but {where}.format is parquet (Parquet files "
                         f"carry their own schema): remove {where}.schema or set {where}.format: tfrecord")
    transform = data.get("transform", DEFAULTS["data.transform"])
    return DataSpec(
        path=resolved_path(base_dir, "the data")(path, f"{where}.path"),
        features=_parse_columns(features, f"{where}.features", allow_mapping=True),
        labels=_parse_columns(labels, f"{where}.labels", allow_mapping=True, what="output"),
        weights=None if weights is None else column_name(weights, f"{where}.weights"),
        batch_size=positive_int(256)(data.get("batch_size", DEFAULTS["data.batch_size"]),
                                      f"{where}.batch_size"),
        limit=None if limit is None else positive_int(1000)(limit, f"{where}.limit"),
        pad_value=_pad_value(data.get("pad_value", DEFAULTS["data.pad_value"]), f"{where}.pad_value"),
        format=data_format,
        schema=schema,
        transform=None if transform is None else _callable(transform, f"{where}.transform"),
        id=None if identity is None else column_name(identity, f"{where}.id"),
    )


def _schema(value: Any, key: str) -> dict:
    """``{feature: {dtype, shape, default}}`` with every entry checked, shapes as lists.

    ``shape: [d1, ...]`` is a ``tf.io.FixedLenFeature``; ``shape: [null]`` a variable-length
    feature (``tf.io.RaggedFeature``), padded per batch like a variable-length list column.
    """
    value = _mapping(value, key, "{x: {dtype: float32, shape: [64]}, y: {dtype: int64, shape: []}}")
    if not value:
        fail(key, "a non-empty mapping", value, "name at least the features and labels")
    schema = {}
    for name, entry in value.items():
        where = f"{key}.{name}"
        column_name(name, key)
        entry = _mapping(entry, where, "{dtype: float32, shape: [64]}")
        check_keys(entry, ("dtype", "shape", "default"), where)
        dtype = choice(*SCHEMA_DTYPES)(_required(entry, "dtype", where, "set it to float32, int64 or string"),
                                       f"{where}.dtype")
        shape = entry.get("shape", [])
        if not isinstance(shape, (list, tuple)) or not all(
                (is_int(d) and d >= 0) or (d is None and i == 0 and len(shape) == 1) for i, d in enumerate(shape)):
            fail(f"{where}.shape", "a list of non-negative sizes, or [null] for a variable-length feature", shape,
                 "write e.g. shape: [64], shape: [] for a scalar or shape: [null]")
        default = entry.get("default")
        if default is not None:
            if shape and shape[0] is None:
                fail(f"{where}.default", "absent for a variable-length feature (a missing one is empty)", default,
                     "remove it")
            _check_plain_data(default, f"{where}.default")
            values = default if isinstance(default, list) else [default]
            kind = {"float32": (int, float), "int64": (int,), "string": (str,)}[dtype]
            size = math.prod(int(d) for d in shape)
            if len(values) != size or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
                fail(f"{where}.default", f"{size} {dtype} value(s) (shape {list(shape)})", default,
                     "give a value of the feature's dtype and shape")
        schema[name] = {"dtype": dtype, "shape": list(shape), "default": default}
    return schema


def _parse_limits(raw: dict) -> LimitsSpec:
    limits = raw.get("limits")
    limits = {} if limits is None else _mapping(limits, "limits", "{hours: 24, memory_gib: auto}")
    check_keys(limits, _LIMITS_KEYS, "limits")
    memory = limits.get("memory_gib", DEFAULTS["limits.memory_gib"])
    if memory != "auto":
        memory = positive_float(16)(memory, "limits.memory_gib")
    return LimitsSpec(hours=positive_float(24)(limits.get("hours", DEFAULTS["limits.hours"]), "limits.hours"),
                      memory_gib=memory, force=boolean(limits.get("force", DEFAULTS["limits.force"]), "limits.force"))


def _pad_value(value: Any, key: str) -> int | float | str:
    ok = isinstance(value, str) or ((is_int(value) or isinstance(value, float)) and math.isfinite(value))
    if not ok:
        fail(key, "a number or a string", value, "set it to e.g. 0 (the value a masking layer skips)")
    return value
