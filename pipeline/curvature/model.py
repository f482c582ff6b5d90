"""Loading the model the user names, and the copy that computes in the job's ``precision``."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import warnings
import zipfile

import keras
import numpy as np
import tensorflow as tf

from pipeline import memory
from pipeline.callables import import_callable
from pipeline.errors import InputError, InputWarning


def hide_gpus() -> None:
    """Keeps this process off the GPUs (the driver's plan, a CPU worker on a GPU node: Ray does
    not hide GPUs from actors that ask for none, PITFALLS.md). Before TensorFlow's first op."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass  # already initialised in this process: it keeps what it has


def model_builder(model_spec):
    """The job's ``model.builder`` as a callable, or None for a ``.keras`` file."""
    return import_callable(model_spec.builder, "model builder") if model_spec.builder else None


def _call_builder(build, reference: str):
    try:
        model = build()
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code: any failure is the user's input
        raise InputError(f"model builder {reference!r} failed: {type(exc).__name__}: {str(exc)[:150]}: fix the builder "
                         "so that it returns a keras.Model".replace("\n", " ")) from None
    if not isinstance(model, keras.Model):
        raise InputError(f"model builder {reference!r} returned {type(model).__name__}, not a keras.Model")
    return model


# A builder that ends its process (os.abort(), os._exit(), a crash in native code) would end the
# command that called it with no error line: ``load_model(isolate=True)`` (the driver, validate)
# first calls it once in a child process, where its death can be seen and reported.
BUILDER_SECONDS = float(os.environ.get("HESSIAN_PIPELINE_BUILDER_SECONDS", "600"))
_CHILD = """
import json, os, sys
sys.path[:] = json.loads(sys.argv[2])
from pipeline.callables import import_callable
try:
    import_callable(sys.argv[1], "model builder")()
except BaseException:
    pass  # raised: called again in the parent, whose message names the exception
sys.stdout.write(sys.argv[3] + "\\n")
sys.stdout.flush()
os._exit(0)
"""
_SURVIVED: set[str] = set()  # builders already seen to return, in this process


def _check_builder_returns(reference: str) -> None:
    """Calls the builder in a child process; an ``InputError`` when that process dies in it."""
    if reference in _SURVIVED:
        return
    marker = secrets.token_hex(8)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}  # no GPU memory taken
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, reference, json.dumps(sys.path), marker],
                              capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                              timeout=BUILDER_SECONDS)
    except subprocess.TimeoutExpired:
        raise InputError(f"model builder {reference!r} did not return within {BUILDER_SECONDS:.0f} s: fix the builder "
                         "(or raise HESSIAN_PIPELINE_BUILDER_SECONDS)") from None
    if marker not in done.stdout.split():
        code = done.returncode
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        raise InputError(f"model builder {reference!r} ended the process that called it ({how}: os.abort(), os._exit() "
                         "or a crash in native code) instead of returning a keras.Model: fix the builder")
    _SURVIVED.add(reference)


def load_model(model_spec, fetch=None, isolate: bool = False):
    """Loads a ``.keras`` file with ``safe_mode`` on, or calls a builder and loads weights.

    ``model_spec`` has ``path``, ``builder`` and ``weights`` (``pipeline.job.ModelSpec``).
    ``fetch(path) -> local path`` gets a file's bytes onto this machine (the storage layer's
    ``local_copy``, for URIs); without it paths are read as local files.
    Raises ``InputError`` naming the file and the way out when the model cannot be loaded.
    With ``isolate``, a builder is first called in a child process (``_check_builder_returns``).
    """
    if model_spec.builder:
        if isolate:
            _check_builder_returns(model_spec.builder)
        model = _call_builder(model_builder(model_spec), model_spec.builder)
        if model_spec.weights:
            local = fetch(model_spec.weights) if fetch else model_spec.weights
            try:
                model.load_weights(local)
            except Exception as exc:  # noqa: BLE001
                raise InputError(
                    f"weights file {model_spec.weights} does not fit the built model ({exc}): "
                    "save them from the same architecture (a subclassed model must be built, by calling "
                    "it once, before its weights load)".replace("\n", " ")
                ) from None
        return model
    local = fetch(model_spec.path) if fetch else model_spec.path
    if not zipfile.is_zipfile(local):  # Keras would say "File not found" about a file that exists
        raise InputError(f"model {model_spec.path} is not a Keras 3 model file (a .keras file is a zip archive): "
                         "save it with model.save('name.keras')")
    check_archive(local, model_spec.path)
    try:
        return keras.models.load_model(local, safe_mode=True, compile=False)
    except Exception as exc:  # noqa: BLE001
        raise _load_error(model_spec.path, exc) from None


