"""The public API, exercised in one process against a real writer process."""

from __future__ import annotations

import itertools
import os
import pickle
import re
import select
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

import mpwriter
from conftest import SCHEMA, Gate, count_rows, rowcounts_or_duplicate
from mpwriter import testing
from mpwriter._wire import frames as _wire

EXPECTED_PUBLIC_NAMES = {
    "AccessDenied",
    "DatabaseError",
    "Error",
    "IntegrityError",
    "Interrupted",
    "MigrationFailed",
    "MissingMainGuard",
    "MissingDependency",
    "NotPicklable",
    "NotSupportedError",
    "OperationalError",
    "OutcomeUnknown",
    "ProgrammingError",
    "QueueFull",
    "ReadConnection",
    "Reader",
    "RemoteError",
    "RemoteTraceback",
    "Result",
    "ServerUnavailable",
    "Session",
    "SessionExpired",
    "StatementRefused",
    "Stats",
    "Timeout",
    "Transaction",
    "UntrustedFile",
    "Writer",
    "WriterAlreadyRunning",
    "WriterClosed",
    "WriterCrashed",
    "WriterUnavailable",
    "attach",
    "connect",
    "get_writer",
    "native",
    "prometheus_text",
    "reader",
    "start",
    "start_or_connect",
}


def test_public_names_are_exactly_the_documented_ones() -> None:
    assert set(mpwriter.__all__) == EXPECTED_PUBLIC_NAMES
    for name in mpwriter.__all__:
        assert getattr(mpwriter, name) is not None


def test_the_api_reference_page_documents_every_public_name() -> None:
    page = Path(__file__).resolve().parent.parent / "docs" / "api.md"
    documented = set(re.findall(r"^::: mpwriter\.(\w+)$", page.read_text(), re.M))
    assert documented == set(mpwriter.__all__)


@pytest.mark.parametrize(
    "cls",
    [
        mpwriter.Error,
        mpwriter.WriterUnavailable,
        mpwriter.WriterClosed,
        mpwriter.WriterCrashed,
        mpwriter.WriterAlreadyRunning,
        mpwriter.AccessDenied,
        mpwriter.UntrustedFile,
        mpwriter.Timeout,
        mpwriter.QueueFull,
        mpwriter.Interrupted,
        mpwriter.StatementRefused,
        mpwriter.NotPicklable,
        mpwriter.RemoteError,
        mpwriter.SessionExpired,
        mpwriter.NotSupportedError,
        mpwriter.MissingMainGuard,
        mpwriter.MigrationFailed,
    ],
)
def test_every_error_pickles_and_derives_from_error(cls: type[Exception]) -> None:
    error = cls("a message")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is cls
    assert str(copy) == "a message"
    assert isinstance(copy, mpwriter.Error)


def test_timeout_is_also_a_timeout_error() -> None:
    assert issubclass(mpwriter.Timeout, TimeoutError)
    assert issubclass(mpwriter.WriterClosed, mpwriter.WriterUnavailable)
    assert issubclass(mpwriter.WriterCrashed, mpwriter.WriterUnavailable)


