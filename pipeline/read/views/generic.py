"""Any table no view claims (a quantity added without a view of its own): ``show`` prints a
small one in full and names a large one with its row count, so a new quantity shows without
changes to the read side."""

from __future__ import annotations

from pipeline.read.text import aligned, number
from pipeline.read.views._base import Shown, View, claims

# A table without a view of its own is shown in full up to this many rows.
OTHER_ROWS = 20


def generic_show(run, name: str) -> Shown:
    """One table: in full (``OTHER_ROWS`` rows at most), or a line with its row count."""
    rows = run.rows(name)
    title = name.removesuffix(".parquet")
    if rows and len(rows) <= OTHER_ROWS:
        header = list(rows[0])
        return Shown(tables=[(title, aligned([[number(r[c]) if isinstance(r[c], float) else r[c] for c in header]
                                               for r in rows], header, text_columns=0))])
    return Shown(lines=[(title, f"{len(rows)} rows in {name}")])


class GenericView(View):
    """Every table of the run that no registered view lists in its ``files``."""

    def __init__(self, claimed: set[str]):
        self.claimed = claimed

    def present(self, run) -> bool:
        return bool(self._others(run))

    def _others(self, run) -> list[str]:
        return sorted(f for f in set(run.files) if f.endswith(".parquet") and not claims(self.claimed, f))

    def show(self, run) -> Shown:
        shown = Shown()
        for name in self._others(run):
            part = generic_show(run, name)
            shown.tables += part.tables
            shown.lines += part.lines
        return shown
