"""The read side: a published run, loaded (``run``: ``pipeline.load``), shown as text (``show``),
compared with another (``compare``, nightly drift), drawn (``report``) and followed over time
(``history``). Each family of published tables is a view (``pipeline.read.views``) that every
read command loops over. PyArrow, pandas and matplotlib; no TensorFlow, no Ray."""
