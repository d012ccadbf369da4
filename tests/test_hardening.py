"""Writer hardening (issue 10): no committed write reported as failed, no writer
killed or reconfigured by a caller.

Each test names the behaviour it pins; each failed on the code before the fix.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mpwriter
from conftest import SCHEMA, Gate, count_rows, writer_inbox
from mpwriter import testing

# -- call() targets (module level: the writer imports them) ---------------------


class CustomAbort(BaseException):
    """A BaseException that is no Exception, as some frameworks define."""


def insert_then_raise(conn: sqlite3.Connection, kind: str) -> None:
    conn.execute("INSERT INTO items(payload) VALUES ('aborted')")
    if kind == "SystemExit":
        raise SystemExit(3)
    if kind == "KeyboardInterrupt":
        raise KeyboardInterrupt
    if kind == "GeneratorExit":
        raise GeneratorExit
    raise CustomAbort("custom")


class Unrebuildable:
    """Pickles, but its pickle cannot be loaded: __reduce__ omits a required argument."""

    def __init__(self, needed: int) -> None:
        self.needed = needed

    def __reduce__(self) -> tuple[Any, ...]:
        return (Unrebuildable, ())


class TwoArgumentError(Exception):
    """Unpickling calls TwoArgumentError(message): a TypeError in the caller."""

    def __init__(self, first: str, second: str) -> None:
        super().__init__(f"{first}/{second}")


def insert_and_return_unrebuildable(conn: sqlite3.Connection) -> Unrebuildable:
    conn.execute("INSERT INTO items(payload) VALUES ('unrebuildable')")
    return Unrebuildable(1)


def insert_and_raise_two_argument_error(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO items(payload) VALUES ('two-args')")
    raise TwoArgumentError("first", "second")


def spin_with_own_alarm_handler(conn: sqlite3.Connection) -> None:
    """A library that installs its own SIGALRM handler, then runs away."""
    signal.signal(signal.SIGALRM, lambda _signum, _frame: None)
    conn.execute("INSERT INTO items(payload) VALUES ('runaway')")
    while True:
        pass


def cancel_timers_and_block(conn: sqlite3.Connection) -> None:
    """Code that cancels the process timer (alarm(0)), then blocks."""
    signal.alarm(0)
    signal.setitimer(signal.ITIMER_REAL, 0)
    conn.execute("INSERT INTO items(payload) VALUES ('sleeper')")
    time.sleep(30)  # sleep-ok: the runaway the limit must stop


def overrun_inside_a_callback(conn: sqlite3.Connection, seconds: float) -> str:
    """Runs past the limit inside an SQLite callback, where sqlite3 swallows
    exceptions, catches the resulting error and returns as if all went well."""

    def spin() -> int:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
        return 1

    conn.create_function("spin", 0, spin)
    conn.execute("INSERT INTO items(payload) VALUES ('late')")
    with contextlib.suppress(sqlite3.OperationalError):
        conn.execute("SELECT spin()").fetchall()
    return "done"


def use_connection_from_a_thread(conn: sqlite3.Connection) -> str:
    outcome: list[str] = []

    def leak() -> None:
        try:
            conn.execute("INSERT INTO items(payload) VALUES ('from a thread')")
            outcome.append("used")
        except sqlite3.ProgrammingError as exc:
            outcome.append(f"ProgrammingError: {exc}")

    thread = threading.Thread(target=leak)
    thread.start()
    thread.join(10)
    return outcome[0] if outcome else "thread hung"


def set_row_factory(conn: sqlite3.Connection) -> None:
    conn.row_factory = sqlite3.Row
    conn.text_factory = bytes


def schema_with_bytearray_text(conn: sqlite3.Connection) -> None:
    conn.executescript(SCHEMA)
    conn.text_factory = bytearray


def read_rows(conn: sqlite3.Connection) -> list[Any]:
    return conn.execute("SELECT 'text', 1").fetchall()


def take_exclusive_lock_behind_the_authorizer(conn: sqlite3.Connection) -> None:
    conn.set_authorizer(lambda *_args: sqlite3.SQLITE_OK)  # allows everything
    conn.execute("PRAGMA locking_mode=EXCLUSIVE")
    conn.execute("INSERT INTO items(payload) VALUES ('exclusive')")


def deny_everything(conn: sqlite3.Connection) -> None:
    conn.set_authorizer(lambda *_args: sqlite3.SQLITE_DENY)


def trace_into(conn: sqlite3.Connection, path: str) -> None:
    def trace(statement: str) -> None:
        with open(path, "a") as log:
            log.write(statement + "\n")

    conn.set_trace_callback(trace)
    conn.execute("INSERT INTO items(payload) VALUES ('traced')")


def switch_transaction_handling(conn: sqlite3.Connection) -> None:
    conn.isolation_level = "DEFERRED"


# -- fixtures ------------------------------------------------------------------


@pytest.fixture
def limited(db_path: Path) -> Iterator[mpwriter.Writer]:
    """A writer whose requests stop after 0.3 s (execution_limit)."""
    handle = mpwriter.start(db_path, init=SCHEMA, timeout=10.0, context="fork", execution_limit=0.3)
    try:
        yield handle
    finally:
        handle.close(timeout=10.0)


def assert_same_writer_serves(writer: mpwriter.Writer, pid: int) -> None:
    assert writer.execute("INSERT INTO items(payload) VALUES ('after')").rowcount == 1
    stats = writer.stats()
    assert stats["pid"] == pid
    assert stats["restarts"] == 0


# -- item 1: statements run alone do not hold back the batch's replies ----------


def test_a_long_vacuum_holds_back_no_reply_and_keeps_its_own_deadline(
    db_path: Path, gate: Gate
) -> None:
    # The writer sleeps 2 s before each statement it runs alone, as a long
    # VACUUM would take; the watchdog would kill a writer 0.5 s past the
    # deadline it reads -- the INSERT's (0.8 s) on the old code.
    with testing.inject(solo_delay=2.0):
        writer = mpwriter.start(
            db_path, init=SCHEMA, context="fork", timeout=10.0, watchdog_grace=0.5
        )
    try:
        pid = writer.stats()["pid"]
        gate.hold(writer)  # so that both requests below form one batch
        vacuum = writer.submit("VACUUM", timeout=20.0)
        insert = writer.submit("INSERT INTO items(payload) VALUES ('quick')", timeout=0.8)
        gate.release()
        assert insert.result(timeout=5).rowcount == 1  # not Timeout: sent after COMMIT
        assert not vacuum.done()  # still running alone, 2 s long
        assert vacuum.result(timeout=20).rows == []
        assert_same_writer_serves(writer, pid)  # the watchdog left it alone
    finally:
        writer.close(timeout=10.0)


def test_a_statement_run_alone_past_its_deadline_is_not_applied(db_path: Path, gate: Gate) -> None:
    with testing.inject(solo_delay=1.0):
        writer = mpwriter.start(db_path, init=SCHEMA, context="fork", timeout=10.0)
    try:
        gate.hold(writer)
        late = writer.submit("PRAGMA foreign_keys=OFF", timeout=0.5)
        gate.release()
        with pytest.raises(mpwriter.Timeout):
            late.result(timeout=10)
        # Its deadline passed before its turn: it was not run after all.
        assert writer.execute("PRAGMA foreign_keys").rows == [(1,)]
    finally:
        writer.close(timeout=10.0)


# -- item 2: close() and SIGTERM deliver large replies ---------------------------

RETURNING_2000 = """
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
INSERT INTO items(payload) SELECT printf('%0500d', i) FROM n WHERE true
RETURNING id, payload
"""


@pytest.mark.parametrize("how", ["close", "sigterm"])
def test_stopping_delivers_every_committed_reply_whatever_its_size(db_path: Path, how: str) -> None:
    writer = mpwriter.start(db_path, init=SCHEMA, context="fork", timeout=10.0)
    try:
        pid = writer.stats()["pid"]
        future = writer.submit(RETURNING_2000)  # sent when submit returns
        if how == "close":
            writer.close(timeout=10.0)
        else:
            os.kill(pid, signal.SIGTERM)
        result = future.result(timeout=10)  # ~1 MB: many pipe-fulls
        assert len(result.rows) == 2000
        assert result.rows[-1][1] == f"{2000:0500d}"
    finally:
        writer.close(timeout=10.0)
    assert count_rows(db_path) == 2000


# -- item 3: a BaseException from call() fails that call alone --------------------


@pytest.mark.parametrize(
    "kind", ["SystemExit", "KeyboardInterrupt", "GeneratorExit", "CustomAbort"]
)
def test_a_base_exception_in_call_fails_that_call_alone(
    writer: mpwriter.Writer, db_path: Path, gate: Gate, kind: str
) -> None:
    pid = writer.stats()["pid"]
    gate.hold(writer)
    # A batch-mate queued behind the gate; the call most likely joins its batch.
    mate = writer.submit("INSERT INTO items(payload) VALUES ('batch-mate')")
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            writer.call(insert_then_raise, kind)
        except BaseException as exc:  # what the caller got, whatever it is
            outcome.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    gate.release()
    thread.join(10)
    assert mate.result(timeout=10).rowcount == 1
    (error,) = outcome
    assert isinstance(error, mpwriter.RemoteError), repr(error)
    assert kind in str(error)
    with mpwriter.reader(db_path) as conn:
        assert conn.execute("SELECT payload FROM items").fetchall() == [("batch-mate",)]
    assert_same_writer_serves(writer, pid)


# -- item 4: what the caller cannot rebuild fails before the COMMIT ----------------


def test_a_result_that_cannot_be_unpickled_fails_before_commit(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    with pytest.raises(mpwriter.NotPicklable, match="cannot be unpickled"):
        writer.call(insert_and_return_unrebuildable)
    assert count_rows(db_path) == 0  # rolled back, not committed


def test_an_exception_that_cannot_be_unpickled_arrives_as_remote_error(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    with pytest.raises(mpwriter.RemoteError, match="TwoArgumentError: first/second"):
        writer.call(insert_and_raise_two_argument_error)
    assert count_rows(db_path) == 0


class UnrebuildableText(str):
    """A str subclass whose pickle cannot be loaded: not the exact type the
    writer trusts to rebuild without checking."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (Unrebuildable, ())