# Keras stores a .keras archive's members uncompressed (zipfile's default) and float weights
# deflate by about 1.1x if re-zipped: a member that inflates 100-fold is no model's. Keras
# reads the weights member into memory whole, so one larger than the free memory cannot load.
MAX_INFLATION = 100
_SMALL_MEMBER = 64 << 20  # below this, any ratio (config.json compresses well)


def check_archive(local: str, shown: str) -> None:
    """Refuses a ``.keras`` archive by its central directory alone, before any member is read
    (a 4 MB file declaring a 4 GiB member took 132 s and 4.7 GiB to fail): ``InputError``
    naming the member and its declared size when it inflates over ``MAX_INFLATION`` times its
    stored bytes, or when the members declare more than this machine's free memory."""
    try:
        with zipfile.ZipFile(local) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"model {shown} is not a readable zip archive ({exc}): save it again with "
                         "model.save('name.keras')") from None
    for info in members:
        if info.file_size > _SMALL_MEMBER and info.file_size > MAX_INFLATION * max(info.compress_size, 1):
            raise InputError(f"model {shown}: member {info.filename!r} declares {info.file_size / 2**30:.2f} GiB "
                             f"stored in {info.compress_size / 2**20:.1f} MiB, which no Keras file does: the file is "
                             "damaged or hostile; save the model again with model.save('name.keras')")
    total = sum(info.file_size for info in members)
    free = memory.available_bytes()
    if total > free:
        largest = max(members, key=lambda info: info.file_size)
        raise InputError(f"model {shown}: its members declare {total / 2**30:.2f} GiB (member {largest.filename!r} "
                         f"{largest.file_size / 2**30:.2f} GiB), more than the {free / 2**30:.2f} GiB this machine has "
                         "free: run where more memory is free")


def _load_error(path: str, exc: Exception) -> InputError:
    """The one-line reason a ``.keras`` file did not load, and the way out."""
    text = " ".join(str(exc).split())
    if "safe_mode" in text or "unsafe" in text.lower():
        return InputError(
            f"model {path} needs safe_mode off (it holds arbitrary code, e.g. a Lambda layer): give "
            "model: {builder: 'pkg.module:function', weights: ...} instead")
    unknown = re.search(r"(?:Could not locate (?:class|function)|Unknown (?:layer|object)[^']*)\s*'([^']+)'", text)
    if unknown:
        return InputError(
            f"model {path} uses the custom class or function {unknown.group(1)!r}, which is not registered in this "
            "process: give model: {builder: 'pkg.module:function', weights: ...} with a builder that "
            "imports it, or register it (keras.saving.register_keras_serializable) in a module the builder imports")
    return InputError(f"model {path} cannot be loaded ({type(exc).__name__}: {text[:300]}): check that it was "
                      "saved by Keras 3 with model.save('name.keras')")


def each_example_alone(model):
    """Returns ``model`` computing each example on its own (contract 1), or raises ``InputError``.

    - A recurrent layer with ``stateful=True`` carries its state from one call to the next,
      even in inference (PITFALLS.md), and the engine calls the model many times: its
      ``stateful`` is turned off, so that every call starts from a zero state, as its
      ``stateful=False`` twin computes each example (the state Keras kept, saved or not, is
      not used).
    - A float8-quantized layer (``layer.quantize("float8")``) is refused: Keras makes its scale
      and amax-history variables trainable and rounds its backward pass to e5m2, so neither the
      variables nor the derivatives are those of the model's function.
    """
    for layer in model._flatten_layers(include_self=False):  # Keras has no public walk
        if getattr(layer, "quantization_mode", None) == "float8":
            raise InputError(
                f"layer {layer.name!r} is float8-quantized (quantize('float8')): Keras makes its scale and "
                "amax-history variables trainable and rounds its backward pass to e5m2, so no derivative through it "
                "is exact: measure the model saved before quantize('float8')")
        if isinstance(layer, keras.layers.RNN) and layer.stateful:
            layer.stateful = False
    return model


