"""PostgreSQL: a request past its deadline is told `Interrupted` while its
caller still waits, and a child forked by a call() holds nothing of the writer's.

The PostgreSQL side of `test_trust_sqlite.py`'s stop-time and fork tests,
against the real server of the `pg_url` fixture.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

import mpwriter
from conftest import PG_SCHEMA, pg_count

psycopg = pytest.importorskip("psycopg", reason="PostgreSQL tests: psycopg is not installed")

SLEEP = "SELECT pg_sleep(30)"

# -- call() targets (module level: the writer imports them) ---------------------


def sleep_after_writing(conn: Any) -> None:
    conn.execute("INSERT INTO items(payload) VALUES ('rolled back')")
    conn.execute(SLEEP)


def spin_after_writing(conn: Any) -> None:
    conn.execute("INSERT INTO items(payload) VALUES ('rolled back')")
    while True:
        pass


# -- a request stopped at its deadline is told Interrupted ------------------------


def test_sql_past_its_deadline_is_interrupted_before_the_caller_gives_up(
    pg_writer: mpwriter.Writer, pg_fresh: str
) -> None:
    began = time.monotonic()
    with pytest.raises(mpwriter.Interrupted) as raised:
        pg_writer.execute(SLEEP, timeout=1.0)
    assert time.monotonic() - began <= 1.0 + 0.1  # within its timeout (and a scheduling slip)
    assert "at its deadline (its timeout)" in str(raised.value)
    assert "execution_limit" not in str(raised.value)  # none was set
    assert "not applied" in str(raised.value)
    assert pg_writer.execute("INSERT INTO items(payload) VALUES ('next')").rowcount == 1


def test_a_call_past_its_deadline_is_interrupted_not_left_unknown(
    pg_writer: mpwriter.Writer, pg_fresh: str
) -> None:
    began = time.monotonic()
    with pytest.raises(mpwriter.Interrupted, match=r"at its deadline .*not applied"):
        pg_writer.call_with_timeout(1.0, sleep_after_writing)
    assert time.monotonic() - began <= 1.0 + 0.1
    assert pg_count(pg_fresh) == 0
    assert pg_writer.execute("INSERT INTO items(payload) VALUES ('next')").rowcount == 1


def test_a_call_spinning_past_its_deadline_is_interrupted_in_time(
    pg_writer: mpwriter.Writer, pg_fresh: str
) -> None:
    began = time.monotonic()
    with pytest.raises(mpwriter.Interrupted, match=r"at its deadline .*not applied"):
        pg_writer.call_with_timeout(1.0, spin_after_writing)
    assert time.monotonic() - began <= 1.0 + 0.1
    assert pg_count(pg_fresh) == 0


def test_sql_past_the_execution_limit_says_the_limit_stopped_it(pg_fresh: str) -> None:
    with mpwriter.start(
        pg_fresh, init=PG_SCHEMA, context="fork", execution_limit=0.2, timeout=10.0
    ) as writer:
        with pytest.raises(mpwriter.Interrupted, match="at the writer's execution_limit"):
            writer.execute(SLEEP, timeout=10.0)
        with pytest.raises(mpwriter.Interrupted, match="at the writer's execution_limit"):
            writer.call_with_timeout(10.0, sleep_after_writing)
    assert pg_count(pg_fresh) == 0