def insert_and_return_unrebuildable_text(conn: sqlite3.Connection) -> str:
    conn.execute("INSERT INTO items(payload) VALUES ('unrebuildable text')")
    return UnrebuildableText("looks like text")


def test_a_str_subclass_result_is_still_checked_before_commit(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    with pytest.raises(mpwriter.NotPicklable, match="cannot be unpickled"):
        writer.call(insert_and_return_unrebuildable_text)
    assert count_rows(db_path) == 0


# -- item 5: the execution limit cannot be switched off by the code it limits -------


def test_a_call_with_its_own_alarm_handler_is_still_interrupted(
    limited: mpwriter.Writer, db_path: Path
) -> None:
    pid = limited.stats()["pid"]
    with pytest.raises(mpwriter.Interrupted):
        limited.call_with_timeout(5.0, spin_with_own_alarm_handler)
    # And the next runaway too: the limit was not switched off for good.
    with pytest.raises(mpwriter.Interrupted):
        limited.call_with_timeout(5.0, spin_with_own_alarm_handler)
    assert count_rows(db_path) == 0
    assert_same_writer_serves(limited, pid)


def test_a_call_that_cancels_the_timer_is_still_interrupted(
    limited: mpwriter.Writer, db_path: Path
) -> None:
    pid = limited.stats()["pid"]
    with pytest.raises(mpwriter.Interrupted):
        limited.call_with_timeout(5.0, cancel_timers_and_block)
    assert count_rows(db_path) == 0
    assert_same_writer_serves(limited, pid)


def test_an_overrun_swallowed_inside_an_sqlite_callback_is_still_interrupted(
    limited: mpwriter.Writer, db_path: Path
) -> None:
    with pytest.raises(mpwriter.Interrupted):
        limited.call_with_timeout(5.0, overrun_inside_a_callback, 1.0)
    assert count_rows(db_path) == 0  # not committed past its limit


def test_a_call_cannot_hand_the_connection_to_a_thread(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    outcome = writer.call(use_connection_from_a_thread)
    assert outcome.startswith("ProgrammingError"), outcome
    assert count_rows(db_path) == 0


# -- item 6: the writer's connection keeps its settings ---------------------------


@pytest.mark.parametrize(
    ("pragma", "reason"),
    [
        ("journal_mode=DELETE", "WAL"),
        ("journal_mode='truncate'", "WAL"),
        ("locking_mode=EXCLUSIVE", "reader"),
        ("main.locking_mode=exclusive", "reader"),
        ("synchronous=OFF", "durability"),
        ("busy_timeout=5000", "deadline"),
        ("query_only=1", "read-only"),
    ],
)
def test_settings_the_writer_depends_on_are_refused(
    writer: mpwriter.Writer, db_path: Path, pragma: str, reason: str
) -> None:
    with pytest.raises(mpwriter.StatementRefused, match=reason):
        writer.execute(f"PRAGMA {pragma}")
    writer.execute("INSERT INTO items(payload) VALUES ('after')")
    with mpwriter.reader(db_path) as conn:  # not "database is locked"
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (1,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_reading_a_setting_or_setting_wal_is_allowed(writer: mpwriter.Writer) -> None:
    assert writer.execute("PRAGMA journal_mode").rows == [("wal",)]
    assert writer.execute("PRAGMA journal_mode=WAL").rows == [("wal",)]
    assert writer.execute("PRAGMA locking_mode").rows == [("normal",)]


def test_connection_settings_a_call_changes_do_not_leak(writer: mpwriter.Writer) -> None:
    writer.call(set_row_factory)
    assert writer.call(read_rows) == [("text", 1)]  # plain tuples of str again
    writer.call(deny_everything)
    assert writer.execute("INSERT INTO items(payload) VALUES ('x')").rowcount == 1


def test_a_text_factory_set_by_init_reaches_the_caller_unchanged(db_path: Path) -> None:
    with mpwriter.start(db_path, init=schema_with_bytearray_text, context="fork") as writer:
        rows = writer.execute("SELECT 'text', x'00ff'").rows
        assert rows == [(bytearray(b"text"), b"\x00\xff")]
        assert type(rows[0][0]) is bytearray
        returned = writer.execute("INSERT INTO items(payload) VALUES ('x') RETURNING payload").rows
        assert [type(value) for (value,) in returned] == [bytearray]


def allow_everything_and_insert(conn: sqlite3.Connection) -> None:
    conn.set_authorizer(lambda *_args: sqlite3.SQLITE_OK)  # replaced, but nothing pinned changes
    conn.execute("INSERT INTO items(payload) VALUES ('allowed')")


def test_the_pinned_settings_are_read_whatever_text_factory_init_set(db_path: Path) -> None:
    """The check after a call() that replaced the authorizer reads the locking
    mode in SQL: with bytearray text, an unchanged one is not taken for a change."""
    with mpwriter.start(db_path, init=schema_with_bytearray_text, context="fork") as writer:
        writer.call(allow_everything_and_insert)
        with pytest.raises(mpwriter.StatementRefused, match="locking_mode"):
            writer.call(take_exclusive_lock_behind_the_authorizer)
        assert writer.execute("SELECT payload FROM items").rows == [(bytearray(b"allowed"),)]


def test_a_trace_callback_a_call_sets_ends_with_the_call(
    writer: mpwriter.Writer, tmp_path: Path
) -> None:
    traced = tmp_path / "trace.log"
    writer.call(trace_into, str(traced))
    writer.execute("INSERT INTO items(payload) VALUES ('after the call')")
    lines = traced.read_text()
    assert "traced" in lines  # the callback ran during the call
    assert "after the call" not in lines


def test_a_call_that_takes_an_exclusive_lock_is_refused_and_undone(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    with pytest.raises(mpwriter.StatementRefused, match="locking_mode"):
        writer.call(take_exclusive_lock_behind_the_authorizer)
    writer.execute("INSERT INTO items(payload) VALUES ('after')")
    with mpwriter.reader(db_path) as conn:
        assert conn.execute("SELECT payload FROM items").fetchall() == [("after",)]


def test_a_call_that_switches_transaction_handling_is_refused_and_undone(
    writer: mpwriter.Writer, db_path: Path
) -> None:
    with pytest.raises(mpwriter.StatementRefused, match="isolation_level"):
        writer.call(switch_transaction_handling)
    writer.executescript(
        "INSERT INTO items(payload) VALUES ('a'); INSERT INTO items(payload) VALUES ('b');"
    )
    assert count_rows(db_path) == 2


# -- item 10: what is dropped is counted ---------------------------------------------


def test_stats_count_what_bounded_holds_dropped(writer: mpwriter.Writer) -> None:
    stats = writer.stats()
    for key in (
        "dropped_partial_requests",
        "dropped_partial_request_bytes",
        "dropped_orphan_replies",
        "dropped_orphan_reply_bytes",
    ):
        assert stats[key] == 0


# -- item 10: large replies without quadratic copies; bounded holds -------------------


def test_a_large_reply_is_written_on_without_copying_what_is_left(tmp_path: Path) -> None:
    from mpwriter._wire.frames import PIPE_REGISTRATION, PIPE_TAG, Request

    read_end, write_end = os.pipe()
    with writer_inbox() as (inbox, outbox, side):
        try:
            socket.send_fds(side, [PIPE_REGISTRATION.pack(PIPE_TAG, 5, 1, 0)], [write_end])
            inbox.read_side_socket()
            reply = os.urandom(24 << 20)
            received = 0
            tracemalloc.start()
            try:
                outbox.send(Request(1, 5, 1, 1, b""), reply)
                while received < len(reply):
                    received += len(os.read(read_end, 1 << 20))
                    for fd in outbox.descriptors():  # as the writer's poll would
                        outbox.flush(fd)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            # Re-slicing what is left (data[written:]) would copy up to 24 MB at
            # each pipe-full: the peak shows at least one such copy.
            assert peak < 4 << 20, peak
            assert received == len(reply)
        finally:
            os.close(read_end)
            os.close(write_end)


def test_a_re_registration_awaiting_a_request_the_session_holds_is_not_declared_lost() -> None:
    from mpwriter._wire.frames import PIPE_REGISTRATION, PIPE_TAG

    pipes = [os.pipe(), os.pipe()]
    with writer_inbox() as (inbox, _, side):
        try:
            # As the writer's session sets it while it holds a request of slot 1
            # (its first, a queued one, its carried COMMIT): it answers that one.
            inbox.session_slot = (5, 1)
            for slot, (read_end, write_end) in enumerate(pipes, 1):
                os.set_blocking(read_end, False)
                socket.send_fds(side, [PIPE_REGISTRATION.pack(PIPE_TAG, 5, slot, 7)], [write_end])
            inbox.read_side_socket()
            inbox.report_lost()
            with pytest.raises(BlockingIOError):
                os.read(pipes[0][0], 1 << 16)  # not answered here too
            assert os.read(pipes[1][0], 1 << 16)  # slot 2, held by nobody: declared lost
        finally:
            for read_end, write_end in pipes:
                os.close(read_end)
                os.close(write_end)


def test_orphan_replies_are_bounded_in_bytes_and_drops_counted() -> None:
    from mpwriter._wire.frames import Request

    with writer_inbox(orphan_bytes_max=1000) as (inbox, outbox, _):
        for sender in (1, 2, 3):  # no pipe registered: each reply is an orphan
            outbox.send(Request(1, sender, 1, 1, b""), b"x" * 600)
            inbox.route_unrouted()
        assert outbox.dropped_orphans == 2
        assert outbox.dropped_orphan_bytes == 1200


def test_handed_over_payloads_are_bounded_in_bytes_and_drops_counted() -> None:
    from mpwriter._wire.frames import PAYLOAD_HANDOVER, PAYLOAD_TAG

    with writer_inbox(handed_over_bytes_max=1000) as (inbox, _, side):
        for request_id in (1, 2, 3):
            fd = os.memfd_create("payload")
            os.write(fd, b"p" * 600)
            socket.send_fds(side, [PAYLOAD_HANDOVER.pack(PAYLOAD_TAG, 9, request_id, 600)], [fd])
            os.close(fd)
        inbox.read_side_socket()
        held = inbox.handovers
        assert held.dropped == 2
        assert held.dropped_bytes == 1200
        assert held.take_payload((9, 1)) is None  # dropped: answered "not applied"
        assert held.take_payload((9, 3)) == b"p" * 600  # the newest is kept


class EqualToAnything:
    """A signal handler that claims to equal every object, SIG_IGN included."""

    def __call__(self, _signum: int, _frame: object) -> None:
        pass

    def __eq__(self, _other: object) -> bool:
        return True

    def __ne__(self, _other: object) -> bool:
        return False

    __hash__ = object.__hash__


def leave_signal_state_behind(conn: sqlite3.Connection) -> None:
    """Leaves a SIGALRM handler, a pending timer, a kick handler and a mask."""
    signal.signal(signal.SIGALRM, EqualToAnything())
    signal.setitimer(signal.ITIMER_REAL, 100.0)
    signal.signal(signal.SIGURG, EqualToAnything())
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})


def report_signal_state(conn: sqlite3.Connection) -> tuple[bool, float, bool, bool]:
    from mpwriter._writer.call_limit import ignore_kick

    return (
        signal.getsignal(signal.SIGALRM) is signal.SIG_IGN,
        signal.getitimer(signal.ITIMER_REAL)[0],
        signal.getsignal(signal.SIGURG) is ignore_kick,
        signal.SIGUSR1 in signal.pthread_sigmask(signal.SIG_BLOCK, ()),
    )


def test_signal_state_a_call_leaves_is_put_back_before_the_next(
    writer: mpwriter.Writer,
) -> None:
    writer.call(leave_signal_state_behind)
    alarm_ignored, timer_left, kick_handler_ours, usr1_blocked = writer.call(report_signal_state)
    assert alarm_ignored
    assert timer_left == 0.0
    assert kick_handler_ours
    assert not usr1_blocked


def block_the_kick_signal(conn: sqlite3.Connection) -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGURG})


def test_a_signal_mask_a_call_leaves_does_not_disable_the_next_limit(
    limited: mpwriter.Writer, db_path: Path
) -> None:
    limited.call(block_the_kick_signal)
    with pytest.raises(mpwriter.Interrupted):
        limited.call_with_timeout(5.0, cancel_timers_and_block)  # blocked, sleeping in the writer
    assert count_rows(db_path) == 0


def catch_interruptions_then_return(conn: sqlite3.Connection, times: int) -> str:
    """Catches the interruption (even as BaseException) and runs on, twice."""
    conn.execute("INSERT INTO items(payload) VALUES ('stubborn')")
    caught = 0
    while caught < times:
        try:
            while True:
                time.sleep(0.01)  # sleep-ok: the runaway the limit must stop
        except BaseException:
            caught += 1
    return "done"


def test_a_call_that_catches_the_interruption_is_interrupted_again_and_rolled_back(
    limited: mpwriter.Writer, db_path: Path
) -> None:
    pid = limited.stats()["pid"]
    with pytest.raises(mpwriter.Interrupted):
        limited.call_with_timeout(5.0, catch_interruptions_then_return, 2)
    assert count_rows(db_path) == 0
    assert_same_writer_serves(limited, pid)