def warn_float32_inside(model, precision: str) -> None:
    """An ``InputWarning`` naming the layers that compute in float32 whatever ``precision`` asks:
    ``UpSampling2D`` and ``Resizing`` with a non-nearest interpolation call ``tf.image.resize``,
    which computes in float32 (a 1e-12 change of a float64 input leaves its output unchanged)."""
    if precision != "float64":
        return
    found = [layer.name for layer in model._flatten_layers(include_self=False)
             if isinstance(layer, (keras.layers.UpSampling2D, keras.layers.Resizing))
             and getattr(layer, "interpolation", "nearest") != "nearest"]
    if found:
        warnings.warn(f"layer {found[0]!r}{f' and {len(found) - 1} more' if len(found) > 1 else ''} resizes with "
                      "tf.image.resize, which computes in float32 even in a float64 run: derivatives through it are "
                      "accurate to about 1e-7, not 1e-15 (interpolation='nearest' stays float64)", InputWarning,
                      stacklevel=2)


def _retype(config, dtype: str):
    """Rewrites every floating dtype (and dtype policy) in a serialized Keras config."""
    if isinstance(config, dict):
        out = {}
        for key, value in config.items():
            if key == "dtype" and isinstance(value, str) and value.startswith(("float", "bfloat", "mixed")):
                out[key] = dtype
            elif key == "dtype" and isinstance(value, dict) and value.get("class_name", "").endswith("DTypePolicy"):
                # A quantized policy (QuantizedDTypePolicy, int8/int4/float8) names the dtype it
                # computes in ``source_name`` and takes no ``name`` key (PITFALLS.md).
                inner = value.get("config", {})
                field = "source_name" if "source_name" in inner else "name"
                # An integer policy (Hashing, IntegerLookup with int outputs) stays as it is.
                out[key] = {**value, "config": {**inner, field: dtype}} if _floating(inner.get(field, "float")) \
                    else value
            else:
                out[key] = _retype(value, dtype)
        return out
    if isinstance(config, list):
        return [_retype(item, dtype) for item in config]
    return config


def _floating(dtype) -> bool:
    name = str(getattr(dtype, "name", dtype))
    return name.startswith(("float", "bfloat", "mixed"))


def precision_mismatch(model, precision: str) -> str | None:
    """What in ``model`` does not compute in ``precision`` (a layer or variable), or None.

    A layer under a ``mixed_float16``/``mixed_bfloat16`` policy computes in half precision
    although its variables are float32 (PITFALLS.md): its compute dtype is what counts.
    """
    for layer in model._flatten_layers(include_self=False):  # Keras' own walk over nested layers
        if isinstance(layer, keras.Model):
            continue  # a nested model computes nothing itself: its own layers are in the walk
        if isinstance(layer, keras.layers.InputLayer):
            given = _output_dtype(layer, "int32")  # a float input of another dtype rounds the data
            if _floating(given) and given != precision:
                return f"input {layer.name!r} takes {given}"
            continue
        compute = layer.dtype_policy.compute_dtype
        if not _floating(_output_dtype(layer, compute)):
            continue  # StringLookup, Hashing...: a float policy, but no float arithmetic to redo
        if _floating(compute) and compute != precision:
            return f"layer {layer.name!r} computes in {compute}"
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.Model):
            continue
        for variable in layer._trainable_variables + layer._non_trainable_variables:
            if _floating(variable.dtype) and variable.dtype != precision:
                if layer.dtype_policy.variable_dtype == precision:
                    # The policy asks for ``precision`` and the layer made another dtype anyway.
                    lora = " (Keras keeps LoRA weights in float32)" if "lora" in variable.path else ""
                    return (f"layer {layer.name!r} ({type(layer).__name__}) creates variable {variable.path!r} "
                            f"as {variable.dtype} whatever the dtype policy{lora}")
                return f"variable {variable.path!r} is {variable.dtype}"
    for variable in model.weights:
        if _floating(variable.dtype) and variable.dtype != precision:
            return f"variable {variable.path!r} is {variable.dtype}"
    return None


def _output_dtype(layer, default):
    """The dtype of a layer's (first) output in a functional graph, else ``default``."""
    try:
        output = layer.output
    except (AttributeError, ValueError):
        return default
    first = output[0] if isinstance(output, (list, tuple)) and output else output
    return getattr(first, "dtype", default)


