"""What the benchmark scripts share: the environment header and the target verdict."""

from __future__ import annotations

import datetime
import os
import platform

import numpy as np


def verdict(ok) -> str:
    return "PASS" if ok else "MISS"


def environment(quick: bool) -> dict:
    """Versions, CPUs and load of this machine, recorded beside every figure."""
    import keras
    import ray
    import tensorflow as tf

    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "mode": "quick" if quick else "full", "python": platform.python_version(),
            "platform": platform.platform(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "ray": ray.__version__, "numpy": np.__version__, "os_cpu_count": os.cpu_count(),
            "load_average_at_start": os.getloadavg()}


def print_header(name: str, env: dict, quick_note: str) -> None:
    print(f"hessian-pipeline {name} benchmark: {env['mode']} run{quick_note if env['mode'] == 'quick' else ''}")
    print(f"  {env['date']}  python {env['python']}  tensorflow {env['tensorflow']}  keras {env['keras']}  "
          f"ray {env['ray']}  os.cpu_count() = {env['os_cpu_count']}  load average "
          f"{' '.join(f'{x:.2f}' for x in env['load_average_at_start'])}")
