"""Loading the model the user names, and the float64 copy used for ``precision: float64``."""

from __future__ import annotations

import importlib
import os

import numpy as np

from pipeline.errors import InputError
from pipeline.signature import ModelSignature, TensorSpec


def import_callable(reference: str, what: str):
    """Imports ``"pkg.module:function"``; an ``InputError`` names the reference otherwise."""
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise InputError(f"{what} {reference!r} is not of the form 'pkg.module:function': fix it")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's input
        raise InputError(
            f"{what} {reference!r}: cannot import module {module_name!r} ({type(exc).__name__}: "
            f"{exc}); make it importable (installed, or on PYTHONPATH)"
        ) from None
    target = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise InputError(f"{what} {reference!r}: module {module_name!r} has no {attr!r}: fix the name")
    if not callable(target):
        raise InputError(f"{what} {reference!r} is not callable: name a function")
    return target


def _local_copy(path: str) -> str:
    """Keras loads from local files only: a URI is copied to a temporary file first."""
    if "://" not in path or path.startswith("file://"):
        local = path[len("file://"):] if path.startswith("file://") else path
        if not os.path.exists(local):
            raise InputError(f"model file {path} not found: check the job's 'model' path")
        return local
    import tempfile

    import pyarrow.fs as pafs

    try:
        filesystem, inner = pafs.FileSystem.from_uri(path)
        suffix = os.path.basename(inner)
        handle, local = tempfile.mkstemp(suffix="-" + suffix)
        with os.fdopen(handle, "wb") as out, filesystem.open_input_stream(inner) as src:
            out.write(src.read())
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"model file {path} cannot be read ({exc}): check the URI and credentials") from None
    return local


def load_model(model_spec):
    """Loads a ``.keras`` file with ``safe_mode`` on, or calls a builder and loads weights.

    ``model_spec`` has ``path``, ``builder`` and ``weights`` (``pipeline.job.ModelSpec``).
    """
    import keras

    if model_spec.builder:
        build = import_callable(model_spec.builder, "model builder")
        try:
            model = build()
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"model builder {model_spec.builder!r} failed: {type(exc).__name__}: {exc}") from None
        if not isinstance(model, keras.Model):
            raise InputError(f"model builder {model_spec.builder!r} returned {type(model).__name__}, not a keras.Model")
        if model_spec.weights:
            local = _local_copy(model_spec.weights)
            try:
                model.load_weights(local)
            except Exception as exc:  # noqa: BLE001
                raise InputError(
                    f"weights file {model_spec.weights} does not fit the built model ({exc}): "
                    "save them from the same architecture"
                ) from None
        return model
    local = _local_copy(model_spec.path)
    import zipfile

    if not zipfile.is_zipfile(local):  # Keras would say "File not found" about a file that exists
        raise InputError(f"model {model_spec.path} is not a Keras 3 model file (a .keras file is a zip archive): "
                         "save it with model.save('name.keras')")
    try:
        return keras.models.load_model(local, safe_mode=True, compile=False)
    except ValueError as exc:
        if "safe_mode" in str(exc) or "unsafe" in str(exc).lower():
            raise InputError(
                f"model {model_spec.path} needs safe_mode off (it holds arbitrary code, e.g. a Lambda "
                "layer): give {builder: 'pkg.module:function', weights: ...} instead"
            ) from None
        raise InputError(f"model {model_spec.path} cannot be loaded: {exc}".replace("\n", " ")) from None
    except Exception as exc:  # noqa: BLE001
        raise InputError(
            f"model {model_spec.path} is not a Keras 3 model file ({type(exc).__name__}): "
            "save it with model.save('name.keras')"
        ) from None


def _retype(config, dtype: str):
    """Rewrites every floating dtype (and dtype policy) in a serialized Keras config."""
    if isinstance(config, dict):
        out = {}
        for key, value in config.items():
            if key == "dtype" and isinstance(value, str) and value.startswith(("float", "bfloat", "mixed")):
                out[key] = dtype
            elif key == "dtype" and isinstance(value, dict) and value.get("class_name", "").endswith("DTypePolicy"):
                out[key] = {**value, "config": {**value.get("config", {}), "name": dtype}}
            else:
                out[key] = _retype(value, dtype)
        return out
    if isinstance(config, list):
        return [_retype(item, dtype) for item in config]
    return config


def to_precision(model, precision: str):
    """Returns the model computing in ``precision`` (a float64 copy for ``float64``).

    The copy is rebuilt from the model's serialized config with every floating dtype set to
    float64, then given the original weights. Variables keep their order, so the parameter
    flattening of the contract is unchanged.
    """
    import keras

    if precision == "float32":
        return model
    config = _retype(keras.saving.serialize_keras_object(model), precision)
    try:
        copy = keras.saving.deserialize_keras_object(config, safe_mode=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(
            f"cannot rebuild the model in {precision} ({type(exc).__name__}: {exc}): "
            "use precision: float32, or a builder model".replace("\n", " ")
        ) from None
    if not copy.built:
        copy.build(model.inputs[0].shape if len(model.inputs) == 1 else [i.shape for i in model.inputs])
    copy.set_weights([np.asarray(w, dtype=np.float64 if np.asarray(w).dtype.kind == "f" else None)
                      for w in model.get_weights()])
    return copy


def model_signature(model) -> ModelSignature:
    """Names, shapes and dtypes of the model's inputs, outputs and trainable variables."""
    def spec(tensor, fallback):
        name = getattr(tensor, "name", None) or fallback
        name = name.split(":")[0]
        shape = tuple(None if d is None else int(d) for d in tensor.shape[1:])
        dtype = str(getattr(tensor, "dtype", "float32"))
        dtype = dtype.replace("<dtype: '", "").replace("'>", "")
        return TensorSpec(name=name, shape=shape, dtype=dtype)

    inputs = tuple(spec(t, f"input_{i}") for i, t in enumerate(model.inputs))
    outputs = tuple(spec(t, f"output_{i}") for i, t in enumerate(model.outputs))
    # Output names as users see them: the producing layer's name.
    output_names = list(getattr(model, "output_names", None) or [])
    if len(output_names) == len(outputs):
        outputs = tuple(TensorSpec(n, o.shape, o.dtype) for n, o in zip(output_names, outputs))
    variables = tuple(v.path for v in model.trainable_variables)
    shapes = tuple(tuple(int(d) for d in v.shape) for v in model.trainable_variables)
    return ModelSignature(inputs=inputs, outputs=outputs, variables=variables, variable_shapes=shapes)