def test_execute_returns_rowcount_lastrowid_and_returning_rows(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    first = writer.execute("INSERT INTO items(payload) VALUES (?)", ("a",))
    assert first.rowcount == 1
    assert first.rows == []
    returned = writer.execute("INSERT INTO items(payload) VALUES (?) RETURNING id, payload", ("b",))
    assert returned.rows == [(first.lastrowid + 1, "b")]
    assert returned.lastrowid == first.lastrowid + 1
    updated = writer.execute("UPDATE items SET payload = 'z'")
    assert updated.rowcount == 2
    assert count_rows(db_path) == 2


def test_a_query_returns_its_values_with_their_types_and_column_names(
    writer: mpwriter.Writer,
) -> None:
    result = writer.execute("SELECT ?, ?, ?, ?, ? AS n", (1, 2.5, "text", b"blob", None))
    assert result.rows == [(1, 2.5, "text", b"blob", None)]
    assert [type(value) for value in result.rows[0]] == [int, float, str, bytes, type(None)]
    assert result.columns == ("?", "?", "?", "?", "n")
    assert result.rowcount == -1
    empty = writer.execute("SELECT id FROM items WHERE id < 0")
    assert empty.rows == []
    assert empty.columns == ("id",)


def test_a_returned_write_is_visible_to_a_reader_opened_afterwards(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    with mpwriter.reader(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (0,)
        writer.execute("INSERT INTO items(payload) VALUES ('seen')")
        assert conn.execute("SELECT payload FROM items").fetchall() == [("seen",)]


def test_reader_refuses_writes(writer: mpwriter.Writer, db_path: Path) -> None:
    with mpwriter.reader(db_path) as conn, pytest.raises(sqlite3.OperationalError):
        conn.execute("INSERT INTO items(payload) VALUES ('x')")


def test_a_with_block_closes_the_reader(writer: mpwriter.Writer, db_path: Path) -> None:
    with mpwriter.reader(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (0,)
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        conn.execute("SELECT 1")


def test_executemany_applies_all_rows(writer: mpwriter.Writer, db_path: Path) -> None:
    result = writer.executemany(
        "INSERT INTO items(client, seq) VALUES (?, ?)", ((1, n) for n in range(500))
    )
    assert result.rowcount == 500
    assert count_rows(db_path) == 500


def test_executemany_is_atomic_when_one_row_fails(writer: mpwriter.Writer, db_path: Path) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        writer.executemany("INSERT INTO items(client, seq) VALUES (?, ?)", [(1, 1), (1, 2), (1, 1)])
    assert count_rows(db_path) == 0


def test_executescript_is_atomic(writer: mpwriter.Writer, db_path: Path) -> None:
    writer.executescript(
        "INSERT INTO items(payload) VALUES ('semi;colon');"
        "CREATE TABLE extra(x); INSERT INTO extra VALUES (1)"
    )
    assert count_rows(db_path) == 1
    assert count_rows(db_path, "extra") == 1
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        writer.executescript("INSERT INTO extra VALUES (2); INSERT INTO missing VALUES (3);")
    # The script failed half-way: its first statement was rolled back too.
    assert count_rows(db_path, "extra") == 1


def test_transaction_applies_everything_or_nothing(writer: mpwriter.Writer, db_path: Path) -> None:
    with writer.transaction() as tx:
        tx.execute("INSERT INTO items(client, seq) VALUES (1, 1)")
        tx.executemany("INSERT INTO items(client, seq) VALUES (?, ?)", [(1, 2), (1, 3)])
    assert tx.results is not None
    assert [r.rowcount for r in tx.results] == [1, 2]
    assert count_rows(db_path) == 3

    with pytest.raises(sqlite3.IntegrityError):
        insert_pair_with_duplicate(writer)
    assert count_rows(db_path) == 3


def insert_pair_with_duplicate(writer: mpwriter.Writer) -> None:
    with writer.transaction() as tx:
        tx.execute("INSERT INTO items(client, seq) VALUES (2, 1)")
        tx.execute("INSERT INTO items(client, seq) VALUES (1, 1)")  # duplicate of the above


def abandon_transaction(writer: mpwriter.Writer) -> None:
    with writer.transaction() as tx:
        tx.execute("INSERT INTO items(client, seq) VALUES (1, 1)")
        raise RuntimeError("changed my mind")


def test_transaction_body_that_raises_sends_nothing(writer: mpwriter.Writer, db_path: Path) -> None:
    before = writer.stats()["requests"]
    with pytest.raises(RuntimeError, match="changed my mind"):
        abandon_transaction(writer)
    assert writer.stats()["requests"] == before
    assert count_rows(db_path) == 0


def move_money(conn: sqlite3.Connection, amount: int) -> int:
    conn.execute("INSERT INTO items(client, seq, payload) VALUES (9, ?, 'transfer')", (amount,))
    return int(conn.execute("SELECT count(*) FROM items").fetchone()[0])


def fail_after_writing(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO items(client, seq) VALUES (8, 1)")
    raise ValueError("business rule broken")


def return_unpicklable(conn: sqlite3.Connection) -> Any:
    conn.execute("INSERT INTO items(client, seq) VALUES (7, 1)")
    return threading.Lock()


def try_to_commit(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO items(client, seq) VALUES (6, 1)")
    conn.commit()


def test_call_runs_the_function_in_the_writer(writer: mpwriter.Writer, db_path: Path) -> None:
    assert writer.call(move_money, 5) == 1
    assert writer.call_with_timeout(5.0, move_money, amount=6) == 2
    assert count_rows(db_path) == 2


def test_call_that_raises_is_rolled_back_and_reraised_with_writer_traceback(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    with pytest.raises(ValueError, match="business rule broken") as caught:
        writer.call(fail_after_writing)
    assert isinstance(caught.value.__cause__, mpwriter.RemoteTraceback)
    assert "fail_after_writing" in str(caught.value.__cause__)
    assert count_rows(db_path) == 0


def test_call_with_unpicklable_result_is_rolled_back(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    with pytest.raises(mpwriter.NotPicklable):
        writer.call(return_unpicklable)
    assert count_rows(db_path) == 0


def test_call_cannot_commit_the_batch(writer: mpwriter.Writer, db_path: Path) -> None:
    with pytest.raises(mpwriter.StatementRefused):
        writer.call(try_to_commit)
    assert count_rows(db_path) == 0


def test_sql_errors_arrive_as_their_sqlite3_class(writer: mpwriter.Writer) -> None:
    with pytest.raises(sqlite3.OperationalError, match="syntax error") as caught:
        writer.execute("INSRT INTO items VALUES (1)")
    assert isinstance(caught.value.__cause__, mpwriter.RemoteTraceback)
    writer.execute("INSERT INTO items(client, seq) VALUES (1, 1)")
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        writer.execute("INSERT INTO items(client, seq) VALUES (1, 1)")
    with pytest.raises(sqlite3.ProgrammingError):
        writer.execute("INSERT INTO items(client, seq) VALUES (?, ?)", (1,))
    # The writer keeps serving after each of them.
    assert writer.execute("INSERT INTO items(client, seq) VALUES (1, 2)").rowcount == 1


@pytest.mark.parametrize(
    "statement",
    ["BEGIN", "BEGIN IMMEDIATE", "COMMIT", "END", "ROLLBACK", "SAVEPOINT s", "RELEASE s"],
)
def test_transaction_control_is_refused(writer: mpwriter.Writer, statement: str) -> None:
    with pytest.raises(mpwriter.StatementRefused, match="refused"):
        writer.execute(statement)
    assert writer.execute("INSERT INTO items(payload) VALUES ('still serving')").rowcount == 1


def test_transaction_control_hidden_in_a_script_is_refused_and_nothing_applies(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    with pytest.raises(mpwriter.StatementRefused):
        writer.executescript(
            "INSERT INTO items(payload) VALUES ('a'); COMMIT;"
            " INSERT INTO items(payload) VALUES ('b');"
        )
    assert count_rows(db_path) == 0


def test_statements_that_cannot_run_in_a_transaction_run_alone(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    writer.execute("INSERT INTO items(payload) VALUES ('x')")
    writer.execute("VACUUM")
    writer.execute("PRAGMA foreign_keys = OFF")
    assert writer.call(read_pragma, "foreign_keys") == 0
    writer.execute("PRAGMA foreign_keys = ON")
    assert writer.call(read_pragma, "foreign_keys") == 1
    # The same text again, now inside a batch, is still run alone (not a no-op).
    writer.execute("PRAGMA foreign_keys = OFF")
    assert writer.call(read_pragma, "foreign_keys") == 0
    assert count_rows(db_path) == 1


def test_unpicklable_argument_raises_at_once_and_sends_nothing(writer: mpwriter.Writer) -> None:
    before = writer.stats()["requests"]
    with pytest.raises(mpwriter.NotPicklable):
        writer.execute("INSERT INTO items(payload) VALUES (?)", (threading.Lock(),))
    with pytest.raises(TypeError):  # NotPicklable is a TypeError too
        writer.call(move_money, threading.Lock())
    assert writer.stats()["requests"] == before


def test_unsupported_parameter_type_is_the_sqlite3_error(writer: mpwriter.Writer) -> None:
    # InterfaceError up to Python 3.10, ProgrammingError since.
    with pytest.raises((sqlite3.ProgrammingError, sqlite3.InterfaceError)):
        writer.execute("INSERT INTO items(payload) VALUES (?)", (1 + 2j,))


def test_submit_returns_futures_resolved_in_order(writer: mpwriter.Writer, db_path: Path) -> None:
    futures = [
        writer.submit("INSERT INTO items(client, seq) VALUES (1, ?) RETURNING seq", (n,))
        for n in range(50)
    ]
    results = [f.result(timeout=10) for f in futures]
    assert [r.rows for r in results] == [[(n,)] for n in range(50)]
    ids = [r.lastrowid for r in results]
    assert ids == sorted(ids)  # applied in the order they were sent
    failing = writer.submit("INSERT INTO nowhere VALUES (1)")
    with pytest.raises(sqlite3.OperationalError):
        failing.result(timeout=10)


def test_slot_numbers_that_wrap_around_skip_the_pipes_still_open(
    writer: mpwriter.Writer, gate: Gate
) -> None:
    """Slot numbers are 16 bits: after 65,535 pipes they wrap. A new pipe must
    not take the number of one still open, or the writer would take it for a
    replacement of that pipe and drop the old one under its request."""
    writer.execute("INSERT INTO items(client, seq) VALUES (0, 0)")  # pools pipe 0
    writer._link.pool.local.slot_numbers = itertools.count(_wire.NO_REPLY)  # next: 0 again
    gate.hold(writer)  # borrows pipe 0 and keeps its request in the writer
    behind = writer.submit("INSERT INTO items(client, seq) VALUES (0, 1)")  # a new pipe
    gate.release()
    assert gate.future.result(timeout=10) == "released"
    assert behind.result(timeout=10).rowcount == 1
    figures = writer.stats()
    assert figures["reply_pipes"] == 2, "one pipe displaced the other in the writer"
    assert figures["errors"] == 0


def test_a_reply_to_another_request_is_an_error_and_retires_the_pipe(
    writer: mpwriter.Writer,
) -> None:
    """Should a pipe ever hold a reply that is not this request's, the call
    fails and the pipe is not lent again: its own reply may still come."""
    writer.execute("INSERT INTO items(client, seq) VALUES (0, 0)")  # pools one pipe
    slot = writer._link.pool.local.free.pop()
    stray_id = 0xFFFF0000  # no request of this test has it (ids are 32 bits)
    # A frame whose handed-over payload is missing is answered at once
    # ("not applied"): a way to have the writer put a reply in this pipe.
    flags = _wire.WHOLE | _wire.HANDED_OVER
    key = testing.frame_key(writer)
    frame = _wire.encode_frame(
        _wire.Kind.EXECUTE, flags, writer._link.pool.local.sender, stray_id, slot.number, b"", key
    )
    os.write(writer._link.request_fd, frame)
    assert select.select([slot.fd], [], [], 10.0)[0], "the writer did not answer the stray frame"
    writer._link.pool.local.free.append(slot)  # lent again with that reply unread, as a bug would
    with pytest.raises(mpwriter.Error, match=f"reply to request {stray_id} arrived"):
        writer.execute("INSERT INTO items(client, seq) VALUES (0, 1)")
    assert slot not in writer._link.pool.local.free
    assert writer.execute("INSERT INTO items(client, seq) VALUES (0, 2)").rowcount == 1


def test_a_failed_reply_collector_fails_its_futures_and_is_replaced(
    writer: mpwriter.Writer, caplog: pytest.LogCaptureFixture
) -> None:
    """If the thread resolving submit() futures ever died, no future may hang.

    Nothing in the collector is known to raise, so the fault is injected
    through `mpwriter.testing`: its next step raises, as a bug there would.
    """
    with testing.inject(collector_fails=True):
        doomed = writer.submit("INSERT INTO items(client, seq) VALUES (1, 1)")
        with pytest.raises(mpwriter.Error, match="outcome unknown") as caught:
            doomed.result(timeout=10)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert "submit() futures failed" in caplog.text
    after = writer.submit("INSERT INTO items(client, seq) VALUES (2, 2)")
    assert after.result(timeout=10).rowcount == 1


def test_a_failing_request_inside_a_batch_leaves_the_others_committed(
    writer: mpwriter.Writer, db_path: Path, gate: Gate
) -> None:
    batches_before = writer.stats()["batches"]
    gate.hold(writer)
    futures = [
        writer.submit("INSERT INTO items(client, seq) VALUES (?, 0)", (n if n != 5 else 1,))
        for n in range(10)
    ]
    gate.release()
    assert gate.future.result(timeout=10) == "released"
    outcomes = rowcounts_or_duplicate(futures, sqlite3.IntegrityError, timeout=10)
    assert outcomes == [1] * 5 + ["duplicate"] + [1] * 4
    assert count_rows(db_path) == 9
    # The gate's call was one batch; the ten requests queued behind it, one more.
    assert writer.stats()["batches"] == batches_before + 2


@pytest.mark.parametrize(
    "culprit_sql",
    [
        # OR ROLLBACK makes SQLite abandon the whole transaction.
        "INSERT OR ROLLBACK INTO items(client, seq) VALUES (0, 0)",
        # OR FAIL keeps the rows a statement wrote before its failure: (5, 1)
        # and (5, 2) would stay in the transaction if nothing undid them.
        "INSERT OR FAIL INTO items(client, seq) VALUES (5, 1), (5, 2), (0, 0)",
    ],
    ids=["or-rollback", "or-fail"],
)
def test_a_request_that_spoils_the_transaction_leaves_its_batch_mates_committed(
    writer: mpwriter.Writer, db_path: Path, gate: Gate, culprit_sql: str
) -> None:
    writer.execute("INSERT INTO items(client, seq) VALUES (0, 0)")
    gate.hold(writer)
    before = writer.submit("INSERT INTO items(client, seq) VALUES (1, 1)")
    culprit = writer.submit(culprit_sql)
    after = writer.submit("INSERT INTO items(client, seq) VALUES (2, 2)")
    gate.release()
    assert before.result(timeout=10).rowcount == 1
    with pytest.raises(sqlite3.IntegrityError):
        culprit.result(timeout=10)
    assert after.result(timeout=10).rowcount == 1
    with mpwriter.reader(db_path) as conn:
        clients = [row[0] for row in conn.execute("SELECT client FROM items ORDER BY id")]
    assert clients == [0, 1, 2]
    # All three were one batch: it was replayed without the culprit.
    assert writer.stats()["replayed_batches"] == 1


def test_timed_out_request_never_hands_its_late_reply_to_the_next(
    writer: mpwriter.Writer, gate: Gate
) -> None:
    gate.hold(writer)
    with pytest.raises(mpwriter.Timeout):
        writer.execute("INSERT INTO items(payload) VALUES ('late') RETURNING payload", timeout=0.2)
    gate.release()
    result = writer.execute("INSERT INTO items(payload) VALUES ('next') RETURNING payload")
    assert result.rows == [("next",)]
    # The timed-out request's deadline had passed before the writer reached it.
    assert writer.stats()["expired"] == 1


def test_stats_reports_the_documented_figures(writer: mpwriter.Writer) -> None:
    writer.execute("INSERT INTO items(payload) VALUES ('x')")
    stats = writer.stats()
    for key in ("requests", "batches", "commits", "errors", "queue_depth", "retries"):
        assert key in stats
    assert stats["requests"] >= 1
    assert stats["commits"] >= 1


def test_close_is_idempotent_and_later_calls_raise_writer_closed(db_path: Path) -> None:
    writer = mpwriter.start(db_path, init=SCHEMA, context="fork")
    writer.execute("INSERT INTO items(payload) VALUES ('kept')")
    writer.close()
    writer.close()
    assert writer.closed
    with pytest.raises(mpwriter.WriterClosed):
        writer.execute("INSERT INTO items(payload) VALUES ('refused')")
    assert count_rows(db_path) == 1
    # The lock is released: a new writer can start on the same file.
    with mpwriter.start(db_path, context="fork") as again:
        assert again.execute("INSERT INTO items(payload) VALUES ('again')").rowcount == 1
    assert count_rows(db_path) == 2


def test_close_checkpoints_the_wal(db_path: Path) -> None:
    with mpwriter.start(db_path, init=SCHEMA, context="fork") as writer:
        writer.executemany("INSERT INTO items(seq) VALUES (?)", [(n,) for n in range(1000)])
    wal = db_path.with_name(db_path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0


def test_start_rejects_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        mpwriter.start(tmp_path / "missing" / "app.db")


def test_failing_init_is_raised_by_start(db_path: Path) -> None:
    with pytest.raises(sqlite3.OperationalError, match="syntax error"):
        mpwriter.start(db_path, init="CREAT TABLE x(y)", context="fork")
    # Nothing is left holding the lock.
    with mpwriter.start(db_path, context="fork") as writer:
        assert not writer.closed


def test_full_synchronous_is_applied(db_path: Path) -> None:
    with mpwriter.start(db_path, synchronous="FULL", context="fork") as writer:
        assert writer.call(read_pragma, "synchronous") == 2  # FULL
        assert writer.call(read_pragma, "journal_mode") == "wal"
        assert writer.call(read_pragma, "foreign_keys") == 1


def read_pragma(conn: sqlite3.Connection, name: str) -> Any:
    return conn.execute(f"PRAGMA {name}").fetchone()[0]


def test_foreign_keys_are_enforced(writer: mpwriter.Writer) -> None:
    writer.executescript(
        "CREATE TABLE parent(id INTEGER PRIMARY KEY);"
        "CREATE TABLE child(id INTEGER PRIMARY KEY, parent INTEGER REFERENCES parent(id));"
    )
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        writer.execute("INSERT INTO child(parent) VALUES (42)")


def test_error_replies_reuse_the_reply_pipe(writer: mpwriter.Writer) -> None:
    writer.execute("INSERT INTO items(client, seq) VALUES (1, 1)")
    for _ in range(20):
        with pytest.raises(sqlite3.IntegrityError):
            writer.execute("INSERT INTO items(client, seq) VALUES (1, 1)")
    # One thread, one call at a time: one pipe served all of them.
    assert writer.stats()["reply_pipes"] == 1


def init_in_a_transaction(conn: sqlite3.Connection) -> None:
    """An `init` that leaves its transaction open: the writer commits it."""
    conn.execute("BEGIN")
    conn.execute("CREATE TABLE IF NOT EXISTS items(id INTEGER PRIMARY KEY, payload TEXT)")


@pytest.mark.parametrize("statement", ["COMMIT", "ROLLBACK"])
def test_the_writers_own_statements_never_let_a_callers_through(
    db_path: Path, statement: str
) -> None:
    # sqlite3 caches prepared statements by their text and the authorizer only
    # sees a statement when it is prepared: whatever the writer itself ran at
    # start-up must not be found in that cache by a caller's identical text.
    with mpwriter.start(db_path, init=init_in_a_transaction, context="fork") as writer:
        with pytest.raises(mpwriter.StatementRefused):
            writer.execute(statement)
        assert writer.execute("INSERT INTO items(payload) VALUES ('x')").rowcount == 1
