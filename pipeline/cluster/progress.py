"""Progress of a pass over the data, and of the passes of HVPs after it: a bar on a terminal,
plain log lines otherwise (the first at once, then at most one each ``LOG_SECONDS``)."""

from __future__ import annotations

import time

LOG_SECONDS = 10.0


class Progress:
    """A progress bar on a terminal; plain log lines otherwise (nightly logs)."""

    def __init__(self, stream, total_rows: int, label: str, enabled: bool = True):
        self.stream = stream
        self.total = total_rows
        self.label = label
        self.enabled = enabled
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.start = time.perf_counter()
        self.rows = 0
        self.shards = 0
        self.last_log: float | None = None
        # The rate is measured from the first shard's arrival: before it lie the workers' start
        # and the functions' tracing, which made an ETA of 160 s for a pass that ended 3 s later.
        self.first: tuple[float, int] | None = None

    def update(self, rows: int, shards_total: int) -> None:
        self.rows += rows
        self.shards += 1
        if not self.enabled:
            return
        now = time.perf_counter()
        elapsed = now - self.start
        if self.first is None:
            self.first = (now, self.rows)
        since, rows_then = now - self.first[0], self.rows - self.first[1]
        rate = rows_then / since if since > 0 and rows_then > 0 else 0.0
        eta_seconds = (self.total - self.rows) / rate if rate > 0 else float("nan")
        eta = "?" if eta_seconds != eta_seconds else f"{eta_seconds:,.0f}s"
        if self.tty:
            width = 30
            filled = int(width * self.rows / max(1, self.total))
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.shards}/{shards_total} "
                              f"shards {rate:,.0f} ex/s ETA {eta} ")
            if self.shards == shards_total:
                self.stream.write("\n")
            self.stream.flush()
        elif self.shards == shards_total or self.last_log is None or elapsed - self.last_log >= LOG_SECONDS:
            self.last_log = elapsed
            shown = f"{rate:,.0f} examples/s" if rate > 0 else f"first shard after {elapsed:.1f}s"
            self.stream.write(f"{self.label}: {self.shards}/{shards_total} shards, {self.rows:,} rows, "
                              f"{shown}, ETA {eta}\n")
            self.stream.flush()


class PassProgress:
    """The passes of Hessian-vector products after the main pass (trace, eigenvalues, spectrum,
    Hutchinson probes, EK-FAC): ``passes k/N`` with the measured mean time of a pass and the
    ETA of the rest. ``N`` is the plan's count, an upper bound (Lanczos stops early once it
    converges), so the ETA is one too."""

    def __init__(self, stream, planned: int):
        self.stream = stream
        self.planned = max(1, planned)
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.done = 0
        self.seconds = 0.0
        self.last_log: float | None = None
        self.start = time.perf_counter()

    def update(self, seconds: float) -> None:
        self.done += 1
        self.seconds += seconds
        mean = self.seconds / self.done
        left = max(0, self.planned - self.done)
        text = (f"passes of HVPs: {self.done}/{self.planned} (at most), {mean:.2f}s each, "
                f"ETA <= {left * mean:,.0f}s")
        elapsed = time.perf_counter() - self.start
        if self.tty:
            self.stream.write(f"\r{text} ")
            self.stream.flush()
        elif self.last_log is None or elapsed - self.last_log >= LOG_SECONDS:
            self.last_log = elapsed
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        """Ends a terminal's line (a bar left mid-line would run into the next output)."""
        if self.tty and self.done:
            self.stream.write("\n")
            self.stream.flush()
