"""Fire-and-forget writes, stats, slow-request logging and Prometheus text."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import get_origin, get_type_hints, is_typeddict

import pytest
from prometheus_client.parser import text_string_to_metric_families

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
    assert stats["latency_count"] == 20
    sums = stats["latency_sum_seconds"]
    # Every request waited and ran for some time; total covers both.
    assert 0 < sums["queue_wait"] < sums["total"]
    assert 0 < sums["execution"] < sums["total"]


def test_stats_keys_are_exactly_those_the_typed_dict_declares(writer: mpwriter.Writer) -> None:
    writer.execute("INSERT INTO items(seq) VALUES (1)")
    stats = writer.stats()
    assert set(stats) == set(mpwriter.Stats.__annotations__)
    assert mpwriter.Stats.__required_keys__ == frozenset(mpwriter.Stats.__annotations__)
    for name, value in stats.items():
        expected = get_type_hints(mpwriter.Stats)[name]
        origin = get_origin(expected) or expected
        if is_typeddict(origin):
            assert set(value) == set(get_type_hints(origin)), name
        else:
            assert isinstance(value, origin), (name, value)


def test_prometheus_text_follows_the_naming_conventions(writer: mpwriter.Writer) -> None:
    for n in range(3):
        writer.execute("INSERT INTO items(seq) VALUES (?)", (n,))
    with pytest.raises(sqlite3.OperationalError):
        writer.execute("INSERT INTO nowhere VALUES (1)")
    stats = writer.stats()
    text = mpwriter.prometheus_text(stats)
    # The reference parser of Prometheus' own Python client reads it all.
    families = {family.name: family for family in text_string_to_metric_families(text)}

    def sample(name: str, **labels: str) -> float:
        matches = [
            s.value
            for family in families.values()
            for s in family.samples
            if s.name == name and s.labels == labels
        ]
        assert len(matches) == 1, (name, labels, matches)
        return float(matches[0])

    for family in families.values():
        assert family.name.startswith("mpwriter_")
        assert family.documentation, family.name  # every family has HELP text
        assert family.type in {"counter", "gauge", "summary"}, family.name
        if family.type == "counter":
            assert all(s.name == f"{family.name}_total" for s in family.samples), family.name
        # Base units: no milliseconds anywhere.
        assert not family.name.endswith(("_ms", "_milliseconds")), family.name
    assert families["mpwriter_requests"].type == "counter"
    assert sample("mpwriter_requests_total") == 4
    assert sample("mpwriter_commits_total") == 4
    assert sample("mpwriter_errors_total") == 1
    assert sample("mpwriter_errors_by_class_total", **{"class": "OperationalError"}) == 1
    assert families["mpwriter_queue_depth"].type == "gauge"
    assert families["mpwriter_uptime_seconds"].type == "gauge"
    for series in ("queue_wait", "execution", "total"):
        name = f"mpwriter_latency_{series}_seconds"
        family = families[name]
        assert family.type == "summary"
        quantiles = {
            s.labels["quantile"]: s.value for s in family.samples if "quantile" in s.labels
        }
        assert set(quantiles) == {"0.5", "0.9", "0.99", "1"}
        for label in quantiles:
            float(label)  # numeric, not "p99"
        # Seconds: the stats' milliseconds divided by 1000.
        figures = stats["latency_ms"][series]
        assert quantiles["0.99"] == pytest.approx(figures["p99"] / 1000)
        assert quantiles["1"] == pytest.approx(figures["max"] / 1000)
        assert sample(f"{name}_count") == stats["latency_count"] == 4
        assert sample(f"{name}_sum") == pytest.approx(stats["latency_sum_seconds"][series])
    assert sample("mpwriter_latency_total_seconds", quantile="1") < 10  # seconds, not ms


def test_prometheus_text_escapes_label_values_and_keeps_big_counts_exact(
    writer: mpwriter.Writer,
) -> None:
    stats = writer.stats()
    stats["requests"] = 123_456_789_012
    stats["errors_by_class"] = {'Odd"Name\\\nError': 2}
    text = mpwriter.prometheus_text(stats)
    assert "mpwriter_requests_total 123456789012\n" in text
    (family,) = [
        f for f in text_string_to_metric_families(text) if f.name == "mpwriter_errors_by_class"
    ]
    assert [(s.labels["class"], s.value) for s in family.samples] == [('Odd"Name\\\nError', 2)]


def test_stats_says_in_words_which_state_the_service_is_in(db_path: Path) -> None:
    writer = mpwriter.start(db_path, init=SCHEMA, context="fork")
    try:
        assert writer.stats()["state"] == "running"
        # SIGKILL the writer: the next stats() comes from its replacement,
        # which says the service runs again (the restart is counted).
        pid = writer.stats()["pid"]
        os.kill(pid, signal.SIGKILL)
        stats = writer.stats()
        assert (stats["state"], stats["restarts"]) == ("running", 1)
    finally:
        writer.close()
