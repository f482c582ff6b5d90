"""What the storage layer needs to know about a model, without importing TensorFlow.

The curvature engine builds a ``ModelSignature`` from a Keras model; the data reader uses it
to turn Parquet columns into arrays of the right shapes, in the order of ``model.inputs`` and
``model.outputs``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace

from pipeline.errors import InputError


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

    def select(self, patterns) -> tuple[list[int], "ModelSignature"]:
        """The variables matched by any of the glob ``patterns`` (``"dense_2/*"``, ``"*/kernel"``:
        ``fnmatch`` over ``variable.path``), in model order: their positions, and this signature
        with only them. ``patterns`` "all" (or None) selects every variable. A pattern that
        matches nothing is an ``InputError`` listing the variable paths."""
        if patterns in (None, "all"):
            chosen, selected = list(range(len(self.variables))), self
        else:
            chosen, selected = self._matching(patterns)
        repeated = sorted({name for name in selected.variables if selected.variables.count(name) > 1})
        if repeated:
            # Every result is keyed by the variable path (contract 1): two variables with one path
            # would be merged in the tables and in blocks. Nested models can repeat a layer name.
            raise InputError(f"the model has several trainable variables with the path {repeated[0]!r}"
                             f"{f' (and {len(repeated) - 1} more repeated paths)' if len(repeated) > 1 else ''}: "
                             "results are keyed by variable path, so they would be merged; give the layers unique "
                             "names (e.g. Dense(..., name=\"head_dense\")) and save the model again")
        return chosen, selected

    def _matching(self, patterns) -> tuple[list[int], "ModelSignature"]:
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in self.variables):
                shown = ", ".join(self.variables[:20]) + (", ..." if len(self.variables) > 20 else "")
                raise InputError(f"variables: pattern {pattern!r} matches no trainable variable (the model's are: "
                                 f"{shown}): fix the pattern, e.g. {self.variables[-1].rsplit('/', 1)[0]}/*")
        chosen = [i for i, name in enumerate(self.variables) if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
        return chosen, replace(self, variables=tuple(self.variables[i] for i in chosen),
                               variable_shapes=tuple(self.variable_shapes[i] for i in chosen))
