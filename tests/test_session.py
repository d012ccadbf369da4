"""Interactive sessions: `Writer.session()` transactions, statement by statement.

Each test asserts what a session promises (read-your-writes, durable on
commit, nothing on rollback, nested savepoints, one failed statement alone)
and what the writer promises everyone else while one is open: hostile
sessions are rolled back alone, other processes' writes go on, nothing
acknowledged is lost.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import random
import signal
import sqlite3
import threading
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import pytest

import mpwriter
from _faults import reap  # tools/, on sys.path through conftest
from conftest import SCHEMA, count_rows

FORK = multiprocessing.get_context("fork")
INSERT = "INSERT INTO items(client, seq) VALUES (?, ?)"


def rows_of(db_path: Path, client: int) -> list[int]:
    with mpwriter.reader(db_path) as conn:
        found = conn.execute("SELECT seq FROM items WHERE client = ? ORDER BY seq", (client,))
        return [row[0] for row in found]


def free_pages(db_path: Path) -> int:
    with mpwriter.reader(db_path) as conn:
        count: int = conn.execute("PRAGMA freelist_count").fetchone()[0]
        return count


# -- one session -------------------------------------------------------------------


def test_a_session_reads_its_own_writes_and_others_see_them_only_after_commit(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    with writer.session() as session:
        assert not session.in_transaction
        inserted = session.execute(INSERT, (1, 1))
        assert session.in_transaction
        assert inserted.rowcount == 1
        read = session.execute("SELECT client, seq FROM items WHERE id = ?", (inserted.lastrowid,))
        assert read.rows == [(1, 1)]
        assert read.columns == ("client", "seq")
        session.executemany(INSERT, [(1, 2), (1, 3)])
        session.executescript("INSERT INTO items(client, seq) VALUES (1, 4);")
        assert session.execute("SELECT count(*) FROM items").rows == [(4,)]
        assert rows_of(db_path, 1) == []  # a reader sees nothing before the commit
        session.commit()
        # Durable once commit() returns: a reader on its own connection sees it.
        assert rows_of(db_path, 1) == [1, 2, 3, 4]
        assert not session.in_transaction
        # The session is usable again: the next statement opens a new transaction.
        session.execute(INSERT, (1, 5))
    assert rows_of(db_path, 1) == [1, 2, 3, 4, 5]


def fail_in_a_session(writer: mpwriter.Writer) -> None:
    with writer.session() as session:
        session.execute(INSERT, (2, 1))
        raise RuntimeError("the block fails: its transaction is rolled back")


def test_rollback_leaves_nothing(writer: mpwriter.Writer, db_path: Path) -> None:
    session = writer.session()
    session.execute(INSERT, (1, 1))
    session.rollback()
    assert not session.in_transaction
    with pytest.raises(RuntimeError):
        fail_in_a_session(writer)
    session.close()
    assert count_rows(db_path) == 0
    assert writer.execute("SELECT count(*) FROM items").rows == [(0,)]


def test_a_failing_statement_leaves_the_session_usable(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    with writer.session() as session:
        session.execute(INSERT, (1, 1))
        with pytest.raises(sqlite3.IntegrityError):
            session.execute(INSERT, (1, 1))
        with pytest.raises(mpwriter.OperationalError):
            session.execute("SELECT * FROM no_such_table")
        assert session.in_transaction
        session.execute(INSERT, (1, 2))
    assert rows_of(db_path, 1) == [1, 2]


def test_nested_savepoints_work_and_the_writers_own_are_out_of_reach(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    with writer.session() as session:
        session.execute(INSERT, (1, 1))
        session.execute("SAVEPOINT outer_sp")
        session.execute(INSERT, (1, 2))
        session.execute("SAVEPOINT inner_sp")
        session.execute(INSERT, (1, 3))
        session.execute("ROLLBACK TO inner_sp")
        session.execute("RELEASE inner_sp")
        session.execute("RELEASE SAVEPOINT outer_sp")
        session.execute("SAVEPOINT gone")
        session.execute(INSERT, (1, 4))
        session.execute("ROLLBACK TO SAVEPOINT gone")
        session.execute("RELEASE gone")
        with pytest.raises(mpwriter.StatementRefused):
            session.execute("SAVEPOINT mpwriter_request")
        with pytest.raises(mpwriter.StatementRefused):
            session.execute("RELEASE mpwriter_request")
    assert rows_of(db_path, 1) == [1, 2]


@pytest.mark.parametrize("sql", ["BEGIN", "BEGIN IMMEDIATE", "COMMIT", "END", "ROLLBACK"])
def test_transaction_control_as_sql_is_refused_and_the_session_goes_on(
    writer: mpwriter.Writer, db_path: Path, sql: str
) -> None:
    with writer.session() as session:
        session.execute(INSERT, (1, 1))
        with pytest.raises(mpwriter.StatementRefused, match=r"Session\.commit"):
            session.execute(sql)
        session.execute(INSERT, (1, 2))
    assert rows_of(db_path, 1) == [1, 2]
    stats = writer.stats()
    assert (stats["refused"], stats["errors"]) == (1, 1)


def test_a_savepoint_allowed_in_a_session_stays_refused_outside(
    writer: mpwriter.Writer,
) -> None:
    # sqlite3 caches prepared statements by their text, and the authorizer only
    # vets a statement when it is prepared: the session's must not be reused.
    with writer.session() as session:
        session.execute("SAVEPOINT a")
        session.execute("RELEASE a")
    with pytest.raises(mpwriter.StatementRefused):
        writer.execute("SAVEPOINT a")
    with pytest.raises(mpwriter.StatementRefused):
        writer.execute("RELEASE a")


def test_a_session_commit_shares_the_commit_of_the_requests_it_held(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    before = writer.stats()
    session = writer.session()
    session.execute(INSERT, (1, 1))
    # Sent (and held by the writer) before the session commits.
    held = writer.submit(INSERT, (2, 1))
    session.commit()
    assert held.result(timeout=10).rowcount == 1
    after = writer.stats()
    assert after["commits"] - before["commits"] == 1  # one COMMIT for both
    assert after["sessions"] - before["sessions"] == 1
    assert after["session_waits"] - before["session_waits"] == 1
    assert after["session_wait_seconds"] > before["session_wait_seconds"]
    assert rows_of(db_path, 1) == [1]
    assert rows_of(db_path, 2) == [1]


def test_a_vacuum_held_behind_a_session_runs_alone_after_the_shared_commit(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    writer.execute("CREATE TABLE ballast(b BLOB)")
    writer.execute("INSERT INTO ballast VALUES (zeroblob(200000))")
    writer.execute("DROP TABLE ballast")
    assert free_pages(db_path) > 0
    before = writer.stats()
    session = writer.session()
    session.execute(INSERT, (1, 1))
    # Held while the session is open; SQLite sets it aside to run alone, after
    # the batch the session's COMMIT is carried into.
    vacuum = writer.submit("VACUUM")
    session.commit()
    vacuum.result(timeout=10)
    assert free_pages(db_path) == 0  # the VACUUM ran
    assert writer.stats()["session_waits"] - before["session_waits"] == 1
    assert rows_of(db_path, 1) == [1]
    assert not session.in_transaction


def test_a_session_whose_shared_commit_is_abandoned_by_sqlite_is_told_so(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    writer.execute(INSERT, (9, 9))
    session = writer.session()
    session.execute(INSERT, (1, 1))
    # Held while the session is open, then run in the transaction that holds
    # its work: ON CONFLICT ROLLBACK makes SQLite abandon that transaction.
    spoiler = writer.submit("INSERT OR ROLLBACK INTO items(client, seq) VALUES (9, 9)")
    bystander = writer.submit(INSERT, (2, 1))
    with pytest.raises(mpwriter.SessionExpired, match="not applied"):
        session.commit()
    with pytest.raises(sqlite3.IntegrityError):
        spoiler.result(timeout=10)
    assert bystander.result(timeout=10).rowcount == 1  # replayed without the spoiler
    assert rows_of(db_path, 1) == []  # never acknowledged, not applied
    assert rows_of(db_path, 2) == [1]
    assert not session.in_transaction


def test_a_statement_that_makes_sqlite_abandon_the_transaction_ends_the_session(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    writer.execute(INSERT, (9, 9))
    session = writer.session()
    session.execute(INSERT, (1, 1))
    with pytest.raises(sqlite3.IntegrityError):
        session.execute("INSERT OR ROLLBACK INTO items(client, seq) VALUES (9, 9)")
    with pytest.raises(mpwriter.SessionExpired, match="whole transaction"):
        session.execute(INSERT, (1, 2))
    session.execute(INSERT, (1, 3))  # a new transaction
    session.commit()
    assert rows_of(db_path, 1) == [3]


def test_a_session_survives_nothing_of_a_dead_writer(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    session = writer.session(idle_limit=60.0, total_limit=60.0)
    session.execute(INSERT, (1, 1))
    # stats() is answered while the session is open (it writes nothing).
    os.kill(writer.stats(timeout=10.0)["pid"], signal.SIGKILL)
    with pytest.raises(mpwriter.WriterCrashed, match="rolled back, not committed"):
        session.execute(INSERT, (1, 2))
    assert not session.in_transaction
    # The restarted writer serves the session again, in a new transaction.
    session.execute(INSERT, (1, 3))
    session.commit()
    assert rows_of(db_path, 1) == [3]


def test_sessions_from_several_threads_are_served_one_after_another(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    errors: list[BaseException] = []

    def run(client: int) -> None:
        try:
            for _ in range(20):
                with writer.session() as session:
                    (count,) = session.execute(
                        "SELECT count(*) FROM items WHERE client = ?", (client,)
                    ).rows[0]
                    session.execute(INSERT, (client, count))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(client,)) for client in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    for client in range(4):
        assert rows_of(db_path, client) == list(range(20))


def test_async_session(writer: mpwriter.Writer, db_path: Path) -> None:
    async def main() -> list[tuple[Any, ...]]:
        session = writer.session()
        await session.aexecute(INSERT, (1, 1))
        await session.aexecutemany(INSERT, [(1, 2)])
        await session.aexecutescript("INSERT INTO items(client, seq) VALUES (1, 3);")
        rows = (await session.aexecute("SELECT seq FROM items ORDER BY seq")).rows
        await session.acommit()
        await session.aexecute(INSERT, (1, 4))
        await session.arollback()
        return rows

    assert asyncio.run(main()) == [(1,), (2,), (3,)]
    assert rows_of(db_path, 1) == [1, 2, 3]


def test_postgres_writers_refuse_sessions(pg_writer: mpwriter.Writer) -> None:
    session = pg_writer.session()
    with pytest.raises(mpwriter.NotSupportedError, match="SQLite"):
        session.execute("SELECT 1")
    assert not session.in_transaction
    assert pg_writer.execute("SELECT 1").rows == [(1,)]


# -- hostile sessions, with other processes writing meanwhile -----------------------------


def keep_writing(writer: mpwriter.Writer, client: int, stop: Any, report: Connection) -> None:
    """Child: insert rows until told to stop; report the seqs acknowledged."""
    acknowledged: list[int] = []
    failures: list[str] = []
    seq = 0
    while not stop.is_set() or seq < 20:
        try:
            writer.execute(INSERT, (client, seq), timeout=20)
            acknowledged.append(seq)
        except mpwriter.Error as exc:
            failures.append(repr(exc))
        seq += 1
    report.send((acknowledged, failures))


def hostile(
    writer: mpwriter.Writer, how: str, ready: Connection, go_on: Connection, report: Connection
) -> None:
    """Child: open a session, write in it, then misbehave as ``how`` says."""
    outcome = "none"
    try:
        limit = 60.0 if how == "killed" else 0.5
        session = writer.session(idle_limit=limit, total_limit=limit)
        session.execute(INSERT, (99, 1))
        if how == "commits_itself":
            for sql in ("COMMIT", "END", "BEGIN", "ROLLBACK"):
                try:
                    session.execute(sql)
                except mpwriter.StatementRefused:
                    outcome = "refused"
            session.execute(INSERT, (99, 2))
        ready.send("in session")
        # A pipe, not an Event: a SIGKILL inside Event.wait() breaks the Event.
        wait([go_on], 30)  # nothing comes for "killed" (it is SIGKILLed while here)
        if how == "sleeps":
            try:
                session.execute(INSERT, (99, 3))
                outcome = "went on"
            except mpwriter.SessionExpired:
                outcome = "expired"
        # "never_commits" and "commits_itself" just leave, without a commit.
    except BaseException as exc:
        outcome = repr(exc)
    report.send(outcome)


@pytest.mark.parametrize("how", ["never_commits", "sleeps", "killed", "commits_itself"])
def test_a_hostile_session_is_rolled_back_alone_while_others_write(db_path: Path, how: str) -> None:
    with mpwriter.start(db_path, init=SCHEMA, timeout=20.0, context="fork") as writer:
        stop = FORK.Event()
        go_on, go_on_w = FORK.Pipe(duplex=False)
        reports: list[Connection] = []
        children = []
        for client in (1, 2):
            receive, send = FORK.Pipe(duplex=False)
            child = FORK.Process(target=keep_writing, args=(writer, client, stop, send))
            child.start()
            send.close()
            reports.append(receive)
            children.append(child)
        ready_r, ready_w = FORK.Pipe(duplex=False)
        outcome_r, outcome_w = FORK.Pipe(duplex=False)
        bad = FORK.Process(target=hostile, args=(writer, how, ready_w, go_on, outcome_w))
        bad.start()
        try:
            assert wait([ready_r], 20), "the hostile session did not start"
            assert ready_r.recv() == "in session"
            if how == "killed":
                os.kill(bad.pid, signal.SIGKILL)  # type: ignore[arg-type]
            else:
                if how == "commits_itself":
                    assert wait([outcome_r, bad.sentinel], 0) == []  # still in session
                # This request waits for the session: it is served once the
                # writer rolled the session back (idle limit, or its caller gone).
            # The killed session's idle limit is 60 s: served within the 20 s
            # timeout only because the writer saw its caller die.
            writer.execute(INSERT, (3, 0))
            go_on_w.send("go on")
            if how != "killed":
                assert wait([outcome_r], 20)
                outcome = outcome_r.recv()
                expected = {"sleeps": "expired", "commits_itself": "refused"}.get(how, "none")
                assert outcome == expected
            stop.set()
            results = []
            for receive in reports:
                assert wait([receive], 30), "a writing child did not report"
                results.append(receive.recv())
        finally:
            stop.set()
            go_on_w.close()
            for child in [*children, bad]:
                reap(child)
        assert rows_of(db_path, 99) == []  # the hostile session: nothing applied
        for client, (acknowledged, failures) in zip((1, 2), results, strict=True):
            assert failures == []
            assert rows_of(db_path, client) == acknowledged  # nothing acknowledged lost
        stats = writer.stats()
        assert stats["sessions_expired"] == 1
        assert stats["session_waits"] >= 1


# -- read-modify-write from 8 processes --------------------------------------------

ACCOUNTS = 10
OPENING = 1000
BANK = """
CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL);
CREATE TABLE ledger (id INTEGER PRIMARY KEY, src INTEGER, dst INTEGER, amount INTEGER);
"""


def transfer_money(writer: mpwriter.Writer, seed: int, count: int, report: Connection) -> None:
    """Child: ``count`` transfers, each read-modify-write in one session."""
    chance = random.Random(seed)
    errors: list[str] = []
    done = 0
    for _ in range(count):
        src, dst = chance.sample(range(ACCOUNTS), 2)
        amount = chance.randint(1, 50)
        try:
            with writer.session() as session:
                query = "SELECT balance FROM accounts WHERE id = ?"
                (balance,) = session.execute(query, (src,)).rows[0]
                if balance < amount:
                    continue
                update = "UPDATE accounts SET balance = ? WHERE id = ?"
                session.execute(update, (balance - amount, src))
                (other,) = session.execute(query, (dst,)).rows[0]
                session.execute(update, (other + amount, dst))
                session.execute(
                    "INSERT INTO ledger(src, dst, amount) VALUES (?, ?, ?)", (src, dst, amount)
                )
            done += 1
        except mpwriter.Error as exc:
            errors.append(repr(exc))
    report.send((done, errors))


def test_bank_transfers_from_8_processes_conserve_money(db_path: Path) -> None:
    opening = ";".join(
        f"INSERT INTO accounts VALUES ({account}, {OPENING})" for account in range(ACCOUNTS)
    )
    with mpwriter.start(db_path, init=BANK + opening, timeout=20.0, context="fork") as writer:
        reports, children = [], []
        for seed in range(8):
            receive, send = FORK.Pipe(duplex=False)
            child = FORK.Process(target=transfer_money, args=(writer, seed, 40, send))
            child.start()
            send.close()
            reports.append(receive)
            children.append(child)
        try:
            outcomes = []
            for receive in reports:
                assert wait([receive], 50), "a transferring child did not report"
                outcomes.append(receive.recv())
        finally:
            for child in children:
                reap(child)
        assert [errors for _, errors in outcomes] == [[]] * 8
        with mpwriter.reader(db_path) as conn:
            balances = dict(conn.execute("SELECT id, balance FROM accounts").fetchall())
            ledger = conn.execute("SELECT src, dst, amount FROM ledger").fetchall()
        assert len(ledger) == sum(done for done, _ in outcomes) > 0
        assert sum(balances.values()) == ACCOUNTS * OPENING
        for account in range(ACCOUNTS):
            moved = sum(a for s, _, a in ledger if s == account) - sum(
                a for _, d, a in ledger if d == account
            )
            assert balances[account] == OPENING - moved


def test_closing_the_writer_rolls_an_open_session_back_and_serves_the_rest(
    db_path: Path,
) -> None:
    writer = mpwriter.start(db_path, init=SCHEMA, timeout=20.0, context="fork")
    session = writer.session(idle_limit=60.0, total_limit=60.0)
    session.execute(INSERT, (1, 1))
    held = writer.submit(INSERT, (2, 1))
    # The CLOSE request must not wait for the session's 60 s limits: past its
    # 10 s, close() would stop the writer by force, and the held write with it.
    began = time.monotonic()
    writer.close(timeout=10.0)
    # A graceful close, not the escalation at 10 s (which also ends in a
    # rolled-back session): the writer rolled it back when CLOSE came.
    assert time.monotonic() - began < 5.0
    assert held.result(timeout=1).rowcount == 1
    with pytest.raises(mpwriter.WriterClosed, match="rolled back"):
        session.execute(INSERT, (1, 2))
    assert rows_of(db_path, 1) == []
    assert rows_of(db_path, 2) == [1]


@pytest.mark.parametrize("shared", [False, True])
def test_a_session_refused_by_a_deferred_constraint_at_commit_is_told_and_harms_nobody(
    writer: mpwriter.Writer, db_path: Path, shared: bool
) -> None:
    writer.executescript(
        "CREATE TABLE parent(id INTEGER PRIMARY KEY);"
        "CREATE TABLE child(id INTEGER PRIMARY KEY,"
        " parent INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED);"
    )
    session = writer.session()
    session.execute("INSERT INTO child(parent) VALUES (42)")  # checked only at COMMIT
    # Shared: a request held by the session runs in the transaction that
    # holds the session's work, and its COMMIT is refused for the session.
    held = writer.submit(INSERT, (2, 1)) if shared else None
    # Alone, its COMMIT is its own and refused as sqlite3's commit() is
    # refused; shared, the batch is run again without it, which loses it.
    refused = mpwriter.SessionExpired if shared else mpwriter.IntegrityError
    with pytest.raises(refused, match="not applied"):
        session.commit()
    if held is not None:
        assert held.result(timeout=10).rowcount == 1  # innocent: committed
    with mpwriter.reader(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM child").fetchone() == (0,)
    assert rows_of(db_path, 2) == ([1] if shared else [])


def test_a_session_whose_caller_gave_up_in_the_queue_holds_nobody(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    holder = writer.session(idle_limit=60.0, total_limit=60.0)
    holder.execute(INSERT, (1, 1))
    late = writer.session(idle_limit=60.0, total_limit=60.0)

    async def give_up() -> None:
        # Its first statement waits behind the open session; the caller gives
        # up long before the statement's own deadline (cancelled).
        await asyncio.wait_for(late.aexecute(INSERT, (2, 1), timeout=60.0), 0.5)

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(give_up())
    assert not late.in_transaction
    holder.commit()
    # Served now, not after the late session's 60 s idle limit (10 s timeout).
    assert writer.execute(INSERT, (3, 1), timeout=10.0).rowcount == 1
    assert rows_of(db_path, 2) == []
    assert rows_of(db_path, 1) == [1]


def open_and_drop(writer: mpwriter.Writer) -> None:
    session = writer.session(idle_limit=60.0, total_limit=60.0)
    session.execute(INSERT, (1, 1))
    # Returns without commit, rollback or close: the session is collected.


def test_a_session_dropped_mid_transaction_is_rolled_back_at_once(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    open_and_drop(writer)
    gc.collect()
    # Served now, not after the dropped session's 60 s idle limit (10 s timeout).
    assert writer.execute(INSERT, (2, 1), timeout=10.0).rowcount == 1
    assert rows_of(db_path, 1) == []
    assert writer.stats()["sessions_expired"] == 1


def test_a_busy_session_is_rolled_back_at_its_total_limit(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    session = writer.session(idle_limit=60.0, total_limit=0.5)
    pace = threading.Event()  # never set: its wait paces the statements
    with pytest.raises(mpwriter.SessionExpired, match="total limit"):  # noqa: PT012
        for seq in range(200):  # 10 s at most
            session.execute(INSERT, (1, seq))
            pace.wait(0.05)  # sleep-ok: a session that keeps busy past its total limit
    assert rows_of(db_path, 1) == []
    assert writer.stats()["sessions_expired"] == 1


@pytest.mark.parametrize(
    "limits",
    [
        {"idle_limit": float("nan")},
        {"total_limit": float("nan")},
        {"idle_limit": float("inf")},
        {"total_limit": float("inf")},
        {"idle_limit": -1.0},
        {"total_limit": 0.0},
    ],
)
def test_session_limits_that_are_not_finite_and_positive_are_refused_at_the_call(
    writer: mpwriter.Writer, limits: dict[str, float]
) -> None:
    before = writer.stats()["requests"]
    with pytest.raises(ValueError, match="finite positive"):
        writer.session(**limits)
    assert writer.stats()["requests"] == before  # nothing was sent
    with pytest.raises(ValueError, match="max_session_seconds"):
        mpwriter.start(":unused:", max_session_seconds=limits.popitem()[1])


@pytest.mark.parametrize("asks", [300.0, float("nan"), float("inf")])
def test_a_session_asking_past_the_owners_maximum_is_rolled_back_at_it(
    db_path: Path, asks: float
) -> None:
    with mpwriter.start(
        db_path, init=SCHEMA, timeout=10.0, context="fork", max_session_seconds=1.0
    ) as writer:
        session = writer.session()
        # Set after the call's check, as a broken or hostile client could
        # send them: the writer must not trust what it is sent.
        session.idle_limit = session.total_limit = asks
        session.execute(INSERT, (1, 1))
        # Held behind the idle session, then served once the writer rolled it
        # back at its maximum (1 s), not after the 300 s the session asked for.
        assert writer.execute(INSERT, (2, 1), timeout=8.0).rowcount == 1
        with pytest.raises(mpwriter.SessionExpired, match="limit"):
            session.execute(INSERT, (1, 2))
        assert rows_of(db_path, 1) == []
        assert rows_of(db_path, 2) == [1]
        assert writer.stats()["sessions_expired"] == 1


def test_requests_held_behind_a_session_are_bounded_and_served_in_order_after_it(
    db_path: Path,
) -> None:
    # max_batch=4: the writer holds 16 batches (64 requests) and one read of
    # the pipe past them while a session is open; the rest wait in the pipe.
    with mpwriter.start(db_path, init=SCHEMA, timeout=10.0, context="fork", max_batch=4) as writer:
        session = writer.session(idle_limit=30.0, total_limit=30.0)
        session.execute(INSERT, (1, 1))
        for seq in range(40):  # under the bound: held, and the session goes on
            assert writer.post(INSERT, (2, seq), max_block=5.0)
        figures = writer.stats()  # answered while the session is open
        assert figures["queue_depth"] == 40
        assert session.execute("SELECT count(*) FROM items").rows == [(1,)]
        # Far more than the bound (and than one read of the pipe): the writer
        # stops reading, and the session's next statement is behind them.
        for seq in range(40, 3040):
            assert writer.post(INSERT, (2, seq), max_block=5.0)
        with pytest.raises(mpwriter.SessionExpired, match="filled the queue behind it"):
            session.execute(INSERT, (1, 2))
        with mpwriter.reader(db_path) as conn:
            assert writer.execute("SELECT 1", timeout=10.0).rows == [(1,)]  # after every post
            found = conn.execute("SELECT client, seq FROM items ORDER BY id").fetchall()
        assert found == [(2, seq) for seq in range(3040)]  # all of them, in order
        assert writer.stats()["sessions_expired"] == 1
