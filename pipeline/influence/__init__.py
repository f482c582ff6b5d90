"""Influence of training examples and per-example outputs (contract section 7): the NumPy side.

``layout`` splits the parameters into the blocks the curvature and the projection treat alike
(a factored layer's ``[d_A, d_S]`` weight matrix, the rest flat); ``projection`` draws ``Phi``
from the seed alone; ``preconditioner`` turns the K-FAC, EK-FAC, dense GGN or identity curvature
into ``(C + lambda I)^-1``; ``topk`` keeps and merges the top-k rows per query exactly. No
TensorFlow and no Ray here: the engine (``pipeline.curvature.example_rows``) and the driver share
these.
"""
