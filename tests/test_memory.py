"""Memory of this process and machine: resident and peak bytes follow a real allocation,
``reset_peak`` starts the peak again, sizes read as people write them."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from pipeline.memory import available_bytes, gib, peak_bytes, reset_peak, resident_bytes

MIB = 1 << 20
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc: Linux only")


@linux
def test_resident_and_peak_follow_an_allocation_and_reset_peak_starts_again():
    before = resident_bytes()
    block = np.ones(64 * MIB, dtype=np.uint8)  # written: every page resident
    grown = resident_bytes()
    assert grown - before >= 60 * MIB
    assert peak_bytes() >= grown
    del block
    assert resident_bytes() < grown - 32 * MIB  # numpy hands a block this large back to the system
    assert reset_peak() is True
    assert peak_bytes() < grown - 32 * MIB  # the 64 MiB are no longer in the peak
    assert peak_bytes() >= resident_bytes() - MIB


@linux
def test_available_memory_is_that_of_proc_meminfo_and_at_most_the_machine():
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with open("/proc/meminfo", encoding="ascii") as handle:
        fields = dict(line.split(":", 1) for line in handle)
    available = int(fields["MemAvailable"].split()[0]) * 1024
    assert 0 < available_bytes() <= total
    assert abs(available_bytes() - available) < 256 * MIB  # read a moment apart


@pytest.mark.parametrize("size, shown", [
    (0, "0 MiB"), (350 * MIB, "350 MiB"), (1023 * MIB, "1,023 MiB"), (1 << 30, "1.0 GiB"),
    (1.3 * (1 << 30), "1.3 GiB"), (1536 * (1 << 30), "1,536.0 GiB"),
])
def test_gib_writes_sizes_for_people(size, shown):
    assert gib(size) == shown