def to_precision(model, precision: str, builder=None):
    """Returns the model computing in ``precision`` (``float32`` or ``float64``).

    A model that already computes in ``precision`` is returned as it is. Otherwise a copy is
    made and given the original weights (variables keep their order, so the contract's
    flattening is unchanged): by calling ``builder`` again under a ``precision`` dtype policy
    (builder models, subclassed ones included), else by rebuilding from the serialized config
    with every floating dtype and policy set to ``precision``. This covers float64 runs and
    mixed-precision models under ``precision: float32``. Raises ``InputError`` naming the
    layer when no copy computes in ``precision``.
    """
    if precision_mismatch(model, precision) is None:
        return model
    copy = None
    problems = []
    if builder is not None:
        # floatx too: keras.Input((6,)) takes floatx, not the dtype policy.
        previous, previous_floatx = keras.config.dtype_policy(), keras.config.floatx()
        keras.config.set_dtype_policy(precision)
        keras.config.set_floatx(precision)
        try:
            copy = _call_builder(builder, getattr(builder, "__name__", "builder"))
        finally:
            keras.config.set_floatx(previous_floatx)
            keras.config.set_dtype_policy(previous)
        problem = precision_mismatch(copy, precision)
        if problem:
            problems.append(f"rebuilt under a {precision} policy, {problem}")
            copy = None
    if copy is None:
        try:
            config = _retype(keras.saving.serialize_keras_object(model), precision)
            # A builder is user code already trusted to run; a .keras file keeps safe_mode on.
            copy = keras.saving.deserialize_keras_object(config, safe_mode=builder is None)
            if not copy.built:
                copy.build(model.inputs[0].shape if len(model.inputs) == 1 else [i.shape for i in model.inputs])
        except Exception as exc:  # noqa: BLE001 - any failure to rebuild is reported as one line
            problems.append(f"rebuilt from its config, {type(exc).__name__}: {exc}")
            copy = None
        else:
            problem = precision_mismatch(copy, precision)
            if problem:
                problems.append(f"rebuilt from its config, {problem}")
                copy = None
    if copy is None:
        raise _no_copy(precision, problems)
    try:
        copy.set_weights([np.asarray(w, dtype=precision if np.asarray(w).dtype.kind == "f" else None)
                          for w in model.get_weights()])
    except Exception as exc:  # noqa: BLE001
        if problems:  # the builder's copy was refused first: its reason is the real one (a config copy lost LoRA)
            raise _no_copy(precision, problems) from None
        raise InputError(f"the {precision} copy of the model does not take its weights ({str(exc)[:150]}): give a "
                         "builder that builds the same architecture every time".replace("\n", " ")) from None
    _copy_layer_state(model, copy)
    return copy


def _no_copy(precision: str, problems: list[str]) -> InputError:
    """Why no copy of the model computes in ``precision``, and the way out."""
    other = "float32" if precision == "float64" else "float64"
    if any("whatever the dtype policy" in problem for problem in problems):
        way_out = (f"use precision: {other}" + (", or merge the LoRA weights into the kernel before saving"
                                                 if any("LoRA" in p for p in problems) else ""))
    else:
        way_out = (f"remove fixed dtypes from its layers, or give a builder model (model: {{builder: ...}}), "
                   f"or use precision: {other}")
    # The first problem, cut: a rebuild's exception can run to thousands of characters.
    cause = "; ".join(problem if len(problem) <= 160 else problem[:157] + "..." for problem in problems[:1])
    return InputError(f"cannot compute the model in {precision} ({cause}): {way_out}".replace("\n", " "))


