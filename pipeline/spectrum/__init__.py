"""Curvature of H from block matrix-vector products alone: trace, extreme eigenvalues, spectrum.

NumPy only (no TensorFlow, no Ray). Every estimator takes ``matvec(V) -> H V`` on the rows of
``V`` (``[K, P]`` float64) and the size ``P``; one call is one distributed pass over the
dataset, so each algorithm puts as many vectors in a pass as it can and reports its cost as
``passes`` (calls) and ``matvecs`` (Hessian-vector products).

==========================  =============================  ====================================
function                    method                         passes
==========================  =============================  ====================================
``hutchinson_trace``        Hutchinson 1989                ``ceil(probes / max_block)``
``hutchpp_trace``           Meyer, Musco, Musco, Woodruff  2 (3 when a pass would exceed
                            2021 (Hutch++)                 ``max_block``)
``exact_trace``             sum of the exact diagonal      0 (the diagonal's own)
``top_eigenvalues``         block Lanczos, full            ``<= iterations + 1``
                            reorthogonalisation
``spectral_density``        stochastic Lanczos quadrature  ``steps``
                            (Ubaru et al. 2017; Ghorbani
                            et al. 2019)
==========================  =============================  ====================================

Each is also written step by step (``top_eigenvalues_steps``, ``hutchinson_steps``,
``hutchpp_steps``, ``spectral_density_steps``: generators that yield the vectors to multiply),
so that ``side_by_side`` can run one per diagonal block of H in the same passes.
"""

from pipeline.spectrum._base import CountingOperator, drive, side_by_side
from pipeline.spectrum.lanczos import EigenResult, default_block, top_eigenvalues, top_eigenvalues_steps
from pipeline.spectrum.slq import SpectrumResult, density, spectral_density, spectral_density_steps
from pipeline.spectrum.trace import (TraceResult, exact_trace, hutchinson_steps, hutchinson_trace,
                                     hutchpp_steps, hutchpp_trace, trace_passes)

__all__ = [
    "CountingOperator",
    "EigenResult",
    "SpectrumResult",
    "TraceResult",
    "default_block",
    "density",
    "drive",
    "exact_trace",
    "hutchinson_steps",
    "hutchinson_trace",
    "hutchpp_steps",
    "hutchpp_trace",
    "side_by_side",
    "spectral_density",
    "spectral_density_steps",
    "top_eigenvalues",
    "top_eigenvalues_steps",
    "trace_passes",
]
