"""Trust, round 3 (issue 17), the SQLite engine and the shared writer code:
one process serves, nobody pays for another's error, every outcome told truly.

Each test names the behaviour it pins; each failed on the code before the fix.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import sqlite3
import subprocess
import sys
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


def fork_and_return_in_both(conn: sqlite3.Connection) -> int:
    """Forks mid-transaction; the child tries to write, then returns normally too."""
    conn.execute("INSERT INTO items(client, payload) VALUES (0, 'parent')")
    pid = os.fork()
    if pid == 0:
        with contextlib.suppress(sqlite3.Error):  # refused in the child
            conn.execute("INSERT INTO items(client, payload) VALUES (0, 'child')")
        return 0
    return pid


def write_child_file(path: str) -> None:
    with open(path, "w") as file:
        file.write(f"written by {os.getpid()}")


def run_children(conn: sqlite3.Connection, path: str) -> tuple[int, int | None]:
    """A subprocess and a fork-started multiprocessing.Process, for the function's own use."""
    returncode = subprocess.run([sys.executable, "-c", "pass"], check=False).returncode
    process = multiprocessing.get_context("fork").Process(target=write_child_file, args=(path,))
    process.start()
    process.join(10.0)
    conn.execute("INSERT INTO items(client, payload) VALUES (0, 'after children')")
    return returncode, process.exitcode


def write_and_check_replies(writer: mpwriter.Writer, client: int, count: int) -> None:
    """A client process: every reply must be its own request's."""
    for seq in range(count):
        result = writer.execute(
            "INSERT INTO items(client, seq, payload) VALUES (?, ?, 'w') RETURNING client, seq",
            (client, seq),
        )
        if result.rows != [(client, seq)]:
            os._exit(3)
    os._exit(0)


# -- item 1: a call() that forks makes no second writer -------------------------------


def wait_exited(pid: int, timeout: float = 10.0) -> None:
    """Wait for a process that is not our child to exit (a zombie has exited)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # gone and reaped already
    try:
        assert select.select([pidfd], [], [], timeout)[0], f"process {pid} still runs"
    finally:
        os.close(pidfd)


def test_a_call_that_forks_leaves_one_writer_serving(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    pid = writer.stats()["pid"]
    child = writer.call(fork_and_return_in_both)
    assert child > 0
    wait_exited(child)  # it came back into the writer's code and was ended there
    clients = [
        multiprocessing.get_context("fork").Process(
            target=write_and_check_replies, args=(writer, client, 200)
        )
        for client in range(1, 5)
    ]
    for process in clients:
        process.start()
    for process in clients:
        process.join(30.0)
    assert [process.exitcode for process in clients] == [0, 0, 0, 0]
    with mpwriter.reader(db_path) as conn:
        rows = conn.execute("SELECT client, seq, payload FROM items").fetchall()
    written = sorted((client, seq) for client, seq, payload in rows if payload == "w")
    assert written == [(client, seq) for client in range(1, 5) for seq in range(200)]
    assert [payload for _, _, payload in rows if payload != "w"] == ["parent"]
    stats = writer.stats()
    assert stats["pid"] == pid
    assert stats["restarts"] == 0


def test_a_call_may_run_a_subprocess_and_a_fork_started_process(
    writer: mpwriter.Writer, db_path: Path, tmp_path: Path
) -> None:
    path = tmp_path / "child-wrote"
    assert writer.call(run_children, str(path)) == (0, 0)
    assert path.read_text().startswith("written by ")
    assert count_rows(db_path) == 1


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
