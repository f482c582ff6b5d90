"""Curvature handed to the tools that consume it: arrays keyed by variable path (``npz``), the
diagonal Laplace approximation (``laplace``), Fisher-weighted merging (``merge``) and an EWC
penalty for Keras training (``ewc``). ``npz`` and ``laplace`` are numpy only; ``weights``,
``merge`` and ``ewc`` load or build Keras models."""
