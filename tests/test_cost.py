"""The plan's cost arithmetic and its refusals (``pipeline.cost``, each quantity unit's ``cost``): no
TensorFlow, no Ray.

The estimate against a real run's measured peaks is in test_reliability
(``test_run_stays_within_the_memory_its_plan_printed``)."""

from __future__ import annotations

import pytest

from pipeline import cost
from pipeline.quantities import registry
from pipeline.errors import InputError
from pipeline.job import LimitsSpec
from pipeline.plan import memory_budget

MEASURED = cost.Measurement(rows=256, gradient_seconds=0.01, activation_bytes=8 << 20, process_bytes=700 << 20,
                            row_bytes=260)
WORK = cost.Workload(parameters=100_000, largest_variable=80_000, outputs=10, itemsize=4, batch_size=256,
                     batches=400, rows=102_400, workers=2, worker_cpus=1)


def test_passes_are_one_main_pass_plus_each_spectral_algorithms():
    q = {"gradient": {}, "trace": {"method": "hutch++", "probes": 100},
         "eigenvalues": {"top": 5, "iterations": 30}, "spectrum": {"runs": 4, "steps": 24}}
    estimate = registry.estimate(q, WORK, MEASURED)
    assert estimate.passes == 1 + 3 + 31 + 24
    assert [x.name for x in estimate.quantities] == list(q)
    # Each pass of V vectors costs batches x (1 + 1.5 V) gradients, shared by the workers.
    spectrum = estimate.quantities[-1]
    assert spectrum.seconds == pytest.approx(24 * 400 * 0.01 * (1 + cost.HVP_GRADIENTS * 4))


def test_per_block_quantities_share_passes_and_the_plan_lists_each_block():
    """``blocks: layer``: as many passes as one block takes, each with every block's vectors;
    the plan's cost table lists each block's size, HVPs per batch and driver memory."""
    import dataclasses

    work = dataclasses.replace(WORK, variables=("a/kernel", "a/bias", "b/kernel", "b/bias"),
                               variable_shapes=((200, 400), (400,), (400, 49), (49,)))
    full = registry.estimate({"eigenvalues": {"top": 5, "iterations": 30, "blocks": "full"}}, work, MEASURED)
    layer = registry.estimate({"eigenvalues": {"top": 5, "iterations": 30, "blocks": "layer"}}, work, MEASURED)
    assert full.passes == layer.passes == 1 + 31
    (blocked,) = layer.quantities
    assert blocked.vectors == 2 * full.quantities[0].vectors
    assert [(b.name, b.parameters, b.vectors) for b in blocked.blocks] == [("a", 80_400, 5), ("b", 19_649, 5)]
    lines = layer.describe(work)
    at = lines.index("eigenvalues: 2 blocks side by side, each pass 10 HVPs per batch in all")
    assert lines[at + 1].startswith("  a 80,400 parameters, 5 HVPs per batch, +")
    assert not any("blocks" in line for line in full.describe(work))
    # Many blocks: the first SHOWN_BLOCKS, then one line for the rest.
    many = dataclasses.replace(WORK, variables=tuple(f"l{k}/kernel" for k in range(20)),
                               variable_shapes=((5_000,),) * 20)
    lines = registry.estimate({"trace": {"method": "hutch++", "probes": 100, "blocks": "variable"}}, many,
                              MEASURED).describe(many)
    assert "  12 more blocks of 5,000 to 5,000 parameters" in lines


def test_reading_and_the_transform_are_paid_once_when_shards_stay_in_memory():
    """``read_seconds`` (one batch read and transformed) adds ``batches x read_seconds`` once when
    each worker's shards fit the shard cache, and on every pass when they do not."""
    import dataclasses

    q = {"eigenvalues": {"top": 5, "iterations": 30}}
    reading = dataclasses.replace(MEASURED, read_seconds=0.05)
    base = registry.estimate(q, WORK, MEASURED)
    cached = registry.estimate(q, WORK, reading)
    assert cached.seconds - base.seconds == pytest.approx(400 * 0.05)
    huge_rows = dataclasses.replace(MEASURED, row_bytes=1 << 20)
    big = dataclasses.replace(huge_rows, read_seconds=0.05)
    uncached = registry.estimate(q, WORK, big)
    assert uncached.seconds - registry.estimate(q, WORK, huge_rows).seconds == pytest.approx(32 * 400 * 0.05)
    assert "reading them 50.0 ms" in cached.describe(WORK)[-1]


