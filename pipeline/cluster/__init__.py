"""The cluster: Ray only (no TensorFlow math, no Parquet).

``connect`` starts or joins Ray and turns SIGTERM into an orderly stop; ``pool.WorkerPool`` runs
passes over the data on ``worker.ShardWorker`` actors with its failure policy (``policy``);
``progress`` draws a pass; ``processes`` watches the local Ray's own processes through
``/proc``; ``submit`` sends a run to a cluster as a Ray Job.
"""
