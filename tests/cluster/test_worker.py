"""``ShardWorker`` built in this process on a tiny saved Keras model and real Parquet shards:
its partial sums against the loss and gradient computed directly with Keras, its shards kept
in memory between passes, and the piece of a shard whose bytes changed. Its constructor asks
Ray for the node it runs on, so the file starts a local Ray of its own (``ray_local``)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

import jobs
from pipeline.cluster.worker import ShardResult, ShardWorker
from pipeline.curvature.requests import BatchWork
from pipeline.errors import InputError
from pipeline.job import load_job
from pipeline.storage.dataset import plan_data

pytestmark = pytest.mark.slow  # a local Ray (the worker asks it for its node)
WORK = BatchWork(gradient=True, sum_grad_squared=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("worker")
    jobs.write_model(str(root / "model.keras"), dtype="float64")
    x, labels, weights = jobs.write_data(str(root / "data"), rows=120, files=3, row_group=10)
    job = load_job(jobs.job(root, {"gradient": {}}, data={"weights": "weight", "batch_size": 16}))
    plan = plan_data(job.data, shards=3)
    return job, plan, x, labels, weights


@pytest.fixture(scope="module")
def worker(ray_local, files):
    job, plan, *_ = files
    return ShardWorker(job, plan.uri, 1, False)


def _direct(job, rows, x, labels, weights):
    """Sums over ``rows`` computed with Keras alone: sum_i s_i l_i, sum_i s_i g_i, sum_i s_i g_i**2."""
    model = keras.models.load_model(job.model.path)
    loss = total = squares = 0.0
    gradient = None
    for i in rows:
        with tf.GradientTape() as tape:
            li = keras.losses.sparse_categorical_crossentropy(labels[i:i + 1], model(x[i:i + 1]), from_logits=True)[0]
        g = np.concatenate([np.ravel(v) for v in tape.gradient(li, model.trainable_variables)])
        loss += weights[i] * float(li)
        gradient = weights[i] * g if gradient is None else gradient + weights[i] * g
        squares = squares + weights[i] * g * g
        total += weights[i]
    return loss, gradient, squares, total


def test_a_shards_partial_is_the_sum_over_its_rows(worker, files):
    job, plan, x, labels, weights = files
    shard = plan.shards[1]
    result = worker.compute(shard, WORK)
    assert isinstance(result, ShardResult) and result.index == 1 and result.seconds > 0
    assert result.worker == worker.name and result.node == worker.node_id
    assert len(result.digests) == len(shard.pieces)  # read from the files: one digest per piece
    rows = range(shard.first_row, shard.first_row + shard.rows)
    loss, gradient, squares, total = _direct(job, rows, x, labels, weights)
    part = result.partial
    assert part.examples == shard.rows and part.batches == -(-shard.rows // 16)
    assert part.weight_sum == pytest.approx(total, rel=1e-13)
    assert part.sums["loss"] == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(part.sums["gradient"], gradient, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(part.sums["sum_grad_squared"], squares, rtol=1e-10, atol=1e-12)


def test_the_shards_add_up_to_the_whole_dataset(worker, files):
    job, plan, x, labels, weights = files
    results = [worker.compute(shard, BatchWork(gradient=True)) for shard in plan.shards]
    assert sum(r.partial.examples for r in results) == len(x) == plan.rows
    loss = sum(r.partial.sums["loss"] for r in results)
    expected = np.sum(weights * keras.losses.sparse_categorical_crossentropy(
        labels, keras.models.load_model(job.model.path)(x), from_logits=True).numpy())
    assert loss == pytest.approx(expected, rel=1e-12)


def test_info_names_the_worker_and_the_model(worker):
    info = worker.info()
    assert info["worker"] == f"{os.uname().nodename}:{os.getpid()}"
    assert info["gpus"] == 0 and info["parameters"] == 6 * 5 + 5 + 5 * 3 + 3
    assert info["node_id"] == worker.node_id and worker.probe_memory() > 0


def test_shards_kept_in_memory_come_back_with_the_digests_they_were_read_with_and_the_same_sums(ray_local, files):
    """A later staged pass (the rows pass) stages a shard served from memory with the digests of
    the bytes it was read from, so that a resumed run can check them (it once got none)."""
    job, plan, *_ = files
    worker = ShardWorker(job, plan.uri, 1, False)
    shard = plan.shards[0]
    once = worker.compute(shard, WORK)
    again = worker.compute(shard, WORK)
    assert again.digests == once.digests != ()  # nothing kept by default (a one-pass run)
    worker.keep_shards(1 << 30)
    read = worker.compute(shard, WORK)
    kept = worker.compute(shard, WORK)
    assert read.digests == once.digests and kept.digests == once.digests
    for key, value in once.partial.sums.items():
        np.testing.assert_array_equal(kept.partial.sums[key], value)
    assert kept.partial.examples == once.partial.examples


def test_a_shard_that_does_not_fit_is_read_again(ray_local, files):
    job, plan, *_ = files
    worker = ShardWorker(job, plan.uri, 1, False)
    worker.keep_shards(100)  # bytes: less than one batch
    shard = plan.shards[0]
    worker.compute(shard, WORK)
    assert worker.compute(shard, WORK).digests != ()


def test_the_changed_piece_of_a_shard_is_found(ray_local, tmp_path):
    jobs.write_model(str(tmp_path / "model.keras"), dtype="float64")
    jobs.write_data(str(tmp_path / "data"), rows=60, files=3, row_group=10, seed=4)
    job = load_job(jobs.job(tmp_path, {"gradient": {}}))
    plan = plan_data(job.data, shards=1)
    worker = ShardWorker(job, plan.uri, 1, False)
    shard = plan.shards[0]
    staged = worker.compute(shard, BatchWork(gradient=True)).digests
    assert len(shard.pieces) == 3 and worker.changed_piece(shard, staged) is None
    path = shard.pieces[1].file
    table = pq.read_table(path)
    x = table.column("x").combine_chunks()
    values = x.flatten().to_numpy().copy()
    values[0] += 1.0
    table = table.set_column(table.schema.get_field_index("x"), "x", pa.FixedSizeListArray.from_arrays(
        pa.array(values), x.type.list_size))
    pq.write_table(table, path, row_group_size=10)
    assert worker.changed_piece(shard, staged) == 1
    assert worker.changed_piece(shard, staged[:2]) == 1  # the changed one comes before the missing one


def test_a_row_whose_loss_overflows_is_an_input_error_naming_it(ray_local, tmp_path):
    """Finite inputs, a non-finite loss: the worker finds the first row whose own sums are not
    finite and names it (retrying would fail the same way)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,), dtype="float64"), keras.layers.Dense(3, dtype="float64")])
    model.save(str(tmp_path / "model.keras"))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 6)), rng.normal(size=(40, 3))
    x[23] = 1e200  # finite, but its squared error is not
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 6),
                             "y": pa.FixedSizeListArray.from_arrays(pa.array(y.ravel()), 3)}),
                   str(tmp_path / "data" / "part-000.parquet"))
    job = load_job(jobs.job(tmp_path, {"gradient": {}}, loss={"name": "mse"},
                            data={"labels": "y", "batch_size": 16}))
    plan = plan_data(job.data, shards=1)
    worker = ShardWorker(job, plan.uri, 1, False)
    with pytest.raises(InputError) as info:
        worker.compute(plan.shards[0], BatchWork(gradient=True))
    message = str(info.value)
    assert message.startswith("non-finite ") and "in shard 0 (rows 16-31), first at row 23 (its inputs are finite)" \
        in message, message
