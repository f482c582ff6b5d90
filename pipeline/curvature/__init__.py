"""The curvature math: TensorFlow only, no Ray, no Parquet.

``engine.CurvatureEngine`` turns one batch into additive float64 partial sums
(``pipeline.partial.Partial``) of the building blocks a ``requests.BatchWork`` asks for;
``adapter.ModelAdapter`` is the one place that calls the model and the loss (as Keras does);
``model`` loads the model and makes the copy that computes in the job's precision; ``losses``
resolves the job's loss; ``probe`` is the plan's trial run on the first rows.

The package itself imports nothing, so that ``pipeline.curvature.requests`` (TensorFlow-free)
can be imported without TensorFlow.
"""

import os

# TensorFlow reads it once, at its first import, and prints CUDA/absl start-up lines without it
# (PITFALLS.md); every module that imports TensorFlow in the driver is in this package.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
