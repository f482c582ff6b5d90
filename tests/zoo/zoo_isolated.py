"""Runs one zoo case through the engine in a child process, so that a crash of the process
(a fault inside TensorFlow) fails one test instead of ending the whole run.

    python zoo_isolated.py CASE PRECISION WEIGHTS.npz OUT_PREFIX

The case is rebuilt here and given the parent's weights (``WEIGHTS.npz``, ``model.get_weights()``
order). One engine runs the batch twice: loss, gradient, exact Hessian diagonal and HVPs first
(written to ``OUT_PREFIX.curvature.npz``), then the per-example products, Fisher and GGN
diagonals (all the sums written to ``OUT_PREFIX.all.npz``), so that a crash in the second
stage still leaves the first to check.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # zoo_models, and tests/cases.py it imports


def _save(path, part, vectors):
    import numpy as np

    np.savez(path, weight_sum=part.weight_sum, vectors=vectors,
             **{f"sum_{key}": np.asarray(value) for key, value in part.sums.items()})


def main(name, precision, weights_path, out_prefix):
    import numpy as np

    import zoo_models

    case = zoo_models.get_case(name)
    with np.load(weights_path) as saved:
        case.model.set_weights([saved[f"w{i}"] for i in range(len(saved.files))])
    engine, first, vectors = zoo_models.run_engine(case, precision, work=zoo_models.CURVATURE_ONLY)
    _save(out_prefix + ".curvature.npz", first, vectors)
    _, second, _ = zoo_models.run_engine(case, precision, engine=engine,
                                         work=dict(gradient=False, ggn_diagonal="exact", sum_grad_squared=True))
    first.sums.update(second.sums)
    _save(out_prefix + ".all.npz", first, vectors)


if __name__ == "__main__":
    main(*sys.argv[1:5])
