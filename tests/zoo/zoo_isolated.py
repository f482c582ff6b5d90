"""Runs one zoo case through the engine in a child process, so that a crash of the process
(a fault inside TensorFlow) fails one test instead of ending the whole run.

    python zoo_isolated.py CASE PRECISION WEIGHTS.npz OUT.npz

The case is rebuilt here and given the parent's weights (``WEIGHTS.npz``, ``model.get_weights()``
order); the partial sums, weight sum and HVP vectors are written to ``OUT.npz``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(name, precision, weights_path, out_path):
    import numpy as np

    import zoo_models

    case = zoo_models.get_case(name)
    with np.load(weights_path) as saved:
        case.model.set_weights([saved[f"w{i}"] for i in range(len(saved.files))])
    _, part, vectors = zoo_models.run_engine(case, precision)
    np.savez(out_path, weight_sum=part.weight_sum, vectors=vectors,
             **{f"sum_{key}": np.asarray(value) for key, value in part.sums.items()})


if __name__ == "__main__":
    main(*sys.argv[1:5])
