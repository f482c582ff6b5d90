"""Progress of a pass over the data: a bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import time


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
        self.last_log = 0.0

    def update(self, rows: int, shards_total: int) -> None:
        self.rows += rows
        self.shards += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        rate = self.rows / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.rows) / rate if rate > 0 else float("nan")
        if self.tty:
            width = 30
            filled = int(width * self.rows / max(1, self.total))
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.shards}/{shards_total} "
                              f"shards {rate:,.0f} ex/s ETA {eta:,.0f}s ")
            if self.shards == shards_total:
                self.stream.write("\n")
            self.stream.flush()
        elif self.shards == shards_total or elapsed - self.last_log >= 10:
            self.last_log = elapsed
            self.stream.write(f"{self.label}: {self.shards}/{shards_total} shards, {self.rows:,} rows, "
                              f"{rate:,.0f} examples/s, ETA {eta:,.0f}s\n")
            self.stream.flush()
