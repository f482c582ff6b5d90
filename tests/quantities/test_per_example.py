"""``per_example``'s options, plan lines and disk estimate (the end-to-end tests are in
``test_influence.py``)."""

from __future__ import annotations

import pytest

from pipeline.errors import InputError
from pipeline.quantities._base import PlanFacts
from pipeline.quantities.per_example import FOLDER, UNIT


def test_options_plan_lines_and_disk():
    options = UNIT.parse({"projection": 16, "projection_dtype": "float16"}, "quantities.per_example", ".")
    assert options == {"projection": 16, "projection_dtype": "float16", "seed": 0}
    assert UNIT.files == (FOLDER + "/",) and UNIT.per_layer(options) == "optional"
    assert UNIT.disk_bytes(options, 1000) == 1000 * (48 + 16 * 2)
    facts = PlanFacts(parameters=23, batches=1, route=None, per_example_route=None,
                      variable_sizes={"d/kernel": 12, "d/bias": 3, "n/gamma": 8},
                      variable_shapes=((4, 3), (3,), (8,)), factor_layers=(("d", 4, 3, 1, True),), rows=1000)
    line, = UNIT.notes(options, facts)
    assert "projection of 16 (float16) per example: d " in line and "__rest__" in line and "1,000 rows" in line
    with pytest.raises(InputError, match="quantities.per_example.projection must be an integer of 0 or more"):
        UNIT.parse({"projection": -1}, "quantities.per_example", ".")
