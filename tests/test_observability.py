"""Fire-and-forget writes, stats, slow-request logging and Prometheus text."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import mpwriter
from conftest import SCHEMA, Gate, count_rows


def test_post_is_applied_in_order_with_the_callers_other_writes(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    assert writer.post("INSERT INTO items(seq, payload) VALUES (1, 'audit')") is True
    # A later call from the same thread is applied after the post: once it
    # returns, the post is committed too.
    writer.execute("INSERT INTO items(seq, payload) VALUES (2, 'business')")
    with mpwriter.reader(db_path) as conn:
        assert conn.execute("SELECT seq FROM items ORDER BY id").fetchall() == [(1,), (2,)]


def test_post_never_raises_and_counts_what_it_dropped(db_path: Path, gate: Gate) -> None:
    with mpwriter.start(db_path, init=SCHEMA, context="fork", queue_size=4096) as writer:
        assert writer.post("INSERT INTO items(payload) VALUES (?)", (threading.Lock(),)) is False
        gate.hold(writer)
        sent = dropped = 0
        while dropped < 3:
            if writer.post("INSERT INTO items(payload) VALUES (?)", ("x" * 200,), max_block=0.01):
                sent += 1
            else:
                dropped += 1
        gate.release()
        assert gate.future.result(timeout=10) == "released"
        assert writer.post("INSERT INTO items(payload) VALUES ('reports the drops')") is True
        writer.execute("SELECT 1")  # after the posts above
        stats = writer.stats()
        assert stats["posts_dropped"] == 1 + dropped
    assert count_rows(db_path) == sent + 1
    assert writer.post("INSERT INTO items(payload) VALUES ('after close')") is False


LOGGING_SCRIPT = textwrap.dedent(
    """
    import logging, sys, mpwriter
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")
    with mpwriter.start(sys.argv[1], context="fork", slow_request=0.0) as writer:
        writer.post("INSERT INTO no_such_table VALUES (1)")
        writer.execute("SELECT 1")
        print(writer.stats()["post_errors_by_class"])
    """
)


def test_failed_posts_and_slow_requests_are_logged_by_the_writer(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", LOGGING_SCRIPT, str(tmp_path / "app.db")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == "{'OperationalError': 1}"
    assert "fire-and-forget write failed: OperationalError: no such table" in result.stderr
    assert "[post INSERT INTO no_such_table VALUES (1)]" in result.stderr
    assert "slow request" in result.stderr


def test_stats_has_latency_percentiles_and_restart_figures(writer: mpwriter.Writer) -> None:
    for n in range(20):
        writer.execute("INSERT INTO items(seq) VALUES (?)", (n,))
    stats = writer.stats()
    latency = stats["latency_ms"]
    assert set(latency) == {"queue_wait", "execution", "total"}
    for figures in latency.values():
        assert set(figures) == {"p50", "p90", "p99", "max"}
        assert 0 <= figures["p50"] <= figures["p90"] <= figures["p99"] <= figures["max"]
    assert latency["total"]["max"] > 0
    assert stats["restarts"] == 0
    assert stats["uptime"] > 0
    assert stats["requests"] == 20


def test_prometheus_text_exposes_the_stats(writer: mpwriter.Writer) -> None:
    writer.execute("INSERT INTO items(seq) VALUES (1)")
    with pytest.raises(sqlite3.OperationalError):
        writer.execute("INSERT INTO nowhere VALUES (1)")
    text = mpwriter.prometheus_text(writer.stats())
    samples = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert samples["mpwriter_requests_total"] == "2"
    assert samples["mpwriter_commits_total"] == "2"
    assert samples['mpwriter_errors_by_class_total{class="OperationalError"}'] == "1"
    assert 'mpwriter_latency_total_ms{quantile="p99"}' in samples
    for line in text.splitlines():
        assert re.fullmatch(r"# (HELP|TYPE) \w+ .+|\w+(\{\w+=\"[^\"]*\"\})? \S+", line), line
