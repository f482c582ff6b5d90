"""A published run reduced to what must not change when the code is reorganised: every
Parquet file's schema and values (as bytes), its provenance, and the manifest, without what
differs between two runs of one job (run id, date, clock times, process names, measured
memory and the measured timing in the estimate).

``python tests/canonical.py RUN_DIR > tests/golden/example.json`` records a run (made by
``tests/system/test_layers.py``'s command on the code before a refactor); the test compares a new run
with it. Reads only PyArrow and JSON, so it works on any version's output.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

# Differ between two runs of one job, by design.
RUN_FIELDS = ("run_id", "date", "started_at", "finished_at", "seconds", "worker_names", "memory", "estimate",
              "timings", "per_worker")
# Manifest and provenance fields that name the machine or the checkout, not the result.
PLACE_FIELDS = ("job", "model", "data", "versions")


def _without(document: dict) -> dict:
    return {k: v for k, v in document.items() if k not in RUN_FIELDS + PLACE_FIELDS}


def canonical(run_dir: str) -> dict:
    """``{file: digest...}`` of a published run, ids and timestamps left out."""
    with open(os.path.join(run_dir, "manifest.json"), encoding="utf-8") as handle:
        manifest = json.load(handle)
    out = {"manifest": _without(manifest),
           "job": {k: v for k, v in manifest["job"].items() if k not in ("model", "data", "output")},
           "model_sha256": manifest["model"]["sha256"], "rows": manifest["data"]["rows"],
           "files": {}}
    for name in sorted(manifest["files"]):
        table = pq.read_table(os.path.join(run_dir, name))
        provenance = json.loads(table.schema.metadata[b"hessian_pipeline"])
        plain = table.replace_schema_metadata(None)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, plain.schema) as writer:
            writer.write_table(plain)
        out["files"][name] = {
            "schema": str(plain.schema),
            "rows": plain.num_rows,
            "sha256": hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest(),
            "provenance": _without(provenance),
        }
    return out


if __name__ == "__main__":
    json.dump(canonical(sys.argv[1]), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
