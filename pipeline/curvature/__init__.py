"""The curvature math: TensorFlow only, no Ray, no Parquet.

``CurvatureEngine`` turns one batch into additive float64 partial sums
(``pipeline.partial.Partial``) of every quantity in the contract.
"""

from pipeline.curvature.engine import BatchWork, CurvatureEngine
from pipeline.curvature.losses import PerExampleLoss, resolve_loss
from pipeline.curvature.model import load_model, model_signature, to_precision

__all__ = [
    "BatchWork",
    "CurvatureEngine",
    "PerExampleLoss",
    "load_model",
    "model_signature",
    "resolve_loss",
    "to_precision",
]