def test_hutchinson_probes_go_in_passes_whose_memory_does_not_grow_with_their_count():
    """Per-probe sums are B x P in each process: up to B probes ride the main pass, the rest go
    in passes of B, so memory stops growing at B while time keeps growing with K."""
    from pipeline.quantities.hessian_diagonal import PROBE_PASS_BYTES

    def hutchinson(probes, per_pass="auto"):
        return registry.estimate({"hessian_diagonal": {"method": "hutchinson", "probes": probes,
                                                       "probes_per_pass": per_pass}}, WORK, MEASURED)

    per_probe = WORK.parameters * 8
    auto = PROBE_PASS_BYTES // per_probe  # 83 probes of 100,000 parameters
    few, more = hutchinson(10), hutchinson(auto)
    assert few.passes == more.passes == 1  # all in the main pass
    assert more.worker_bytes - few.worker_bytes >= (auto - 10) * per_probe * cost.WORKER_VECTOR_COPIES
    assert more.driver_bytes - few.driver_bytes == (auto - 10) * per_probe * cost.DRIVER_VECTOR_COPIES
    many, most = hutchinson(10 * auto), hutchinson(100 * auto)
    assert (many.passes, most.passes) == (1 + 9, 1 + 99)
    assert many.worker_bytes == most.worker_bytes and many.driver_bytes == most.driver_bytes == more.driver_bytes
    # (the whole worker also keeps its shards between passes, which a one-pass run does not)
    assert many.quantities[0].worker_bytes == more.quantities[0].worker_bytes
    assert most.seconds > 8 * (many.seconds - many.startup)
    # probes_per_pass chooses B.
    assert hutchinson(100, 30).passes == 1 + 3 and hutchinson(100, 30).worker_bytes < few.worker_bytes * 4


