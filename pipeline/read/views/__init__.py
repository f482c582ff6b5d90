"""The registry of views: one per family of published tables (``pipeline.read.views._base.View``).

``VIEWS`` is the order in which ``show``, ``compare``, ``export`` and ``Run`` take them; ``on_page()`` the
order of the report's page and of ``history``'s series (``View.page``). Adding a family to the
read side is one module here and one line in ``VIEWS``; a table that no view lists falls to the
generic view (``show`` prints it). ``ACCESSORS`` are the views' mixins that ``Run`` is built from.
"""

from __future__ import annotations

from pipeline.read.views._base import Figure, Section, Shown, View, claims
from pipeline.read.views.diagonals import DiagonalsView
from pipeline.read.views.examples import ExamplesView
from pipeline.read.views.generic import GenericView
from pipeline.read.views.hessian_blocks import HessianView
from pipeline.read.views.kronecker import KroneckerView
from pipeline.read.views.spectral import SpectralView
from pipeline.read.views.trace import TraceView
from pipeline.read.views.vectors import VectorsView

_FAMILIES: tuple[View, ...] = (
    DiagonalsView(),
    TraceView(),
    VectorsView(),
    SpectralView(),
    KroneckerView(),
    HessianView(),
    ExamplesView(),
)
VIEWS: tuple[View, ...] = _FAMILIES + (GenericView({name for view in _FAMILIES for name in view.files}),)
ACCESSORS: tuple[type, ...] = tuple(view.access for view in _FAMILIES)


def on_page() -> list[View]:
    """The views in the order of the report's page and ``history``'s series."""
    return sorted(VIEWS, key=lambda view: view.page)


__all__ = ["ACCESSORS", "VIEWS", "Figure", "Section", "Shown", "View", "claims", "on_page"]
