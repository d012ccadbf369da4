"""Trust, round 3 (issue 17), the SQLite engine and the shared writer code:
one process serves, nobody pays for another's error, every outcome told truly.

Each test names the behaviour it pins; each failed on the code before the fix.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mpwriter
from conftest import SCHEDULING_SLIP, SCHEMA, Gate, count_rows, wait_exited
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


def run_children(conn: sqlite3.Connection, path: str) -> tuple[int, int | None, int | None]:
    """A subprocess and fork-started multiprocessing.Processes, for the function's
    own use: one runs to its end, one is ended with terminate() (SIGTERM)."""
    returncode = subprocess.run([sys.executable, "-c", "pass"], check=False).returncode
    context = multiprocessing.get_context("fork")
    process = context.Process(target=write_child_file, args=(path,))
    process.start()
    process.join(10.0)
    sleeper = context.Process(target=time.sleep, args=(30.0,))
    sleeper.start()
    sleeper.terminate()
    sleeper.join(10.0)
    conn.execute("INSERT INTO items(client, payload) VALUES (0, 'after children')")
    return returncode, process.exitcode, sleeper.exitcode


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
    assert writer.call(run_children, str(path)) == (0, 0, -signal.SIGTERM)
    assert path.read_text().startswith("written by ")
    assert count_rows(db_path) == 1


def fork_a_child_that_lives_on(conn: sqlite3.Connection) -> int:
    pid = os.fork()
    if pid == 0:
        time.sleep(60)  # sleep-ok: a child that outlives the writer, holding what it inherited
        os._exit(0)
    return pid


def test_a_forked_child_that_lives_on_holds_no_reply_pipe(
    writer: mpwriter.Writer, gate: Gate
) -> None:
    """Callers learn that their writer died from EOF on their reply pipe, and
    the supervisor from the writer's sentinel pipe: a child that kept copies
    of those would leave callers waiting out their timeout (10 s here)."""
    writer_pid = writer.stats()["pid"]
    child = writer.call(fork_a_child_that_lives_on)
    try:
        gate.hold(writer)  # a request in flight when the writer dies
        killed = time.monotonic()
        os.kill(writer_pid, signal.SIGKILL)
        outcome = gate.future.exception(timeout=15.0)
        assert time.monotonic() - killed < 5.0
        assert isinstance(outcome, mpwriter.WriterCrashed), repr(outcome)
        assert "outcome is unknown" in str(outcome)
        assert writer.execute("INSERT INTO items(payload) VALUES ('served')").rowcount == 1
        assert writer.stats()["restarts"] == 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


# -- item 9: a request stopped at its deadline is told Interrupted ------------------


def test_a_call_past_its_deadline_is_interrupted_not_left_unknown(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    began = time.monotonic()
    with pytest.raises(mpwriter.Interrupted, match=r"at its deadline .*not applied"):
        writer.call_with_timeout(1.0, spin_after_writing)
    assert time.monotonic() - began <= 1.0 + SCHEDULING_SLIP  # within its timeout
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


# -- item 5: a COMMIT refused by a deferred constraint fails only its culprit -------

DEFERRED_SCHEMA = """
CREATE TABLE IF NOT EXISTS parent (id INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS child (
    id INTEGER PRIMARY KEY,
    parent_id INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED,
    note TEXT
);
INSERT OR IGNORE INTO parent(id) VALUES (1);
"""


def new_gate(directory: Path) -> Gate:
    """A fresh `Gate` (one holds the writer once: its release byte stays behind)."""
    path = directory / f"gate-{time.monotonic_ns()}"
    path.mkdir()
    return Gate(path)


def warm_slots(writer: mpwriter.Writer, directory: Path, count: int) -> None:
    """Leave ``count`` registered reply pipes in this process's pool, so that
    as many requests can be sent while the writer is held: a new pipe is
    registered on the side socket, which holds only ten until the writer reads
    it. Each round holds the writer and needs at most seven new pipes."""
    for round_ in range(1, count // 7 + 2):
        gate = new_gate(directory)
        try:
            gate.hold(writer)
            futures = [writer.submit("SELECT 1") for _ in range(7 * round_)]
        finally:
            gate.release()
        assert gate.future.result(timeout=10.0) == "released"
        gate.close()
        for future in futures:
            future.result(timeout=10.0)


@pytest.mark.parametrize("culprits", [(30,), (0, 17, 60)], ids=["one", "three"])
def test_a_deferred_constraint_failing_at_commit_fails_only_its_culprit(
    db_path: Path, gate: Gate, tmp_path: Path, culprits: tuple[int, ...]
) -> None:
    """61 requests in one batch, the culprits among them inserting a dangling
    reference (checked only at COMMIT): the others commit."""
    with mpwriter.start(db_path, init=DEFERRED_SCHEMA, context="fork", timeout=10.0) as writer:
        warm_slots(writer, tmp_path, 62)
        before = writer.stats()
        gate.hold(writer)
        insert = "INSERT INTO child(parent_id, note) VALUES (?, ?)"
        futures = [
            writer.submit(insert, (999, f"dangling {n}") if n in culprits else (1, f"ok {n}"))
            for n in range(61)
        ]
        gate.release()
        assert gate.future.result(timeout=10.0) == "released"
        for n, future in enumerate(futures):
            if n not in culprits:
                assert future.result(timeout=10.0).rowcount == 1
        for n in culprits:
            error = futures[n].exception(timeout=10.0)
            assert isinstance(error, sqlite3.IntegrityError), repr(error)
            assert isinstance(error, mpwriter.IntegrityError)
            assert "FOREIGN KEY constraint failed" in str(error)
            assert "not applied" in str(error)
        after = writer.stats()
    assert after["batches"] - before["batches"] == 2  # the held call's, then all 61 at once
    assert after["errors"] - before["errors"] == len(culprits)
    with mpwriter.reader(db_path) as conn:
        notes = {row[0] for row in conn.execute("SELECT note FROM child")}
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    assert notes == {f"ok {n}" for n in range(61) if n not in culprits}


def insert_parent_and_dangling_child(writer: mpwriter.Writer) -> None:
    with writer.transaction() as tx:
        tx.execute("INSERT INTO parent(id) VALUES (2)")
        tx.execute("INSERT INTO child(parent_id, note) VALUES (998, 'dangling')")


def test_a_lone_request_failing_at_commit_gets_the_error_and_leaves_nothing(
    db_path: Path,
) -> None:
    with mpwriter.start(db_path, init=DEFERRED_SCHEMA, context="fork", timeout=10.0) as writer:
        with pytest.raises(mpwriter.IntegrityError, match="not applied"):
            writer.execute("INSERT INTO child(parent_id, note) VALUES (999, 'dangling')")
        with pytest.raises(sqlite3.IntegrityError, match="not applied"):
            insert_parent_and_dangling_child(writer)
        assert writer.execute("INSERT INTO child(parent_id, note) VALUES (1, 'ok')").rowcount == 1
    with mpwriter.reader(db_path) as conn:
        assert conn.execute("SELECT note FROM child").fetchall() == [("ok",)]
        assert conn.execute("SELECT id FROM parent").fetchall() == [(1,)]


class FailSavepointAfterCommits:
    """A ``writer_statement`` fault: once ``armed`` exists, the first SAVEPOINT
    after ``commits`` COMMITs raises, as a failing disk would make it."""

    def __init__(self, armed: Path, commits: int) -> None:
        self.armed = armed
        self.commits = commits
        self.fired = False

    def __call__(self, sql: str) -> None:
        if self.fired or not self.armed.exists():
            return
        if sql.startswith("COMMIT"):
            self.commits -= 1
        elif sql.startswith("SAVEPOINT") and self.commits <= 0:
            self.fired = True
            raise sqlite3.OperationalError("disk I/O error")


def test_a_writer_statement_failing_after_a_bisected_commit_fails_only_the_rest(
    db_path: Path, gate: Gate, tmp_path: Path
) -> None:
    """61 scripts in one batch, the 31st leaving a dangling reference: the
    bisection commits the first 30, then the writer's own SAVEPOINT fails.
    The 30 committed get their OK, the other 31 "not applied", and the
    database holds exactly the acknowledged rows."""
    armed = tmp_path / "armed"
    # Commits once armed: the held call's batch, the whole batch (refused),
    # its first half (committed); then the next SAVEPOINT fails.
    fault = FailSavepointAfterCommits(armed, commits=3)
    with testing.inject(writer_statement=fault):
        writer = mpwriter.start(db_path, init=DEFERRED_SCHEMA, context="fork", timeout=10.0)
    with writer:
        warm_slots(writer, tmp_path, 62)
        gate.hold(writer)
        armed.touch()
        insert = "INSERT INTO child(parent_id, note) VALUES ({}, '{}')"
        futures = [
            writer.submit_script(insert.format(999 if n == 30 else 1, f"n {n}")) for n in range(61)
        ]
        gate.release()
        assert gate.future.result(timeout=10.0) == "released"
        acknowledged = set()
        for n, future in enumerate(futures):
            error = future.exception(timeout=10.0)
            if error is None:
                acknowledged.add(f"n {n}")
            else:
                assert n >= 30, (n, error)
                assert isinstance(error, sqlite3.OperationalError), repr(error)
                assert "disk I/O error" in str(error)
                assert "not applied" in str(error)
        assert acknowledged == {f"n {n}" for n in range(30)}
        # The writer serves on.
        assert writer.execute("INSERT INTO child(parent_id, note) VALUES (1, 'after')").rowcount
    with mpwriter.reader(db_path) as conn:
        notes = {row[0] for row in conn.execute("SELECT note FROM child")}
    assert notes == acknowledged | {"after"}


# -- counters count once when a batch is replayed ------------------------------------


def test_errors_and_posts_dropped_count_once_when_a_batch_is_replayed(
    writer: mpwriter.Writer, gate: Gate, db_path: Path, tmp_path: Path
) -> None:
    writer.execute("INSERT INTO items(id, payload) VALUES (1, 'first')")
    warm_slots(writer, tmp_path, 3)
    for _ in range(3):  # dropped in this process: reported with its next post
        assert writer.post("INSERT INTO items(payload) VALUES (?)", (lambda: 0,)) is False
    before = writer.stats()
    gate.hold(writer)
    # One batch: the post that reports the 3 drops, a request that fails on
    # its own, then one that spoils the transaction (OR ROLLBACK): the batch
    # is replayed without it, and runs the first two again.
    assert writer.post("INSERT INTO items(payload) VALUES ('posted')")
    failing = writer.submit("INSERT INTO items(id, payload) VALUES (1, 'duplicate')")
    spoiler = writer.submit("INSERT OR ROLLBACK INTO items(id, payload) VALUES (1, 'rollback')")
    gate.release()
    assert gate.future.result(timeout=10.0) == "released"
    assert isinstance(failing.exception(timeout=10.0), sqlite3.IntegrityError)
    assert isinstance(spoiler.exception(timeout=10.0), sqlite3.IntegrityError)
    after = writer.stats()
    assert after["replayed_batches"] - before["replayed_batches"] == 1
    assert after["posts_dropped"] - before["posts_dropped"] == 3
    assert after["errors"] - before["errors"] == 2
    assert (
        after["errors_by_class"]["IntegrityError"]
        - before["errors_by_class"].get("IntegrityError", 0)
        == 2
    )
    with mpwriter.reader(db_path) as conn:
        payloads = sorted(row[0] for row in conn.execute("SELECT payload FROM items"))
    assert payloads == ["first", "posted"]
