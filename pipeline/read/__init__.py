"""The read side: a published run, loaded (``run``: ``pipeline.load``), shown as text (``show``),
compared with another (``compare``, nightly drift) and drawn (``report``). PyArrow, pandas and
matplotlib; no TensorFlow, no Ray."""
