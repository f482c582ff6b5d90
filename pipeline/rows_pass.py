"""The rows pass: per-example outputs and influence (contract 7), after every other pass.

``per_example`` and ``influence`` need one more pass over the training data whose results are
per example, not sums: the workers write each shard's ``per_example/`` part as they go (staged
beside the run's partials, so a resumed run keeps the finished shards' parts) and return their
top-k rows per query, which the pool merges exactly. Influence first needs its query gradients:
one worker reads the query set and returns ``g_q`` ``[Q, P]``; the driver turns them into
``v_q = (C + lambda I)^-1 g_q`` (the unit's ``Preconditioner``) and ships ``V`` once with the
pass's request. Orchestration only (Ray through the pool, NumPy): no TensorFlow here.
"""

from __future__ import annotations

import dataclasses
import time

from pipeline.curvature.requests import RowsRequest
from pipeline.quantities.influence import query_spec
from pipeline.storage import parts

ASKING = ("per_example", "influence")


def asked(quantities: dict) -> bool:
    """Whether the job asks for anything the rows pass computes."""
    return any(name in quantities for name in ASKING)


def request_of(plan, results: dict) -> RowsRequest:
    """The pass's request from the job's ``per_example`` and ``influence`` options."""
    per = plan.job.quantities.get("per_example")
    influence = plan.job.quantities.get("influence")
    pre = results["influence"]["preconditioner"] if influence else None
    self_influence = bool(influence and influence["self"])
    return RowsRequest(
        projection=per["projection"] if per else 0, projection_dtype=per["projection_dtype"] if per else "float32",
        seed=per["seed"] if per else 0, self_influence=self_influence,
        structured=not (influence and influence["curvature"] == "ggn"),
        top_k=influence["top_k"] if influence else 0,
        dense_scores=bool(influence and influence["scores"] == "dense"),
        write=bool(per) or self_influence, files=tuple(zip(plan.data.files, plan.data.names)),
        arrays=pre.worker_arrays() if self_influence else {})


def run(plan, pool, results: dict, store, stream, provenance: dict) -> dict:
    """Runs the pass; returns what it adds to ``results``: ``per_example`` (its parts and
    entries) and, with influence, ``influence["topk"]`` and ``influence["queries"]``."""
    job = plan.job
    request = request_of(plan, results)
    influence = job.quantities.get("influence")
    added: dict = {}
    if influence:
        began = time.perf_counter()
        queries = pool.call_one("query_gradients", (query_spec(influence), RowsRequest(gradients=True,
                                                                                         structured=False)))
        pre = results["influence"]["preconditioner"]
        vectors = pre.apply(queries["gradients"])
        stream.write(f"influence: {len(vectors):,} query gradients, preconditioned ({pre.curvature}) in "
                     f"{time.perf_counter() - began:.1f} s\n")
        request = dataclasses.replace(request, vectors=vectors)
    rows_store = store.for_pass("rows")
    folder = store.folder
    reducer = pool.map_shards("rows", (request, folder, provenance), f"{job.name} (per example)", stream,
                              store=rows_store)
    if request.write:
        added["per_example"] = {"parts": parts.list_parts(f"{folder}/per_example"), "request": request,
                                "resumed": len(pool.last_resumed)}
        added["per_example"]["entry"] = manifest_entry(plan, added["per_example"])
    if influence:
        added["influence"] = {**results["influence"], "queries": len(vectors),
                              "topk": {"tops": reducer.total.tops, "origins": plan.data.origins,
                                       "query_ids": queries["ids"]},
                              "dense": parts.list_parts(f"{folder}/influence_scores")
                              if request.dense_scores else []}
    return added


def manifest_entry(plan, result: dict) -> dict:
    """The manifest's ``per_example`` entry (contract 7.1): rows, parts, the projection, columns."""
    request = result["request"]
    columns = ["row", "file", "file_row"] + (["id"] if plan.job.data.id else []) + ["weight", "loss",
                                                                                    "gradient_norm"]
    columns += ["self_influence"] if request.self_influence else []
    columns += ["projection"] if request.projection else []
    return {"per_example": {"rows": plan.data.rows, "parts": len(result["parts"]), "projection": request.projection,
                            "projection_dtype": request.projection_dtype, "columns": columns,
                            "resumed_parts": result["resumed"]}}


def provenance_of(plan, started_at: str, versions: dict) -> dict:
    """The provenance a part carries (what is known before the run ends: no loss or examples)."""
    return {"run_id": plan.run_id, "date": plan.date, "job": plan.job.to_dict(), "parameters": plan.parameters,
            "model": {"sha256": plan.model_sha256}, "data": {"fingerprint": plan.data.fingerprint,
                                                              "rows": plan.data.rows},
            "versions": versions, "started_at": started_at}
