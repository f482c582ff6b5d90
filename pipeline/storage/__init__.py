"""Storage: PyArrow only (no TensorFlow, no Ray).

One URI rule (``uri.py``), the run layout (``layout.py``), reading the dataset
(``dataset.py``), result tables (``tables.py``), durable staging of finished shards
(``staging.py``) and atomic publishing and reading of a run (``publish.py``).
"""
