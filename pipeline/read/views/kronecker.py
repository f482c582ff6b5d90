"""Kronecker factors: ``layer_inputs.parquet`` (each layer's input second moment ``A``),
``kfac.parquet`` (K-FAC's ``A`` and ``S`` per layer, ``S_stderr`` with ``fisher_type: mc``) and
``kfac_eigen.parquet`` (EK-FAC's eigenvalues), contract 6.1. A factor is stored one row per
``index`` in a ``row`` list column and read as a float64 matrix.

- ``show``: one line per table naming each layer's factors and their sizes.
- ``report``: the eigenvalues of each factor by rank (how fast each layer's input and
  output-gradient spectra decay), and a table of their traces, extreme eigenvalues and
  condition numbers.
"""

from __future__ import annotations

import numpy as np

from pipeline.read import pages
from pipeline.read.figures import default_style, fmt, new_figure
from pipeline.read.views._base import Figure, Section, Shown, View

LAYER_INPUTS, KFAC, KFAC_EIGEN = "layer_inputs", "kfac", "kfac_eigen"


class KroneckerAccess:
    """``Run``'s Kronecker factors, per layer (its path as the plan names it: ``run.blocks("kfac")``)."""

    def layer_inputs(self, layer: str) -> np.ndarray:
        """A layer's input second moment ``A`` (``layer_inputs.parquet``) as a float64 ``[d, d]``
        matrix; ``layer`` is its path as the plan names it (``run.blocks("layer_inputs")``)."""
        return self.matrix(LAYER_INPUTS, layer)

    def kfac(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """A layer's K-FAC factors ``(A, S)`` (``kfac.parquet``) as published (contract 6.1). They
        approximate its curvature block at a scale: ``kron(A, S) / R`` with ``reduction: expand``
        (R positions per example), ``kron(A, S)`` with ``reduce``; ``kfac_curvature`` applies it."""
        return self.matrix(KFAC, layer, "A"), self.matrix(KFAC, layer, "S")

    def kfac_stderr(self, layer: str) -> np.ndarray:
        """The standard error of a layer's ``S`` (``fisher_type: mc`` only; ``factor`` "S_stderr"
        of ``kfac.parquet``), entry by entry, ``[d_out, d_out]``. ``KeyError`` for another
        fisher_type (its S is exact for its labels)."""
        part = self.block(KFAC, layer)
        if not (part["factor"] == "S_stderr").any():
            raise KeyError(f"layer {layer!r} has no S_stderr: only kfac with fisher_type: mc has one")
        return self.matrix(KFAC, layer, "S_stderr")

    def kfac_curvature(self, layer: str, max_dimension: int = 4096) -> np.ndarray:
        """The dense K-FAC approximation of a layer's GGN/Fisher block (contract 6.1), ``[D, D]``
        with ``D = d_A * d_S`` in the engine's flat order (kernel ``[d_in, d_out]`` in C order,
        then the bias):

            C_l = kron(A, S) / R   (reduction: expand; R = manifest layer_positions[layer])
            C_l = kron(A, S)       (reduction: reduce)

        the approximation of kfac-jax, curvlinops and Grosse & Martens (2016): for a linear
        layer under mse, where K-FAC expand is exact, ``C_l`` is the layer's GGN block (a test
        shows it to 1e-8). ``kron(A, S)`` alone is R times too large for a layer with R > 1
        positions (a Conv, a Dense on a sequence). Memory: ``8 D^2`` bytes; ``ValueError`` above
        ``max_dimension``, ``KeyError`` for a layer without factors."""
        a, s = self.kfac(layer)
        size = len(a) * len(s)
        if size > max_dimension:
            raise ValueError(f"layer {layer!r}: its K-FAC block is {size:,} x {size:,} ({8 * size * size / 2**30:.1f} "
                             f"GiB); use its factors (run.kfac), or raise max_dimension")
        positions = 1.0
        if self.options(KFAC).get("reduction", "expand") == "expand":
            positions = float(self.manifest["layer_positions"][layer])
        return np.kron(a, s) / positions

    def kfac_eigen(self, layer: str) -> np.ndarray:
        """A layer's EK-FAC eigenvalues ``[d_A, d_S]`` (``kfac_eigen.parquet``): entry ``(a, c)``
        belongs to ``Q_A[:, a] (x) Q_S[:, c]``, the eigenvectors ``numpy.linalg.eigh`` gives for
        the published ``A`` and ``S``."""
        a, s = self.kfac(layer)
        part = self.block(KFAC_EIGEN, layer)
        return part.sort_values("index")["value"].to_numpy(np.float64).reshape(len(a), len(s))


class KroneckerView(View):
    files = (f"{LAYER_INPUTS}.parquet", f"{KFAC}.parquet", f"{KFAC_EIGEN}.parquet")
    access = KroneckerAccess
    page = 60

    def show(self, run) -> Shown:
        shown = Shown()
        for name in (LAYER_INPUTS, KFAC):
            if not run.has(name):
                continue
            rows = run.rows(name, ["block", "factor"] if name == KFAC else ["block"])
            sizes: dict = {}
            for r in rows:
                key = (r["block"], r.get("factor", "A"))
                sizes[key] = sizes.get(key, 0) + 1
            layers = dict.fromkeys(block for block, _ in sizes)
            described = "; ".join(f"{layer} " + ", ".join(f"{factor} {n:,} x {n:,}" for (b, factor), n in sizes.items()
                                                          if b == layer) for layer in layers)
            extra = ", EK-FAC eigenvalues in kfac_eigen.parquet" if name == KFAC and run.has(KFAC_EIGEN) else ""
            shown.lines.append((name, f"{len(layers)} layers ({described}) in {name}.parquet{extra} "
                                      f"(run.{name}(layer))"))
        return shown

    def figures(self, run, baseline, context):
        factors = context.setdefault(KFAC, factor_spectra(run))
        if factors:
            yield Figure("factors.png", "eigenvalues of each layer's factors", plot_factor_spectra(factors))

    def sections(self, run, baseline, drawn, context):
        factors = context.get(KFAC)
        if not factors:
            return [Section(60, "<h2>Kronecker factors</h2>\n<p>Not computed (layer_inputs or kfac).</p>\n")]
        rows = [[layer, factor, f"{values.size:,}", fmt(values.sum()), fmt(values[0]), fmt(values[-1]),
                 fmt(values[0] / values[-1]) if values[-1] > 0 else "∞"] for layer, factor, values in factors]
        return [Section(60, "<h2>Kronecker factors</h2>\n" + pages.table(
            ["layer", "factor", "size", "trace", "largest eigenvalue", "smallest eigenvalue", "condition number"],
            rows, numeric={2, 3, 4, 5, 6}) + pages.figures([(f.name, f.caption) for f in drawn]))]


def factor_spectra(run) -> list[tuple[str, str, np.ndarray]]:
    """``(layer, factor, eigenvalues descending)`` of every published factor: ``A`` of
    ``layer_inputs.parquet`` (named "inputs"), then ``A`` and ``S`` of ``kfac.parquet``, per layer
    in model order (``numpy.linalg.eigvalsh``)."""
    out = []
    if run.has(LAYER_INPUTS):
        out += [(layer, "inputs", np.linalg.eigvalsh(run.layer_inputs(layer))[::-1])
                for layer in run.blocks(LAYER_INPUTS)]
    if run.has(KFAC):
        for layer in run.blocks(KFAC):
            a, s = run.kfac(layer)
            out += [(layer, "A", np.linalg.eigvalsh(a)[::-1]), (layer, "S", np.linalg.eigvalsh(s)[::-1])]
    return out


@default_style
def plot_factor_spectra(spectra: list[tuple[str, str, np.ndarray]]):
    """The eigenvalues of each factor by rank, one line per (layer, factor), log scale (the
    factors are positive semi-definite; an eigenvalue at or below 1e-14 of its factor's largest
    is drawn at that floor): how fast each layer's input and output-gradient spectra decay."""
    figure = new_figure()
    axes = figure.subplots()
    for number, (layer, factor, values) in enumerate(spectra):
        top = max(float(values[0]) if values.size else 0.0, 1e-300)
        axes.plot(np.arange(1, values.size + 1), np.maximum(values, 1e-14 * top), marker=".", linewidth=1.2,
                  linestyle="-" if factor != "S" else "--", label=f"{layer} {factor}",
                  color=f"C{number % 10}")
    axes.set_yscale("log")
    axes.set_xlabel("rank")
    axes.set_ylabel("eigenvalue")
    axes.set_title("Kronecker factors: eigenvalues by rank (A solid, S dashed)", fontsize=9)
    axes.legend(fontsize=7, ncol=2)
    return figure
