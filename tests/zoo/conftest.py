"""Makes ``tests/zoo`` importable (``zoo_models``, and ``zoo_losses`` for the user-loss case)
and prints the zoo's measured errors at the end of a run."""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
for folder in (os.path.dirname(HERE), HERE):  # tests/ (cases.py) and tests/zoo
    if folder not in sys.path:
        sys.path.insert(0, folder)


def pytest_terminal_summary(terminalreporter):
    zoo_models = sys.modules.get("zoo_models")
    rows = getattr(zoo_models, "MEASURED", None)
    if not rows:
        return
    quantities = ["loss", "gradient", "hessian_diagonal", "hvp", "hessian", "ggn_diagonal", "fisher_diagonal"]
    terminalreporter.section("model zoo: max |engine - reference| / max |reference| per quantity")
    header = f"{'case':<46}{'prec':<8}" + "".join(f"{q[:12]:>13}" for q in quantities) + f"{'max':>11}"
    terminalreporter.write_line(header)
    for (case, precision), errors in sorted(rows.items()):
        line = f"{case:<46}{precision:<8}" + "".join(f"{errors.get(q, float('nan')):>13.2e}" for q in quantities)
        terminalreporter.write_line(line + f"{max(errors.values()):>11.2e}")
