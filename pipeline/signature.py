"""What the storage layer needs to know about a model, without importing TensorFlow.

The curvature engine builds a ``ModelSignature`` from a Keras model; the data reader uses it
to turn Parquet columns into arrays of the right shapes, in the order of ``model.inputs`` and
``model.outputs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | None, ...]  # without the batch dimension
    dtype: str  # numpy dtype name, e.g. "float32", "int32"


@dataclass(frozen=True)
class ModelSignature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Parameters, in the contract's flattening order (model.trainable_variables, C order).
    variables: tuple[str, ...] = field(default=())
    variable_shapes: tuple[tuple[int, ...], ...] = field(default=())
    # For dict-structured outputs: the dict keys, in ``outputs`` order (accepted as output
    # names beside ``model.output_names``).
    output_aliases: tuple[str, ...] = field(default=())

    def output_index(self, name: str) -> int | None:
        """Position of the output called ``name`` (an output name or a dict key), or None."""
        for index, spec in enumerate(self.outputs):
            if spec.name == name:
                return index
        if name in self.output_aliases:
            return self.output_aliases.index(name)
        return None

    @property
    def parameters(self) -> int:
        total = 0
        for shape in self.variable_shapes:
            size = 1
            for dim in shape:
                size *= dim
            total += size
        return total
