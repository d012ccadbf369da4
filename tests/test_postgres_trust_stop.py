"""PostgreSQL: a request past its deadline is told `Interrupted` while its
caller still waits, and a child forked by a call() holds nothing of the writer's.

The PostgreSQL side of `test_trust_sqlite.py`'s stop-time and fork tests,
against the real server of the `pg_url` fixture.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from typing import Any

import pytest

import mpwriter
from conftest import PG_SCHEMA, SCHEDULING_SLIP, Gate, pg_count, wait_exited

psycopg = pytest.importorskip("psycopg", reason="PostgreSQL tests: psycopg is not installed")

SLEEP = "SELECT pg_sleep(30)"  # sleep-ok: the server's, a statement for the writer to stop

# -- call() targets (module level: the writer imports them) ---------------------


def sleep_after_writing(conn: Any) -> None:
    conn.execute("INSERT INTO items(payload) VALUES ('rolled back')")
    conn.execute(SLEEP)


def spin_after_writing(conn: Any) -> None:
    conn.execute("INSERT INTO items(payload) VALUES ('rolled back')")
    while True:
        pass


def fork_and_return_in_both(conn: Any) -> int:
    """Forks mid-transaction; the child tries to write, then returns normally too."""
    conn.execute("INSERT INTO items(client, payload) VALUES (0, 'parent')")
    pid = os.fork()
    if pid == 0:
        with contextlib.suppress(psycopg.Error):  # its socket is /dev/null
            conn.execute("INSERT INTO items(client, payload) VALUES (0, 'child')")
        return 0
    return pid


def fork_a_child_that_lives_on(conn: Any) -> int:
    """Forks; returns the child's pid once the child runs its own code (the
    writer's fork handlers have run in it by then)."""
    ready, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(ready_w, b"!")
        time.sleep(60)  # sleep-ok: a child that outlives the writer, holding what it inherited
        os._exit(0)
    os.close(ready_w)
    try:
        if not select.select([ready], [], [], 10.0)[0]:
            raise TimeoutError("the forked child did not start")
    finally:
        os.close(ready)
    return pid


# -- a request stopped at its deadline is told Interrupted ------------------------


def test_sql_past_its_deadline_is_interrupted_before_the_caller_gives_up(
    pg_writer: mpwriter.Writer, pg_fresh: str
) -> None:
    began = time.monotonic()
    with pytest.raises(mpwriter.Interrupted) as raised:
        pg_writer.execute(SLEEP, timeout=1.0)
    assert time.monotonic() - began <= 1.0 + SCHEDULING_SLIP  # within its timeout
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
    assert time.monotonic() - began <= 1.0 + SCHEDULING_SLIP
    assert pg_count(pg_fresh) == 0
    assert pg_writer.execute("INSERT INTO items(payload) VALUES ('next')").rowcount == 1


def test_a_call_spinning_past_its_deadline_is_interrupted_in_time(
    pg_writer: mpwriter.Writer, pg_fresh: str
) -> None:
    began = time.monotonic()
    with pytest.raises(mpwriter.Interrupted, match=r"at its deadline .*not applied"):
        pg_writer.call_with_timeout(1.0, spin_after_writing)
    assert time.monotonic() - began <= 1.0 + SCHEDULING_SLIP
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


# -- a call() that forks: the child holds nothing of the writer's -----------------


def _tcp_sockets_of(pid: int) -> set[str]:
    """The TCP sockets (their inodes) process ``pid`` has open: the writer's
    one to the server among them."""
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    tcp = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as file:
            tcp.update(line.split()[9] for line in file.readlines()[1:])
    return inodes & tcp


def test_a_call_that_forks_leaves_one_writer_serving(
    pg_writer: mpwriter.Writer, pg_fresh: str
) -> None:
    pid = pg_writer.stats()["pid"]
    child = pg_writer.call(fork_and_return_in_both)
    assert child > 0
    wait_exited(child)  # it came back into the writer's code and was ended there
    for seq in range(50):
        result = pg_writer.execute(
            "INSERT INTO items(client, seq, payload) VALUES (1, ?, 'w') RETURNING seq", (seq,)
        )
        assert result.rows == [(seq,)]
    with mpwriter.reader(pg_fresh) as conn:
        payloads = [row[0] for row in conn.execute("SELECT payload FROM items").fetchall()]
    assert sorted(payloads) == ["parent"] + ["w"] * 50
    stats = pg_writer.stats()
    assert stats["pid"] == pid
    assert stats["restarts"] == 0


def test_a_forked_child_that_lives_on_holds_no_server_socket(
    pg_writer: mpwriter.Writer, gate: Gate
) -> None:
    """A child that kept the writer's socket to the server would keep the
    server's session (and its locks, its open transaction) alive after the
    writer died, and callers would still wait on reply pipes it holds."""
    writer_pid = pg_writer.stats()["pid"]
    writer_sockets = _tcp_sockets_of(writer_pid)
    assert writer_sockets  # its connection to the server
    child = pg_writer.call(fork_a_child_that_lives_on)
    try:
        assert not _tcp_sockets_of(child) & writer_sockets
        gate.hold(pg_writer)  # a request in flight when the writer dies
        killed = time.monotonic()
        os.kill(writer_pid, signal.SIGKILL)
        outcome = gate.future.exception(timeout=15.0)
        assert time.monotonic() - killed < 5.0
        assert isinstance(outcome, mpwriter.WriterCrashed), repr(outcome)
        assert pg_writer.execute("INSERT INTO items(payload) VALUES ('served')").rowcount == 1
        assert pg_writer.stats()["restarts"] == 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
