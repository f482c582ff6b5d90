"""Which layer rules (``layer_rules``) are right for a model: each is checked on the model's
first rows, once per model, against the tape's gradients of the whole model; a rule that does
not pass leaves its variables to per-example products. Cost: a few forward and backward passes
of 3 and 5 rows, traced once.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from pipeline.curvature import layer_rules
from pipeline.curvature.core import Core
from pipeline.curvature.tensors import batch_tensor, dense, flat_outputs


def checked_rules(core: Core, rules, raw_inputs) -> list:
    """The rules that are right for this model, checked on its first rows (see
    ``layer_rules``), on batches of 3 and of 5 rows (the first rows, repeated when the batch
    is shorter: two sizes no model axis can both share):

    - the model's output for a row must not depend on the other rows of its batch (else no
      rule: per-example products compute each example alone);
    - with the layers tapped, the model's outputs are unchanged;
    - per rule: its tensors have one row per example; the sum of its per-example gradients
      equals the tape's batch gradient of its variables; no op outside its calls reads
      them (a tied weight, found from the traced graph, whatever the data); its shapes are
      the ones it assumes.

    When the rules together cannot be traced or change the outputs, each is checked alone."""
    n = len(raw_inputs[0])
    batches = [[batch_tensor(np.asarray(a)[np.arange(size) % n], core.dtype) for a in raw_inputs]
               for size in (3, 5)]
    # Row 0 replaced by row 1: rows 1-4 must give the same outputs.
    swapped = [batch_tensor(np.asarray(a)[np.array([1, 1, 2, 3, 4]) % n], core.dtype) for a in raw_inputs]
    specs = core.specs(raw_inputs, [])[0]
    outputs = tf.function(lambda a: flat_outputs(core.adapter.forward(list(a))[0], core.dtype),
                          input_signature=(specs,))
    tolerance = 1e-9 if core.dtype == tf.float64 else 1e-4
    try:
        alone, mixed = outputs(batches[1]).numpy()[1:], outputs(swapped).numpy()[1:]
    except (ValueError, TypeError, NotImplementedError, LookupError, tf.errors.OpError):
        return []
    if np.max(np.abs(alone - mixed), initial=0.0) > tolerance * max(np.max(np.abs(alone), initial=0.0), 1e-30):
        return []
    kept = _passing(core, rules, batches, specs, tolerance)
    if kept is None:
        kept = [rule for rule in rules if _passing(core, [rule], batches, specs, tolerance)]
    return kept

def _passing(core: Core, rules, batches, specs, tolerance):
    """``checked_rules`` for one set of rules: the ones that pass, or None when the set fails
    to trace or changes the model's outputs."""
    facts: list = []
    handles = {k: v.handle for k, v in enumerate(core.variables)}

    def check(inputs):
        plain = flat_outputs(core.adapter.forward(list(inputs))[0], core.dtype)
        graph = tf.compat.v1.get_default_graph()
        start = len(graph.get_operations())
        with layer_rules.Taps(rules) as taps:
            with tf.GradientTape() as tape:
                outputs, _ = core.adapter.forward(list(inputs))
                flat = flat_outputs(outputs, core.dtype)
                end = len(graph.get_operations())
                # Any fixed, non-trivial cotangent: the check compares two routes to one number.
                index = tf.cast(tf.reshape(tf.range(tf.size(flat)), tf.shape(flat)), core.dtype)
                value = tf.reduce_sum(flat * tf.cos(0.7 * index + 0.3))
        shared = layer_rules.reads_elsewhere(rules, graph, graph.get_operations()[start:end], handles)
        tapped = taps.outputs()
        grads = tape.gradient(value, tapped + core.variables,
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        truth = dense(grads[len(tapped):])
        out = []
        facts.clear()
        for rule, dzs in zip(rules, taps.split(grads[:len(tapped)])):
            usable = bool(rule.records) and rule.shapes_fit() and id(rule) not in shared
            facts.append((usable, len(rule.records) == 1 and rule.records[0].x.shape.rank == 2))
            if not usable:
                out.append(([], [], tf.zeros([0], tf.int32)))
                continue
            summed = rule.summed([tf.cast(d, core.dtype) for d in dzs])
            sizes = tf.stack([tf.shape(r.x)[0] for r in rule.records] + [tf.shape(r.z)[0] for r in rule.records])
            out.append(([tf.cast(summed[a], core.dtype) for a, _ in rule.variables],
                        [tf.cast(truth[k], core.dtype) for _, k in rule.variables], sizes))
        return tf.reduce_max(tf.abs(flat - plain)), tf.reduce_max(tf.abs(plain)), out

    traced = tf.function(check, input_signature=(specs,))
    try:
        results = [traced(batch) for batch in batches]
    except (ValueError, TypeError, NotImplementedError, LookupError, tf.errors.OpError):
        return None
    if any(float(changed) > tolerance * max(float(scale), 1e-30) for changed, scale, _ in results):
        return None
    kept = []
    for number, (rule, (usable, plain)) in enumerate(zip(rules, facts)):
        if not usable:
            continue
        right = True
        for batch, (_, _, out) in zip(batches, results):
            summed, truth, sizes = out[number]
            right = right and np.all(sizes.numpy() == int(batch[0].shape[0])) and all(
                np.max(np.abs(a.numpy() - b.numpy()), initial=0.0)
                <= tolerance * max(np.max(np.abs(b.numpy()), initial=0.0), 1e-30)
                for a, b in zip(summed, truth))
        if right:
            # One call on [B, n_in] inputs: a Dense's squares need no per-example gradient.
            rule.materialises = not (rule.kind == "dense" and plain)
            kept.append(rule)
    return kept
