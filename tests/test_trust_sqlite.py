"""Trust, round 3 (issue 17), the SQLite engine and the shared writer code:
one process serves, nobody pays for another's error, every outcome told truly.

Each test names the behaviour it pins; each failed on the code before the fix.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

import mpwriter
from conftest import SCHEMA, Gate, count_rows
from mpwriter import testing

INFINITE_QUERY = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
)

# -- call() targets (module level: the writer imports them) ---------------------


def spin_after_writing(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO items(payload) VALUES ('rolled back')")
    while True:
        pass


# -- item 9: a request stopped at its deadline is told Interrupted ------------------


def test_a_call_past_its_deadline_is_interrupted_not_left_unknown(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    began = time.monotonic()
    with pytest.raises(mpwriter.Interrupted, match=r"at its deadline .*not applied"):
        writer.call_with_timeout(1.0, spin_after_writing)
    assert time.monotonic() - began <= 1.0 + 0.1  # within its timeout (and a scheduling slip)
    assert count_rows(db_path) == 0
    assert writer.execute("INSERT INTO items(payload) VALUES ('next')").rowcount == 1


def test_sql_past_its_deadline_says_its_deadline_stopped_it(writer: mpwriter.Writer) -> None:
    with pytest.raises(mpwriter.Interrupted) as raised:
        writer.execute(INFINITE_QUERY, timeout=1.0)
    assert "at its deadline" in str(raised.value)
    assert "execution_limit" not in str(raised.value)  # none was set


def test_sql_past_the_execution_limit_says_the_limit_stopped_it(db_path: Path) -> None:
    with mpwriter.start(db_path, init=SCHEMA, context="fork", execution_limit=0.2) as writer:
        with pytest.raises(mpwriter.Interrupted, match="at the writer's execution_limit"):
            writer.execute(INFINITE_QUERY, timeout=10.0)
        with pytest.raises(mpwriter.Interrupted, match="at the writer's execution_limit"):
            writer.call_with_timeout(10.0, spin_after_writing)
    assert count_rows(db_path) == 0


# -- item 10: a request dropped by the hand-over bound is told so ----------------


def test_a_bulk_request_dropped_by_the_memory_bound_is_queue_full_not_a_crash(
    db_path: Path, gate: Gate
) -> None:
    """Four bulk payloads reach the writer while it is busy; the bound on what
    it holds (2.5 payloads) drops the two oldest. Those callers get QueueFull,
    "not applied", never WriterCrashed; the other two commit."""
    payload = "x" * 200_000  # handed over as a file (over HAND_OVER_MIN)
    with testing.inject(handed_over_bytes_max=500_000):
        writer = mpwriter.start(db_path, init=SCHEMA, timeout=10.0, context="fork")
    try:
        gate.hold(writer)
        # Four new reply pipes and four payloads: within the side socket's
        # default 10 datagrams, so none of these sends waits for the writer.
        futures = [
            writer.submit("INSERT INTO items(seq, payload) VALUES (?, ?)", (n, payload))
            for n in range(4)
        ]
        gate.release()
        assert gate.future.result(timeout=10.0) == "released"
        outcomes = [future.exception(timeout=10.0) for future in futures]
        assert all(isinstance(outcome, mpwriter.QueueFull) for outcome in outcomes[:2]), outcomes
        assert all("not applied" in str(outcome) for outcome in outcomes[:2])
        assert outcomes[2:] == [None, None]
        stats = writer.stats()
        assert stats["restarts"] == 0
        assert stats["lost_requests"] == 0  # no writer died
        assert stats["dropped_partial_requests"] == 2
    finally:
        writer.close(timeout=10.0)
    with mpwriter.reader(db_path) as conn:
        assert [row[0] for row in conn.execute("SELECT seq FROM items ORDER BY seq")] == [2, 3]
