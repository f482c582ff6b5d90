"""Bundled, deterministic example: a small "digits" MLP and its Parquet dataset."""
