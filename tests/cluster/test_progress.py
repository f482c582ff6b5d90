"""Progress lines: a bar on a terminal; plain log lines otherwise, the first at once, then at
most one each ``LOG_SECONDS`` (and the last shard's always)."""

from __future__ import annotations

import io
import time

from pipeline.cluster import progress
from pipeline.cluster.progress import PassProgress, Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_first_line_comes_at_once_then_none_within_log_seconds():
    out = io.StringIO()
    bar = Progress(out, total_rows=100, label="main pass")
    bar.update(10, shards_total=4)
    first = out.getvalue().splitlines()
    assert len(first) == 1
    assert first[0].startswith("main pass: 1/4 shards, 10 rows, first shard after ")
    assert first[0].endswith(", ETA ?")  # no rate yet: measured from the first shard on
    bar.update(10, shards_total=4)
    bar.update(10, shards_total=4)
    assert out.getvalue().splitlines() == first
    assert (bar.rows, bar.shards) == (30, 3)


def test_the_last_shard_is_always_logged():
    out = io.StringIO()
    bar = Progress(out, total_rows=2000, label="pass")
    bar.update(1000, shards_total=2)
    time.sleep(0.01)
    bar.update(1000, shards_total=2)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[1].startswith("pass: 2/2 shards, 2,000 rows, ") and "examples/s" in lines[1]
    assert lines[1].endswith("ETA 0s")


def test_a_line_again_once_log_seconds_have_passed(monkeypatch):
    monkeypatch.setattr(progress, "LOG_SECONDS", 0.2)
    out = io.StringIO()
    bar = Progress(out, total_rows=100, label="pass")
    bar.update(10, shards_total=10)
    bar.update(10, shards_total=10)
    assert len(out.getvalue().splitlines()) == 1
    time.sleep(0.25)
    bar.update(10, shards_total=10)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("pass: 3/10 shards, 30 rows, ")
    # 20 rows in the time since the first shard, 70 to go: an ETA in seconds.
    assert "examples/s, ETA " in lines[1] and not lines[1].endswith("ETA ?")


def test_disabled_progress_counts_but_writes_nothing():
    out = io.StringIO()
    bar = Progress(out, total_rows=10, label="pass", enabled=False)
    bar.update(4, 2)
    bar.update(6, 2)
    assert out.getvalue() == "" and (bar.rows, bar.shards) == (10, 2)


def test_a_terminal_gets_one_bar_rewritten_in_place_and_a_newline_at_the_end():
    out = Terminal()
    bar = Progress(out, total_rows=20, label="pass")
    bar.update(10, 2)
    text = out.getvalue()
    assert text.startswith("\rpass [" + "#" * 15 + "." * 15 + "] 1/2 shards") and "\n" not in text
    bar.update(10, 2)
    assert out.getvalue().count("\r") == 2 and out.getvalue().endswith("\n")
    assert "[" + "#" * 30 + "] 2/2 shards" in out.getvalue()


def test_passes_log_the_mean_time_and_an_upper_bound_eta():
    out = io.StringIO()
    passes = PassProgress(out, planned=5)
    passes.update(0.5)
    passes.update(1.5)  # within LOG_SECONDS of the first: no line
    passes.close()  # not a terminal: nothing to end
    assert out.getvalue() == "passes of HVPs: 1/5 (at most), 0.50s each, ETA <= 2s\n"
    assert passes.done == 2 and passes.seconds == 2.0


def test_passes_past_the_plan_show_no_negative_eta(monkeypatch):
    monkeypatch.setattr(progress, "LOG_SECONDS", 0.0)
    out = io.StringIO()
    passes = PassProgress(out, planned=0)  # at least one pass is planned
    passes.update(2.0)
    passes.update(4.0)
    assert out.getvalue().splitlines() == ["passes of HVPs: 1/1 (at most), 2.00s each, ETA <= 0s",
                                           "passes of HVPs: 2/1 (at most), 3.00s each, ETA <= 0s"]


def test_passes_on_a_terminal_rewrite_one_line_and_close_ends_it():
    out = Terminal()
    passes = PassProgress(out, planned=3)
    passes.close()
    assert out.getvalue() == ""  # no pass yet: no line to end
    passes.update(1.0)
    passes.update(1.0)
    assert out.getvalue().count("\r") == 2 and "\n" not in out.getvalue()
    passes.close()
    assert out.getvalue().endswith("2/3 (at most), 1.00s each, ETA <= 1s \n")
