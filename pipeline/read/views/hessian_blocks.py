"""Dense blocks of H: ``hessian.parquet`` (one row per row of a block: ``block``, ``variable``,
``index``, ``row``), read as float64 matrices (``run.hessian(block)``).

- ``show``: the table as any table (in full when small, else its row count).
- ``report``: per block, a heat map on a symmetric log colour scale (linear below 1e-4 of its
  largest entry, so that signs and orders of magnitude both show), pooled to at most
  ``HEAT_CELLS`` cells a side, with the block's variables marked; the histogram of its
  eigenvalues (``numpy.linalg.eigvalsh``); and a table of each block's trace and extreme
  eigenvalues.
"""

from __future__ import annotations

import numpy as np

from pipeline.blocks import ALL
from pipeline.read import pages
from pipeline.read.figures import BINS, RUN_COLOR, default_style, fmt, new_figure, slug
from pipeline.read.views._base import Figure, Section, Shown, View
from pipeline.read.views.generic import generic_show

HESSIAN = "hessian"


class HessianAccess:
    """``Run``'s dense Hessian blocks."""

    def hessian(self, block: str = ALL) -> np.ndarray:
        """One dense block of ``hessian.parquet`` as a float64 ``[b, b]`` matrix, rows and columns
        in the block's flat order (``"__all__"`` for ``blocks: full``; a variable path or a
        layer name otherwise)."""
        part = self.block(HESSIAN, block)
        return np.stack([np.asarray(row, dtype=np.float64) for row in part["row"]])


class HessianView(View):
    files = (f"{HESSIAN}.parquet",)
    access = HessianAccess
    page = 50

    def show(self, run) -> Shown:
        return generic_show(run, self.files[0]) if run.has(HESSIAN) else Shown()

    def figures(self, run, baseline, context):
        # An eigendecomposition of a 10,000-parameter block takes minutes: once, for the plot and the page.
        spectra = context.setdefault(HESSIAN, {block: hessian_spectrum(run, block) for block in hessian_blocks(run)})
        for k, (block, spectrum) in enumerate(spectra.items(), start=1):
            yield Figure(f"hessian-{k:02d}-{slug(block)}.png", f"block {block}", plot_hessian(run, block, spectrum))

    def sections(self, run, baseline, drawn, context):
        if not drawn:
            return [Section(50, "<h2>Hessian blocks</h2>\n<p>Not computed.</p>\n")]
        rows = [[block, f"{len(values):,}", fmt(values.sum()), fmt(values[-1]), fmt(values[0])]
                for block, (_, values) in context[HESSIAN].items()]
        return [Section(50, "<h2>Hessian blocks</h2>\n" + pages.table(
            ["block", "parameters", "trace", "largest eigenvalue", "smallest eigenvalue"], rows,
            numeric={1, 2, 3, 4}) + pages.figures([(f.name, f.caption) for f in drawn]))]


def hessian_blocks(run) -> list[str]:
    """The blocks of ``hessian.parquet``, in the order published."""
    return run.blocks(HESSIAN) if run.has(HESSIAN) else []


def hessian_spectrum(run, block: str) -> tuple[np.ndarray, np.ndarray]:
    """A block of ``hessian.parquet`` and its eigenvalues (``numpy.linalg.eigvalsh``, ascending)."""
    matrix = run.hessian(block)
    return matrix, np.linalg.eigvalsh(matrix)


#: A heat map shows at most this many cells a side: a larger block is pooled (k x k parameters per
#: cell, the entry of largest magnitude, sign kept), since drawing 2,080 rows into ~270 pixels
#: drops most of them and reads as noise.
HEAT_CELLS = 208


def pooled(matrix: np.ndarray, cells: int = HEAT_CELLS) -> tuple[np.ndarray, int]:
    """``(matrix pooled to at most cells x cells, k)``: each cell the largest-magnitude entry (its
    sign kept) of a ``k x k`` tile; ``k = 1`` for a block of at most ``cells`` parameters."""
    size = matrix.shape[0]
    k = max(1, -(-size // cells))
    if k == 1:
        return matrix, 1
    padded = np.zeros((-(-size // k) * k,) * 2)
    padded[:size, :size] = matrix
    n = padded.shape[0] // k
    tiles = padded.reshape(n, k, n, k).transpose(0, 2, 1, 3).reshape(n, n, k * k)
    return np.take_along_axis(tiles, np.abs(tiles).argmax(axis=2)[..., None], axis=2)[..., 0], k


@default_style
def plot_hessian(run, block: str = "__all__", spectrum: tuple[np.ndarray, np.ndarray] | None = None):
    """One dense Hessian block: a heat map on a symmetric log colour scale (linear below 1e-4 of
    its largest entry, so that signs and orders of magnitude both show), pooled to at most
    ``HEAT_CELLS`` cells a side (``pooled``), with the block's variables marked by lines and
    named on the axis; and the histogram of its eigenvalues. ``spectrum``:
    ``hessian_spectrum(run, block)`` when the caller has it already (an eigendecomposition of a
    10,000-parameter block takes minutes)."""
    from matplotlib.colors import SymLogNorm  # lazy: pipeline.read.figures says why

    matrix, eigenvalues = spectrum if spectrum is not None else hessian_spectrum(run, block)
    size = matrix.shape[0]
    scale = max(float(np.abs(matrix).max()), 1e-300)
    cells, k = pooled(matrix)
    figure = new_figure()
    heat, counts = figure.subplots(1, 2, width_ratios=[1.25, 1.0])
    extent = (-0.5, size - 0.5, size - 0.5, -0.5)  # axes in parameters, whatever the pooling
    image = heat.imshow(cells, cmap="RdBu_r", interpolation="nearest", extent=extent,
                        norm=SymLogNorm(linthresh=1e-4 * scale, vmin=-scale, vmax=scale))
    ticks = [sign * scale * 10.0 ** -power for sign in (-1, 1) for power in (0, 2, 4)] + [0.0]
    figure.colorbar(image, ax=heat, shrink=0.85, ticks=sorted(ticks), format="%.0e")
    names = run.block(HESSIAN, block)["variable"].tolist()  # each row's variable, in block order
    bounds = [i for i in range(1, len(names)) if names[i] != names[i - 1]]
    for edge in bounds:
        heat.axhline(edge - 0.5, color="#333333", linewidth=0.6)
        heat.axvline(edge - 0.5, color="#333333", linewidth=0.6)
    starts = [0, *bounds]
    if 1 < len(starts) <= 12:
        middles = [(a + b) / 2 for a, b in zip(starts, [*bounds, size])]
        heat.set_yticks(middles, [names[a] for a in starts], fontsize=6)
    pooling = f", {k} x {k} per cell (largest |entry|)" if k > 1 else ""
    heat.set_title(f"H of {block} ({size:,} x {size:,}{pooling})", fontsize=8)
    heat.set_xlabel("parameter (block order; lines: variables)", fontsize=8)
    counts.hist(eigenvalues, bins=min(BINS, max(10, size // 2)), color=RUN_COLOR)
    counts.set_yscale("log")
    counts.set_xlabel("eigenvalue")
    counts.set_ylabel("count")
    counts.set_title(f"eigenvalues: {eigenvalues[0]:.3g} to {eigenvalues[-1]:.3g}, trace {eigenvalues.sum():.4g}",
                     fontsize=9)
    return figure
