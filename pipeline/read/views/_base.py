"""The protocol every view of the read side implements, and what its methods return.

A view is one family of published tables (kfac-jax's ``CurvatureBlock`` idea, applied to
reading): it knows its files and how each read command presents them. ``show``, ``compare``,
``history``, ``report`` and ``Run`` loop over the registered views (``pipeline.read.views``)
and name no quantity; each method below defaults to "nothing to add", so a view implements
only what its tables have.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator


@dataclass
class Shown:
    """A view's part of ``show``: titled text tables, and one-line descriptions (``label``,
    ``text``) of tables too large to print, listed after every table."""

    tables: list[tuple[str, str]] = field(default_factory=list)
    lines: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Figure:
    """One plot of ``report``: a matplotlib figure, its PNG file name and its caption."""

    name: str
    caption: str
    figure: Any


@dataclass(frozen=True)
class Section:
    """One HTML section of ``report``; ``place`` orders sections across views on the page."""

    place: int
    html: str


def claims(files, name: str) -> bool:
    """Whether a view's ``files`` claim the published file ``name``: it is listed, or it lies
    under a folder listed with its trailing slash (``per_example/`` claims
    ``per_example/part-00000.parquet``), since a folder of parts is one output."""
    return name in files or any(f.endswith("/") and name.startswith(f) for f in files)


class View:
    """One family of published tables and how each read command presents it.

    ``files``: the tables it reads (``show`` gives any other table to the generic view), a
    folder of parts named with its trailing slash (``claims``);
    ``compared``: those whose numbers ``compare`` pairs.
    ``access``: a mixin class whose methods ``Run`` gains (``run.kfac(layer)``), so the Python API
    of a family lives with its view. ``page``: its place on the report's page and among
    ``history``'s series (views are otherwise taken in registry order).
    """

    files: tuple[str, ...] = ()
    # The files whose numbers ``compare`` pairs; a run that has them and another that does not
    # are named in a warning.
    compared: tuple[str, ...] = ()
    access: type = object
    page: int = 0

    def present(self, run) -> bool:
        """Whether ``run`` published any of its tables."""
        return any(run.has(name) for name in self.files)

    # ------------------------------------------------------------------ show
    def show(self, run) -> Shown:
        """Its text tables and one-line descriptions for ``show``."""
        return Shown()

    def notebook(self, run) -> str:
        """HTML a notebook shows under the run's facts (``Run._repr_html_``)."""
        return ""

    def export(self, run) -> dict:
        """``export --format npz``: its arrays, ``{"KEY/VARIABLE_PATH": array}`` (contract 6.3)."""
        return {}

    # ------------------------------------------------------------------ compare
    def changes(self, comparison, run_a, run_b) -> list:
        """``compare``: its numbers' ``Change`` rows for two runs that both hold its tables;
        warnings go to ``comparison.warnings``."""
        return []

    # ------------------------------------------------------------------ history
    def series(self, run) -> tuple[dict[str, float], dict[str, float]]:
        """``history``: one run's ``{series: value}`` and ``{series: absolute change that is no
        change}`` (an eigenvalue's residual)."""
        return {}, {}

    # ------------------------------------------------------------------ report
    def figures(self, run, baseline, context: dict) -> Iterator[Figure]:
        """``report``: its plots, drawn one at a time. ``context`` holds the report's options
        (``sigma``) and what a view computes once for its plots and its page (a block's
        eigenvalues)."""
        return iter(())

    def sections(self, run, baseline, drawn: list[Figure], context: dict) -> list[Section]:
        """``report``: its HTML sections, showing the figures it drew (``drawn``)."""
        return []
