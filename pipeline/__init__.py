"""hessian-pipeline: curvature statistics of Keras models over whole datasets, on Ray."""

__version__ = "0.1.0"