def _copy_layer_state(model, copy) -> None:
    """Gives the copy's layers the state that ``set_weights`` does not carry.

    ``set_weights`` assigns variables only: an adapted ``Normalization`` derives its mean and
    variance tensors from them in ``finalize_state()`` (which Keras' loader calls, and
    ``set_weights`` does not: a float64 copy computed with the unadapted statistics), and the
    vocabulary of a ``StringLookup``/``IntegerLookup``/``TextVectorization`` lives in assets, not
    variables. ``finalize_state`` runs on the layers that own variables (their state derives from
    them). Layers are paired in Keras' walk order (the copy has the original's structure).
    Whatever is still different is caught by ``copy_mismatch`` on the data's first rows.
    """
    pairs = zip(model._flatten_layers(include_self=False), copy._flatten_layers(include_self=False))
    for original, twin in pairs:
        if type(original) is not type(twin):
            return  # not the same structure: copy_mismatch names the layer that differs
        if callable(getattr(original, "save_assets", None)) and callable(getattr(twin, "load_assets", None)):
            with tempfile.TemporaryDirectory() as assets:
                original.save_assets(assets)
                twin.load_assets(assets)
        # Only where set_weights changed something to derive from: a Discretization keeps its
        # boundaries in its config, and finalize_state would recompute them from an empty summary.
        if twin.weights and callable(getattr(twin, "finalize_state", None)):
            twin.finalize_state()


def _agrees(got, want, tolerance: float) -> bool:
    scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-30)
    return bool(np.all(np.isfinite(got) == np.isfinite(want))) and \
        float(np.max(np.abs(np.where(np.isfinite(want), got - want, 0.0)), initial=0.0)) <= tolerance * scale


# Relative agreement between the original model's outputs and its copy's, by the original's
# compute dtype: the copy computes more exactly, so the original's own rounding sets the bound
# (a float16 model rounds each layer to ~5e-4). A copy that lost a layer's state is off by O(1).
COPY_TOLERANCE = {"float16": 3e-2, "bfloat16": 1e-1, "float32": 1e-4, "float64": 1e-9}


def copy_mismatch(model, copy, inputs, copy_inputs) -> str | None:
    """None when ``copy`` (``to_precision``'s) computes on ``copy_inputs`` what ``model`` computes
    on ``inputs`` (the same rows, packed as each model is called, floats in each model's input
    dtype), else the first layer whose output differs, with the relative error.

    Both models run in inference mode; outputs are compared relative to their largest entry,
    within ``COPY_TOLERANCE`` of the original's compute dtype. A functional model is compared
    layer by layer (the first layer that differs is named); another model by its outputs.
    Cost: two forward passes over ``inputs`` (a few rows).
    """
    if copy is model:
        return None
    # The least exact layer sets the bound: its rounding reaches every layer after it.
    tolerance = max([COPY_TOLERANCE.get(str(layer.dtype_policy.compute_dtype), 1e-4)
                     for layer in model._flatten_layers(include_self=True)], default=1e-4)
    try:
        names, want, got = _layer_outputs(model, copy, inputs, copy_inputs)
    except Exception:  # noqa: BLE001 - a model Keras cannot cut into layers: compare the outputs
        names = ["the model's outputs"]
        want = [keras.tree.flatten(model(inputs, training=False))]
        got = [keras.tree.flatten(copy(copy_inputs, training=False))]
    for name, a, b in zip(names, want, got):
        for x, y in zip(a, b):
            x, y = np.asarray(x), np.asarray(y)
            if x.dtype.kind not in "fc":
                if not np.array_equal(x, y):
                    return f"{name} (its outputs differ)"
                continue
            x, y = x.astype(np.float64), y.astype(np.float64)
            if not _agrees(y, x, tolerance):
                scale = max(float(np.max(np.abs(x), initial=0.0)), 1e-30)
                error = float(np.max(np.abs(np.nan_to_num(y - x)), initial=0.0)) / scale
                return f"{name} (relative error {error:.2g})"
    return None


def _as_list(outputs):
    return outputs if isinstance(outputs, list) else [outputs]


def _layer_outputs(model, copy, inputs, copy_inputs):
    """Names and outputs of every layer of two functional models on ``inputs``, in graph order."""
    layers = [layer for layer in model._flatten_layers(include_self=False, recursive=False)
              if not isinstance(layer, keras.layers.InputLayer)]
    twins = [layer for layer in copy._flatten_layers(include_self=False, recursive=False)
             if not isinstance(layer, keras.layers.InputLayer)]
    probe = keras.Model(model.inputs, [layer.output for layer in layers])
    twin_probe = keras.Model(copy.inputs, [layer.output for layer in twins])
    want = [keras.tree.flatten(o) for o in _as_list(probe(inputs, training=False))]
    got = [keras.tree.flatten(o) for o in _as_list(twin_probe(copy_inputs, training=False))]
    return [f"layer {layer.name!r}" for layer in layers], want, got