def test_auto_probes_per_pass_shares_the_probes_out_evenly_over_the_fewest_passes():
    """At most 14 probes fit (582,026 parameters): 100 go in 8 passes of 13 (not 7 of 14 and
    one of 2), 15 in 2 of 8, and the bound itself is never exceeded."""
    from pipeline.quantities.hessian_diagonal import PROBE_PASS_BYTES, probes_per_pass

    parameters = 582_026
    most = PROBE_PASS_BYTES // (8 * parameters)
    assert most == 14
    per_pass = {k: probes_per_pass({"probes": k}, parameters) for k in (1, 10, 14, 15, 100, 1000)}
    assert per_pass == {1: 1, 10: 10, 14: 14, 15: 8, 100: 13, 1000: 14}
    for k, b in per_pass.items():
        assert b <= most and -(-k // b) == -(-k // most)  # no more passes than the bound needs
    assert probes_per_pass({"probes": 100, "probes_per_pass": 30}, parameters) == 30  # asked: as asked


def test_an_exact_trace_beside_the_exact_diagonal_is_counted_once():
    diagonal = registry.estimate({"hessian_diagonal": {"method": "exact"}}, WORK, MEASURED)
    both = registry.estimate({"hessian_diagonal": {"method": "exact"}, "trace": {"method": "exact", "probes": 1}},
                         WORK, MEASURED)
    assert both.seconds == pytest.approx(diagonal.seconds) and both.worker_bytes == diagonal.worker_bytes


def test_a_plan_over_its_time_limit_is_refused_with_the_numbers_unless_forced():
    q = {"eigenvalues": {"top": 5, "iterations": 5000}}
    estimate = registry.estimate(q, WORK, MEASURED)
    assert estimate.seconds > 24 * 3600
    with pytest.raises(InputError) as refused:
        cost.check(estimate, cost.Budget(), LimitsSpec(), workers=2, gpus=False)
    message = str(refused.value)
    assert "5,002 passes over the data" in message and "quantities.eigenvalues" in message
    assert "limits.hours=24" in message and "limits.force=true" in message and "more workers" in message
    cost.check(estimate, cost.Budget(), LimitsSpec(force=True), workers=2, gpus=False)
    cost.check(estimate, cost.Budget(), LimitsSpec(hours=1000), workers=2, gpus=False)
    # Timed on the driver's CPU: GPU workers are not refused on time.
    cost.check(estimate, cost.Budget(), LimitsSpec(), workers=2, gpus=True)


def test_memory_budgets_per_process_per_machine_and_per_node():
    estimate = registry.estimate({"hvp": {"random": 2000}}, WORK, MEASURED)
    capped = memory_budget(LimitsSpec(memory_gib=1.0), {}, workers=2)
    assert capped.worker_bytes == capped.driver_bytes == 2**30 and capped.machine_bytes is None
    with pytest.raises(InputError, match=r"each worker would need about .* more than the 1.0 GiB "
                                         r"limits.memory_gib=1 allows per process"):
        cost.check(estimate, capped, LimitsSpec(memory_gib=1.0), workers=2, gpus=False)
    local = memory_budget(LimitsSpec(), {"CPU": 2}, workers=2)
    assert local.machine_bytes > 0 and local.worker_bytes is None
    machine = cost.Budget(machine_bytes=estimate.driver_bytes + 2 * estimate.worker_bytes - 1, source="x has")
    with pytest.raises(InputError, match=r"the driver and 2 workers would need about .*quantities.hvp: .* fewer --workers"):
        cost.check(estimate, machine, LimitsSpec(), workers=2, gpus=False)
    cost.check(estimate, machine, LimitsSpec(), workers=1, gpus=False)
    cluster = memory_budget(LimitsSpec(), {"CPU": 8, "node_memory": 8 * 2**30, "nodes": 2}, workers=8)
    assert cluster.worker_bytes == 2 * 2**30  # four workers share each node


def test_the_plan_table_names_every_quantity_and_the_measurement():
    estimate = registry.estimate({"gradient": {}, "fisher_diagonal": {}}, WORK, MEASURED)
    lines = estimate.describe(WORK)
    assert lines[0].split() == ["quantity", "passes", "time", "worker", "driver"]
    assert [line.split()[0] for line in lines[1:3]] == ["gradient", "fisher_diagonal"]
    assert lines[3].startswith("whole run") and "10.0 ms" in lines[4]


def test_a_cluster_the_driver_joined_is_budgeted_per_node():
    """Connected to an existing Ray (not started by this driver): the budget is a node's
    memory shared by its workers, not the driver machine's free memory."""
    import ray

    from pipeline.cluster.connect import cluster_resources as _cluster

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        joined, started = _cluster(local=False), _cluster(local=True)
    finally:
        ray.shutdown()
    assert joined["nodes"] == 1 and joined["node_memory"] > 0 and "node_memory" not in started
    budget = memory_budget(LimitsSpec(), joined, workers=2)
    assert budget.worker_bytes == joined["node_memory"] / 2 and budget.machine_bytes is None


def test_fisher_and_ggn_by_layer_rules_cost_what_the_rules_do_and_the_plan_says_so():
    """Parameters with a per-layer rule cost a forward pass and ~0.8 gradients per cotangent
    column for the whole batch; the rest keep per-example chunks, and the plan names them."""
    import dataclasses

    from pipeline.quantities._base import PlanFacts
    from pipeline.quantities.ggn_diagonal import per_example_notes

    ruled = dataclasses.replace(WORK, rule_parameters=WORK.parameters)
    mixed = dataclasses.replace(WORK, rule_parameters=60_000)
    exact = {"ggn_diagonal": {"method": "exact"}}
    seconds = [registry.estimate(exact, w, MEASURED).quantities[0].seconds for w in (ruled, mixed, WORK)]
    batch_seconds = WORK.batches * MEASURED.gradient_seconds
    assert seconds[0] == pytest.approx(batch_seconds * (1 + cost.LAYER_RULE_FORWARD + 10 * cost.LAYER_RULE_COLUMN))
    assert seconds[0] < seconds[1] < seconds[2]  # all, some, none of the parameters by rules
    facts = PlanFacts(parameters=3, batches=1, route="vectorised", per_example_route="loop",
                      layer_routes={"dense/kernel": "layer rule", "lstm/kernel": "per-example"},
                      variable_sizes={"dense/kernel": 2, "lstm/kernel": 1})
    notes = per_example_notes(facts)
    assert notes[0] == ("Fisher/GGN products: per-layer rules for 2 of 3 parameters (Dense, Conv1D/2D, Embedding, "
                        "normalisation scale/shift); per-example products of the whole model for lstm/kernel")
    assert "one example at a time" in notes[1]
    every = dataclasses.replace(facts, layer_routes={"dense/kernel": "layer rule", "lstm/kernel": "layer rule"})
    assert len(per_example_notes(every)) == 1  # no variable left for the loop


def test_layer_rules_in_calls_of_fewer_rows_cost_each_call():
    """A convolution's per-example gradients are held rows x its size: with rows per call below
    the batch, each call repeats the passes, and the estimate counts them."""
    import dataclasses

    whole = dataclasses.replace(WORK, rule_parameters=WORK.parameters)
    split = dataclasses.replace(whole, rule_rows=64)  # 256-row batches: 4 calls
    exact = {"ggn_diagonal": {"method": "exact"}}
    one, four = (registry.estimate(exact, w, MEASURED).quantities[0].seconds for w in (whole, split))
    per_call = WORK.batches * MEASURED.gradient_seconds * (cost.LAYER_RULE_FORWARD + 10 * cost.LAYER_RULE_COLUMN)
    assert four - one == pytest.approx(3 * per_call)


@pytest.mark.parametrize("quantities, remedy", [
    ({"hessian_diagonal": {"method": "exact"}}, "set quantities.hessian_diagonal.method=hutchinson"),
    ({"hessian_diagonal": {"method": "hutchinson", "probes": 50}}, None),
])
def test_a_refusal_names_the_cheaper_method_of_the_quantity_over_the_limit(quantities, remedy):
    """The memory refusal of an exact diagonal first names Hutchinson (the same number, estimated,
    at a vector's memory per probe), not only smaller batches; a Hutchinson diagonal is not told so."""
    estimate = registry.estimate(quantities, WORK, MEASURED)
    tight = cost.Budget(worker_bytes=estimate.worker_bytes - 1, source="x allows")
    with pytest.raises(InputError) as refused:
        cost.check(estimate, tight, LimitsSpec(), workers=2, gpus=False)
    message = str(refused.value)
    assert ("method=hutchinson" in message) == (remedy is not None)
    if remedy:
        assert message.index(remedy) < message.index("a smaller data.batch_size")
