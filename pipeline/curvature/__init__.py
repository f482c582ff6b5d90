"""The curvature math: TensorFlow only, no Ray, no Parquet.

``CurvatureEngine`` turns one batch into additive float64 partial sums
(``pipeline.partial.Partial``) of every quantity in the contract.
"""

from pipeline.curvature.adapter import ModelAdapter, model_signature
from pipeline.curvature.engine import BatchWork, CurvatureEngine
from pipeline.curvature.losses import PerExampleLoss, resolve_loss
from pipeline.curvature.model import load_model, model_builder, to_precision

__all__ = [
    "BatchWork",
    "CurvatureEngine",
    "ModelAdapter",
    "PerExampleLoss",
    "load_model",
    "model_builder",
    "model_signature",
    "resolve_loss",
    "to_precision",
]
