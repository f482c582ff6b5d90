"""Memory of this process and this machine, as plans estimate it and workers report it.

Standard library only (Linux ``/proc`` where it exists, ``resource`` otherwise), so the driver's
cheap commands and the Ray workers can both use it.
"""

from __future__ import annotations

import os
import re
import sys

_STATUS = "/proc/self/status"


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS, encoding="ascii") as handle:
            found = re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) if found else None


def peak_bytes() -> int:
    """Peak resident memory of this process since it started (or since ``reset_peak``)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource  # lazy: Unix only, and only where /proc is missing (macOS)

    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux KiB


def resident_bytes() -> int:
    """Resident memory of this process now (the peak where the current value is not available)."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_bytes()


def reset_peak() -> bool:
    """Starts ``peak_bytes`` again from the current resident memory (Linux); False where the
    system cannot, and the peak then keeps counting from the process start."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def available_bytes() -> int:
    """Memory this machine can give to new work now: ``MemAvailable``, else the physical total."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            found = re.search(r"^MemAvailable:\s+(\d+) kB", handle.read(), re.MULTILINE)
        if found:
            return int(found.group(1)) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gib(size: float) -> str:
    """``size`` bytes for people: ``1.2 GiB``, ``350 MiB``."""
    if size >= 1 << 30:
        return f"{size / (1 << 30):,.1f} GiB"
    return f"{size / (1 << 20):,.0f} MiB"
